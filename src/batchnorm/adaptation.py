"""``adapt``: test-time adaptation of a model's BN layers to the data it now meets (AdaBN, TENT).

A model trained on one distribution and tested on a shifted one (another camera, lighting,
inverted contrast) often keeps working weights but stale BN statistics. Two classic remedies,
both touching only the BN layers:

- **AdaBN** (Li et al. 2016): re-estimate every BN's running statistics on the target data,
  here with :func:`batchnorm.recalibrate`'s exact estimator. Nothing is trained.
- **TENT** (Wang et al. 2021): normalise with each test batch's own statistics and train only
  the BN layers' affine parameters to minimise the entropy of the model's predictions, a few
  Adam steps per batch.

Data with NaN/Inf in a BN layer's input is refused by default, or skipped (``nonfinite``).
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .conversion import convert
from .errors import expected
from .layers import _OurBatchNorm
from .probe import Skips, batch_arguments, check_data_arguments, nonfinite_guard
from .progress import progress_bar
from .protocol import is_batchnorm
from .recalibration import recalibrate

__all__ = ["adapt", "METHODS"]

METHODS = ("adabn", "tent")


def adapt(
    model: nn.Module,
    data: Iterable,
    method: str = "adabn",
    *,
    steps: int = 1,
    lr: float = 1e-3,
    batches: int | None = None,
    progress: bool = True,
    input_fn: Callable | None = None,
    nonfinite: str = "raise",
) -> nn.Module:
    r"""An adapted copy of ``model`` for the distribution of ``data``; ``model`` is untouched.

    - ``method="adabn"``: the copy's BN running statistics become those of ``data``
      (:func:`batchnorm.recalibrate`, ``estimator="exact"``); it is returned in eval mode and
      keeps its module classes.
    - ``method="tent"``: the copy's BN layers become ours (:func:`batchnorm.convert`) with
      ``eval_stats="batch"``, so in eval they normalise with each batch's own statistics,
      gradients flowing through them. For each batch of ``data`` the copy (in eval mode) takes
      ``steps`` Adam steps on the BN layers' ``weight`` and ``bias`` only, minimising the mean
      entropy of its softmax predictions,

      .. math::
          H = -\frac{1}{N}\sum_{i}\sum_{k} p_{ik} \log p_{ik}, \qquad p_i = \mathrm{softmax}(f(x_i))

      Every other parameter stays bitwise as it was, and the running statistics are never
      touched. The returned model keeps ``eval_stats="batch"`` (TENT predicts with the test
      batch's statistics); set a layer's ``eval_stats = "running"`` to undo that.

    A batch with NaN or Inf in a BN's input is refused with ``nonfinite="raise"`` (the default):
    a BatchNormError names the first such layer and batch. With ``nonfinite="skip"`` AdaBN
    leaves it out of that layer's statistics (as :func:`batchnorm.recalibrate` does) and TENT
    takes no step on it (a step trains every BN at once); either warns once with the batches
    left out per layer, and a layer (AdaBN) or the whole run (TENT) left with no batch is an
    error.

    Args:
        model: a classifier whose output is ``(N, classes)`` logits (for TENT), with BN layers.
        data: an iterable of batches, as :func:`batchnorm.recalibrate` takes them (labels, if
            present, are never read).
        method: "adabn" or "tent". Default: "adabn"
        steps: TENT's Adam steps per batch. Default: 1
        lr: TENT's Adam learning rate. Default: 1e-3
        batches: use at most this many batches. Default: None (all)
        progress: show a progress bar. Default: True
        input_fn: ``batch -> input``, as in :func:`batchnorm.recalibrate`. Default: None
        nonfinite: "raise" or "skip", what a batch with NaN/Inf in a BN's input does (see
            above). Default: "raise"

    Returns:
        the adapted copy, in eval mode.

    Raises:
        BatchNormError: bad arguments, a model without BN layers, NaN/Inf data (see
            ``nonfinite``), or (TENT) a model whose output is not ``(N, classes)`` logits or
            not finite; ``model`` is unchanged either way.

    >>> adapted = batchnorm.adapt(model, target_loader, method="tent", steps=1)
    """
    check_data_arguments(model, data, batches, input_fn)
    if method not in METHODS:
        raise expected(f"method in {METHODS}", repr(method))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise expected("steps to be a positive integer", repr(steps))
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise expected("lr > 0", repr(lr))
    skips = Skips(nonfinite)
    if not any(is_batchnorm(m) for m in model.modules()):
        raise expected("a model with BN layers to adapt", f"{type(model).__name__} without any")
    if method == "adabn":
        adapted, report = recalibrate(copy.deepcopy(model), data, batches=batches,
                                      progress=progress, input_fn=input_fn, estimator="exact",
                                      nonfinite=nonfinite, report=True)
        skips.batches = report.skipped_batches
        adapted.eval()
    else:
        adapted = _tent(model, data, steps, float(lr), batches, progress, input_fn, skips)
    skips.warn()
    return adapted


def _tent(model, data, steps, lr, batches, progress, input_fn, skips) -> nn.Module:
    adapted = convert(model, to="batchnorm").eval()
    guarded = {name: m for name, m in adapted.named_modules() if isinstance(m, _OurBatchNorm)}
    layers = list({id(m): m for m in guarded.values()}.values())
    for m in layers:
        m.eval_stats = "batch"
    affine = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    if not affine:
        raise expected("BN layers with affine parameters for TENT to train",
                       "affine=False everywhere")
    flags = [(p, p.requires_grad) for p in adapted.parameters()]
    device = affine[0].device
    total = batches if batches is not None or not hasattr(data, "__len__") else len(data)
    iterator = iter(data) if batches is None else itertools.islice(data, batches)
    try:
        for p in adapted.parameters():
            p.requires_grad_(False)
        for p in affine:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(affine, lr=lr)
        kept = 0
        with progress_bar(progress, total, "adapting BN (TENT)") as advance, \
                nonfinite_guard(guarded, skips):
            for skips.batch, batch in enumerate(iterator, 1):
                args, kwargs = batch_arguments(batch, input_fn, device)
                for _ in range(steps):
                    loss = _entropy(adapted(*args, **kwargs))
                    if skips.of(skips.batch):  # NaN/Inf in a BN's input: no step on it
                        break
                    if not torch.isfinite(loss):
                        raise expected(f"a finite entropy on batch {skips.batch} of data",
                                       "NaN/Inf, with finite inputs to every BN layer: the "
                                       "model's output is not finite")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                else:
                    kept += 1
                advance()
        if skips.batches and not kept:
            raise expected("at least one batch with finite values in every BN layer's input "
                           "for TENT", f"NaN/Inf in all {skips.batch} batches; "
                           "nonfinite='skip' left them all out")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return adapted


def _entropy(logits) -> torch.Tensor:
    """Mean entropy of the softmax of (N, classes) logits."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise expected("a model whose output is (N, classes) logits for TENT", got)
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()
