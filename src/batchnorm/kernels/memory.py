"""A kernel's arrays from NumPy arrays or from tensors' memory by address.

A kernel written with these takes either NumPy arrays (what the :mod:`batchnorm.kernels` entry
points pass) or tensors' memory by address (a tensor's ``data_ptr()``, dense, in the kernel's
dtype): the data as an ``(address, *shape)`` tuple, every other array as an address alone, its
shape the data's or ``(C,)`` (0 for an absent weight or bias). The choice is made when numba
compiles a signature, so the array kernels' code is unchanged, and a caller holding tensors
skips the NumPy view it would make of each (about 1 us each: more than a small layer's
arithmetic); integers are also the arguments numba's dispatcher types fastest. The two kinds
of signature are kernels of their own (``at=True`` in a kernel factory), one cache entry each.
"""
from __future__ import annotations

import numpy as np
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["memory", "like", "vector", "wide"]


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a pointer, for ``numba.carray``."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


def memory(t, dtype):
    """Inside a kernel: the data ``t`` itself (an array), or the ``dtype`` array at ``(address,
    *shape)``."""
    raise NotImplementedError("called inside a kernel only")


def like(t, data, dtype):
    """Inside a kernel: ``t`` itself (an array), or the ``dtype`` array of ``data``'s shape at
    the address ``t`` (an output)."""
    raise NotImplementedError("called inside a kernel only")


def vector(t, c, dtype):
    """Inside a kernel: ``t`` itself (an array), or the ``dtype`` array of ``(C,)`` at the
    address ``t``; empty at 0 (an absent weight or bias, as ``NO_PARAMETER`` passes it)."""
    raise NotImplementedError("called inside a kernel only")


def wide(t, c, dtype):
    """Inside a kernel: ``t`` itself (a float64 array), or :func:`vector` copied to float64
    (statistics held in the data's dtype, as a buffer is)."""
    raise NotImplementedError("called inside a kernel only")


@overload(memory, inline="always")
def _memory(t, dtype):
    if isinstance(t, types.Array):
        return lambda t, dtype: t
    return lambda t, dtype: carray(_pointer(t[0]), t[1:], dtype)


@overload(like, inline="always")
def _like(t, data, dtype):
    if isinstance(t, types.Array):
        return lambda t, data, dtype: t
    return lambda t, data, dtype: carray(_pointer(t), data.shape, dtype)


@overload(vector, inline="always")
def _vector(t, c, dtype):
    if isinstance(t, types.Array):
        return lambda t, c, dtype: t
    # (the length without a branch: a branch in an inlined overload trips numba's SSA check)
    return lambda t, c, dtype: carray(_pointer(t), (c * (t != 0),), dtype)


@overload(wide, inline="always")
def _wide(t, c, dtype):
    if isinstance(t, types.Array):
        return lambda t, c, dtype: t
    return lambda t, c, dtype: carray(_pointer(t), (c,), dtype).astype(np.float64)
