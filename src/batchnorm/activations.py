"""The one registry of activations: every other file reads it.

Each :class:`Activation` says what the project knows about one activation: its kernel code (for
the ones the fused kernels and ``BatchNormAct`` apply), the PyTorch function, the module classes,
functions and tensor methods that apply it in a model's graph, whether it can be inverted (the
InPlace-ABN mode) and how, and its derivative. The kernels implement the codes (the switch in
``kernels/_activation.py``); the ops' fallback, the layers, ``convert(fuse_act=True)``, the graph
helpers and the tools take everything else from here. Adding an activation to the fused layers
is one entry here plus its branch in the kernels; a test runs every entry through all of them.

Activations without a kernel code (GELU, Sigmoid, ...) are here so that the graph helpers recognise
them (``inspect``'s placement findings) and can rebuild them (a timm-style BN+act module's
``act="gelu"``); ``BatchNormAct`` does not take them.

Conventions follow PyTorch: the derivative at 0 is the left one for relu / leaky_relu / elu
(``z > 0`` takes the positive branch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .numerics import elu_inverse_floor

__all__ = ["Activation", "REGISTRY", "FUSED", "INVERTIBLE", "get", "by_module", "by_call"]


@dataclass(frozen=True)
class Activation:
    """What the project knows about one activation.

    ``apply(z, negative_slope, alpha)`` and ``derivative(z, negative_slope, alpha)`` are the
    PyTorch forms; ``inverse(y, negative_slope, alpha) -> (z, act'(z))`` recovers the
    pre-activation and the derivative from the output, for the invertible ones. ``params`` names
    the constructor arguments of ``BatchNormAct`` the activation reads, ``positive`` those that
    must be > 0 for the inverse to exist. ``call_args`` gives, for a functional call, each
    parameter's position, keyword and default (``F.leaky_relu(x, 0.2)``).
    """

    name: str
    code: Optional[int]  # the fused kernels' code; None: recognised in graphs, not fused
    make_module: Callable[[float, float], nn.Module]  # (negative_slope, alpha) -> module
    apply: Optional[Callable[[Tensor, float, float], Tensor]] = None
    derivative: Optional[Callable[[Tensor, float, float], Tensor]] = None
    inverse: Optional[Callable[[Tensor, float, float], tuple[Tensor, Tensor]]] = None
    params: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    modules: tuple[type, ...] = ()  # classes that apply it (exact types match for fusing)
    functions: tuple = ()  # torch functions that apply it
    methods: tuple[str, ...] = ()  # Tensor methods that apply it
    call_args: tuple[tuple[str, int, float], ...] = ()
    aliases: tuple[str, ...] = ()  # other names a third-party BN+act may use ("swish")
    module_args: Callable[[nn.Module], dict] = field(default=lambda m: {})

    @property
    def fused(self) -> bool:
        """True when the fused kernels (and so ``BatchNormAct``) apply it."""
        return self.code is not None

    @property
    def invertible(self) -> bool:
        return self.inverse is not None


# ------------------------------------------------------------------------------------------------
# the torch forms of the fused activations' inverses (InPlace-ABN backward from the output)


def _identity_inverse(y: Tensor, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
    return y, torch.ones_like(y)


def _leaky_relu_inverse(y: Tensor, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
    neg = y < 0
    slope = y.new_full((), negative_slope)  # a bare float would be taken as float32
    return torch.where(neg, y / negative_slope, y), torch.where(neg, slope, 1.0)


def _elu_inverse(y: Tensor, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
    neg = y <= 0
    u = torch.clamp(y / alpha, min=elu_inverse_floor(torch.finfo(y.dtype).eps))
    return torch.where(neg, torch.log1p(u), y), torch.where(neg, y + alpha, 1.0)


def _silu_derivative(z: Tensor, negative_slope: float, alpha: float) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _hardswish_derivative(z: Tensor, negative_slope: float, alpha: float) -> Tensor:
    # PyTorch's hardswish_backward: 0 up to -3 (inclusive), z / 3 + 1/2 below 3, 1 from 3 on;
    # NaN gives NaN, as its vectorised loop does
    return torch.where(z <= -3, torch.zeros_like(z),
                       torch.where(z >= 3, torch.ones_like(z), z / 3 + 0.5))


_ENTRIES = (
    # the fused ones, in kernel-code order (the order of BatchNormAct's act argument)
    Activation(
        "identity", 0, lambda ns, a: nn.Identity(),
        apply=lambda z, ns, a: z,
        derivative=lambda z, ns, a: torch.ones_like(z),
        inverse=_identity_inverse,
    ),
    Activation(
        "relu", 1, lambda ns, a: nn.ReLU(),
        apply=lambda z, ns, a: F.relu(z),
        derivative=lambda z, ns, a: (z > 0).to(z.dtype),
        modules=(nn.ReLU,), functions=(F.relu, F.relu_, torch.relu, torch.relu_),
        methods=("relu", "relu_"),
    ),
    Activation(
        "leaky_relu", 2, lambda ns, a: nn.LeakyReLU(ns),
        apply=lambda z, ns, a: F.leaky_relu(z, ns),
        derivative=lambda z, ns, a: torch.where(z > 0, 1.0, ns).to(z.dtype),
        inverse=_leaky_relu_inverse,
        params=("negative_slope",), positive=("negative_slope",),
        modules=(nn.LeakyReLU,), functions=(F.leaky_relu,),
        call_args=(("negative_slope", 1, 0.01),),
        module_args=lambda m: {"negative_slope": m.negative_slope},
    ),
    Activation(
        "elu", 3, lambda ns, a: nn.ELU(a),
        apply=lambda z, ns, a: F.elu(z, a),
        derivative=lambda z, ns, a: torch.where(z > 0, torch.ones_like(z), a * torch.exp(z)),
        inverse=_elu_inverse,
        params=("alpha",), positive=("alpha",),
        modules=(nn.ELU,), functions=(F.elu,),
        call_args=(("alpha", 1, 1.0),),
        module_args=lambda m: {"alpha": m.alpha},
    ),
    Activation(
        "silu", 4, lambda ns, a: nn.SiLU(),
        apply=lambda z, ns, a: F.silu(z),
        derivative=_silu_derivative,
        modules=(nn.SiLU,), functions=(F.silu,), aliases=("swish",),
    ),
    Activation(
        "relu6", 5, lambda ns, a: nn.ReLU6(),
        apply=lambda z, ns, a: F.relu6(z),
        derivative=lambda z, ns, a: ((z > 0) & (z < 6)).to(z.dtype),
        modules=(nn.ReLU6,), functions=(F.relu6,),
    ),
    Activation(
        "hardswish", 6, lambda ns, a: nn.Hardswish(),
        apply=lambda z, ns, a: F.hardswish(z),
        derivative=_hardswish_derivative,
        modules=(nn.Hardswish,), functions=(F.hardswish,),
    ),
    # recognised in graphs and rebuilt from a BN+act module's name, not fused
    Activation("gelu", None, lambda ns, a: nn.GELU(), modules=(nn.GELU,), functions=(F.gelu,)),
    Activation("sigmoid", None, lambda ns, a: nn.Sigmoid(), modules=(nn.Sigmoid,),
               functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid", "sigmoid_")),
    Activation("tanh", None, lambda ns, a: nn.Tanh(), modules=(nn.Tanh,),
               functions=(torch.tanh, F.tanh), methods=("tanh", "tanh_")),
    Activation("selu", None, lambda ns, a: nn.SELU(), modules=(nn.SELU,), functions=(F.selu,)),
    Activation("celu", None, lambda ns, a: nn.CELU(), modules=(nn.CELU,)),
    Activation("mish", None, lambda ns, a: nn.Mish(), modules=(nn.Mish,), functions=(F.mish,)),
    Activation("hardsigmoid", None, lambda ns, a: nn.Hardsigmoid(), modules=(nn.Hardsigmoid,),
               functions=(F.hardsigmoid,)),
    Activation("hardtanh", None, lambda ns, a: nn.Hardtanh(), modules=(nn.Hardtanh,),
               functions=(F.hardtanh,)),
    Activation("prelu", None, lambda ns, a: nn.PReLU(), modules=(nn.PReLU,)),
    Activation("softplus", None, lambda ns, a: nn.Softplus(), modules=(nn.Softplus,),
               functions=(F.softplus,)),
)

REGISTRY: dict[str, Activation] = {a.name: a for a in _ENTRIES}
FUSED: tuple[str, ...] = tuple(a.name for a in _ENTRIES if a.fused)  # BatchNormAct's act values
INVERTIBLE: tuple[str, ...] = tuple(a.name for a in _ENTRIES if a.fused and a.invertible)
_ALIASES = {alias: a for a in _ENTRIES for alias in a.aliases}
# names a BN+act module may give for "no activation"
NO_ACTIVATION = ("identity", "none", "linear", "")


def get(name: str) -> Activation | None:
    """The entry for ``name`` (or one of its aliases, any case, ``-`` for ``_``), or None."""
    key = name.lower().replace("-", "_")
    return REGISTRY.get(key) or _ALIASES.get(key)


def by_module(module: nn.Module, *, exact: bool = False) -> Activation | None:
    """The entry whose module classes include ``module``'s (exact type, or isinstance)."""
    for a in _ENTRIES:
        if type(module) in a.modules:
            return a
    if not exact:
        for a in _ENTRIES:
            if a.modules and isinstance(module, a.modules):
                return a
    return None


def by_call(target) -> Activation | None:
    """The entry whose torch functions include ``target`` (or whose methods name it)."""
    for a in _ENTRIES:
        if any(target is f for f in a.functions) or (isinstance(target, str)
                                                      and target in a.methods):
            return a
    return None


def module_classes() -> tuple[type, ...]:
    """Every module class of the registry (nn.Identity excluded: it is no activation)."""
    return tuple(cls for a in _ENTRIES for cls in a.modules)


def labels() -> set[str]:
    """Names of every function and method of the registry, as an fx graph labels them."""
    return ({getattr(f, "__name__", str(f)) for a in _ENTRIES for f in a.functions}
            | {m for a in _ENTRIES for m in a.methods})

