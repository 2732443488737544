"""Fold BN into the conv/linear before (or after) it, or strip the bias BN makes useless.

At inference BN is a fixed per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is the
output of a conv or linear layer (and nothing else reads it), the map folds into that layer:

    W' = W * s            (per output channel)
    b' = (b - running_mean) * s + beta

When ``x`` is a channel concatenation of such outputs, each slice of ``s, t`` folds into the
layer that produced it. When ``y`` goes straight into a Linear, or a conv that pads with
nothing or with the data itself, the map folds forward into that layer's input side:

    W' = W * s            (per input channel)
    b' = b + W t

``fold_weights`` / ``fold_weights_forward`` are those statements as pure tensor math; ``fold``
finds where each BN goes on the model's graph (``batchnorm.graph``) and rewrites a copy;
``strip_bias`` removes a bias that BN cancels.
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

__all__ = ["fold_weights", "fold_weights_forward", "fold", "plan_folds", "FoldPlan", "strip_bias",
           "FoldReport", "LayerFold", "StripReport"]


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
    _check_lengths(c, bias=bias, running_var=running_var, gamma=gamma, beta=beta)
    scale, shift = _affine(running_mean, running_var, eps, gamma, beta)
    b = bias.detach().to(torch.float64) if bias is not None else 0.0
    new_bias = b * scale + shift
    w = _writable(weight, in_place)
    factor = scale.to(w.dtype)
    spatial = (1,) * (w.dim() - 2)
    if transposed:
        # (C_in, C_out/groups, *k) -> (groups, C_in/groups, C_out/groups, *k), a view of w
        blocks = w.view(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        blocks.mul_(factor.reshape(groups, 1, w.shape[1], *spatial))
    else:
        w.mul_(factor.reshape(c, 1, *spatial))
    return w, new_bias.to(weight.dtype)


def fold_weights_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    groups: int = 1,
    repeat: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an eval-mode BN into the weight and bias of the conv or linear layer *after* it.

    BN in eval is ``y = x * s + t`` per input channel (``s = gamma / sqrt(Var + eps)``,
    ``t = beta - E * s``), so a layer ``W y + b`` reading it computes

    .. math::
        W' = W \cdot s \ \text{(per input channel)}, \qquad
        b' = b + \sum_{i, k} W_{o, i, k} \, t_i

    This is exact for a Linear and for a conv whose padding adds nothing (``padding=0``) or
    pads with the data (``reflect``, ``replicate``, ``circular``: the padded border of the
    affine image is the affine image of the padded border); with zero padding the border
    windows would see ``t`` where the original saw 0, so that case is not for this function.
    ``groups`` and dilation are taken; input channel ``g * C_in/groups + i`` of group ``g``
    meets weight column ``i`` of that group's outputs. ``repeat`` is for a Linear after a
    flatten: each of the BN's channels spans ``repeat`` consecutive input features. The factor
    and the bias are computed in float64; the weight is multiplied once, in its own dtype.

    Args:
        weight: conv weight ``(C_out, C_in/groups, *k)`` or linear weight ``(C_out, C * repeat)``.
        bias: the layer's bias ``(C_out,)``, or None for none.
        running_mean, running_var: BN statistics ``(C,)``, ``C`` the layer's input channels.
        eps: BN's eps.
        gamma, beta: BN's weight and bias, or None when ``affine=False``. Default: None
        groups: the conv's groups. Default: 1
        repeat: input features per BN channel (a Linear after a flatten). Default: 1

    Returns:
        ``(weight', bias')``, new tensors; the inputs are not changed.

    >>> bn, fc = nn.BatchNorm1d(8).eval(), nn.Linear(8, 4)
    >>> w, b = fold_weights_forward(fc.weight, fc.bias, bn.running_mean, bn.running_var,
    ...                             bn.eps, bn.weight, bn.bias)
    """
    return _fold_weights_forward(weight, bias, running_mean, running_var, eps, gamma, beta,
                                 groups=groups, repeat=repeat, in_place=False)


def _fold_weights_forward(weight, bias, running_mean, running_var, eps, gamma, beta, *, groups,
                          repeat, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    c = running_mean.numel()
    if weight.dim() < 2 or weight.shape[1] * groups != c * repeat or weight.shape[0] % groups:
        raise expected(
            f"a weight reading {c * repeat} input features in {groups} groups",
            f"weight of shape {tuple(weight.shape)}",
        )
    _check_lengths(c, running_var=running_var, gamma=gamma, beta=beta)
    if bias is not None and bias.numel() != weight.shape[0]:
        raise expected(f"bias with {weight.shape[0]} elements", f"{bias.numel()}")
    scale, shift = _affine(running_mean, running_var, eps, gamma, beta)
    out, per_group = weight.shape[0], weight.shape[1]
    # (C,) -> (C_out, C_in/groups): the factor each weight column of each output meets
    scale = scale.repeat_interleave(repeat).view(groups, 1, per_group)
    scale = scale.expand(groups, out // groups, per_group).reshape(out, per_group)
    shift = shift.repeat_interleave(repeat).view(groups, 1, per_group)
    shift = shift.expand(groups, out // groups, per_group).reshape(out, per_group)
    w64 = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64) if bias is not None else 0.0
    new_bias = b + (w64.flatten(2).sum(2) if w64.dim() > 2 else w64).mul(shift).sum(1)
    w = _writable(weight, in_place)
    w.mul_(scale.to(w.dtype).reshape(out, per_group, *(1,) * (w.dim() - 2)))
    return w, new_bias.to(weight.dtype)


def _affine(running_mean, running_var, eps, gamma, beta) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval as ``x * scale + shift``, both float64 ``(C,)``."""
    f64 = torch.float64
    scale = torch.rsqrt(running_var.detach().to(f64) + float(eps))
    if gamma is not None:
        scale = scale * gamma.detach().to(f64)
    shift = -running_mean.detach().to(f64) * scale
    if beta is not None:
        shift = shift + beta.detach().to(f64)
    return scale, shift


def _check_lengths(c: int, **tensors) -> None:
    for what, t in tensors.items():
        if t is not None and t.numel() != c:
            raise expected(f"{what} with {c} elements", f"{t.numel()}")


def _writable(weight: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``weight`` detached, itself when it may be scaled in place, else a contiguous copy."""
    w = weight.detach()
    if not (in_place and w.is_contiguous()):
        w = w.clone(memory_format=torch.contiguous_format)
    return w


# --------------------------------------------------------------------------- reports


@dataclass
class LayerFold:
    """What ``fold`` did with one BN layer.

    ``action`` is ``"folded"`` (into ``into``), ``"frozen"`` (now a fixed per-channel affine) or
    ``"kept"``. A folded BN has a ``direction``: ``"previous"`` (into the conv/linear before
    it), ``"next"`` (into the Linear/conv after it) or ``"pieces"`` (split over the layers a
    channel concatenation joins: ``into`` lists them, comma-separated; channels from anything
    else stay a frozen affine, which ``reason`` names). Errors are measured on
    ``example_input`` (None without one): ``max_error`` is the largest absolute difference of
    the rewritten layers' output, fed the original layers' inputs, ``rel_error`` that divided
    by the largest absolute output.
    """

    name: str
    action: str
    into: str | None = None
    reason: str = ""
    max_error: float | None = None
    rel_error: float | None = None
    direction: str | None = None


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
            into = r.into or "-"
            if r.direction in ("next", "pieces"):
                into = f"{r.direction}: {into}"
            table.add_row(r.name, r.action, into, err, r.reason)
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


def fold(model: nn.Module, example_input=None, *, forward: bool = True, report: bool = False):
    r"""A new eval-mode model with every BN folded into the conv or linear layers around it.

    Each BN goes to the first of these that applies:

    * **into the layer before it** (direction ``"previous"``): its input comes from a
      Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (subclasses included) whose output goes to
      the BN alone, both modules called once, the channel counts equal;
    * **into the pieces of a concatenation** (``"pieces"``): its input is ``torch.cat`` along
      the channel axis (nested cats too), and every piece from such a layer, used only by the
      cat, takes its slice of the BN; channels from anything else (a pooling branch, the
      input) stay a frozen affine for those channels alone;
    * **into the layer after it** (``"next"``, with ``forward=True``): a BN without activation
      whose output goes only to a Linear (through Dropout, Identity and a ``flatten(1)``
      where present) or to a conv whose padding adds nothing (``padding=0``) or pads with the
      data (``padding_mode`` reflect, replicate or circular); groups and dilation are taken.
      With zero padding the border windows would change, so that conv is not folded into. A
      Linear straight after a BatchNorm1d needs the BN's input to be 2D: known from a flatten
      before the BN or from ``example_input``, else the BN stays frozen and the reason says so.

    Every other BN with running statistics becomes a fixed per-channel affine
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
    only pairs adjacent in one ``nn.Sequential`` fold and the report carries a warning.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (or tuple of tensors) to measure the error each fold introduces
            and to learn shapes (a Linear whose output is not 2D is not folded). The one
            forward pass keeps a copy of every conv/linear/BN input and output. Default: None
        forward: fold a BN left over into the layer after it (keyword only). Default: True
        report: also return a :class:`FoldReport` (keyword only). Default: False

    Returns:
        the folded model, in eval mode (a plain module: nothing of the report is attached, so
        it pickles like any other); with ``report=True`` the pair ``(model, FoldReport)``.

    Example::

        >>> folded, report = batchnorm.fold(model, torch.randn(1, 3, 224, 224), report=True)
        >>> print(report)   # per-layer action, direction and error
    """
    _check_model(model)
    _check_eval_stats(model)
    if not isinstance(forward, bool):
        raise expected("forward to be True or False", repr(forward))
    folded = copy.deepcopy(model).eval()
    graph = trace(folded)
    args = as_args(example_input)
    captured, reference = ({}, None)
    if args is not None:
        captured, reference = capture(folded, args, _captured_module)
    summary = FoldReport(warning=graph.warning)
    plans = plan_folds(folded, graph, captured, forward=forward)
    uses = Counter(id(p) for m in folded.modules() for p in m._parameters.values() if p is not None)
    records = {}
    with torch.no_grad():
        # into the layer after last: that layer may first take the BN after it (both exact)
        for plan in sorted(plans, key=lambda p: p.direction == "next"):
            errors = _apply(folded, plan, captured, uses)
            records[plan.name] = LayerFold(plan.name, plan.action, plan.into, plan.reason,
                                           *(errors or (None, None)), direction=plan.direction)
        summary.layers = [records[plan.name] for plan in plans]
        if args is not None:
            out = folded(*args)
            summary.max_error, summary.rel_error = max_error(out, reference)
    return (folded, summary) if report else folded


def _captured_module(m: nn.Module) -> bool:
    return is_batchnorm(m) or is_foldable_producer(m)


@dataclass
class _Piece:
    """Channels ``start:stop`` of a BN's input, from the layer ``into`` (None: they stay a
    frozen affine); ``label`` says what produced them."""

    start: int
    stop: int
    into: str | None
    label: str


@dataclass
class FoldPlan:
    """Where one BN goes (``fold`` carries it out; ``inspect`` reports it)."""

    name: str
    bn: nn.Module
    action: str
    into: str | None = None
    reason: str = ""
    act: nn.Module | None = None
    rank: object = None  # the rank key of the affine a frozen (or split) BN becomes
    direction: str | None = None  # "previous", "pieces" or "next" for a folded BN
    pieces: list[_Piece] = field(default_factory=list)
    chain: list = field(default_factory=list)  # pass-through calls between BN and next layer
    repeat: int = 1  # input features of the next layer per BN channel


def plan_folds(model: nn.Module, graph: ModelGraph, captured: dict | None = None, *,
               forward: bool = True) -> list[FoldPlan]:
    """Where each BN of ``model`` would go under :func:`fold`, in module order; ``captured``
    holds the first ``(inputs, output)`` of its conv/linear/BN modules where known."""
    captured = captured or {}
    plans = []
    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        act = activation_of(bn)
        if act is UNKNOWN_ACTIVATION:
            plans.append(
                FoldPlan(name, bn, "kept",
                         reason=f"unknown activation {getattr(bn, 'act', None)!r}")
            )
            continue
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            plans.append(
                FoldPlan(name, bn, "kept",
                         reason="no running statistics: eval uses batch statistics")
            )
            continue
        rank = rank_key(bn, _seen_rank(captured.get(name)))
        producer, why_not = foldable_producer(model, graph, name, bn, captured)
        if producer is not None:
            kind = type(model.get_submodule(producer)).__name__
            plans.append(FoldPlan(name, bn, "folded", producer, f"{kind} → BN", act,
                                  direction="previous"))
            continue
        pieces, why_not_cat = _cat_pieces(model, graph, name, bn, captured)
        if pieces is not None:
            into = [p.into for p in pieces if p.into is not None]
            stay = [f"{p.start}:{p.stop} ({p.label})" for p in pieces if p.into is None]
            reason = f"cat → BN, {len(into)} of {len(pieces)} pieces folded"
            if stay:
                reason += f"; channels {', '.join(stay)} stay a frozen affine"
            plans.append(FoldPlan(name, bn, "folded", ", ".join(into), reason, act, rank,
                                  direction="pieces", pieces=pieces))
            continue
        why_not = why_not_cat or why_not
        if forward:
            nxt, why_not_next = _next_layer(model, graph, name, bn, act, captured)
            if nxt is not None:
                plans.append(nxt)
                continue
            why_not = f"{why_not}; {why_not_next}"
        if bn_kind(bn) == "frozen" and act is None:
            plans.append(FoldPlan(name, bn, "kept", reason=f"already frozen; {why_not}"))
            continue
        plans.append(FoldPlan(name, bn, "frozen", reason=why_not, act=act, rank=rank))
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
        return None, f"input comes from {_label(prod)}, not a conv/linear"
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
    why = _producer_problem(graph, prod, captured)
    return (None, why) if why else (prod.name, None)


def _producer_problem(graph: ModelGraph, prod, captured: dict) -> str | None:
    """Why the conv/linear at ``prod`` cannot take a fold of its outputs, or None."""
    if not graph.called_once(prod):
        return f"{prod.name} is called more than once"
    if isinstance(prod.module, nn.Linear) and prod.name in captured:
        out = captured[prod.name][1]
        if isinstance(out, torch.Tensor) and out.dim() != 2:
            return f"{prod.name} output is {out.dim()}D: BN channels are not its features"
    if not prod.module.weight.is_floating_point():
        return f"{prod.name} weight is not floating point"
    return None


def _label(site) -> str:
    """What a site is, for a reason: "the input", a module class, a function name."""
    if site is None or site.op == "input":
        return "the input"
    return type(site.module).__name__ if site.module is not None else site.label


# --------------------------------------------------------------------------- through torch.cat

_CAT = {"cat", "concat", "concatenate"}


def _cat_pieces(model, graph: ModelGraph, name: str, bn: nn.Module, captured: dict):
    """(the BN's channels split by producer, None) when its input is a channel cat of which at
    least one piece folds, else (None, reason or None when the input is not a cat)."""
    sites = graph.calls(name)
    if len(sites) != 1 or graph.approximate:
        return None, None
    site = sites[0]
    cat = site.producer
    if cat is None or cat.op != "function" or cat.label not in _CAT:
        return None, None
    if not graph.feeds_only(cat, site):
        return None, "the cat's output has other users"
    rank = _input_rank(graph, site, bn, captured)
    parts = _cat_parts(graph, cat, rank)
    if isinstance(parts, str):
        return None, parts
    count = Counter(id(p) for p in parts)
    widths, reasons = [], {}
    for part in parts:
        width = _width(part, rank)
        widths.append(width)
        if width is None:
            continue
        if count[id(part)] > 1:
            reasons[id(part)] = "appears twice"
        elif not (part.op == "module" and is_foldable_producer(part.module)):
            reasons[id(part)] = "not a conv/linear"
        elif len(part.users) != 1:
            reasons[id(part)] = "output has other users"
        else:
            reasons[id(part)] = _producer_problem(graph, part, captured)
    unknown = [i for i, w in enumerate(widths) if w is None]
    if unknown and unknown != list(range(unknown[0], unknown[-1] + 1)):
        return None, "the widths of several cat pieces are not known"
    rest = bn.num_features - sum(w for w in widths if w is not None)
    if unknown:
        if rest < len(unknown):
            return None, f"the cat's pieces give more than the BN's {bn.num_features} channels"
    elif rest:
        return None, (f"the cat's pieces give {bn.num_features - rest} channels, BN "
                      f"{bn.num_features}")
    pieces, start = [], 0
    for i, part in enumerate(parts):
        if widths[i] is None:
            if i == unknown[0]:
                labels = ", ".join(dict.fromkeys(_piece_label(parts[j]) for j in unknown))
                pieces.append(_Piece(start, start + rest, None, labels))
                start += rest
            continue
        foldable = reasons[id(part)] is None
        pieces.append(_Piece(start, start + widths[i], part.name if foldable else None,
                             _piece_label(part)))
        start += widths[i]
    if not any(p.into for p in pieces):
        return None, "input comes from cat, and no piece is a conv/linear used only there"
    return pieces, None


def _piece_label(site) -> str:
    return site.name if site.op == "module" else _label(site)


def _cat_parts(graph: ModelGraph, cat, rank: int | None):
    """The sites a channel cat joins, nested channel cats (used only there) opened; a reason
    string when ``cat`` does not join along the channel axis."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return "input comes from a cat whose pieces are not a plain list"
    if not (dim == 1 or (rank is not None and dim == 1 - rank)):
        where = f"dim {dim}" if rank is not None or dim >= 0 else f"dim {dim} of unknown rank"
        return f"input comes from a cat along {where}, not the channel axis"
    parts = []
    for t in tensors:
        if t.op == "function" and t.label in _CAT and len(t.users) == 1:
            inner = _cat_parts(graph, t, rank)
            if not isinstance(inner, str):
                parts.extend(inner)
                continue
        parts.append(t)
    return parts


def _width(site, rank: int | None) -> int | None:
    """Channels a cat piece gives, where its module says (a Linear only on 2D data)."""
    if site.op != "module" or not is_foldable_producer(site.module):
        return None
    if isinstance(site.module, nn.Linear) and rank != 2:
        return None
    return out_channels(site.module)


def _input_rank(graph: ModelGraph, site, bn: nn.Module, captured: dict) -> int | None:
    """The rank of the BN's input: seen on example_input, a flatten's 2D output, or the BN's
    own class (BatchNorm2d: 4)."""
    seen = _seen_rank(captured.get(site.name))
    if seen is not None:
        return seen
    if _flatten_dim(site.producer) == 1:
        return 2
    key = rank_key(bn)
    return key[0] if isinstance(key, tuple) and len(key) == 1 else None


def _flatten_dim(site) -> int | None:
    """start_dim of a flatten to the end (nn.Flatten, torch.flatten, Tensor.flatten), else None."""
    if site is None:
        return None
    if site.op == "module":
        m = site.module
        if type(m) is nn.Flatten and m.end_dim == -1:
            return m.start_dim
        return None
    if site.op == "function" and site.label == "flatten":
        start = site.args[1] if len(site.args) > 1 else site.kwargs.get("start_dim", 0)
        end = site.args[2] if len(site.args) > 2 else site.kwargs.get("end_dim", -1)
        return start if end == -1 and isinstance(start, int) else None
    return None


# --------------------------------------------------------------------------- into the next layer

_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)


def _next_layer(model, graph: ModelGraph, name: str, bn: nn.Module, act, captured: dict):
    """(the plan folding ``bn`` into the layer after it, None), else (None, reason)."""
    if act is not None:
        return None, "an activation follows inside the BN"
    sites = graph.calls(name)
    if len(sites) != 1:
        return None, "not called once"
    site = sites[0]
    chain, repeat_from = [], None
    here = site
    while True:
        users = here.users
        if len(users) != 1 or not graph.feeds_only(here, users[0]):
            return None, f"output goes to {len(users)} users" if len(users) != 1 \
                else "output is not the next layer's input"
        nxt = users[0]
        if nxt.op == "module" and isinstance(nxt.module, _PASS_THROUGH):
            chain.append(nxt.module)
        elif _flatten_dim(nxt) == 1 and repeat_from is None:
            chain.append(nn.Flatten())
            repeat_from = len(chain)
        else:
            break
        here = nxt
    layer = nxt.module if nxt.op == "module" else None
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(
            layer, _ConvTransposeNd):
        return None, f"output goes to {_label(nxt)}, not a Linear/conv"
    if not graph.called_once(nxt):
        return None, f"{nxt.name} is called more than once"
    if not layer.weight.is_floating_point():
        return None, f"{nxt.name} weight is not floating point"
    c = bn.num_features
    if isinstance(layer, nn.Linear):
        if repeat_from is None:
            rank = _input_rank(graph, site, bn, captured)
            if rank != 2:
                why = ("its input is not known to be 2D (pass example_input)" if rank is None
                       else f"its input is {rank}D: BN channels are not the Linear's features")
                return None, f"{nxt.name} (Linear) follows, but {why}"
        if layer.in_features % c:
            return None, f"{nxt.name} reads {layer.in_features} features, not a multiple of {c}"
        repeat = layer.in_features // c
        if repeat_from is None and repeat != 1:
            return None, f"{nxt.name} reads {layer.in_features} features, BN gives {c}"
    else:
        if repeat_from is not None:
            return None, f"{nxt.name} reads a flattened input"
        if layer.in_channels != c:
            return None, f"{nxt.name} reads {layer.in_channels} channels, BN gives {c}"
        if layer.padding_mode == "zeros" and _pads(layer):
            return None, (f"{nxt.name} pads with zeros, which the fold would change at the "
                          "borders")
        repeat = 1
    kind = type(layer).__name__
    return FoldPlan(name, bn, "folded", nxt.name, f"BN → {kind}", direction="next",
                    chain=chain, repeat=repeat), None


def _pads(conv) -> bool:
    """Whether the conv adds any padding (zeros or not)."""
    if isinstance(conv.padding, str):  # "valid" or "same"
        return conv.padding == "same" and any(
            d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    return any(conv.padding)


# --------------------------------------------------------------------------- carrying a plan out


def _apply(model: nn.Module, plan: FoldPlan, captured: dict, uses: Counter):
    """Rewrite ``model`` for one plan; the local (max, relative) error where measured."""
    bn = plan.bn
    if plan.direction == "previous":
        _fold_into(model, plan.into, uses, *_stats_of(bn))
        model.set_submodule(plan.name, _with_act(nn.Identity(), plan.act))
        if plan.name in captured:
            got = model.get_submodule(plan.into)(*captured[plan.into][0])
            return max_error([_act(plan, got)], [captured[plan.name][1]])
    elif plan.direction == "pieces":
        rest = _split_affine(bn, plan)
        if rest is None:  # no exact identity for the folded channels in this dtype
            plan.action, plan.direction, plan.into = "frozen", None, None
            plan.reason = "cat → BN, but no exact identity for the folded channels"
            return _apply(model, plan, captured, uses)
        for piece in plan.pieces:
            if piece.into is not None:
                _fold_into(model, piece.into, uses,
                           *_stats_of(bn, slice(piece.start, piece.stop)))
        rest = _with_act(rest, plan.act)
        model.set_submodule(plan.name, rest)
        if plan.name in captured:
            x = captured[plan.name][0][0].clone()
            for piece in plan.pieces:
                if piece.into is not None:
                    x[:, piece.start:piece.stop] = model.get_submodule(piece.into)(
                        *captured[piece.into][0])
            return max_error([rest(x)], [captured[plan.name][1]])
    elif plan.direction == "next":
        layer = model.get_submodule(plan.into)
        before = layer(*captured[plan.into][0]) if plan.into in captured else None
        w, b = _fold_weights_forward(layer.weight, layer.bias, *_stats_of(bn),
                                     groups=getattr(layer, "groups", 1), repeat=plan.repeat,
                                     in_place=uses[id(layer.weight)] == 1)
        _set_weights(layer, w, b)
        model.set_submodule(plan.name, nn.Identity())
        if before is not None and plan.name in captured:
            x = captured[plan.name][0][0]
            for step in plan.chain:
                x = step(x)
            return max_error([layer(x)], [before])
    elif plan.action == "frozen":
        model.set_submodule(plan.name, _with_act(_torch_affine(bn, plan.rank), plan.act))
        if plan.name in captured:
            got = model.get_submodule(plan.name)(*captured[plan.name][0])
            return max_error([got], [captured[plan.name][1]])
    return None


def _stats_of(bn: nn.Module, channels: slice = slice(None)) -> tuple:
    """(running_mean, running_var, eps, weight, bias) of ``bn`` for these channels, the
    arguments of the fold math."""
    tensors = [getattr(bn, name, None) for name in ("running_mean", "running_var", "weight",
                                                   "bias")]
    mean, var, weight, bias = (None if t is None else t[channels] for t in tensors)
    return mean, var, bn.eps, weight, bias


def _with_act(module: nn.Module, act: nn.Module | None) -> nn.Module:
    """What replaces a BN+act layer: the module, then the activation it applied (the activation
    alone in place of an identity)."""
    if act is None:
        return module
    return act if isinstance(module, nn.Identity) else nn.Sequential(module, act)


def _fold_into(model, into: str, uses: Counter, *stats) -> None:
    """Fold BN statistics ``stats`` into the outputs of the conv/linear at ``into``."""
    layer = model.get_submodule(into)
    w, b = _fold_weights(
        layer.weight, layer.bias, *stats,
        transposed=isinstance(layer, _ConvTransposeNd),
        groups=getattr(layer, "groups", 1),
        # the copy's own weight, unless the model ties it to another layer
        in_place=uses[id(layer.weight)] == 1,
    )
    _set_weights(layer, w, b)


def _set_weights(layer, w, b) -> None:
    trains = layer.weight.requires_grad
    layer.weight = nn.Parameter(w, requires_grad=trains)
    layer.bias = nn.Parameter(b, requires_grad=trains)


def _act(plan: FoldPlan, x):
    return x if plan.act is None else plan.act(x)


def _split_affine(bn: nn.Module, plan: FoldPlan) -> nn.Module | None:
    """What a split BN becomes: its frozen affine on the channels no layer took, the exact
    identity on the others (mean 0, weight 1, bias 0, a variance for which ``var + eps`` rounds
    to 1: checked on values whose last bit any other factor would move); nn.Identity when every
    channel folded; None if no such variance is found for the buffers' dtype."""
    keep = torch.zeros(bn.num_features, dtype=torch.bool)
    for p in plan.pieces:
        if p.into is None:
            keep[p.start:p.stop] = True
    if not keep.any():
        return nn.Identity()
    affine = _torch_affine(bn, plan.rank)
    folded = ~keep.to(affine.running_mean.device)
    dtype = affine.running_var.dtype
    one = torch.ones((), dtype=dtype, device=folded.device)
    probe = torch.stack([torch.nextafter(2 * one, one), torch.nextafter(one, 2 * one),
                         -torch.nextafter(2 * one, one), 3.3 * one])
    shape = (4, bn.num_features) + (1,) * (_affine_rank(plan.rank) - 2)
    x = probe.view(4, *(1,) * (len(shape) - 1)).expand(shape)
    var = one - bn.eps
    with torch.no_grad():
        affine.running_mean[folded] = 0
        affine.weight[folded] = 1
        affine.bias[folded] = 0
        for candidate in (var, torch.nextafter(var, 2 * one), torch.nextafter(var, 0 * one)):
            affine.running_var[folded] = candidate
            if torch.equal(affine(x)[:, folded], x[:, folded]):
                return affine
    return None


def _affine_rank(rank: object) -> int:
    """An input rank the affine of this rank key takes."""
    return rank[0] if isinstance(rank, tuple) else 2


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

