"""Channel-fused kernels for the ``(N, C, S)`` layout: one task per channel makes both passes.

The training forward (statistics, then normalise) and backward (the reductions, then ``dx``)
each read the data twice. Done channel by channel, the channel's N planes are still in the
core's L2 cache (2 MB here; a ResNet-50 channel at batch 32 is 6 KB to 1.6 MB) when the second
pass reads them, so memory sees one read of the input instead of two. The per-channel work
between the passes (Chan merge, ``1 / sqrt(var + eps)``, the backward's coefficients) runs in
the same task, in parallel, instead of a serial merge of N * C partials afterwards.

Definitions and order are those of :mod:`.statistics`, :mod:`.normalize` and :mod:`.backward`:
each plane's shifted float64 sums (shift: the channel's first value), merged plane by plane in
order with Chan's formula; backward sums of plane partials in plane order. Nothing depends on
the thread count.

The plane reductions are separate (not inlined) functions compiled with ``reassoc`` so their
float64 sums vectorise; the element-wise passes are compiled without it, so LLVM cannot
re-associate ``(x - mean_hi) - mean_lo`` (that split keeps float32 data far from zero exact).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._activation import ELU, IDENTITY, LEAKY_RELU, RELU, SILU, unpack
from .backward import _reduce_row_ncs, _write_row_ncs
from .normalize import _row_ncs
from .statistics import REASSOC, _chan

# When to use these kernels instead of the plane-parallel ones (same definitions): a property of
# the shape only, never of the thread count, so results stay independent of it.
# - Below this many channels a task per channel leaves threads idle.
FUSE_MIN_CHANNELS = 16
# - Backward only: planes shorter than this many bytes make a channel's walk (two inputs, one
#   output) a jump of C * S values every few cache lines, which the hardware prefetchers do not
#   follow: measured up to 2.5x slower than the plane-parallel passes at 14x14 and 7x7 (784 and
#   196 B), faster from 28x28 (3 KB) up. The forward measured as fast or faster at every size.
FUSE_MIN_PLANE_BYTES = 2048


@njit(cache=True, fastmath=REASSOC)
def plane_moments(row, k):
    """(mean - k, M2) in float64 of one plane, from its sums shifted by k."""
    s = row.shape[0]
    a = 0.0
    b = 0.0
    for t in range(s):
        d = np.float64(row[t]) - k
        a += d
        b += d * d
    mean_d = a / s
    m2 = b - a * mean_d
    if m2 < 0.0:  # rounding; NaN stays NaN
        m2 = 0.0
    return mean_d, m2


@njit(cache=True, fastmath=REASSOC)
def _reduce_plane(xr, gr, mh, ml, sc, sh, act, k):
    """(sum g, sum g*e) in float64 over one plane (input x)."""
    if act == RELU:
        return _reduce_row_ncs(xr, gr, mh, ml, sc, sh, RELU, False, k)
    if act == LEAKY_RELU:
        return _reduce_row_ncs(xr, gr, mh, ml, sc, sh, LEAKY_RELU, False, k)
    if act == ELU:
        return _reduce_row_ncs(xr, gr, mh, ml, sc, sh, ELU, False, k)
    if act == SILU:
        return _reduce_row_ncs(xr, gr, mh, ml, sc, sh, SILU, False, k)
    return _reduce_row_ncs(xr, gr, mh, ml, sc, sh, IDENTITY, False, k)


@njit(cache=True, fastmath=REASSOC)
def _reduce_plane_from_output(yr, gr, mh, ml, sc, sh, act, k):
    """(sum g, sum g*e) in float64 over one plane (inplace mode: the output y)."""
    if act == LEAKY_RELU:
        return _reduce_row_ncs(yr, gr, mh, ml, sc, sh, LEAKY_RELU, True, k)
    if act == ELU:
        return _reduce_row_ncs(yr, gr, mh, ml, sc, sh, ELU, True, k)
    return _reduce_row_ncs(yr, gr, mh, ml, sc, sh, IDENTITY, True, k)


@njit(inline="always", cache=True)
def _normalize_planes(x, y, j, mh, ml, sc, sh, act, kt):
    for i in range(x.shape[0]):
        xr, yr = x[i, j], y[i, j]
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
def train_forward_ncs(x, y, gamma, beta, eps, act, k):
    """Statistics and y = act(normalised x), (N, C, S), one channel per task.

    ``gamma`` float64 (C,), ``beta`` (C,) in x's dtype. Returns float64 (mean, biased var).
    """
    n, c, s = x.shape
    kt = unpack(k)
    cnt = np.float64(n * s)
    mean = np.empty(c)
    var = np.empty(c)
    # per-channel values in x's dtype (an assignment into these arrays is the cast)
    mean_hi = np.empty(c, x.dtype)
    mean_lo = np.empty(c, x.dtype)
    scale = np.empty(c, x.dtype)
    for j in prange(c):
        shift = np.float64(x[0, j, 0])
        mu, m2 = plane_moments(x[0, j], shift)
        for i in range(1, n):
            pm, pm2 = plane_moments(x[i, j], shift)
            mu, m2 = _chan(np.float64(i * s), mu, m2, np.float64(s), pm, pm2)
        mu += shift
        v = m2 / cnt
        mean[j] = mu
        var[j] = v
        invstd = 1.0 / np.sqrt(v + eps)
        mean_hi[j] = mu
        mean_lo[j] = mu - np.float64(mean_hi[j])
        scale[j] = gamma[j] * invstd
        _normalize_planes(x, y, j, mean_hi[j], mean_lo[j], scale[j], beta[j], act, kt)
    return mean, var


@njit(inline="always", cache=True)
def _write_planes(dy, src, dx, j, mh, ml, sc, sh, a1, a0, a2, act, inplace, kt):
    for i in range(src.shape[0]):
        xr, gr, out = src[i, j], dy[i, j], dx[i, j]
        if act == RELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, RELU, inplace, kt)
        elif act == LEAKY_RELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, LEAKY_RELU, inplace, kt)
        elif act == ELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, ELU, inplace, kt)
        elif act == SILU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, SILU, inplace, kt)
        else:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, IDENTITY, inplace, kt)


@njit(inline="always", cache=True)
def _channel_constants(mean, var, gamma, eps, j, tmp):
    """invstd (float64) and mean_hi, mean_lo, scale in the data's dtype (via tmp)."""
    invstd = 1.0 / np.sqrt(var[j] + eps)
    tmp[0] = mean[j]
    tmp[1] = mean[j] - np.float64(tmp[0])
    tmp[2] = gamma[j] * invstd
    return invstd, tmp[0], tmp[1], tmp[2]


@njit(parallel=True, cache=True)
def train_backward_ncs(dy, src, dx, mean, var, gamma, beta, eps, act, k):
    """dx of the training forward, (N, C, S), one channel per task; float64 (sum g, sum g*e).

    Both passes of :mod:`.backward` (reduce, then write dx) for one channel in one task;
    ``mean``, ``var``, ``gamma`` float64 (C,), ``beta`` (C,) in the data's dtype.
    """
    n, c, s = src.shape
    kt = unpack(k)
    m = np.float64(n * s)
    sum_g = np.empty(c)
    sum_ge = np.empty(c)
    for j in prange(c):
        tmp = np.empty(6, src.dtype)
        invstd, mh, ml, sc = _channel_constants(mean, var, gamma, eps, j, tmp)
        sh = beta[j]
        a = 0.0
        b = 0.0
        for i in range(n):
            pa, pb = _reduce_plane(src[i, j], dy[i, j], mh, ml, sc, sh, act, kt)
            a += pa
            b += pb
        sum_g[j] = a
        sum_ge[j] = b
        k1 = gamma[j] * invstd
        sum_gxhat = b * invstd  # e = x - mean
        tmp[3] = k1
        tmp[4] = -k1 * a / m
        tmp[5] = -k1 * invstd * sum_gxhat / m
        _write_planes(dy, src, dx, j, mh, ml, sc, sh, tmp[3], tmp[4], tmp[5], act, False, kt)
    return sum_g, sum_ge


@njit(parallel=True, cache=True)
def train_backward_from_output_ncs(dy, src, dx, mean, var, gamma, beta, eps, act, k):
    """As :func:`train_backward_ncs` in the inplace mode: ``src`` is the output y."""
    n, c, s = src.shape
    kt = unpack(k)
    m = np.float64(n * s)
    sum_g = np.empty(c)
    sum_ge = np.empty(c)
    for j in prange(c):
        tmp = np.empty(6, src.dtype)
        invstd, mh, ml, sc = _channel_constants(mean, var, gamma, eps, j, tmp)
        sh = beta[j]
        a = 0.0
        b = 0.0
        for i in range(n):
            pa, pb = _reduce_plane_from_output(src[i, j], dy[i, j], mh, ml, sc, sh, act, kt)
            a += pa
            b += pb
        sum_g[j] = a
        sum_ge[j] = b
        g = gamma[j]
        k1 = g * invstd
        safe = g
        if abs(g) < eps:  # e = gamma * x_hat: divide by a gamma moved away from 0
            safe = -eps if g < 0 else eps
        sum_gxhat = b / safe
        tmp[3] = k1
        tmp[4] = -k1 * a / m
        tmp[5] = -k1 * sum_gxhat / (m * safe)
        _write_planes(dy, src, dx, j, mh, ml, sc, sh, tmp[3], tmp[4], tmp[5], act, True, kt)
    return sum_g, sum_ge
