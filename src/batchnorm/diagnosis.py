"""``diagnose``: do a model's BN running statistics still describe the data it meets?

For each BN layer with running statistics, on the user's data, without changing the model:

- **drift**: the statistics the layer sees (its inputs' mean and unbiased variance over every
  batch, in a train-mode pass of a copy, the pass :func:`batchnorm.recalibrate` makes) against
  its running ones, per channel: the mean shift in running standard deviations,
  ``(mean - running_mean) / sqrt(running_var + eps)``, and the log variance ratio,
  ``log((var + eps) / (running_var + eps))``; summarised per layer by the median magnitude over
  the channels (unsigned: opposite shifts must not cancel) and the worst channel (largest
  magnitude, signed: it says which way);
- **effect**: how much the model's output moves when this layer alone normalises with the
  batch statistics instead of its running ones (the rest in eval): the relative RMS difference
  ``||y_layer - y_eval|| / ||y_eval||`` over the batches.

A layer **drifts** when its worst channel's mean shift is at least ``SHIFT`` (1 running
standard deviation) or its worst log variance ratio at least ``LOG_RATIO`` (log 2: a variance
off by 2x either way), or when its effect is at least ``EFFECT`` (5%) with a median channel
shifted by ``MILD`` (0.1) or more in either measure. The effect alone does not make a layer
drift: a BN after a drifting one also moves the output when switched to batch statistics (it
renormalises what the drifting layer shifted), while its own statistics describe the data.
Non-finite running statistics always drift. The table is sorted by effect, so the layers that
matter most come first.

Data with NaN/Inf in a BN's input is refused, or left out (``nonfinite``): of that layer's
statistics, and of every effect (the output of such a batch is not finite).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .console import render_text
from .errors import expected
from .layers import _OurBatchNorm
from .ops.moments import merge_parts
from .probe import (
    NonFiniteBatch,
    Skips,
    batch_arguments,
    check_data_arguments,
    failed_on,
    nonfinite_guard,
    tensor_leaves,
)
from .progress import progress_bar
from .protocol import bn_kind, is_batchnorm

__all__ = ["diagnose", "Diagnosis", "LayerDrift", "EFFECT", "SHIFT", "LOG_RATIO", "MILD"]

EFFECT = 0.05
SHIFT = 1.0
LOG_RATIO = math.log(2.0)
MILD = 0.1


@dataclass
class LayerDrift:
    """One BN layer's drift: per-channel summaries and the output effect."""

    name: str
    channels: int
    shift_median: float  # median over channels of |mean shift| (running std): unsigned
    shift_worst: float  # the mean shift of the channel of largest magnitude: signed
    log_ratio_median: float  # median over channels of |log variance ratio|: unsigned
    log_ratio_worst: float  # the log variance ratio of the channel of largest magnitude: signed
    effect: float  # relative RMS output change with this layer on batch statistics
    drifts: bool
    shift: list = field(default_factory=list, repr=False)  # per channel, signed
    log_ratio: list = field(default_factory=list, repr=False)


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: one :class:`LayerDrift` per layer, sorted by effect
    (largest first); ``order`` holds the names in network order; ``skipped_batches`` the
    batches (numbered from 1) each layer left out for NaN/Inf (``nonfinite="skip"``), and
    ``effect_batches`` how many batches, finite at every layer, the effects were measured on.
    ``print(diagnosis)`` shows the table and the verdict; ``to_dict()`` is JSON-ready."""

    layers: list[LayerDrift]
    order: list[str]
    batches: int
    samples: int
    skipped_layers: list = field(default_factory=list)  # (name, why)
    skipped_batches: dict = field(default_factory=dict)  # name -> [batch, ...]
    effect_batches: int | None = None  # None: all of them

    @property
    def drifting(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.drifts]

    @property
    def verdict(self) -> str:
        if not self.drifting:
            return "running statistics describe this data"
        return "recalibrate: layers " + ", ".join(self.drifting) + " drift"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "drifting": self.drifting, "batches": self.batches,
                "samples": self.samples, "thresholds": {"effect": EFFECT, "shift": SHIFT,
                                                        "log_ratio": LOG_RATIO, "mild": MILD},
                "layers": [asdict(layer) for layer in self.layers],
                "order": self.order,
                "skipped_layers": [{"layer": n, "why": w} for n, w in self.skipped_layers],
                "skipped_batches": {n: list(b) for n, b in self.skipped_batches.items()},
                "effect_batches": self.batches if self.effect_batches is None
                else self.effect_batches}

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="BN drift, largest output effect first", title_justify="left")
        for col in ("layer", "C", "mean shift\nmedian |·| / worst", "log var ratio\nmedian |·| / "
                    "worst", "effect", "drifts"):
            table.add_column(col, justify="left" if col == "layer" else "right",
                             overflow="fold")
        for r in self.layers:
            table.add_row(r.name, str(r.channels), f"{r.shift_median:.3f} / {r.shift_worst:+.3f}",
                          f"{r.log_ratio_median:.3f} / {r.log_ratio_worst:+.3f}",
                          f"{r.effect:.2%}", "[red]yes[/]" if r.drifts else "no")
        colour = "yellow" if self.drifting else "green"
        parts = [table, *(f"[dim]{line}[/]" for line in _NOTES), f"[{colour}]{self.verdict}[/]"]
        for name, why in self.skipped_layers:
            parts.append(f"not diagnosed: {name} ({why})")
        for name, numbers in self.skipped_batches.items():
            which = ("batch " if len(numbers) == 1 else "batches ") + ", ".join(map(str, numbers))
            parts.append(f"left out of {name}'s statistics: {which} (NaN/Inf in its input)")
        if self.effect_batches is not None and self.effect_batches < self.batches:
            parts.append(f"effects measured on the {self.effect_batches} of {self.batches} "
                         "batches finite at every layer")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)

    def plot(self, ax_shift, ax_effect) -> None:
        """Drift and effect per layer, in network order, on two matplotlib axes."""
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        by_name = {layer.name: layer for layer in self.layers}
        rows = [by_name[name] for name in self.order]
        xs = range(len(rows))
        ax_shift.bar([x - 0.2 for x in xs], [abs(r.shift_worst) for r in rows], 0.4,
                     label="|mean shift|, worst channel (running std)")
        ax_shift.bar([x + 0.2 for x in xs], [abs(r.log_ratio_worst) for r in rows], 0.4,
                     label="|log variance ratio|, worst channel")
        ax_shift.axhline(SHIFT, color="C0", linestyle=":", linewidth=1,
                         label=f"shift threshold: {SHIFT:g} std")
        ax_shift.axhline(LOG_RATIO, color="C1", linestyle=":", linewidth=1,
                         label="ratio threshold: log 2 (2x)")
        ax_shift.set_title("statistics seen vs running statistics")
        ax_shift.legend(fontsize=8)
        ax_effect.bar(list(xs), [100 * r.effect for r in rows],
                      color=["C3" if r.drifts else "C2" for r in rows])
        ax_effect.axhline(100 * EFFECT, color="k", linestyle=":", linewidth=1)
        ax_effect.set_title("output change with this layer on batch statistics (%)")
        ax_effect.legend(handles=[
            Patch(color="C3", label="drifts"), Patch(color="C2", label="does not drift"),
            Line2D([], [], color="k", linestyle=":", linewidth=1,
                   label=f"threshold: {EFFECT:.0%} (with a median >= {MILD:g})")], fontsize=8)
        for ax in (ax_shift, ax_effect):
            ax.set_xticks(list(xs), [r.name for r in rows], rotation=60, ha="right", fontsize=7)
            ax.set_xlabel("BN layer, network order")


# under the table: what the columns hold (read with the module docstring)
_NOTES = (
    "mean shift (running std), log var ratio: median |·| over the channels / the worst "
    "channel, signed",
    "effect: output change with this layer alone on its batch statistics (the rest on running "
    "ones); it includes drift inherited from the layers before it, so a layer after a drifting "
    "one can have a large effect and not drift",
)


def diagnose(
    model: nn.Module,
    data: Iterable,
    *,
    batches: int | None = 8,
    progress: bool = True,
    input_fn: Callable | None = None,
    nonfinite: str = "raise",
) -> Diagnosis:
    """How far each BN's running statistics are from those of ``data``, and what that does to
    the output (see the module docstring for the measures and thresholds). The model is not
    changed: every pass runs on copies.

    Args:
        model: any ``nn.Module`` with BN layers.
        data: an iterable of batches, as :func:`batchnorm.recalibrate` takes them.
        batches: use at most this many batches (each layer's effect costs one pass over them).
            Default: 8
        progress: show a progress bar. Default: True
        input_fn: ``batch -> input``, as in :func:`batchnorm.recalibrate`. Default: None
        nonfinite: what a batch with NaN/Inf in a BN's input (in the train-mode pass) does:
            "raise" refuses the data, naming the first such layer and batch; "skip" leaves the
            batch out of that layer's statistics and out of every effect, and the
            :class:`Diagnosis` lists it. Default: "raise"

    Returns:
        a :class:`Diagnosis`; its ``verdict`` says "running statistics describe this data" or
        which layers to recalibrate (``batchnorm.recalibrate(model, data)``).

    Raises:
        BatchNormError: bad arguments, no batches, no BN layer with running statistics, a
            model that fails on the data, NaN/Inf data with "raise", or with "skip" a layer
            (or the effects) left with no batch.

    >>> print(batchnorm.diagnose(model, val_loader, batches=4))
    """
    check_data_arguments(model, data, batches, input_fn)
    skips = Skips(nonfinite)
    names, skipped = [], []
    for name, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        if bn_kind(m) == "frozen":
            skipped.append((name, "frozen: no batch statistics to compare"))
        elif getattr(m, "running_mean", None) is None:
            skipped.append((name, "no running statistics"))
        elif name not in names:
            names.append(name)
    if not names:
        raise expected("a model with BN layers that keep running statistics",
                       f"{type(model).__name__} without any")
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    chosen = list(data) if batches is None else list(itertools.islice(data, batches))
    calls = [batch_arguments(b, input_fn, device) for b in chosen]
    if not calls:
        raise expected("at least one batch in data", "no batches")
    total = 1 + len(names)
    with progress_bar(progress, total * len(calls), "diagnosing BN") as advance, torch.no_grad():
        seen = _seen_moments(model, names, calls, advance, skips)
        clean = [k for k in range(len(calls)) if not skips.of(k + 1)]
        if not clean:
            raise expected("at least one batch with finite values in every BN layer's input, "
                           "to measure the effects", f"NaN/Inf in all {len(calls)} batches: "
                           + skips.summary())
        effects = _effects(model, names, calls, clean, advance)
    layers = [_drift(name, model.get_submodule(name), seen[name], effects[name])
              for name in names]
    layers.sort(key=lambda layer: -_largest_first(layer.effect))
    samples = sum(int(tensor_leaves(args)[0].shape[0]) if tensor_leaves(args) else 0
                  for args, _ in calls)
    return Diagnosis(layers, names, len(calls), samples, skipped, skips.batches,
                     None if len(clean) == len(calls) else len(clean))


def _largest_first(effect: float) -> float:
    """A NaN effect (running statistics not finite) sorts before every number."""
    return math.inf if math.isnan(effect) else effect


def _seen_moments(model, names, calls, advance, skips) -> dict:
    """Each layer's float64 (count, mean, M2) over the batches it kept, from a train-mode
    copy."""
    probe = copy.deepcopy(model).train()
    partials = {name: [] for name in names}
    with nonfinite_guard({name: probe.get_submodule(name) for name in names}, skips, partials):
        for k, (args, kwargs) in enumerate(calls):
            skips.batch = k + 1
            _run(probe, args, kwargs, k)
            advance()
    out = {}
    for name, parts in partials.items():
        if not parts and name in skips.batches:
            raise skips.none_left(name)
        if not parts:
            raise expected(f"data that reaches every BN layer (got none for {name!r})",
                           "a branch the data never takes")
        out[name] = merge_parts(parts)
    return out


def _effects(model, names, calls, clean, advance) -> dict:
    """Relative RMS output change with each layer alone on batch statistics (eval otherwise),
    over the batches ``clean`` (indices into ``calls``)."""
    base = copy.deepcopy(model).eval()
    reference = {i: tensor_leaves(_run(base, *calls[i], i)) for i in clean}
    norm = math.sqrt(sum(float(t.double().square().sum()) for ts in reference.values()
                         for t in ts))
    out = {}
    for name in names:
        layer = base.get_submodule(name)
        restore = _on_batch_statistics(layer)
        try:
            diff = 0.0
            for i, (args, kwargs) in enumerate(calls):
                if i in reference:
                    got = tensor_leaves(_run(base, args, kwargs, i))
                    diff += sum(float((g.double() - w.double()).square().sum())
                                for g, w in zip(got, reference[i]))
                advance()
        finally:
            restore()
        out[name] = math.sqrt(diff) / norm if norm > 0 else math.sqrt(diff)
    return out


def _on_batch_statistics(layer: nn.Module) -> Callable[[], None]:
    """Make one BN of an eval-mode copy normalise with batch statistics, updating nothing;
    returns the undo."""
    if isinstance(layer, _OurBatchNorm):
        before = layer.eval_stats
        layer.eval_stats = "batch"

        def undo():
            layer.eval_stats = before
    else:  # PyTorch's: train mode with momentum 0 leaves the running statistics as they are
        momentum, tracked = layer.momentum, getattr(layer, "num_batches_tracked", None)
        nbt = None if tracked is None else tracked.clone()
        layer.train()
        layer.momentum = 0.0

        def undo():
            layer.eval()
            layer.momentum = momentum
            if nbt is not None:
                layer.num_batches_tracked.copy_(nbt)
    return undo


def _run(model, args, kwargs, k):
    try:
        return model(*args, **kwargs)
    except NonFiniteBatch:
        raise
    except Exception as exc:
        raise failed_on(tuple(args) + tuple(kwargs.values()), exc, f"batch {k + 1} of data") \
            from exc


def _drift(name, bn, stats, effect) -> LayerDrift:
    n, mean, m2 = stats
    n = float(n)
    var = m2 / max(n - 1.0, 1.0)
    rm = bn.running_mean.detach().to(torch.float64)
    rv = bn.running_var.detach().to(torch.float64)
    shift = (mean - rm) / torch.sqrt(rv + bn.eps)
    log_ratio = torch.log((var + bn.eps) / (rv + bn.eps))

    def worst(t):  # a non-finite channel (running statistics NaN/Inf) is the worst
        bad = (~torch.isfinite(t)).nonzero()
        return float(t[bad[0, 0] if len(bad) else t.abs().argmax()])

    shift_worst, ratio_worst = worst(shift), worst(log_ratio)
    shift_median, ratio_median = float(shift.abs().median()), float(log_ratio.abs().median())
    # written as "not within the thresholds" so that a NaN measure drifts
    drifts = (not (abs(shift_worst) < SHIFT and abs(ratio_worst) < LOG_RATIO)
              or (effect >= EFFECT and max(shift_median, ratio_median) >= MILD))
    return LayerDrift(name, int(bn.num_features), shift_median, shift_worst, ratio_median,
                      ratio_worst, float(effect), drifts, shift.tolist(), log_ratio.tolist())
