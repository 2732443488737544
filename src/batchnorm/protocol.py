"""The BN protocol every tool reads: what counts as batch norm, and how one is replaced.

- :func:`is_batchnorm` / :func:`bn_kind`: PyTorch's ``_BatchNorm`` (SyncBatchNorm and every
  subclass, ours included), frozen BN (ours, torchvision's: the affine tensors are buffers) and
  duck-typed third-party BN (``num_features``, ``eps``, ``running_mean``, ``running_var``).
  Decided by classes and attributes, not by class names.
- :func:`is_fixed_affine`: a frozen BN, or the eval-mode PyTorch BN ``fold`` leaves in place
  of one it cannot fold.
- :func:`bn_input_ranks`: the input ranks a BN class takes: PyTorch's ``BatchNorm1d/2d/3d``, and
  ours by their public ``input_ranks`` class attribute; a third-party class by the ``1d/2d/3d``
  suffix of its name (the one thing torchvision's FrozenBatchNorm2d says about its rank); None
  when any rank goes (SyncBatchNorm, other duck-typed BN).
- :data:`FAMILIES`, :func:`family_of`, :func:`rank_key`, :func:`frozen_class`: the classes of
  each family (PyTorch's, ours, ours with an activation, frozen) by input rank.
  ``batchnorm.conversion`` adds the SyncBatchNorm families.
- :func:`activation_of`: the activation a BN+act module applies after normalising.
- :func:`swap`, :func:`move_state`, :func:`bn_args`, :func:`act_args`: replacing BN modules in a
  model, one recursive walk, parameters and buffers moved (not copied).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from . import activations, layers
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
    _FrozenBatchNormXd,
)

__all__ = [
    "is_batchnorm",
    "bn_kind",
    "is_fixed_affine",
    "bn_input_ranks",
    "rank_key",
    "FAMILIES",
    "family_of",
    "frozen_class",
    "activation_of",
    "UNKNOWN_ACTIVATION",
    "swap",
    "move_state",
    "bn_args",
    "options_of",
    "act_args",
]


# ------------------------------------------------------------------------------------------------
# what counts as BN


def is_batchnorm(module: object) -> bool:
    """True for any BN-like module: PyTorch's, ours, SyncBatchNorm, frozen, or duck-typed."""
    return bn_kind(module) is not None


def bn_kind(module: object) -> str | None:
    """``"batchnorm"``, ``"sync"``, ``"frozen"``, ``"duck"`` or None when not BN-like."""
    if not isinstance(module, nn.Module) or isinstance(module, _InstanceNorm):
        return None
    if isinstance(module, nn.SyncBatchNorm):
        return "sync"
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if not (
        isinstance(getattr(module, "num_features", None), int)
        and hasattr(module, "eps")
        and isinstance(getattr(module, "running_mean", None), torch.Tensor)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    ):
        return None
    # frozen: the affine tensors are buffers, nothing is learned (ours and torchvision's)
    if "weight" in module._buffers or isinstance(module, _FrozenBatchNorm):
        return "frozen"
    return "duck"


def is_fixed_affine(module: object) -> bool:
    """True for a BN that applies a fixed per-channel affine: frozen BN, or what ``fold`` makes
    of a BN it cannot fold (PyTorch's BN in eval mode, parameters frozen, momentum 0)."""
    if bn_kind(module) == "frozen":
        return True
    return (isinstance(module, _BatchNorm) and not module.training and module.momentum == 0.0
            and module.running_mean is not None
            and not any(p.requires_grad for p in module.parameters(recurse=False)))


def bn_input_ranks(module: nn.Module) -> tuple[int, ...] | None:
    """Input ranks the BN class accepts ((2, 3), (4,), (5,), ...), or None when any rank goes."""
    if isinstance(module, nn.BatchNorm1d):
        return (2, 3)
    if isinstance(module, nn.BatchNorm2d):
        return (4,)
    if isinstance(module, nn.BatchNorm3d):
        return (5,)
    ranks = getattr(type(module), "input_ranks", None)  # ours: BN, BN+act, frozen, sync
    if ranks:
        return tuple(ranks)
    # third-party BN carries no rank but its name: the convention of PyTorch, torchvision
    # (FrozenBatchNorm2d) and timm is a 1d / 2d / 3d suffix
    name = type(module).__name__
    return next((r for suffix, r in _RANK_SUFFIXES if name.endswith(suffix)), None)


_RANK_SUFFIXES = (("1d", (2, 3)), ("2d", (4,)), ("3d", (5,)))


# ------------------------------------------------------------------------------------------------
# families: the class of each kind for each input rank

# family -> rank key -> class. "xd" is the rank-less one (SyncBatchNorm and what it converts to).
FAMILIES: dict[str, dict[object, type]] = {
    "torch": {(2, 3): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d,
              "xd": nn.SyncBatchNorm},
    "ours": {(2, 3): layers.BatchNorm1d, (4,): layers.BatchNorm2d, (5,): layers.BatchNorm3d,
             "xd": layers._BatchNormXd},
    "ours_act": {(2, 3): layers.BatchNormAct1d, (4,): layers.BatchNormAct2d,
                 (5,): layers.BatchNormAct3d},
    "frozen": {(2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d,
               "xd": _FrozenBatchNormXd},
}
_RANK_KEYS = ((2, 3), (4,), (5,))


def family_of(module: nn.Module, families: dict[str, dict] = FAMILIES) -> str | None:
    """The family whose table holds exactly this module's class (not subclasses: their forward
    may differ, so they are not ours to swap)."""
    for family, classes in families.items():
        if type(module) in classes.values():
            return family
    return None


def rank_key(module: nn.Module, seen_rank: int | None = None) -> object:
    """The family-table key for ``module``: its input ranks ((2, 3), (4,) or (5,)), those of the
    BN a sync layer replaced (``source_ranks``), else the rank it was seen with, else "xd"."""
    ranks = getattr(module, "source_ranks", None) or bn_input_ranks(module)
    if ranks in _RANK_KEYS:
        return ranks
    if seen_rank is not None:
        return next((key for key in _RANK_KEYS if seen_rank in key), "xd")
    return "xd"


def frozen_class(bn: nn.Module, seen_rank: int | None = None) -> type:
    """The frozen class for this BN: FrozenBatchNorm1d/2d/3d by its input ranks (or the rank of
    an input it was seen with), else the frozen BN that takes any rank."""
    return FAMILIES["frozen"][rank_key(bn, seen_rank)]


# ------------------------------------------------------------------------------------------------
# the activation of a BN+act module

UNKNOWN_ACTIVATION = object()


def activation_of(bn: nn.Module):
    """The activation a BN+act module applies after normalising, as a fresh module.

    None for plain BN (or ``act`` in {None, "identity", "none", "linear"}); ``UNKNOWN_ACTIVATION``
    when the module names one the registry (:mod:`batchnorm.activations`) does not know.
    """
    act = getattr(bn, "act", None)
    if act is None:
        return None
    if callable(getattr(bn, "activation", None)):  # our BatchNormAct*d builds its own
        act = bn.activation()
    if isinstance(act, nn.Module):
        return None if isinstance(act, nn.Identity) else copy.deepcopy(act)
    if isinstance(act, str):
        if act.lower() in activations.NO_ACTIVATION:
            return None
        entry = activations.get(act)
        if entry is not None:
            return entry.make_module(getattr(bn, "negative_slope", 0.01), getattr(bn, "alpha", 1.0))
    return UNKNOWN_ACTIVATION


# ------------------------------------------------------------------------------------------------
# replacing BN modules


def move_state(src: nn.Module, dst: nn.Module) -> None:
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


def bn_args(bn: nn.Module) -> dict:
    """The constructor arguments of a trainable BN that rebuild ``bn``'s configuration."""
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats, bias=bn.bias is not None)


def options_of(bn: nn.Module) -> dict:
    """The options for hard training conditions (Batch Renorm, Ghost BN, test-time statistics)
    that ``bn`` sets, as constructor keywords; {} for plain BN and PyTorch's."""
    options = getattr(bn, "options", None)
    return options() if callable(options) else {}


def act_args(bn: nn.Module) -> dict:
    """The activation arguments of one of our BN+act modules (BatchNormAct, SyncBatchNormAct)."""
    return dict(act=bn.act, negative_slope=bn.negative_slope, alpha=bn.alpha, inplace=bn.inplace)


def swap(model: nn.Module, accepts: Callable[[nn.Module], bool],
         build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every module ``accepts`` takes with ``build(module)``; a module shared
    twice stays shared (built once). Returns the model, or its replacement."""
    done: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) not in done:
            if accepts(m):
                done[id(m)] = build(m)
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
