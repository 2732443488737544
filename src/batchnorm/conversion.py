"""convert / freeze / unfreeze: swap every BN in a model for another kind, on a copy.

One recursive walk (:func:`_swap`) over a deep copy of the model, driven by one table,
``_TARGETS``: each target says which modules it replaces and how it builds the replacement.
What counts as batch norm, and which input ranks a BN takes, is :mod:`batchnorm.graph`'s protocol
(``bn_kind``, ``bn_input_ranks``); the classes to build are in the small ``_FAMILIES`` table.
Parameters and buffers move to the replacement as they are (same tensors in the copy, so device,
dtype and ``requires_grad`` are kept), and so does the training flag.

``fuse_act=True`` then traces the converted model with ``torch.fx`` and turns each BN whose only
consumer is a ReLU / LeakyReLU / ELU / SiLU (module or functional) into one ``BatchNormAct``.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from numbers import Real
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import graph, layers, sync
from .errors import expected
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNormXd

__all__ = ["convert", "freeze", "unfreeze"]


# family -> input ranks -> class. "xd" is the rank-less SyncBatchNorm and what it converts to.
_FAMILIES: dict[str, dict[object, type]] = {
    "torch": {(2, 3): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d,
              "xd": nn.SyncBatchNorm},
    "ours": {(2, 3): layers.BatchNorm1d, (4,): layers.BatchNorm2d, (5,): layers.BatchNorm3d,
             "xd": layers._BatchNormXd},
    "ours_act": {(2, 3): layers.BatchNormAct1d, (4,): layers.BatchNormAct2d,
                 (5,): layers.BatchNormAct3d},
    "frozen": {(2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d,
               "xd": _FrozenBatchNormXd},
    "sync": {"xd": sync.SyncBatchNorm},  # rank-less; remembers the BN it replaced (source_ranks)
    "sync_act": {"xd": sync.SyncBatchNormAct},
}


def _family_of(module: nn.Module) -> str | None:
    """The family whose table holds exactly this module's class (not subclasses: their forward
    may differ, so they are not ours to swap)."""
    for family, classes in _FAMILIES.items():
        if type(module) in classes.values():
            return family
    return None


def _rank_key(module: nn.Module) -> object:
    ranks = getattr(module, "source_ranks", None) or graph.bn_input_ranks(module)
    return ranks if ranks in ((2, 3), (4,), (5,)) else "xd"


# ------------------------------------------------------------------------------------------------
# builders: one BN in, its replacement out (parameters and buffers moved, not copied)


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Hand src's tensors to dst (weight/bias as Parameters) and its training flag."""
    for name in ("weight", "bias"):
        t = getattr(src, name, None)
        if t is None:
            continue
        if not isinstance(t, nn.Parameter):  # a frozen BN's buffers
            t = nn.Parameter(t.detach())
        setattr(dst, name, t)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in dst._buffers and getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    dst.training = src.training


def _bn_args(bn: nn.Module) -> dict:
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats, bias=bn.bias is not None)


def _with_activation(bn: nn.Module, replacement: nn.Module) -> nn.Module:
    """replacement alone, or followed by the activation a BN+act module applied."""
    act = graph.activation_of(bn)
    if act is graph.UNKNOWN_ACTIVATION:
        raise expected("an activation convert can rebuild", f"{type(bn).__name__}.act={bn.act!r}")
    if act is None:
        return replacement
    act.train(bn.training)
    return nn.Sequential(replacement, act)


def _to_ours(bn: nn.Module) -> nn.Module:
    new = _FAMILIES["ours"][_rank_key(bn)](bn.num_features, **_bn_args(bn))
    _move_state(bn, new)
    return new


def _to_torch(bn: nn.Module) -> nn.Module:
    new = _FAMILIES["torch"][_rank_key(bn)](bn.num_features, **_bn_args(bn))
    _move_state(bn, new)
    return _with_activation(bn, new)


def _to_frozen(bn: nn.Module) -> nn.Module:
    if getattr(bn, "running_mean", None) is None:
        warnings.warn(f"freezing {type(bn).__name__}({bn.num_features}) without running "
                      "statistics: it normalises with mean 0 and variance 1", stacklevel=4)
    new = _FAMILIES["frozen"][_rank_key(bn)].from_batchnorm(bn)
    new.training = bn.training
    return _with_activation(bn, new)


def _to_trainable(frozen: nn.Module) -> nn.Module:
    new = _FAMILIES["ours"][_rank_key(frozen)](frozen.num_features, eps=frozen.eps)
    _move_state(frozen, new)
    new.num_batches_tracked = torch.zeros((), dtype=torch.long, device=frozen.weight.device)
    return new


def _act_args(bn: nn.Module) -> dict:
    return dict(act=bn.act, negative_slope=bn.negative_slope, alpha=bn.alpha, inplace=bn.inplace)


def _to_sync(bn: nn.Module) -> nn.Module:
    if _family_of(bn) == "ours_act":
        new = sync.SyncBatchNormAct(bn.num_features, **_act_args(bn), **_bn_args(bn),
                                    nonfinite=bn.nonfinite)
    else:
        new = sync.SyncBatchNorm(bn.num_features, **_bn_args(bn),
                                 nonfinite=getattr(bn, "nonfinite", "skip"))
    key = _rank_key(bn)
    new.source_ranks = None if key == "xd" else key
    _move_state(bn, new)
    return new


def _from_sync(bn: nn.Module) -> nn.Module:
    key = _rank_key(bn)
    if _family_of(bn) == "sync_act" and key != "xd":
        new = _FAMILIES["ours_act"][key](bn.num_features, **_act_args(bn), **_bn_args(bn),
                                         nonfinite=bn.nonfinite)
    else:
        new = _FAMILIES["ours"][key](bn.num_features, **_bn_args(bn), nonfinite=bn.nonfinite)
        new = _with_activation(bn, new)
    _move_state(bn, new[0] if isinstance(new, nn.Sequential) else new)
    return new


@dataclass(frozen=True)
class _Target:
    accepts: Callable[[nn.Module], bool]  # which modules this target replaces
    build: Callable[[nn.Module], nn.Module]  # the replacement


# convert's `to` -> target. A SyncBatchNorm helper adds its entry here ("sync").
_TARGETS: dict[str, _Target] = {
    "batchnorm": _Target(lambda m: _family_of(m) in ("torch", "sync", "sync_act"),
                         lambda m: _to_ours(m) if _family_of(m) == "torch" else _from_sync(m)),
    "torch": _Target(lambda m: _family_of(m) in ("ours", "ours_act", "sync", "sync_act"),
                     _to_torch),
    "sync": _Target(lambda m: _family_of(m) in ("torch", "ours", "ours_act"), _to_sync),
    "frozen": _Target(lambda m: graph.bn_kind(m) not in (None, "frozen"), _to_frozen),
}
_UNFREEZE = _Target(lambda m: graph.bn_kind(m) == "frozen", _to_trainable)


def _swap(model: nn.Module, target: _Target) -> nn.Module:
    """Replace, in place, every module target accepts; a module shared twice stays shared."""
    done: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) not in done:
            if target.accepts(m):
                done[id(m)] = target.build(m)
            else:
                done[id(m)] = m
                for name, child in list(m._modules.items()):  # shared children too
                    if child is None:
                        continue
                    new = visit(child)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)]

    return visit(model)


# ------------------------------------------------------------------------------------------------
# public API


def convert(model: nn.Module, to: str = "batchnorm", fuse_act: bool = False) -> nn.Module:
    r"""A copy of ``model`` with every batch-norm layer swapped for another kind.

    The input model is left untouched. Parameters, buffers (values, device, dtype,
    ``requires_grad``) and each layer's training flag are carried over, so the copy computes
    what the original computes (up to the kernels' rounding).

    Targets:

    - ``"batchnorm"``: PyTorch's ``BatchNorm1d/2d/3d`` (exact classes, not subclasses) become
      ours (:class:`batchnorm.BatchNorm2d`...). ``SyncBatchNorm``, which has no fixed rank,
      becomes our BN that accepts any rank 2..5 (and goes back to ``SyncBatchNorm`` with
      ``to="torch"``).
    - ``"torch"``: ours become PyTorch's; a ``BatchNormAct`` becomes
      ``nn.Sequential(BatchNorm, activation)`` (its state_dict keys gain ``0.``).
    - ``"frozen"``: any BN-like module (PyTorch's, ours, SyncBatchNorm, third-party) becomes
      :class:`batchnorm.FrozenBatchNorm2d`... with its statistics and affine parameters; a BN
      with an activation becomes ``nn.Sequential(frozen, activation)``.
    - ``"sync"``: PyTorch's and our BN (BatchNormAct too) become :class:`batchnorm.SyncBatchNorm`
      (:class:`batchnorm.SyncBatchNormAct`), each named after its path for error messages;
      ``to="batchnorm"`` / ``to="torch"`` turn them back into the class of the original rank.

    Args:
        model: any module; a BN itself is converted too.
        to: "batchnorm", "torch", "frozen" or "sync". Default: "batchnorm"
        fuse_act: with ``to="batchnorm"``, also trace the model with ``torch.fx`` and turn each
            BN whose only consumer is a ReLU / LeakyReLU / ELU / SiLU (module, ``F.relu``,
            ``F.leaky_relu``, ``F.elu``, ``F.silu``, ``torch.relu`` or ``x.relu()``) into one
            :class:`batchnorm.BatchNormAct2d`... keeping ``negative_slope`` / ``alpha``. The
            result is then a ``torch.fx.GraphModule``. A model fx cannot trace is returned
            converted but unfused, with a warning. Default: False

    Returns:
        The new model.

    Raises:
        BatchNormError: unknown ``to``, or ``fuse_act`` with a target other than "batchnorm".

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> ours = batchnorm.convert(net)                  # our BatchNorm2d, same weights
    >>> fused = batchnorm.convert(net, fuse_act=True)  # conv + BatchNormAct2d(act="relu")
    >>> back = batchnorm.convert(ours, to="torch")     # PyTorch's again
    """
    if to not in _TARGETS:
        raise expected(f"to in {tuple(_TARGETS)}", repr(to))
    if fuse_act and to != "batchnorm":
        raise expected("fuse_act=True only with to='batchnorm'", f"to={to!r}")
    new = _swap(copy.deepcopy(model), _TARGETS[to])
    if to == "sync":
        sync.name_layers(new)  # errors name the layer by its path
    return _fuse_activations(new) if fuse_act else new


def freeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BN frozen: ``convert(model, to="frozen")``.

    Frozen BN (:class:`batchnorm.FrozenBatchNorm2d`...) applies the fixed per-channel map
    ``y = x * scale + shift`` in train and eval alike, with all four tensors as buffers, so
    nothing is learned or updated. Like :func:`convert`, it returns a new model and leaves the
    input untouched.

    >>> frozen = batchnorm.freeze(net)
    """
    return convert(model, to="frozen")


def unfreeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every frozen BN turned back into a trainable one (ours).

    Each :class:`FrozenBatchNorm2d` (ours or torchvision's) becomes :class:`batchnorm.BatchNorm2d`
    with its ``weight`` and ``bias`` as Parameters, its running statistics, eps, the default
    momentum 0.1, and ``num_batches_tracked = 0``. Returns a new model; the input is untouched.

    >>> trainable = batchnorm.unfreeze(batchnorm.freeze(net))
    """
    return _swap(copy.deepcopy(model), _UNFREEZE)


# ------------------------------------------------------------------------------------------------
# fuse_act: BN -> activation pairs in the fx graph become one BatchNormAct


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every BN-like module whole (their forward checks shapes in Python)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return graph.is_batchnorm(m) or super().is_leaf_module(m, qualname)


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)


def _activation_spec(gm: fx.GraphModule, user: fx.Node, bn: fx.Node) -> tuple[str, dict] | None:
    """(act, kwargs) when ``user`` applies a fusable activation to ``bn`` alone, else None."""
    if not user.args or user.args[0] is not bn or bn in user.args[1:] or bn in user.kwargs.values():
        return None

    def const(position: int, name: str, default: float):
        value = user.args[position] if len(user.args) > position else user.kwargs.get(name, default)
        return value if isinstance(value, Real) and not isinstance(value, bool) else None

    if user.op == "call_module":
        m = gm.get_submodule(user.target)
        return {
            nn.ReLU: lambda: ("relu", {}),
            nn.LeakyReLU: lambda: ("leaky_relu", {"negative_slope": m.negative_slope}),
            nn.ELU: lambda: ("elu", {"alpha": m.alpha}),
            nn.SiLU: lambda: ("silu", {}),
        }.get(type(m), lambda: None)()
    if user.op == "call_method" and user.target in ("relu", "relu_") and len(user.args) == 1:
        return "relu", {}
    if user.op != "call_function":
        return None
    if user.target in _RELU_FUNCTIONS:
        return "relu", {}
    if user.target is F.silu:
        return "silu", {}
    if user.target is F.leaky_relu:
        slope = const(1, "negative_slope", 0.01)
        return None if slope is None else ("leaky_relu", {"negative_slope": slope})
    if user.target is F.elu:
        alpha = const(1, "alpha", 1.0)
        return None if alpha is None else ("elu", {"alpha": alpha})
    return None


def _fuse_activations(model: nn.Module) -> nn.Module:
    try:
        traced = _LeafTracer().trace(model)
    except Exception as exc:  # any tracing failure: keep the converted model as it is
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]
        warnings.warn(f"convert(fuse_act=True): torch.fx cannot trace {type(model).__name__} "
                      f"({reason}); BatchNorm layers converted but not fused with activations",
                      stacklevel=3)
        return model
    gm = fx.GraphModule(model, traced, class_name=type(model).__name__)
    for name, sub in gm.named_modules():  # fx builds fresh containers: give them their flags
        sub.training = model.get_submodule(name).training
    calls = Counter(n.target for n in traced.nodes if n.op == "call_module")
    fused = 0
    for node in list(traced.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        bn = gm.get_submodule(node.target)
        if _family_of(bn) != "ours" or _rank_key(bn) == "xd":
            continue
        (user,) = node.users
        spec = _activation_spec(gm, user, node)
        if spec is None:
            continue
        act, act_args = spec
        new = _FAMILIES["ours_act"][_rank_key(bn)](bn.num_features, act, **act_args, **_bn_args(bn),
                                                  nonfinite=bn.nonfinite)
        _move_state(bn, new)
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, new)
        user.replace_all_uses_with(node)
        traced.erase_node(user)
        fused += 1
    if not fused:
        return model
    traced.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm
