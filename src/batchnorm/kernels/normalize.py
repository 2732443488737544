"""One pass over the data: y = act(((x - mean_hi) - mean_lo) * scale + shift).

Per channel, ``scale = gamma / sqrt(var + eps)`` and ``shift = beta`` are computed in the input's
dtype first, inside the same call (:func:`.per_channel.channel_values`, the arithmetic of
:func:`.per_channel.prepare`); the call ends with the running update when it is given the
buffers: a layer's step after its statistics is one call.

The mean is split in two numbers of the input's dtype, ``mean_hi + mean_lo``: for float32 data far
from zero (mean 1e4, std 1e-2) ``x - mean_hi`` is exact and ``- mean_lo`` restores the float64
mean, so the centred value keeps full float32 precision without float64 arithmetic per element.
(Folding the mean into the shift, ``x * scale + shift'``, loses it all there.)

Each kernel is made for one activation (its code a closure constant, see ``_compile.py``): the
inner loop has no activation branch, which it needs to vectorise (LLVM does not hoist such a
branch out of these loops by itself).
"""
from __future__ import annotations

from numba import njit, prange

from ._activation import activate, unpack
from ._compile import specialised
from .memory import like, memory, vector, wide
from .per_channel import channel_values, tiled, update_running
from .statistics import plane_task, rows_per_chunk, span, span_rows


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


@njit(inline="always", cache=True)
def _updated(mean, var, running_mean, running_var, factor, n, check):
    """The running update after the pass when buffers are given (empty ones: none); ok."""
    if running_mean.shape[0] == 0:
        return True
    return update_running(mean, var, running_mean, running_var, factor, n, check)


@njit(inline="always", cache=True)
def _arrays(x, y, mean, var, weight, bias, running_mean, running_var, dtype):
    """A pass's arrays from arrays as they are or from tensors' memory by address
    (:mod:`.memory`): the statistics float64, the rest in the data's dtype."""
    x = memory(x, dtype)
    c = x.shape[1]
    return (x, like(y, x, dtype), wide(mean, c, dtype), wide(var, c, dtype),
            vector(weight, c, dtype), vector(bias, c, dtype), vector(running_mean, c, dtype),
            vector(running_var, c, dtype))


@specialised(parallel=True)
def normalize_ncs(act, dtype, at=False):
    """Kernel: y (N, C, S) = act(normalised x (N, C, S)) from float64 ``mean`` / ``var``,
    ``splits`` tasks per sample (see ``statistics.plane_task``), then the running update of
    :func:`.per_channel.running_update` when the buffers are not empty; returns its ok. One call
    does a layer's whole step after the statistics. ``at``: the kernel of the same code taking
    tensors' memory by address (:mod:`.memory`), a kernel (and cache) of its own: True for every
    tensor by address (eval), "train" for all but the float64 statistics, which come as arrays
    (the training step's, from its statistics call)."""

    def kernel(x, y, mean, var, weight, bias, eps, k, splits, running_mean, running_var, factor,
               n_values, check):
        x, y, mean, var, weight, bias, running_mean, running_var = _arrays(
            x, y, mean, var, weight, bias, running_mean, running_var, dtype)
        n, c, s = x.shape
        _, _, mean_hi, mean_lo, scale, shift = channel_values(x, mean, var, weight, bias, eps)
        kt = unpack(k)
        for q in prange(n * splits):
            i, j0, count = plane_task(q, splits, c)
            for jj in range(count):
                j = j0 + jj
                _row_ncs(x[i, j], y[i, j], mean_hi[j], mean_lo[j], scale[j], shift[j], act, kt)
        return _updated(mean, var, running_mean, running_var, factor, n_values, check)

    return kernel


@specialised(parallel=True)
def normalize_mc(act, dtype, at=False):
    """Kernel: y (M, C) = act(normalised x (M, C)), channels-last, a block of rows per task
    (few channels: spans of rows, ``statistics.span``); the rest as :func:`normalize_ncs`."""

    def kernel(x, y, mean, var, weight, bias, eps, k, running_mean, running_var, factor,
               n_values, check):
        x, y, mean, var, weight, bias, running_mean, running_var = _arrays(
            x, y, mean, var, weight, bias, running_mean, running_var, dtype)
        m, c = x.shape
        _, _, mean_hi, mean_lo, scale, shift = channel_values(x, mean, var, weight, bias, eps)
        kt = unpack(k)
        reps = span_rows(c)
        smh, sml, ssc, ssh = (tiled(mean_hi, reps), tiled(mean_lo, reps), tiled(scale, reps),
                              tiled(shift, reps))
        xf, yf = x.reshape(m * c), y.reshape(m * c)
        rows = rows_per_chunk(c)
        for q in prange((m + rows - 1) // rows):
            r0 = q * rows
            r1 = min(m, r0 + rows)
            for p in range((r1 - r0 + reps - 1) // reps):
                _row_mc(span(xf, c, r0, r1, reps, p), span(yf, c, r0, r1, reps, p), smh, sml,
                        ssc, ssh, act, kt)
        return _updated(mean, var, running_mean, running_var, factor, n_values, check)

    return kernel
