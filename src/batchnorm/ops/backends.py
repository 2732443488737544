"""Which kernels run a call: the one place the backends are chosen.

``kernels_for(x, *per_channel, fused=False)`` gives the module whose ``*_impl`` functions run
these tensors: :mod:`.triton_gpu` (CUDA, Triton importable; CPU tensors only inside its
``on_cpu()``), :mod:`.numba_cpu` (CPU, float32/float64), or None for PyTorch's own path
(:mod:`.torch_fallback`). Both kernel modules have the same functions with the same results.

The choice (:func:`set_backend`, or ``BATCHNORM_BACKEND`` in the environment, read at import):

- ``"auto"`` (the default): the numba kernels on CPU. On CUDA, PyTorch's path for plain BN and
  BN + activation, whose cuDNN / ATen kernels ours trailed on an H200 (0.35-0.48x on
  ResNet-50's shapes, benchmarks/README.md), and the Triton kernels where our layer does in one
  pass what PyTorch cannot: ``inplace=True`` (InPlace-ABN) and masks (``fused=True``).
- ``"kernels"``: our kernels wherever they take the tensors (CUDA plain BN included).
- ``"torch"``: PyTorch's path everywhere (the options still work, in PyTorch ops).
"""
from __future__ import annotations

import os
from types import ModuleType

from torch import Tensor

from ..errors import expected
from . import numba_cpu, triton_gpu

__all__ = ["kernels_for", "kernels_taking", "set_backend", "get_backend", "BACKENDS", "ENV"]

BACKENDS = ("auto", "kernels", "torch")
ENV = "BATCHNORM_BACKEND"
# plain BN on CUDA under "auto": PyTorch's path, since bench_gpu.py measured ours slower on an
# H200 (2026-12-04: every case's geometric mean below 1.0x; benchmarks/README.md)
_CUDA_PLAIN_KERNELS = False


def _checked(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise expected(f"{source} in {BACKENDS}", repr(name))
    return name.strip().lower()


_choice = _checked(os.environ.get(ENV, "auto") or "auto", ENV)


def set_backend(name: str) -> str:
    """Choose the backend every layer and op of this package runs on; returns the previous
    choice. ``"auto"`` (default), ``"kernels"`` or ``"torch"``; see :mod:`batchnorm.ops.backends`.

    >>> import batchnorm
    >>> previous = batchnorm.set_backend("torch")   # PyTorch's own kernels everywhere
    >>> batchnorm.set_backend(previous)
    'torch'
    """
    global _choice
    name = _checked(name, "backend")
    previous, _choice = _choice, name
    return previous


def get_backend() -> str:
    """The backend chosen: "auto", "kernels" or "torch"."""
    return _choice


def kernels_for(x: Tensor, *per_channel: Tensor | None, fused: bool = False) -> ModuleType | None:
    """triton_gpu, numba_cpu, or None (PyTorch's path) for these tensors under the choice;
    ``fused``: the call needs what only our kernels do in one pass (InPlace-ABN, masks)."""
    if _choice == "torch":
        return None
    kernels = kernels_taking(x, *per_channel)
    if kernels is triton_gpu and _choice == "auto" and not (fused or _CUDA_PLAIN_KERNELS):
        return None
    return kernels


def kernels_taking(x: Tensor, *per_channel: Tensor | None) -> ModuleType | None:
    """The kernel module that can run these tensors (triton_gpu, numba_cpu), whatever the
    choice, or None."""
    if triton_gpu.takes(x, *per_channel):
        return triton_gpu
    if numba_cpu.takes(x, *per_channel):
        return numba_cpu
    return None
