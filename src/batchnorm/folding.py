"""Fold BN into the conv/linear before it, or strip the bias BN makes useless.

At inference BN is a fixed per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is the
output of a conv or linear layer (and nothing else reads it), the map folds into that layer:

    W' = W * s            (per output channel)
    b' = (b - running_mean) * s + beta

``fold_weights`` is that statement as pure tensor math; ``fold`` finds the pairs on the model's
graph (``batchnorm.graph``) and rewrites a copy; ``strip_bias`` removes a bias that BN cancels.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from .console import render_text
from .errors import expected
from .graph import ModelGraph, is_foldable_producer, out_channels, trace
from .probe import as_args, capture, max_error, training_flags_kept
from .protocol import (
    FAMILIES,
    UNKNOWN_ACTIVATION,
    activation_of,
    bn_kind,
    is_batchnorm,
    rank_key,
)

__all__ = ["fold_weights", "fold", "strip_bias", "FoldReport", "LayerFold", "StripReport"]


# --------------------------------------------------------------------------- the math


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an eval-mode BN into the weight and bias of the conv or linear layer before it.

    .. math::
        W' = W \cdot \frac{\gamma}{\sqrt{\mathrm{Var} + \epsilon}}, \qquad
        b' = (b - \mathrm{E}) \cdot \frac{\gamma}{\sqrt{\mathrm{Var} + \epsilon}} + \beta

    per output channel. The per-channel factor and the bias are computed in float64; the
    weight is multiplied by the factor once, in its own dtype (one rounding per element). The
    output channel is dim 0 of a conv or linear weight; for a transposed conv it is dim 1 within
    each of the ``groups`` blocks of dim 0 (output channel ``o = g * C_out/groups + j``).

    Args:
        weight: conv weight ``(C_out, C_in/groups, *k)``, linear weight ``(C_out, C_in)``, or
            transposed conv weight ``(C_in, C_out/groups, *k)``.
        bias: the layer's bias ``(C_out,)``, or None for none.
        running_mean, running_var: BN statistics ``(C_out,)``.
        eps: BN's eps.
        gamma, beta: BN's weight and bias, or None when ``affine=False``. Default: None
        transposed: ``weight`` belongs to a ConvTranspose. Default: False
        groups: groups of the transposed conv (ignored otherwise). Default: 1

    Returns:
        ``(weight', bias')``, new tensors; the inputs are not changed.

    >>> conv, bn = nn.Conv2d(3, 8, 3).eval(), nn.BatchNorm2d(8).eval()
    >>> w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
    ...                     bn.weight, bn.bias)
    """
    return _fold_weights(weight, bias, running_mean, running_var, eps, gamma, beta,
                         transposed=transposed, groups=groups, in_place=False)


def _fold_weights(weight, bias, running_mean, running_var, eps, gamma, beta, *, transposed,
                  groups, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_weights; with ``in_place`` a contiguous weight is scaled in place, not copied
    (fold() scales its private copy of the model: no second copy of every weight)."""
    c = running_mean.numel()
    if transposed:
        if weight.dim() < 2 or weight.shape[0] % groups or weight.shape[1] * groups != c:
            raise expected(
                f"a transposed conv weight with {c} output channels in {groups} groups",
                f"weight of shape {tuple(weight.shape)}",
            )
    elif weight.dim() < 2 or weight.shape[0] != c:
        raise expected(
            f"a weight with {c} output channels on dim 0", f"weight of shape {tuple(weight.shape)}"
        )
    for what, t in (("bias", bias), ("running_var", running_var), ("gamma", gamma), ("beta", beta)):
        if t is not None and t.numel() != c:
            raise expected(f"{what} with {c} elements", f"{t.numel()}")
    f64 = torch.float64
    scale = torch.rsqrt(running_var.detach().to(f64) + float(eps))
    if gamma is not None:
        scale = scale * gamma.detach().to(f64)
    b = (
        bias.detach().to(f64)
        if bias is not None
        else torch.zeros(c, dtype=f64, device=weight.device)
    )
    new_bias = (b - running_mean.detach().to(f64)) * scale
    if beta is not None:
        new_bias = new_bias + beta.detach().to(f64)
    w = weight.detach()
    if not (in_place and w.is_contiguous()):
        w = w.clone(memory_format=torch.contiguous_format)
    factor = scale.to(w.dtype)
    spatial = (1,) * (w.dim() - 2)
    if transposed:
        # (C_in, C_out/groups, *k) -> (groups, C_in/groups, C_out/groups, *k), a view of w
        blocks = w.view(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        blocks.mul_(factor.reshape(groups, 1, w.shape[1], *spatial))
    else:
        w.mul_(factor.reshape(c, 1, *spatial))
    return w, new_bias.to(weight.dtype)


# --------------------------------------------------------------------------- reports


@dataclass
class LayerFold:
    """What ``fold`` did with one BN layer.

    ``action`` is ``"folded"`` (into ``into``), ``"frozen"`` (now a fixed per-channel affine) or
    ``"kept"``; errors are measured on ``example_input`` (None without one): ``max_error`` is
    the largest absolute difference of this layer's output, fed the original layer's input,
    ``rel_error`` that divided by the largest absolute output.
    """

    name: str
    action: str
    into: str | None = None
    reason: str = ""
    max_error: float | None = None
    rel_error: float | None = None


@dataclass
class FoldReport:
    """Per-layer record of a ``fold`` call, plus the whole model's error on the example input."""

    layers: list[LayerFold] = field(default_factory=list)
    max_error: float | None = None
    rel_error: float | None = None
    warning: str | None = None

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    def to_dict(self) -> dict:
        return {
            "folded": self.count("folded"),
            "frozen": self.count("frozen"),
            "kept": self.count("kept"),
            "max_error": self.max_error,
            "rel_error": self.rel_error,
            "warning": self.warning,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="fold: what happened to each BN", title_justify="left")
        for col in ("layer", "action", "into", "max error", "why"):
            table.add_column(col, overflow="fold")
        for r in self.layers:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            table.add_row(r.name, r.action, r.into or "-", err, r.reason)
        summary = (
            f"{self.count('folded')} folded, {self.count('frozen')} frozen, "
            f"{self.count('kept')} kept"
        )
        if self.max_error is not None:
            summary += (
                f"; model output max error {self.max_error:.2e} (relative {self.rel_error:.2e})"
            )
        parts = [table, summary]
        if self.warning:
            parts.append(f"[yellow]warning:[/] {self.warning}")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)


@dataclass
class StripReport:
    """What ``strip_bias`` removed: ``(producer, bn, parameters)`` per layer, and the total."""

    layers: list[tuple[str, str, int]] = field(default_factory=list)
    warning: str | None = None

    @property
    def parameters_saved(self) -> int:
        return sum(n for _, _, n in self.layers)

    def to_dict(self) -> dict:
        return {
            "parameters_saved": self.parameters_saved,
            "warning": self.warning,
            "layers": [{"layer": p, "bn": b, "parameters": n} for p, b, n in self.layers],
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="strip-bias: biases moved into BN running_mean", title_justify="left")
        for col in ("layer", "feeds BN", "parameters saved"):
            table.add_column(col)
        for p, b, n in self.layers:
            table.add_row(p, b, str(n))
        parts = [table, f"{self.parameters_saved} parameters saved"]
        if self.warning:
            parts.append(f"[yellow]warning:[/] {self.warning}")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)


# --------------------------------------------------------------------------- fold


def fold(model: nn.Module, example_input=None, *, report: bool = False):
    r"""A new eval-mode model with every foldable BN folded into the conv or linear before it.

    A BN folds when its producer is a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (subclasses
    included), that output goes to the BN alone, both modules are called once, and the channel
    counts agree. Every other BN with running statistics becomes a fixed per-channel affine
    ``y = x * s + t``: PyTorch's own ``BatchNorm1d/2d/3d`` (``SyncBatchNorm`` where the input
    rank is unknown) in eval mode on the same statistics, bit-identical to the BN it replaces in
    eval, with ``requires_grad=False`` and ``momentum=0``. So the folded model holds PyTorch
    modules only (unless the input held other classes) and ``torch.save`` gives a file that
    loads without this package. Keep it in eval mode: ``.train()`` would make those layers
    normalise with batch statistics, as any BN does. A BN without running statistics
    normalises with batch statistics even in eval and is kept as it is. A BN+act layer
    (``batchnorm.BatchNormAct2d``) leaves its activation (a PyTorch module) in its place.

    The input model is never changed (its state_dict stays byte-identical). The graph comes
    from ``torch.fx`` (residual adds, concatenations and branches all work); if tracing fails,
    only conv/BN pairs adjacent in one ``nn.Sequential`` fold and the report carries a warning.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (or tuple of tensors) to measure the error each fold introduces
            and to learn shapes (a Linear whose output is not 2D is not folded). The one
            forward pass keeps a copy of every conv/linear/BN input and output. Default: None
        report: also return a :class:`FoldReport` (keyword only). Default: False

    Returns:
        the folded model, in eval mode (a plain module: nothing of the report is attached, so
        it pickles like any other); with ``report=True`` the pair ``(model, FoldReport)``.

    Example::

        >>> folded, report = batchnorm.fold(model, torch.randn(1, 3, 224, 224), report=True)
        >>> print(report)   # per-layer action and error
    """
    _check_model(model)
    _check_eval_stats(model)
    folded = copy.deepcopy(model).eval()
    graph = trace(folded)
    args = as_args(example_input)
    captured, reference = ({}, None)
    if args is not None:
        captured, reference = capture(folded, args, _captured_module)
    summary = FoldReport(warning=graph.warning)
    plans = _plan(folded, graph, captured)
    uses = Counter(id(p) for m in folded.modules() for p in m._parameters.values() if p is not None)

    with torch.no_grad():
        for plan in plans:
            bn = plan.bn
            if plan.action == "folded":
                layer = folded.get_submodule(plan.into)
                w, b = _fold_weights(
                    layer.weight,
                    layer.bias,
                    bn.running_mean,
                    bn.running_var,
                    bn.eps,
                    getattr(bn, "weight", None),
                    getattr(bn, "bias", None),
                    transposed=isinstance(layer, _ConvTransposeNd),
                    groups=getattr(layer, "groups", 1),
                    # the copy's own weight, unless the model ties it to another layer
                    in_place=uses[id(layer.weight)] == 1,
                )
                layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
                layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
                replacement = plan.act if plan.act is not None else nn.Identity()
                folded.set_submodule(plan.name, replacement)
            elif plan.action == "frozen":
                affine = _torch_affine(bn, plan.rank)
                replacement = affine if plan.act is None else nn.Sequential(affine, plan.act)
                folded.set_submodule(plan.name, replacement)
            record = LayerFold(plan.name, plan.action, plan.into, plan.reason)
            if plan.name in captured:
                record.max_error, record.rel_error = _local_error(folded, plan, captured)
            summary.layers.append(record)
        if args is not None:
            out = folded(*args)
            summary.max_error, summary.rel_error = max_error(out, reference)
    return (folded, summary) if report else folded


def _captured_module(m: nn.Module) -> bool:
    return is_batchnorm(m) or is_foldable_producer(m)


@dataclass
class _Plan:
    name: str
    bn: nn.Module
    action: str
    into: str | None = None
    reason: str = ""
    act: nn.Module | None = None
    rank: object = None  # the rank key of the affine a frozen BN becomes


def _plan(model: nn.Module, graph: ModelGraph, captured: dict) -> list[_Plan]:
    plans = []
    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        act = activation_of(bn)
        if act is UNKNOWN_ACTIVATION:
            plans.append(
                _Plan(name, bn, "kept", reason=f"unknown activation {getattr(bn, 'act', None)!r}")
            )
            continue
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            plans.append(
                _Plan(name, bn, "kept", reason="no running statistics: eval uses batch statistics")
            )
            continue
        producer, why_not = foldable_producer(model, graph, name, bn, captured)
        if producer is not None:
            kind = type(model.get_submodule(producer)).__name__
            plans.append(_Plan(name, bn, "folded", producer, f"{kind} → BN", act))
            continue
        if bn_kind(bn) == "frozen" and act is None:
            plans.append(_Plan(name, bn, "kept", reason=f"already frozen; {why_not}"))
            continue
        plans.append(
            _Plan(
                name,
                bn,
                "frozen",
                reason=why_not,
                act=act,
                rank=rank_key(bn, _seen_rank(captured.get(name))),
            )
        )
    return plans


def foldable_producer(model, graph: ModelGraph, name: str, bn: nn.Module, captured: dict):
    """(producer module name, None) when ``bn`` folds into it, else (None, reason)."""
    sites = graph.calls(name)
    if not sites:
        return None, "never called in the traced graph"
    if len(sites) > 1:
        return None, f"called {len(sites)} times"
    site = sites[0]
    prod = site.producer
    if prod is None or prod.op != "module" or not is_foldable_producer(prod.module):
        label = (
            "the input"
            if prod is None or prod.op == "input"
            else (type(prod.module).__name__ if prod.module is not None else prod.label)
        )
        return None, f"input comes from {label}, not a conv/linear"
    if not graph.called_once(prod):
        return None, f"{prod.name} is called more than once"
    if not graph.feeds_only(prod, site):
        why = (
            "not adjacent in an nn.Sequential (graph approximate)"
            if graph.approximate
            else "its output has other users"
        )
        return None, f"{prod.name}: {why}"
    if out_channels(prod.module) != bn.num_features:
        return (
            None,
            f"{prod.name} has {out_channels(prod.module)} output channels, BN {bn.num_features}",
        )
    if isinstance(prod.module, nn.Linear) and prod.name in captured:
        out = captured[prod.name][1]
        if isinstance(out, torch.Tensor) and out.dim() != 2:
            return None, f"{prod.name} output is {out.dim()}D: BN channels are not its features"
    if not prod.module.weight.is_floating_point():
        return None, f"{prod.name} weight is not floating point"
    return prod.name, None


def _torch_affine(bn: nn.Module, rank: object) -> nn.Module:
    """PyTorch's BN of this rank in eval mode on bn's statistics and affine parameters, frozen
    (requires_grad off, momentum 0): the same F.batch_norm call a frozen BN makes."""
    stats = bn.running_mean
    new = FAMILIES["torch"][rank](bn.num_features, eps=bn.eps, momentum=0.0,
                                  device=stats.device, dtype=stats.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(bn, name, None)
            if value is not None:
                getattr(new, name).copy_(value)
    new.weight.requires_grad_(False)
    new.bias.requires_grad_(False)
    return new.eval()


def _seen_rank(seen) -> int | None:
    """The rank of the first input a captured module saw, if it was a tensor."""
    if seen is not None and isinstance(seen[0][0], torch.Tensor):
        return seen[0][0].dim()
    return None


def _check_eval_stats(model: nn.Module) -> None:
    """Folding bakes in the running statistics: a BN that normalises with others in eval
    (``eval_stats`` "batch" or "mix") cannot be folded without changing what it computes."""
    for name, m in model.named_modules():
        stats = getattr(m, "eval_stats", "running")
        if is_batchnorm(m) and stats != "running":
            raise expected("BN layers on eval_stats='running' to fold (folding uses the running "
                           "statistics)", f"{name or type(m).__name__}: eval_stats={stats!r}; "
                           "set it to 'running' first")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    if isinstance(model, torch.jit.ScriptModule):
        raise expected(
            "a Python nn.Module to rewrite", "a TorchScript module, which cannot be rewritten"
        )


def _local_error(model: nn.Module, plan: _Plan, captured: dict) -> tuple[float, float]:
    want = captured[plan.name][1]
    if plan.action == "folded":
        got = model.get_submodule(plan.into)(*captured[plan.into][0])
        if plan.act is not None:
            got = plan.act(got)
    else:
        got = model.get_submodule(plan.name)(*captured[plan.name][0])
    return max_error([got], [want])


# --------------------------------------------------------------------------- strip_bias


def strip_bias(model: nn.Module, example_input=None, *, report: bool = False):
    r"""A new model without the conv/linear biases that BN cancels.

    BN subtracts the batch mean, so a bias ``b`` added just before it changes nothing in
    training: the mean moves by ``b`` and is subtracted again. In eval BN subtracts
    ``running_mean``, so the bias is moved there: ``running_mean -= b``. Eval outputs are
    unchanged up to float rounding (1e-6 relative), and so are training outputs and later
    running-statistic updates. Only biases whose output feeds one BN and nothing else go.

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
            producer, _ = foldable_producer(stripped, graph, name, bn, captured)
            if producer is None:
                continue
            layer = stripped.get_submodule(producer)
            if layer.bias is None:
                continue
            if getattr(bn, "running_mean", None) is not None:
                bn.running_mean.sub_(layer.bias.detach().to(bn.running_mean.dtype))
            summary.layers.append((producer, name, layer.bias.numel()))
            layer.bias = None
    return (stripped, summary) if report else stripped

