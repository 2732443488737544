"""convert / freeze / unfreeze: swap every BN in a model for another kind, on a copy.

One recursive walk (:func:`batchnorm.protocol.swap`) over a deep copy of the model, driven by
one table, ``_TARGETS``: each target says which modules it replaces and how it builds the
replacement. What counts as batch norm, which input ranks a BN takes and the class of each family
are :mod:`batchnorm.protocol`'s; this file adds the SyncBatchNorm families, whose builder is
:func:`batchnorm.sync.from_batchnorm`. Parameters and buffers move to the replacement as they are
(same tensors in the copy, so device, dtype and ``requires_grad`` are kept), and so does the
training flag.

``fuse_act=True`` then traces the converted model with ``torch.fx`` to find each BN whose only
consumer is a fused activation of the registry (:mod:`batchnorm.activations`). An activation
module is fused by swapping modules in the model's own tree (BN -> ``BatchNormAct``, activation
-> ``nn.Identity``), so the class, its forward and the state_dict keys stay; only an activation
applied as a function or tensor method needs the graph rewrite, whose result is a GraphModule.
``to="torch"`` / ``"frozen"`` undo the swap: a BN+act's activation goes back into the
``nn.Identity`` that alone follows it.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from numbers import Real
from typing import Callable

import torch
from torch import fx, nn

from . import activations, sync
from .errors import expected
from .protocol import (
    FAMILIES,
    UNKNOWN_ACTIVATION,
    act_args,
    activation_of,
    bn_args,
    bn_kind,
    family_of,
    frozen_class,
    is_batchnorm,
    move_state,
    options_of,
    rank_key,
    swap,
)

__all__ = ["convert", "freeze", "unfreeze"]


# the protocol's families and the rank-less SyncBatchNorm ones (they remember the BN they
# replaced: source_ranks)
_FAMILIES: dict[str, dict[object, type]] = {
    **FAMILIES,
    "sync": {"xd": sync.SyncBatchNorm},
    "sync_act": {"xd": sync.SyncBatchNormAct},
}


def _family_of(module: nn.Module) -> str | None:
    return family_of(module, _FAMILIES)


# ------------------------------------------------------------------------------------------------
# builders: one BN in, its replacement out (parameters and buffers moved, not copied)


def _with_activation(bn: nn.Module, replacement: nn.Module) -> nn.Module:
    """replacement alone, or followed by the activation a BN+act module applied."""
    act = activation_of(bn)
    if act is UNKNOWN_ACTIVATION:
        raise expected("an activation convert can rebuild", f"{type(bn).__name__}.act={bn.act!r}")
    if act is None:
        return replacement
    act.train(bn.training)
    return nn.Sequential(replacement, act)


def _to_ours(bn: nn.Module) -> nn.Module:
    new = _FAMILIES["ours"][rank_key(bn)](bn.num_features, **bn_args(bn))
    move_state(bn, new)
    return new


def _to_torch(bn: nn.Module) -> nn.Module:
    if options_of(bn):
        settings = ", ".join(f"{k}={v!r}" for k, v in options_of(bn).items())
        raise expected("BN layers without the options PyTorch's BatchNorm lacks, to convert "
                       "to='torch'", f"{type(bn).__name__}({bn.num_features}) with {settings}")
    new = _FAMILIES["torch"][rank_key(bn)](bn.num_features, **bn_args(bn))
    move_state(bn, new)
    return _with_activation(bn, new)


def _to_frozen(bn: nn.Module) -> nn.Module:
    if getattr(bn, "running_mean", None) is None:
        warnings.warn(f"freezing {type(bn).__name__}({bn.num_features}) without running "
                      "statistics: it normalises with mean 0 and variance 1", stacklevel=4)
    new = frozen_class(bn).from_batchnorm(bn)
    new.training = bn.training
    return _with_activation(bn, new)


def _to_trainable(frozen: nn.Module) -> nn.Module:
    new = _FAMILIES["ours"][rank_key(frozen)](frozen.num_features, eps=frozen.eps)
    move_state(frozen, new)
    new.num_batches_tracked = torch.zeros((), dtype=torch.long, device=frozen.weight.device)
    return new


def _from_sync(bn: nn.Module) -> nn.Module:
    key = rank_key(bn)
    if _family_of(bn) == "sync_act" and key != "xd":
        new = _FAMILIES["ours_act"][key](bn.num_features, **act_args(bn), **bn_args(bn),
                                         nonfinite=bn.nonfinite, **options_of(bn))
    else:
        new = _FAMILIES["ours"][key](bn.num_features, **bn_args(bn), nonfinite=bn.nonfinite,
                                     **options_of(bn))
        new = _with_activation(bn, new)
    move_state(bn, new[0] if isinstance(new, nn.Sequential) else new)
    return new


@dataclass(frozen=True)
class _Target:
    accepts: Callable[[nn.Module], bool]  # which modules this target replaces
    build: Callable[[nn.Module], nn.Module]  # the replacement


# convert's `to` -> target
_TARGETS: dict[str, _Target] = {
    "batchnorm": _Target(lambda m: _family_of(m) in ("torch", "sync", "sync_act"),
                         lambda m: _to_ours(m) if _family_of(m) == "torch" else _from_sync(m)),
    "torch": _Target(lambda m: _family_of(m) in ("ours", "ours_act", "sync", "sync_act"),
                     _to_torch),
    "sync": _Target(sync.converts, sync.from_batchnorm),
    "frozen": _Target(lambda m: bn_kind(m) not in (None, "frozen"), _to_frozen),
}
_UNFREEZE = _Target(lambda m: bn_kind(m) == "frozen", _to_trainable)


# ------------------------------------------------------------------------------------------------
# public API


def convert(model: nn.Module, to: str = "batchnorm", fuse_act: bool | str = False) -> nn.Module:
    r"""A copy of ``model`` with every batch-norm layer swapped for another kind.

    The input model is left untouched. Parameters, buffers (values, device, dtype,
    ``requires_grad``) and each layer's training flag are carried over, so the copy computes
    what the original computes (up to the kernels' rounding).

    Targets:

    - ``"batchnorm"``: PyTorch's ``BatchNorm1d/2d/3d`` (exact classes, not subclasses) become
      ours (:class:`batchnorm.BatchNorm2d`...). ``SyncBatchNorm``, which has no fixed rank,
      becomes our BN that accepts any rank 2..5 (and goes back to ``SyncBatchNorm`` with
      ``to="torch"``).
    - ``"torch"``: ours become PyTorch's; a ``BatchNormAct`` becomes PyTorch's BN and its
      activation takes the place of the ``nn.Identity`` module that alone takes the BN's output
      (what ``fuse_act`` leaves), so the state_dict keys stay; without one (or when fx cannot
      trace the model) it becomes ``nn.Sequential(BatchNorm, activation)`` (keys gain ``0.``).
    - ``"frozen"``: any BN-like module (PyTorch's, ours, SyncBatchNorm, third-party) becomes
      :class:`batchnorm.FrozenBatchNorm2d`... with its statistics and affine parameters; a BN
      with an activation becomes the frozen BN and its activation, placed as for ``"torch"``.
    - ``"sync"``: PyTorch's and our BN (BatchNormAct too) become :class:`batchnorm.SyncBatchNorm`
      (:class:`batchnorm.SyncBatchNormAct`), each named after its path for error messages;
      ``to="batchnorm"`` / ``to="torch"`` turn them back into the class of the original rank.

    Args:
        model: any module; a BN itself is converted too.
        to: "batchnorm", "torch", "frozen" or "sync". Default: "batchnorm"
        fuse_act: with ``to="batchnorm"``, also trace the model with ``torch.fx`` to find each
            BN whose only consumer is a fused activation of the registry (ReLU, LeakyReLU, ELU,
            SiLU, ReLU6, Hardswish) and turn the pair into one
            :class:`batchnorm.BatchNormAct2d`... keeping ``negative_slope`` / ``alpha``.
            An activation *module* called once is fused in the model's own module tree: the BN
            becomes the BatchNormAct, the activation ``nn.Identity()``; the result keeps the
            model's class, its forward (Python control flow included), ``nn.Sequential``
            indexing and the state_dict keys. An activation module called more than once (one
            ``self.relu`` for two calls) is left unfused, with a warning. An activation
            *function* (``F.relu``... ``F.hardswish``, ``torch.relu``, ``x.relu()``) can only be
            fused by rewriting the traced graph: the result is then a ``torch.fx.GraphModule``
            (every pair fused, forward kept for the one path fx traced), with a warning naming
            those pairs. A model fx cannot trace is returned converted but unfused, with a
            warning. Pairs are found on the path fx traces: a forward that uses the BN or the
            activation otherwise on another path is not seen. ``fuse_act="graph"`` fuses every
            pair by the graph rewrite (shared activation modules too, as in torchvision's
            ResNet blocks), without a warning: the result is a ``torch.fx.GraphModule``.
            Default: False

    Returns:
        The new model.

    Raises:
        BatchNormError: unknown ``to``, ``fuse_act`` not False, True or "graph", or
            ``fuse_act`` with a target other than "batchnorm".

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> ours = batchnorm.convert(net)                  # our BatchNorm2d, same weights
    >>> fused = batchnorm.convert(net, fuse_act=True)  # Sequential(conv, BatchNormAct2d, Identity)
    >>> back = batchnorm.convert(ours, to="torch")     # PyTorch's again
    """
    if to not in _TARGETS:
        raise expected(f"to in {tuple(_TARGETS)}", repr(to))
    if not (isinstance(fuse_act, bool) or (isinstance(fuse_act, str) and fuse_act == "graph")):
        raise expected("fuse_act False, True or 'graph'", repr(fuse_act))
    if fuse_act and to != "batchnorm":
        raise expected("fuse_act=True only with to='batchnorm'", f"to={to!r}")
    target = _TARGETS[to]
    new = copy.deepcopy(model)
    slots = _activation_slots(new, target)
    if slots:
        built: dict[int, nn.Module] = {}

        def build(m: nn.Module) -> nn.Module:
            built[id(m)] = target.build(m)
            return built[id(m)]

        new = _place_activations(swap(new, target.accepts, build), slots, built)
    else:
        new = swap(new, target.accepts, target.build)
    if to == "sync":
        sync.name_layers(new)  # errors name the layer by its path
    return _fuse_activations(new, graph=fuse_act == "graph") if fuse_act else new


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
    return swap(copy.deepcopy(model), _UNFREEZE.accepts, _UNFREEZE.build)


# ------------------------------------------------------------------------------------------------
# fuse_act: BN -> activation pairs found in the fx graph become one BatchNormAct


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every BN-like module whole (their forward checks shapes in Python)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """(the fx graph, "") or (None, why tracing failed)."""
    try:
        return _LeafTracer().trace(model), ""
    except Exception as exc:  # any tracing failure: the caller keeps the model as it is
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]


def _module_calls(graph: fx.Graph) -> Counter:
    """How often each module is called (fx names a module shared at two paths by its first)."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def _activation_spec(model: nn.Module, user: fx.Node, bn: fx.Node) -> tuple[str, dict] | None:
    """(act, kwargs) when ``user`` applies a fused activation of the registry to ``bn`` alone
    (a module of its exact class, one of its functions with constant arguments, or one of its
    tensor methods), else None."""
    if not user.args or user.args[0] is not bn or bn in user.args[1:] or bn in user.kwargs.values():
        return None
    if user.op == "call_module":
        m = model.get_submodule(user.target)
        entry = activations.by_module(m, exact=True)
        return (entry.name, entry.module_args(m)) if entry is not None and entry.fused else None
    if user.op == "call_method":
        entry = activations.by_call(user.target)
        ok = entry is not None and entry.fused and len(user.args) == 1
        return (entry.name, {}) if ok else None
    if user.op != "call_function":
        return None
    entry = activations.by_call(user.target)
    if entry is None or not entry.fused:
        return None
    kwargs = {}
    for name, position, default in entry.call_args:
        value = user.args[position] if len(user.args) > position else user.kwargs.get(name, default)
        if not isinstance(value, Real) or isinstance(value, bool):
            return None
        kwargs[name] = value
    return entry.name, kwargs


def _bn_act(bn: nn.Module, act: str, act_kwargs: dict) -> nn.Module:
    """Our BatchNormAct of ``bn``'s rank, with ``bn``'s configuration and tensors."""
    new = _FAMILIES["ours_act"][rank_key(bn)](bn.num_features, act, **act_kwargs, **bn_args(bn),
                                             nonfinite=bn.nonfinite, **options_of(bn))
    move_state(bn, new)
    return new


def _pair_names(pairs: list[tuple[fx.Node, fx.Node]]) -> str:
    def label(node: fx.Node) -> str:
        if node.op in ("call_module", "call_method"):
            return str(node.target)
        return getattr(node.target, "__name__", str(node.target))

    names = [f"{bn.target} -> {label(user)}" for bn, user in pairs]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _fuse_activations(model: nn.Module, graph: bool = False) -> nn.Module:
    """Fuse each (our BN, activation) pair of ``model`` (already converted) into a BatchNormAct.

    An activation module is swapped in the model's own tree (the BN becomes a BatchNormAct, the
    activation nn.Identity), which keeps its class, forward and state_dict keys. fx tracing only
    finds the pairs; the model becomes an fx GraphModule only when a pair applies its activation
    as a function, which only a graph rewrite can fuse, or when ``graph`` asks for the rewrite of
    every pair.
    """
    cls = type(model).__name__
    rewrite_all = graph
    graph, reason = _trace(model)
    if graph is None:
        warnings.warn(f"convert(fuse_act=True): torch.fx cannot trace {cls} ({reason}); "
                      "BatchNorm layers converted but not fused with activations", stacklevel=3)
        return model
    calls = _module_calls(graph)
    swaps, shared, functional = [], [], []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        bn = model.get_submodule(node.target)
        if _family_of(bn) != "ours" or rank_key(bn) == "xd":
            continue
        (user,) = node.users
        spec = _activation_spec(model, user, node)
        if spec is None:
            continue
        if user.op != "call_module":
            functional.append((node, user, spec))
        elif calls[user.target] == 1:
            swaps.append((node, user, spec))
        else:  # nn.Identity in its place would drop the activation from its other calls
            shared.append((node, user, spec))
    if rewrite_all:
        functional, swaps, shared = functional + swaps + shared, [], []
    if shared:
        names = _pair_names([(n, u) for n, u, _ in shared])
        warnings.warn(f"convert(fuse_act=True): {names} left unfused: each of these activation "
                      "modules is called more than once, so it cannot become nn.Identity; give "
                      "each call its own activation module to fuse them, or pass "
                      "fuse_act='graph' for an fx GraphModule with every pair fused",
                      stacklevel=3)
    if not swaps and not functional:
        if not shared:
            names = ", ".join(activations.FUSED[1:])
            warnings.warn(f"convert(fuse_act=True): no BN of {cls} is followed by an activation "
                          f"it can fuse ({names}) and nothing else; BN layers converted, none "
                          "fused", stacklevel=3)
        return model
    replacements: dict[int, nn.Module] = {}
    for node, user, (act, act_kwargs) in swaps:
        bn, activation = model.get_submodule(node.target), model.get_submodule(user.target)
        replacements[id(bn)] = _bn_act(bn, act, act_kwargs)
        replacements[id(activation)] = nn.Identity()
        replacements[id(activation)].training = activation.training
    model = swap(model, lambda m: id(m) in replacements, lambda m: replacements[id(m)])
    if not functional:
        return model
    if not rewrite_all:  # with fuse_act='graph' the user asked for it
        names = _pair_names([(n, u) for n, u, _ in functional])
        warnings.warn(f"convert(fuse_act=True) returns a torch.fx GraphModule, not a {cls}: "
                      f"fusing an activation function ({names}) takes a graph rewrite, and the "
                      "rewritten forward is the one path fx traced (Python control flow is "
                      "gone); use activation modules (nn.ReLU()...) to keep the class",
                      stacklevel=3)
    gm = fx.GraphModule(model, graph, class_name=cls)
    for name, sub in gm.named_modules():  # fx builds fresh containers: give them their flags
        sub.training = model.get_submodule(name).training
    for node, user, (act, act_kwargs) in functional:
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, _bn_act(gm.get_submodule(node.target), act,
                                                        act_kwargs))
        user.replace_all_uses_with(node)
        graph.erase_node(user)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# ------------------------------------------------------------------------------------------------
# back from a BatchNormAct: its activation goes where fuse_act took it from


def _activation_slots(model: nn.Module, target: _Target) -> dict[int, nn.Module]:
    """id of each BN+act module ``target`` replaces -> the nn.Identity module that alone takes
    its output, called once (the place fuse_act took the activation from); {} when fx cannot
    trace the model."""
    if is_batchnorm(model) or not any(target.accepts(m) and activation_of(m) is not None
                                      for m in model.modules()):
        return {}  # (a BN alone has no slot, and tracing its forward would run it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, _ = _trace(model)
    if graph is None:
        return {}
    calls = _module_calls(graph)
    slots = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op != "call_module" or calls[user.target] != 1 or user.args != (node,)
                or user.kwargs):
            continue
        bn, identity = model.get_submodule(node.target), model.get_submodule(user.target)
        if type(identity) is nn.Identity and target.accepts(bn):
            slots[id(bn)] = identity
    return slots


def _place_activations(model: nn.Module, slots: dict[int, nn.Module],
                       built: dict[int, nn.Module]) -> nn.Module:
    """Split each ``nn.Sequential(BN, act)`` built for a BN with a slot: the BN stays at the BN's
    path, the activation replaces the slot's nn.Identity (same computation, same keys)."""
    replacements: dict[int, nn.Module] = {}
    for bn_id, identity in slots.items():
        pair = built.get(bn_id)
        if isinstance(pair, nn.Sequential) and len(pair) == 2:
            replacements[id(pair)] = pair[0]
            pair[1].training = identity.training
            replacements[id(identity)] = pair[1]
    return swap(model, lambda m: id(m) in replacements, lambda m: replacements[id(m)])
