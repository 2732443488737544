"""The lesson's §4 proof, for real: its hand-written loop, our reference and PyTorch agree.

The lesson draws a random (2, 2, 2, 2) input, normalises it channel by channel with NumPy,
updates running statistics with momentum 0.1 (population variance to normalise, sample variance
for the running one) and prints the result beside ``nn.BatchNorm2d``'s. :func:`prove` does the
same for training, then evaluates the same input in eval mode with the running statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import reference

EPS = 1e-5
MOMENTUM = 0.1


def lesson_batch_norm(feature, statistic_mean, statistic_var):
    """The lesson's hand-written per-channel loop (§4 of the tour), returning instead of
    printing and copying its inputs."""
    feature = np.array(feature, dtype=np.float64)
    statistic_mean = list(statistic_mean)
    statistic_var = list(statistic_var)
    for i in range(feature.shape[1]):
        channel = feature[:, i, :, :]
        mean = channel.mean()
        std_1 = channel.std()  # population standard deviation
        std_t2 = channel.std(ddof=1)  # sample standard deviation
        feature[:, i, :, :] = (channel - mean) / np.sqrt(std_1**2 + EPS)
        statistic_mean[i] = statistic_mean[i] * 0.9 + mean * 0.1
        statistic_var[i] = statistic_var[i] * 0.9 + (std_t2**2) * 0.1
    return feature, np.array(statistic_mean), np.array(statistic_var)


def lesson_eval(feature, statistic_mean, statistic_var):
    """Eval mode written the lesson's way: each channel with the running statistics."""
    feature = np.array(feature, dtype=np.float64)
    for i in range(feature.shape[1]):
        feature[:, i] = (feature[:, i] - statistic_mean[i]) / np.sqrt(statistic_var[i] + EPS)
    return feature


@dataclass
class ProofRow:
    """One quantity computed by every implementation, and their largest disagreement."""

    mode: str  # "train" or "eval"
    quantity: str  # "output", "running_mean", "running_var"
    values: dict[str, np.ndarray]  # implementation -> flattened float64 values

    @property
    def max_diff(self) -> float:
        arrays = list(self.values.values())
        return max(float(np.max(np.abs(a - arrays[0]), initial=0.0)) for a in arrays)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "quantity": self.quantity,
            "values": {k: v.tolist() for k, v in self.values.items()},
            "max_diff": self.max_diff,
        }


@dataclass
class Proof:
    """The proof table: rows for training then evaluation, and the input they used."""

    input: np.ndarray
    rows: list[ProofRow] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max(row.max_diff for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "input": self.input.tolist(),
            "rows": [row.to_dict() for row in self.rows],
            "max_diff": self.max_diff,
        }


def prove(seed: int = 0, extra: dict | None = None) -> Proof:
    """Run the lesson's loop, ``reference`` and ``torch.nn.BatchNorm2d`` on one random input.

    Args:
        seed: seeds the (2, 2, 2, 2) standard-normal input. Default: 0
        extra: more implementations to add as columns, ``name -> factory``; a factory returns a
            fresh module with BatchNorm2d's interface (e.g. ``batchnorm.BatchNorm2d``).
            Default: None

    All values are compared in float32, as the lesson's tensor is float32.
    """
    import torch

    x = np.random.default_rng(seed).standard_normal((2, 2, 2, 2)).astype(np.float32)
    proof = Proof(input=x)
    factories = {"torch": torch.nn.BatchNorm2d, **(extra or {})}

    lesson_y, lesson_mean, lesson_var = lesson_batch_norm(x, [0.0, 0.0], [1.0, 1.0])
    ref_y, state = reference.forward(
        x, None, None, np.zeros(2, np.float32), np.ones(2, np.float32),
        training=True, momentum=MOMENTUM, eps=EPS,
    )
    train = {"output": {"lesson loop": lesson_y, "reference": ref_y},
             "running_mean": {"lesson loop": lesson_mean, "reference": state.running_mean},
             "running_var": {"lesson loop": lesson_var, "reference": state.running_var}}
    modules = {}
    for name, factory in factories.items():
        bn = factory(2, eps=EPS, momentum=MOMENTUM)
        with torch.no_grad():
            out = bn(torch.from_numpy(x.copy()))
        train["output"][name] = out.numpy()
        train["running_mean"][name] = bn.running_mean.numpy()
        train["running_var"][name] = bn.running_var.numpy()
        modules[name] = bn

    ref_eval, _ = reference.forward(
        x, None, None, state.running_mean, state.running_var, training=False, eps=EPS
    )
    evaluation = {"lesson loop": lesson_eval(x, lesson_mean, lesson_var), "reference": ref_eval}
    for name, bn in modules.items():
        bn.eval()
        with torch.no_grad():
            evaluation[name] = bn(torch.from_numpy(x.copy())).numpy()

    def row(mode, quantity, values):
        flat = {k: np.asarray(v, dtype=np.float32).astype(np.float64).ravel()
                for k, v in values.items()}
        return ProofRow(mode, quantity, flat)

    for quantity, values in train.items():
        proof.rows.append(row("train", quantity, values))
    proof.rows.append(row("eval", "output", evaluation))
    return proof


def render(proof: Proof, console=None) -> None:
    """Print the proof as rich tables: every value side by side, then the max difference."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for row in proof.rows:
        names = list(row.values)
        title = f"{row.mode}: {row.quantity}  (max difference {row.max_diff:.2e})"
        table = Table(title=title, title_justify="left")
        table.add_column("#", justify="right", style="dim")
        for name in names:
            table.add_column(name, justify="right")
        table.add_column("max |diff|", justify="right")
        for i in range(len(row.values[names[0]])):
            vals = [row.values[n][i] for n in names]
            table.add_row(str(i), *(f"{v: .6f}" for v in vals), f"{max(vals) - min(vals):.1e}")
        console.print(table)
    console.print(
        f"Largest difference anywhere: {proof.max_diff:.2e}  "
        "(training normalises with the batch's biased variance and stores the unbiased one; "
        "eval normalises with the running statistics)"
    )
