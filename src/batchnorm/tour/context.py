"""What the demo's sections share: settings, data, output folder, progress, trained models."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Dataset
from .training import MAX_TEST


@dataclass(frozen=True)
class Settings:
    """The demo's knobs; ``quick`` shrinks every training run for tests."""

    seed: int = 0
    quick: bool = False
    steps: int = 400  # training steps of each network in sections 1 and 5
    lr: float = 0.05  # SGD learning rate (momentum 0.9) of those runs
    batch_size: int = 64
    sweep_rates: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    sweep_steps: int = 300
    latency_repeats: int = 30

    @classmethod
    def make(cls, seed: int, quick: bool) -> "Settings":
        if quick:
            return cls(seed=seed, quick=True, steps=40, sweep_rates=(0.03, 0.3, 3.0),
                       sweep_steps=20, latency_repeats=5)
        return cls(seed=seed)

    def not_reached(self) -> str:
        """A target no run reached: "never", or in a quick run, that the run was too short."""
        return f"not within {self.steps} steps (quick run)" if self.quick else "never"

    def none_worked(self) -> str:
        """No learning rate worked: "none", or in a quick run, that the runs were too short."""
        return f"none within {self.sweep_steps} steps (quick run)" if self.quick else "none"

    QUICK_NOTE = ("Quick run (--quick): every training run is a few dozen steps, too short to "
                  "show what BN does to training speed and usable learning rates; run without "
                  "--quick for the full tour.")

    def to_dict(self) -> dict:
        return {
            "seed": self.seed, "quick": self.quick, "steps": self.steps, "lr": self.lr,
            "momentum": 0.9, "batch_size": self.batch_size, "sweep_rates": list(self.sweep_rates),
            "sweep_steps": self.sweep_steps, "latency_repeats": self.latency_repeats,
        }


@dataclass
class Context:
    settings: Settings
    data: Dataset
    out: Path
    progress: object  # rich.progress.Progress
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # placement -> trained model
    curves: dict = field(default_factory=dict)  # placement -> training.Curves

    @property
    def eval_every(self) -> int:
        """Evaluate every step on images the size of the digits; less often on larger ones,
        so that evaluation costs about what it costs on the digits (449 test images, 8x8)."""
        n_test = min(len(self.data.y_test), MAX_TEST)
        pixels = int(np.prod(self.data.image_shape))
        return max(1, round(n_test * pixels / (449 * 64)))

    def task(self, description: str, total: int):
        """A progress-bar task, as the ``(progress, task_id)`` pair training.train advances."""
        return self.progress, self.progress.add_task(description, total=total)

    def done(self, task) -> None:
        progress, task_id = task
        total = next(t.total for t in progress.tasks if t.id == task_id)
        progress.update(task_id, completed=total)
