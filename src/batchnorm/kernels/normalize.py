"""One pass over the data: y = act(((x - mean_hi) - mean_lo) * scale + shift).

Per channel, ``scale = gamma / sqrt(var + eps)`` and ``shift = beta`` are precomputed in the input's
dtype. The mean is split in two numbers of the input's dtype, ``mean_hi + mean_lo``: for float32
data far from zero (mean 1e4, std 1e-2) ``x - mean_hi`` is exact and ``- mean_lo`` restores the
float64 mean, so the centred value keeps full float32 precision without float64 arithmetic
per element. (Folding the mean into the shift, ``x * scale + shift'``, loses it all there.)

Each kernel dispatches on the activation code *outside* its inner loop, calling an inlined row
function with a constant code: LLVM does not hoist the activation branch out of these loops by
itself, and the loop only vectorises once the branch is gone.
"""
from __future__ import annotations

from numba import njit, prange

from ._activation import ELU, IDENTITY, LEAKY_RELU, RELU, SILU, activate, unpack
from .statistics import rows_per_chunk


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


@njit(parallel=True, cache=True)
def normalize_ncs(x, y, mean_hi, mean_lo, scale, shift, act, k):
    """y (N, C, S) = act(normalised x (N, C, S)) for one (n, c) plane per task."""
    n, c, s = x.shape
    kt = unpack(k)
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, yr, mh, ml, sc, sh = x[i, j], y[i, j], mean_hi[j], mean_lo[j], scale[j], shift[j]
        if act == RELU:
            _row_ncs(xr, yr, mh, ml, sc, sh, RELU, kt)
        elif act == LEAKY_RELU:
            _row_ncs(xr, yr, mh, ml, sc, sh, LEAKY_RELU, kt)
        elif act == ELU:
            _row_ncs(xr, yr, mh, ml, sc, sh, ELU, kt)
        elif act == SILU:
            _row_ncs(xr, yr, mh, ml, sc, sh, SILU, kt)
        else:
            _row_ncs(xr, yr, mh, ml, sc, sh, IDENTITY, kt)


@njit(parallel=True, cache=True)
def normalize_mc(x, y, mean_hi, mean_lo, scale, shift, act, k):
    """y (M, C) = act(normalised x (M, C)), channels-last, a block of rows per task."""
    m, c = x.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    for q in prange((m + rows - 1) // rows):
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, yr = x[r], y[r]
            if act == RELU:
                _row_mc(xr, yr, mean_hi, mean_lo, scale, shift, RELU, kt)
            elif act == LEAKY_RELU:
                _row_mc(xr, yr, mean_hi, mean_lo, scale, shift, LEAKY_RELU, kt)
            elif act == ELU:
                _row_mc(xr, yr, mean_hi, mean_lo, scale, shift, ELU, kt)
            elif act == SILU:
                _row_mc(xr, yr, mean_hi, mean_lo, scale, shift, SILU, kt)
            else:
                _row_mc(xr, yr, mean_hi, mean_lo, scale, shift, IDENTITY, kt)
