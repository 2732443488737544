"""One small, deterministic training loop shared by every section that trains.

Same seed -> same initial weights (``torch.manual_seed``) and the same mini-batches (a NumPy
``Generator``), so two networks trained with one seed see identical data in identical order.
:func:`deterministic` pins torch to one thread with deterministic algorithms while the tour runs.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import Dataset

PERCENTILES = (15, 50, 85)
# Largest number of test images evaluated at every step, and of pre-activation values whose
# percentiles are taken: enough for stable curves, few enough to evaluate at every step.
MAX_TEST = 1000
MAX_PROBE_VALUES = 20000



def task_progress(console):
    """The tour's progress display: one bar per task, with its count and elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def as_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of ``data`` as tensors, the images float32."""
    return (torch.from_numpy(data.x_train).float(), torch.from_numpy(data.y_train),
            torch.from_numpy(data.x_test).float(), torch.from_numpy(data.y_test))

@contextlib.contextmanager
def deterministic():
    """One thread, deterministic algorithms; restores the previous settings on exit."""
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)


@dataclass
class Curves:
    """What one training run recorded: per-step loss, and per-evaluation accuracy/percentiles."""

    name: str
    lr: float
    loss: list[float] = field(default_factory=list)  # training loss at steps 1..len(loss)
    eval_steps: list[int] = field(default_factory=list)  # 0 = before training
    test_acc: list[float] = field(default_factory=list)
    percentiles: list[list[float]] = field(default_factory=list)  # per eval: [p15, p50, p85]
    diverged_at: int | None = None  # first step whose loss was not finite

    @property
    def final_test_acc(self) -> float | None:
        return None if self.diverged_at is not None else self.test_acc[-1]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lr": self.lr,
            "loss": [round(v, 6) for v in self.loss],
            "eval_steps": self.eval_steps,
            "test_acc": [round(v, 6) for v in self.test_acc],
            "percentiles": {f"p{p}": [round(row[i], 6) for row in self.percentiles]
                            for i, p in enumerate(PERCENTILES)},
            "diverged_at": self.diverged_at,
            "final_test_acc": self.final_test_acc,
            "final_loss": (round(self.loss[-1], 6)
                           if self.loss and self.diverged_at is None else None),
        }


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Indices of ``steps`` mini-batches: reshuffled each epoch by a NumPy Generator."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def probe_selection(model: nn.Module, data: Dataset, seed: int) -> torch.Tensor | None:
    """Fixed positions in the flattened probe output on the test images, for percentiles."""
    n_test = min(len(data.y_test), MAX_TEST)
    with torch.no_grad():
        shape = _probe_output(model, torch.from_numpy(data.x_test[:1])).shape
    per_image = int(np.prod(shape[1:]))
    total = n_test * per_image
    if total <= MAX_PROBE_VALUES:
        return None
    rng = np.random.default_rng(seed + 1)
    return torch.from_numpy(np.sort(rng.choice(total, MAX_PROBE_VALUES, replace=False)))


def _probe_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.probe.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        model(x)
    finally:
        handle.remove()
    return captured["out"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probe_unit: int | None,
             selection: torch.Tensor | None) -> tuple[float, list[float]]:
    """Test accuracy and the probe's 15/50/85th percentiles, in eval mode (running statistics)."""
    captured = {}
    handle = model.probe.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
        model.train(was_training)
    acc = float((logits.argmax(1) == y).double().mean())
    pre = captured["out"]
    values = pre[:, probe_unit] if probe_unit is not None else pre.reshape(-1)
    if probe_unit is None and selection is not None:
        values = values[selection]
    q = torch.quantile(values.double().reshape(-1), torch.tensor([p / 100 for p in PERCENTILES],
                                                                  dtype=torch.float64))
    return acc, [float(v) for v in q]


def train(model: nn.Module, data: Dataset, *, name: str, steps: int, lr: float, seed: int,
          batch_size: int = 64, eval_every: int = 1, probe_unit: int | None = None,
          momentum: float = 0.9, progress=None) -> Curves:
    """Train with SGD on cross-entropy; record loss every step, test accuracy and the probe's
    percentiles before training and every ``eval_every`` steps (and at the last step).

    Stops early, recording ``diverged_at``, the first time the loss is not finite.
    ``progress`` is a ``(rich.progress.Progress, task_id)`` pair to advance, or None.
    """
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    n_test = min(len(data.y_test), MAX_TEST)
    x_test = torch.from_numpy(data.x_test[:n_test])
    y_test = torch.from_numpy(data.y_test[:n_test])
    selection = probe_selection(model, data, seed) if probe_unit is None else None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    curves = Curves(name=name, lr=lr)

    def record(step: int) -> None:
        acc, pct = evaluate(model, x_test, y_test, probe_unit, selection)
        curves.eval_steps.append(step)
        curves.test_acc.append(acc)
        curves.percentiles.append(pct)

    model.train()
    record(0)
    for step, idx in enumerate(batches(len(y_train), batch_size, steps, seed), start=1):
        idx_t = torch.from_numpy(idx)
        loss = loss_fn(model(x_train[idx_t]), y_train[idx_t])
        value = float(loss.detach())
        if not math.isfinite(value):
            curves.diverged_at = step
            if progress is not None:
                progress[0].update(progress[1], completed=steps)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves.loss.append(value)
        if step % eval_every == 0 or step == steps:
            record(step)
        if progress is not None:
            progress[0].advance(progress[1])
    return curves
