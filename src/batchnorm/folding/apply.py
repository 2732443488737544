"""``fold``: carry out the plan on a copy of the model and measure what each fold changed."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from ..errors import expected
from ..graph import trace
from ..probe import as_args, capture, max_error
from ..protocol import FAMILIES, is_batchnorm
from .plan import FoldPlan, _captured_module, _check_model, plan_folds
from .report import FoldReport, LayerFold
from .weights import _fold_weights, _fold_weights_forward

# fold computes what model.eval() computes: a model handed over in training mode (normalising
# with batch statistics) comes back computing something else, which the caller should hear
TRAIN_MODE_WARNING = ("fold uses the running statistics: the model was in training mode, the "
                      "folded model is in eval mode (it computes what model.eval() computes)")


def fold(model: nn.Module, example_input=None, *, forward: bool = True, report: bool = False):
    r"""A new eval-mode model with every BN folded into the conv or linear layers around it.

    Each BN goes to the first of these that applies:

    * **into the layer before it** (direction ``"previous"``): its input comes from a
      Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (subclasses included) whose output goes to
      the BN alone, both modules called once, the channel counts equal;
    * **into the pieces of a concatenation** (``"pieces"``): its input is ``torch.cat`` along
      the channel axis (nested cats too), and every piece from such a layer, used only by the
      cat, takes its slice of the BN; channels from anything else (a pooling branch, the
      input) cannot fold backwards and stay a frozen affine for those channels alone (the
      report's action ``"partial"``);
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

    Folding uses the running statistics, as ``model.eval()`` does: a model (or a BN in it) in
    training mode gets a ``UserWarning`` saying the result is in eval mode, and so does the
    report's ``warning``.

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
    trains = _trains(model)
    folded = copy.deepcopy(model).eval()
    graph = trace(folded)
    args = as_args(example_input)
    captured, reference = ({}, None)
    if args is not None:
        captured, reference = capture(folded, args, _captured_module)
    if trains:
        warnings.warn(TRAIN_MODE_WARNING, UserWarning, stacklevel=2)
    notes = [w for w in (graph.warning, TRAIN_MODE_WARNING if trains else None) if w]
    summary = FoldReport(warning="; ".join(notes) or None)
    plans = plan_folds(folded, graph, captured, forward=forward)
    uses = Counter(id(p) for m in folded.modules() for p in m._parameters.values() if p is not None)
    records = {}
    with torch.no_grad():
        # into the layer after last: that layer may first take the BN after it (both exact)
        for plan in sorted(plans, key=lambda p: p.direction == "next"):
            errors = _apply(folded, plan, captured, uses)
            left = _channels_left(plan)
            records[plan.name] = LayerFold(plan.name, "partial" if left else plan.action,
                                           plan.into, plan.reason, *(errors or (None, None)),
                                           direction=plan.direction, kept_channels=left)
        summary.layers = [records[plan.name] for plan in plans]
        if args is not None:
            out = folded(*args)
            summary.max_error, summary.rel_error = max_error(out, reference)
    return (folded, summary) if report else folded


def _channels_left(plan: FoldPlan) -> int:
    """Channels of a BN folded in pieces that no layer took (0 for any other plan)."""
    if plan.direction != "pieces":
        return 0
    return sum(p.stop - p.start for p in plan.pieces if p.into is None)


def _trains(model: nn.Module) -> bool:
    """Whether ``model`` or any BN in it is in training mode (normalising with batch
    statistics, which fold replaces by the running ones)."""
    return model.training or any(is_batchnorm(m) and m.training for m in model.modules())


def _check_eval_stats(model: nn.Module) -> None:
    """Folding bakes in the running statistics: a BN that normalises with others in eval
    (``eval_stats`` "batch" or "mix") cannot be folded without changing what it computes."""
    for name, m in model.named_modules():
        stats = getattr(m, "eval_stats", "running")
        if is_batchnorm(m) and stats != "running":
            raise expected("BN layers on eval_stats='running' to fold (folding uses the running "
                           "statistics)", f"{name or type(m).__name__}: eval_stats={stats!r}; "
                           "set it to 'running' first")


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

