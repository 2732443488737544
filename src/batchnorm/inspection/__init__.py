"""``inspect``: every BN layer of a model in one table, and what is wrong with where it sits.

The layer table counts what BN adds to a model (2·C learnable parameters with affine=True; the
running statistics are buffers, not parameters); the findings check the order of the layers
around each BN (Conv → BN → act is the order that trains well and folds), the biases a BN makes
useless, where ``fold`` will put each BN, and the state that breaks training or inference
(train mode at inference, eps, momentum, batch size 1).

    report.py   Report, Finding, LayerRow: what inspect returns
    rules.py    the rules, one function per finding, and each finding's message and fix
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import expected
from ..folding import plan_folds
from ..graph import class_name, is_foldable_producer, trace
from ..probe import as_args, capture
from ..protocol import is_batchnorm
from .report import Finding, LayerRow, Report, _row
from .rules import (  # noqa: F401
    FP16_TINY,
    LAG_WEIGHT,
    MESSAGES,
    RULES,
    SEVERITY,
    SLOW_MOMENTUM,
    Hit,
    Layer,
    Model,
    findings,
)

__all__ = ["inspect", "Report", "Finding", "LayerRow"]


def inspect(model: nn.Module, example_input=None, *, mode: str = "auto") -> Report:
    r"""Every BN-like layer of ``model``, totals, and findings about placement and state.

    Layers: PyTorch's BatchNorm*, SyncBatchNorm, ours, frozen BN and duck-typed BN
    (``num_features``, ``eps``, ``running_mean``, ``running_var``). Learnable parameters are
    :math:`2C` with ``affine=True`` and 0 otherwise; the running statistics are buffers.

    Findings (``Report.findings``, each with layer names and a one-line fix): ``conv-bn-act``
    (fine), ``act-before-bn`` (Conv → act → BN), ``pre-activation`` (BN → act → Conv: fine, but
    folds only as a frozen affine), ``fold-pieces`` (input is a channel concatenation of
    conv/linear outputs: ``fold`` splits the BN into them; the message names the channels from
    anything else, which stay a frozen affine), ``fold-forward`` (input from
    elsewhere, output straight into a Linear or a conv that does not pad with zeros: ``fold``
    folds it forward), ``no-producer`` (input is not a conv/linear and no such consumer: the
    model's input, an add, a pooling...), ``shared-output`` (the conv output has other users, so
    BN cannot fold), ``unverified-pair`` (conv then BN in module order on a graph fx could not
    trace), ``no-running-stats`` (batch statistics in eval too: nothing folds),
    ``redundant-bias`` (a conv/linear bias feeding BN, directly or through a channel
    concatenation, with the parameters wasted),
    ``train-mode``, ``eps-zero``, ``eps-underflow-fp16`` (float16 buffers with 0 < eps < 2^-24),
    ``frozen-params-train-mode`` (parameters frozen, module in train mode: the statistics still
    move), ``slow-momentum`` (a momentum below 0.01 with which, after the batches seen, the
    initial running statistics still weigh over 5%), ``cumulative-momentum`` (momentum=None
    while training), ``ddp-broadcast-buffers`` (the model passed is a
    ``DistributedDataParallel`` with ``broadcast_buffers=True``), ``channel-mismatch`` and, with
    ``example_input``, ``one-value-per-channel`` (the batch size at which training breaks).

    A traced TorchScript module (``torch.jit.trace``) keeps the BN tensors but none of their
    attributes (``num_features``, ``eps``, ``momentum``): such layers cannot be listed, and
    ``Report.warning`` says how many there are. Scripted modules (``torch.jit.script``) keep
    them and are listed.

    BN in train mode at inference: with ``mode="auto"`` a BN is flagged when it is in train
    mode while the model itself is in eval mode (someone called ``.train()`` on a part);
    ``mode="inference"`` flags every BN in train mode; ``mode="training"`` flags none.

    Where a BN goes when folded is ``fold``'s own plan (:func:`batchnorm.folding.plan_folds`), so
    the folding findings say what ``fold`` does. The graph comes from ``torch.fx``; when
    tracing fails, module order stands in for it and ``Report.warning`` says the findings are
    approximate. The model is not changed (shapes come from a forward pass on an eval-mode
    copy).

    Args:
        model: any ``nn.Module``.
        example_input: tensor or tuple of tensors, to learn each BN's input shape. Default: None
        mode: ``"auto"``, ``"inference"`` or ``"training"``. Default: ``"auto"``

    >>> report = batchnorm.inspect(model, torch.randn(2, 3, 32, 32))
    >>> print(report); report.to_dict()["totals"]["bn_params"]
    """
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    if mode not in ("auto", "inference", "training"):
        raise expected('mode "auto", "inference" or "training"', repr(mode))
    graph = trace(model)
    seen = _seen_shapes(model, example_input) if example_input is not None else {}
    modules = dict(model.named_modules())  # get_submodule fails on TorchScript
    # where fold would put each BN (fold takes no TorchScript, so neither does this)
    folds = {} if isinstance(model, torch.jit.ScriptModule) else {
        plan.name: plan for plan in plan_folds(model, graph, seen)}
    report = Report(approximate=graph.approximate, warning=_join(graph.warning,
                                                                 _traced_bn_warning(model)))
    context = Model(model, graph, seen, mode, modules)
    hits: list[Hit] = []
    for name, bn in modules.items():
        if not is_batchnorm(bn):
            continue
        sites = graph.calls(name)
        site = sites[0] if sites else None
        report.layers.append(_row(name, bn, site.producer if site is not None else None))
        rec = seen.get(name)
        layer = Layer(name, bn, site, folds.get(name),
                      tuple(rec[0][0].shape) if rec and rec[0] else None,
                      getattr(bn, "running_mean", None) is None
                      or getattr(bn, "running_var", None) is None)
        hits += [hit for rule in RULES for hit in rule(context, layer)]

    report.findings = findings(hits)
    codes = [h.code for h in hits]
    bn_params = sum(r.params for r in report.layers)
    model_params = sum(p.numel() for p in model.parameters())
    report.totals = {
        "bn_layers": len(report.layers),
        "bn_params": bn_params,
        "bn_buffers": sum(r.buffers for r in report.layers),
        "model_params": model_params,
        "bn_param_share": bn_params / model_params if model_params else 0.0,
        "foldable": sum(codes.count(c) for c in ("conv-bn-act", "fold-pieces", "fold-forward")),
        "wasted_bias_params": sum(h.params for h in hits if h.code == "redundant-bias"),
    }
    return report


def _join(*warnings: str | None) -> str | None:
    return "; ".join(w for w in warnings if w) or None


def _traced_bn_warning(model: nn.Module) -> str | None:
    """The warning for BN layers of a traced TorchScript module, which keep no attributes."""
    if not isinstance(model, torch.jit.ScriptModule):
        return None
    traced = [name for name, m in model.named_modules() if not is_batchnorm(m)
              and "BatchNorm" in class_name(m) and hasattr(m, "running_mean")]
    if not traced:
        return None
    return (f"{len(traced)} BN layers ({', '.join(traced[:3])}"
            f"{', ...' if len(traced) > 3 else ''}) "
            "come from torch.jit.trace, which keeps their tensors but not num_features, eps or "
            "momentum, so they are not listed; inspect the Python model, or a torch.jit.script "
            "one")


def _seen_shapes(model: nn.Module, example_input) -> dict[str, tuple]:
    """``((input,), output)`` of every BN and conv/linear on one eval-mode forward pass of a
    copy of ``model``, as meta tensors: the shapes, no data."""
    args = as_args(example_input)
    records, _ = capture(copy.deepcopy(model).eval(), args,
                         lambda m: is_batchnorm(m) or is_foldable_producer(m), _as_meta)
    return records


def _as_meta(inputs: tuple, output) -> tuple[tuple, object]:
    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    first = inputs[:1] if inputs and isinstance(inputs[0], torch.Tensor) else ()
    return (tuple(meta(t) for t in first),
            meta(output) if isinstance(output, torch.Tensor) else output)

