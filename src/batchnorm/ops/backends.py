"""Which kernels run a call: the one place the backends are chosen.

``kernels_for(x, *per_channel)`` gives the module whose ``*_impl`` functions run these
tensors: :mod:`.triton_gpu` (CUDA, Triton importable; CPU tensors only inside its ``on_cpu()``),
:mod:`.numba_cpu` (CPU, float32/float64), or None for PyTorch's own path
(:mod:`.torch_fallback`). Both kernel modules have the same functions with the same results.
"""
from __future__ import annotations

from types import ModuleType

from torch import Tensor

from . import numba_cpu, triton_gpu

__all__ = ["kernels_for"]


def kernels_for(x: Tensor, *per_channel: Tensor | None) -> ModuleType | None:
    """triton_gpu, numba_cpu, or None (PyTorch's path) for these tensors."""
    if triton_gpu.takes(x, *per_channel):
        return triton_gpu
    if numba_cpu.takes(x, *per_channel):
        return numba_cpu
    return None
