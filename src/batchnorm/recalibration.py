"""``recalibrate``: re-estimate every BN's running statistics from data.

After weight averaging (SWA), pruning or a change of domain, the running statistics no longer
describe the activations the weights produce. ``recalibrate`` runs the data through the model
once in train mode and sets each BN's running statistics to those of every value it saw
(``estimator="exact"``: one Chan merge of the per-batch moments), or to the plain average of
the per-batch statistics (``estimator="average"``, what PyTorch's ``update_bn`` computes).
A batch with NaN/Inf in a BN's input is refused, or left out of that BN's statistics
(``nonfinite``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import sync
from .collectives import RECALIBRATE, Link, group_world, layer_key
from .errors import expected
from .ops.moments import Moments, merge, merge_parts
from .probe import (
    NonFiniteBatch,
    Skips,
    batch_arguments,
    check_data_arguments,
    failed_on,
    nonfinite_guard,
    training_flags_kept,
)
from .progress import progress_bar
from .protocol import bn_kind, is_batchnorm

__all__ = ["recalibrate", "RecalibrationReport", "ESTIMATORS"]

ESTIMATORS = ("exact", "average")


def recalibrate(
    model: nn.Module,
    data: Iterable,
    *,
    batches: int | None = None,
    progress: bool = True,
    input_fn: Callable | None = None,
    process_group=None,
    drop_last: bool = True,
    report: bool = False,
    estimator: str = "exact",
    nonfinite: str = "raise",
):
    r"""Recompute the running statistics of every BN in ``model`` from ``data``.

    The model runs once over the batches in train mode under ``torch.no_grad()`` (each BN
    normalising with its batch's statistics, as in training, so every layer sees the inputs it
    sees in training). Then, for each BN, over all the values x it saw in the B batches:

    - ``estimator="exact"`` (default): the mean and the unbiased variance of all of them,

      .. math::
          \text{running\_mean} = \frac{1}{n}\sum x, \qquad
          \text{running\_var} = \frac{1}{n - 1}\sum (x - \text{running\_mean})^2

      exactly what BN computes on the concatenation of the batches' inputs: the per-batch
      ``(count, mean, M2)`` are merged with Chan's formula, so batches of unequal size weigh by
      their size and the spread between the batch means is counted.
    - ``estimator="average"``: the plain average of the per-batch statistics,
      :math:`\frac{1}{B}\sum_b \mathrm{E}_b[x]` and
      :math:`\frac{1}{B}\sum_b \mathrm{Var}^{\text{unbiased}}_b[x]`, equal to PyTorch's
      ``torch.optim.swa_utils.update_bn`` (each batch weighs the same; the variance of the
      batch means is left out, so it underestimates the population variance when batches
      differ).

    fvcore's precise BN offers both: its default averages the batch variances (our "average");
    its population estimator adds the spread of the batch means through a running mean of
    ``E[x^2]``, i.e. ``E[x^2] - E[x]^2`` (population variance = mean of batch variances +
    variance of batch means, weighted by batch size), which loses digits to cancellation where
    the mean is large against the spread. "exact" is that population variance computed from
    deviations (Chan), never from ``E[x^2]``.

    A batch with NaN or Inf in a BN's input (so that its statistics there are not finite: over
    the positions its ``mask`` counts, for ours) is refused with ``nonfinite="raise"`` (the
    default): a BatchNormError names the first such layer (its qualified module name) and batch,
    and nothing changes. With ``nonfinite="skip"`` that batch is left out of that layer's
    statistics only (the rule of the layers' own ``nonfinite="skip"``; the layers it did not
    poison keep it), the report lists the batches left out per layer, and a call without
    ``report=True`` warns once; a layer left with no batch at all is an error, never NaN.

    ``num_batches_tracked`` becomes B, the batches run (with "average": the batches each layer
    kept). Momenta, the training flag and our layers' own ``nonfinite`` of every module are
    restored afterwards; if anything fails (or ``data`` is empty) the running statistics are
    restored too, so a failed call changes nothing. Frozen BN, BN without running statistics
    and (with "exact") a BN no batch reached are left as they were, and the report says which.

    Args:
        model: the model; changed in place and returned.
        data: an iterable of batches: tensors, tuples/lists (the first element is the input) or
            dicts (key ``input``, ``inputs``, ``x``, ``image``, ``images`` or ``pixel_values``).
        batches: use at most this many batches. Default: None (all)
        progress: show a progress bar. Default: True
        input_fn: ``batch -> input``, when the default choice is wrong. A tuple it returns is
            passed as positional arguments, a dict as keyword arguments. Default: None
        process_group: a ``torch.distributed`` process group (``dist.group.WORLD`` for all
            ranks) whose ranks each pass their own ``data``: every rank runs its batches
            locally (SyncBatchNorm layers do not synchronise per batch, so ranks may hold
            different numbers of batches, even none), then one all-reduce averages each
            layer's statistics over all batches of all ranks, weighted by batch count. Every
            rank ends with identical running statistics, equal to one process recalibrating
            on all the ranks' batches. Every rank of the group must call ``recalibrate``.
            Default: None (this process's data only)
        drop_last: skip a last batch of a single sample (97 samples in batches of 32 leave one):
            BN in train mode cannot normalise one value per channel, and one sample has no
            spread to measure. The report counts the samples skipped. Default: True
        report: also return a :class:`RecalibrationReport` (batches and samples used, samples
            skipped, layers left alone, batches left out per layer). Default: False
        estimator: "exact" or "average" (see above). Default: "exact"
        nonfinite: what a batch with NaN/Inf in a BN's input does: "raise" (refuse the data)
            or "skip" (leave it out of that layer's statistics, see above). Default: "raise"

    Returns:
        ``model``, or ``(model, RecalibrationReport)`` with ``report=True``.

    Raises:
        BatchNormError: bad arguments, no batches, a model that fails on a batch ("expected
            a model that runs on batch 3 of data of shape ..."), NaN/Inf in a BN's input
            ("... in the input of 'layer1.0.bn1' on batch 2 of data ...") with "raise", or a
            layer whose every batch was left out with "skip"; the running statistics are then
            as they were.

    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    >>> batchnorm.recalibrate(swa_model, loader, batches=100)
    """
    check_data_arguments(model, data, batches, input_fn)
    if estimator not in ESTIMATORS:
        raise expected(f"estimator in {ESTIMATORS}", repr(estimator))
    skips = Skips(nonfinite)
    summary = RecalibrationReport(estimator=estimator, nonfinite=nonfinite)
    names = {}
    for name, m in model.named_modules():
        if not is_batchnorm(m) or id(m) in names:
            continue
        names[id(m)] = name or type(m).__name__
        if bn_kind(m) == "frozen":
            summary.skipped_layers.append((names[id(m)], "frozen: fixed statistics"))
        elif getattr(m, "running_mean", None) is None:
            summary.skipped_layers.append((names[id(m)], "no running statistics "
                                           "(track_running_stats=False)"))
    layers = [m for m in model.modules() if is_batchnorm(m) and bn_kind(m) != "frozen"
              and getattr(m, "running_mean", None) is not None]
    layers = list({id(m): m for m in layers}.values())  # a layer used twice counts once
    if not layers:
        return (model, summary) if report else model

    momenta = [(m, m.momentum) for m in layers]
    saved = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in layers]
    partials: dict[int, list] = {id(m): [] for m in layers}
    # every BN's input checked for NaN/Inf, and (exact) its moments collected, batch by batch
    guarded = {names[id(m)]: m for m in layers}
    collect = {names[id(m)]: partials[id(m)] for m in layers} if estimator == "exact" else None
    with training_flags_kept(model), nonfinite_guard(guarded, skips, collect):
        try:
            for m in layers:
                _reset(m)
                m.momentum = None
            model.train()
            if process_group is None:
                _accumulate(model, data, batches, input_fn, progress, drop_last, summary, skips)
                if summary.batches == 0:
                    skipped = f" ({summary.skipped_samples} skipped)" if summary.skipped_samples \
                        else ""
                    raise expected("at least one batch in data", f"no batches{skipped}")
            else:  # a rank without batches still joins the merge; it raises if no rank had any
                with sync.local_only(model):
                    _accumulate(model, data, batches, input_fn, progress, drop_last, summary,
                                skips)
                if estimator == "average":
                    _merge_running_stats(layers, process_group)
            if estimator == "exact":
                merged = _merge_partials(layers, partials, process_group, summary)
                _set_exact(layers, merged, saved, names, summary, skips)
            else:
                _check_kept(layers, names, skips, process_group)
        except BaseException:
            _restore(layers, saved)
            raise
        finally:
            for m, momentum in momenta:
                m.momentum = momentum
    summary.skipped_batches = skips.batches
    if not report:
        skips.warn()
    return (model, summary) if report else model


def _check_kept(layers, names, skips, process_group) -> None:
    """("average") A layer that left out every batch it saw has no statistics: an error. With a
    process group, a batch kept on any rank counts (the merged num_batches_tracked)."""
    for m in layers:
        name = names[id(m)]
        if name not in skips.batches:
            continue
        nbt = getattr(m, "num_batches_tracked", None)
        kept = int(nbt) if process_group is not None and nbt is not None \
            else skips.kept.get(name, 0)
        if kept == 0:
            raise skips.none_left(name)


def _merge_partials(layers, partials, process_group, summary):
    """Each layer's ``(count, mean, M2)`` over every batch (of every rank of the group)."""
    merged = []
    for m in layers:
        parts = partials[id(m)]
        c = m.num_features
        if parts:
            merged.append(merge_parts(parts))
        else:
            zeros = torch.zeros(c, dtype=torch.float64, device=m.running_mean.device)
            merged.append(Moments(zeros.new_zeros(()), zeros, zeros.clone()))
    group, world = group_world(process_group)
    if process_group is None or world == 1:
        return merged
    payload = torch.cat([torch.cat([n.reshape(1), mean, m2]) for n, mean, m2 in merged]
                        + [torch.tensor([float(summary.batches)], dtype=torch.float64,
                                        device=merged[0][1].device)])
    link = Link(group, world, "recalibrate", layer_key("recalibrate"))
    rows = link.gather(payload, RECALIBRATE, len(layers), sum(m.num_features for m in layers))
    out, i = [], 0
    for m in layers:
        c = m.num_features
        block = rows[:, i:i + 1 + 2 * c]
        out.append(merge(block[:, 0], block[:, 1:1 + c], block[:, 1 + c:]))
        i += 1 + 2 * c
    summary.batches_all_ranks = int(rows[:, i].sum())
    if summary.batches_all_ranks == 0:
        raise expected("at least one batch on some rank", "no batches on any rank")
    return out


@torch.no_grad()
def _set_exact(layers, merged, saved, names, summary, skips) -> None:
    """running_mean / running_var = mean / M2 / (n - 1) of all the values each layer kept."""
    batches = summary.batches_all_ranks if summary.batches_all_ranks is not None \
        else summary.batches
    for m, (n, mean, m2), buffers in zip(layers, merged, saved):
        n = float(n)
        if n == 0 and names[id(m)] in skips.batches:  # every batch it saw was left out
            raise skips.none_left(names[id(m)])
        if n == 0:  # no batch reached it (a branch the data never takes): as it was
            for k, v in buffers.items():
                m._buffers[k].copy_(v)
            summary.skipped_layers.append((names[id(m)], "no batch reached it"))
            continue
        if n < 2:
            raise expected(f"at least 2 values per channel for {names[id(m)]}",
                           f"{int(n)} value")
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))
        if getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(batches)


@torch.no_grad()
def _restore(layers, saved) -> None:
    for m, buffers in zip(layers, saved):
        for k, v in buffers.items():
            m._buffers[k].copy_(v)


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` ran: batches and samples used (this rank's), samples skipped
    (drop_last), the estimator, the BN layers left as they were with the reason, and
    (``nonfinite="skip"``) the batches, numbered from 1, each layer left out for NaN/Inf."""

    batches: int = 0
    samples: int = 0
    skipped_samples: int = 0
    estimator: str = "exact"
    skipped_layers: list = field(default_factory=list)  # (name, why) per layer left alone
    batches_all_ranks: int | None = None  # with a process group
    nonfinite: str = "raise"
    skipped_batches: dict = field(default_factory=dict)  # layer name -> [batch, ...]

    def to_dict(self) -> dict:
        out = dict(vars(self))
        out["skipped_layers"] = [{"layer": n, "why": w} for n, w in self.skipped_layers]
        out["skipped_batches"] = {n: list(b) for n, b in self.skipped_batches.items()}
        return out


def _reset(bn: nn.Module) -> None:
    if callable(getattr(bn, "reset_running_stats", None)):
        bn.reset_running_stats()
        return
    with torch.no_grad():  # duck-typed BN without the method
        bn.running_mean.zero_()
        bn.running_var.fill_(1)
        if getattr(bn, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.zero_()


def _accumulate(model: nn.Module, data: Iterable, batches: int | None, input_fn, progress: bool,
                drop_last: bool, summary: "RecalibrationReport", skips: Skips) -> None:
    """Run every batch through ``model`` (train mode, no grad), counting them in ``summary``.

    With momentum None each BN's own update keeps the cumulative average, so the per-layer
    accumulation is the forward pass itself. A batch is run once the next one is known, so that
    a last batch of one sample can be skipped (``drop_last``).
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    total = batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    elif total is not None and hasattr(data, "__len__"):
        total = min(total, len(data))
    iterator = iter(data) if batches is None else itertools.islice(data, batches)
    with torch.no_grad(), progress_bar(progress, total, "recalibrating BN") as advance:
        pending = next(iterator, _END)
        while pending is not _END:
            batch, pending = pending, next(iterator, _END)
            args, kwargs = batch_arguments(batch, input_fn, device)
            n = _samples(args, kwargs)
            if drop_last and pending is _END and n == 1:
                summary.skipped_samples += 1
                advance()
                break
            skips.batch = summary.batches + 1
            try:
                model(*args, **kwargs)
            except NonFiniteBatch:
                raise
            except Exception as exc:
                raise failed_on(tuple(args) + tuple(kwargs.values()), exc,
                                f"batch {summary.batches + 1} of data") from exc
            summary.batches += 1
            summary.samples += n or 0
            advance()


_END = object()


def _samples(args: tuple, kwargs: dict) -> int | None:
    """The batch size: dim 0 of the first tensor argument (None without one)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


# ------------------------------------------------------------------------------------------------
# across ranks


@torch.no_grad()
def _merge_running_stats(layers: list[nn.Module], process_group) -> None:
    """Average each layer's running statistics over ranks, weighted by ``num_batches_tracked``.

    After a recalibration pass with ``momentum=None``, rank r's ``running_mean`` is the average of
    its B_r per-batch means (likewise ``running_var``). The average over every rank's batches is

        running = sum_r B_r * running_r / sum_r B_r,      num_batches_tracked = sum_r B_r

    which is what one process recalibrating on all the batches computes. All layers travel in
    ONE all-reduce, with a check header, so every rank ends with identical statistics. Layers
    that no rank saw a batch for keep their values. Raises BatchNormError when the ranks hold
    different layers, or when no rank saw any batch.
    """
    group, world = group_world(process_group)
    if world == 1:
        return
    if not layers:
        dev = torch.device("cpu")
    else:
        dev = layers[0].running_mean.device
    parts = []
    for m in layers:
        b = _batches_seen(m)
        parts += [m.running_mean.to(torch.float64) * b, m.running_var.to(torch.float64) * b,
                  torch.tensor([b], dtype=torch.float64, device=dev)]
    payload = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=dev)
    link = Link(group, world, "recalibrate", layer_key("recalibrate"))
    channels = sum(m.num_features for m in layers)
    total = link.all_reduce(payload, RECALIBRATE, len(layers), channels)
    i, seen = 0, 0.0
    for m in layers:
        c = m.num_features
        mean_sum, var_sum, b = total[i:i + c], total[i + c:i + 2 * c], float(total[i + 2 * c])
        i += 2 * c + 1
        seen = max(seen, b)
        if b > 0:
            m.running_mean.copy_(mean_sum / b)
            m.running_var.copy_(var_sum / b)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(int(b))
    if layers and seen == 0:
        raise expected("at least one batch on some rank", "no batches on any rank")


def _batches_seen(m: nn.Module) -> float:
    nbt = getattr(m, "num_batches_tracked", None)
    return 0.0 if nbt is None else float(nbt)
