"""One pass over the data: y = act(((x - mean_hi) - mean_lo) * scale + shift).

Per channel, ``scale = gamma / sqrt(var + eps)`` and ``shift = beta`` are precomputed in the input's
dtype. The mean is split in two numbers of the input's dtype, ``mean_hi + mean_lo``: for float32
data far from zero (mean 1e4, std 1e-2) ``x - mean_hi`` is exact and ``- mean_lo`` restores the
float64 mean, so the centred value keeps full float32 precision without float64 arithmetic
per element. (Folding the mean into the shift, ``x * scale + shift'``, loses it all there.)

Each kernel is made for one activation (its code a closure constant, see ``_compile.py``): the
inner loop has no activation branch, which it needs to vectorise (LLVM does not hoist such a
branch out of these loops by itself).
"""
from __future__ import annotations

from numba import njit, prange

from ._activation import activate, unpack
from ._compile import specialised
from .statistics import plane_task, rows_per_chunk


@njit(inline="always", cache=True)
def _row_ncs(xr, yr, mh, ml, sc, sh, act, k):
    """One (n, c) plane: per-channel values are scalars."""
    for t in range(xr.shape[0]):
        yr[t] = activate(((xr[t] - mh) - ml) * sc + sh, act, k)


@njit(inline="always", cache=True)
def _row_mc(xr, yr, mh, ml, sc, sh, act, k):
    """One channels-last row: per-channel values are arrays."""
    for j in range(xr.shape[0]):
        yr[j] = activate(((xr[j] - mh[j]) - ml[j]) * sc[j] + sh[j], act, k)


@specialised(parallel=True)
def normalize_ncs(act, dtype):
    """Kernel: y (N, C, S) = act(normalised x (N, C, S)), ``splits`` tasks per sample (see
    ``statistics.plane_task``)."""

    def kernel(x, y, mean_hi, mean_lo, scale, shift, k, splits):
        n, c, s = x.shape
        kt = unpack(k)
        for q in prange(n * splits):
            i, j0, j1 = plane_task(q, splits, c)
            for j in range(j0, j1):
                _row_ncs(x[i, j], y[i, j], mean_hi[j], mean_lo[j], scale[j], shift[j], act, kt)

    return kernel


@specialised(parallel=True)
def normalize_mc(act, dtype):
    """Kernel: y (M, C) = act(normalised x (M, C)), channels-last, a block of rows per task."""

    def kernel(x, y, mean_hi, mean_lo, scale, shift, k):
        m, c = x.shape
        kt = unpack(k)
        rows = rows_per_chunk(c)
        for q in prange((m + rows - 1) // rows):
            for r in range(q * rows, min(m, (q + 1) * rows)):
                _row_mc(x[r], y[r], mean_hi, mean_lo, scale, shift, act, kt)

    return kernel
