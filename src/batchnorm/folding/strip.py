"""``strip_bias``: remove the conv/linear biases that a BN after them cancels."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..graph import trace
from ..probe import as_args, capture, training_flags_kept
from ..protocol import is_batchnorm
from .plan import _captured_module, _check_model, bias_producers
from .report import StripReport


def strip_bias(model: nn.Module, example_input=None, *, report: bool = False):
    r"""A new model without the conv/linear biases that BN cancels.

    BN subtracts the batch mean, so a bias ``b`` added just before it changes nothing in
    training: the mean moves by ``b`` and is subtracted again. In eval BN subtracts
    ``running_mean``, so the bias is moved there: ``running_mean -= b``. Eval outputs are
    unchanged up to float rounding (1e-6 relative), and so are training outputs and later
    running-statistic updates. Only biases whose output feeds one BN and nothing else go: the
    layer before the BN, or the layers whose outputs a channel concatenation joins before it
    (each bias is a constant on its own slice of the BN's channels).

    Args:
        model: any ``nn.Module``; it is not changed.
        example_input: optional tensor (or tuple) used to learn shapes: a Linear whose output
            is not 2D keeps its bias. Default: None
        report: also return a :class:`StripReport` (keyword only). Default: False

    Returns:
        the new model (same training mode as ``model``, nothing attached); with
        ``report=True`` the pair ``(model, StripReport)`` (``.parameters_saved``).

    >>> lean, report = batchnorm.strip_bias(model, report=True)
    >>> report.parameters_saved
    """
    _check_model(model)
    stripped = copy.deepcopy(model)
    graph = trace(stripped)
    captured = {}
    args = as_args(example_input)
    if args is not None:
        with training_flags_kept(stripped):
            stripped.eval()
            captured, _ = capture(stripped, args, _captured_module)
    summary = StripReport(warning=graph.warning)
    with torch.no_grad():
        for name, bn in stripped.named_modules():
            if not is_batchnorm(bn):
                continue
            for producer, channels in bias_producers(stripped, graph, name, bn, captured):
                layer = stripped.get_submodule(producer)
                if layer.bias is None:
                    continue
                if getattr(bn, "running_mean", None) is not None:
                    # a view of the producer's channels: their mean absorbs the bias
                    bn.running_mean[channels].sub_(layer.bias.detach().to(bn.running_mean.dtype))
                summary.layers.append((producer, name, layer.bias.numel()))
                layer.bias = None
    return (stripped, summary) if report else stripped

