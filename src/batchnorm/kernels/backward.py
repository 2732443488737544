"""Backward kernels: activation derivative and batch-norm backward fused, two passes.

With z the pre-activation, g = dL/dz = dy * act'(z), e the centred input (x - mean) and
x_hat = e * invstd, per channel:

    pass 1 (reduce):  sum_g = sum(g),  sum_ge = sum(g * e)         float64 partials per chunk
    pass 2 (write):   dx = k1 * g + k0 + k2 * e

with ``k1 = gamma * invstd``, ``k0 = -k1 * sum_g / m`` and ``k2 = -k1 * invstd^2 * sum_ge / m``
(the training formula ``dx = gamma*invstd*(g - mean(g) - x_hat*mean(g*x_hat))``, x_hat = e*invstd);
in evaluation ``k0 = k2 = 0`` and one pass does both.

In the inplace (InPlace-ABN) mode the source is the output y: z = act^-1(y), g uses act' written
with y, and e = z - beta stands for gamma * x_hat, so x_hat = e / gamma: the caller builds the
coefficients with that. Partials are summed in a fixed order, so results do not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._activation import (
    ELU,
    IDENTITY,
    LEAKY_RELU,
    RELU,
    SILU,
    derivative,
    derivative_from_output,
    inverse,
    unpack,
)
from .statistics import REASSOC, rows_per_chunk

# Each kernel dispatches on the activation outside its inner loop and calls an inlined row
# function with constants, so that every inner loop is branch-free and vectorises (see
# normalize.py). The inplace mode (source = output y) has kernels of its own (*_from_output_*):
# each compiles only when first used, and compile time grows with the number of branches.


@njit(inline="always", cache=True)
def _grad_centred(src, dy, mh, ml, sc, sh, act, inplace, k):
    """(g, e) for one element: g = dL/dz, e = centred value (see the module docstring)."""
    if inplace:
        z = inverse(src, act, k)
        return dy * derivative_from_output(src, act, k), z - sh
    e = (src - mh) - ml
    if act == IDENTITY:
        return dy, e
    return dy * derivative(e * sc + sh, act, k), e


@njit(inline="always", cache=True)
def _reduce_row_ncs(xr, gr, mh, ml, sc, sh, act, inplace, k):
    a = 0.0
    b = 0.0
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, inplace, k)
        a += np.float64(g)
        b += np.float64(g) * np.float64(e)
    return a, b


@njit(inline="always", cache=True)
def _reduce_row_mc(xr, gr, mh, ml, sc, sh, acc_g, acc_ge, act, inplace, k):
    for j in range(xr.shape[0]):
        g, e = _grad_centred(xr[j], gr[j], mh[j], ml[j], sc[j], sh[j], act, inplace, k)
        acc_g[j] += np.float64(g)
        acc_ge[j] += np.float64(g) * np.float64(e)


@njit(inline="always", cache=True)
def _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, act, inplace, k):
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, inplace, k)
        out[t] = a1 * g + a0 + a2 * e


@njit(inline="always", cache=True)
def _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, act, inplace, k):
    for j in range(xr.shape[0]):
        g, e = _grad_centred(xr[j], gr[j], mh[j], ml[j], sc[j], sh[j], act, inplace, k)
        out[j] = k1[j] * g + k0[j] + k2[j] * e


@njit(inline="always", cache=True)
def _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, act, k):
    a = 0.0
    b = 0.0
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, False, k)
        out[t] = g * sc
        a += np.float64(g)
        b += np.float64(g) * np.float64(e)
    return a, b


@njit(inline="always", cache=True)
def _eval_row_mc(xr, gr, out, mh, ml, sc, sh, acc_g, acc_ge, act, k):
    for j in range(xr.shape[0]):
        g, e = _grad_centred(xr[j], gr[j], mh[j], ml[j], sc[j], sh[j], act, False, k)
        out[j] = g * sc[j]
        acc_g[j] += np.float64(g)
        acc_ge[j] += np.float64(g) * np.float64(e)


@njit(cache=True)
def _sum_rows(part):
    """Column sums of (chunks, C) partials, chunk by chunk in order (fixed, thread-independent)."""
    out = np.zeros(part.shape[1])
    for q in range(part.shape[0]):
        for j in range(part.shape[1]):
            out[j] += part[q, j]
    return out


@njit(parallel=True, cache=True, fastmath=REASSOC)
def reduce_ncs(dy, src, mean_hi, mean_lo, scale, shift, act, k):
    """Per-channel float64 (sum g, sum g*e) over (N, C, S)."""
    n, c, s = src.shape
    kt = unpack(k)
    part_g = np.empty((n, c))
    part_ge = np.empty((n, c))
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, gr, mh, ml, sc, sh = src[i, j], dy[i, j], mean_hi[j], mean_lo[j], scale[j], shift[j]
        if act == RELU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, RELU, False, kt)
        elif act == LEAKY_RELU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, LEAKY_RELU, False, kt)
        elif act == ELU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, ELU, False, kt)
        elif act == SILU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, SILU, False, kt)
        else:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, IDENTITY, False, kt)
        part_g[i, j] = a
        part_ge[i, j] = b
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def reduce_mc(dy, src, mean_hi, mean_lo, scale, shift, act, k):
    """Per-channel float64 (sum g, sum g*e) over channels-last (M, C)."""
    m, c = src.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    part_g = np.zeros((chunks, c))
    part_ge = np.zeros((chunks, c))
    mh, ml, sc, sh = mean_hi, mean_lo, scale, shift
    for q in prange(chunks):
        a = part_g[q]
        b = part_ge[q]
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, gr = src[r], dy[r]
            if act == RELU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, RELU, False, kt)
            elif act == LEAKY_RELU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, LEAKY_RELU, False, kt)
            elif act == ELU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, ELU, False, kt)
            elif act == SILU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, SILU, False, kt)
            else:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, IDENTITY, False, kt)
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(parallel=True, cache=True)
def write_dx_ncs(dy, src, dx, mean_hi, mean_lo, scale, shift, k1, k0, k2, act, k):
    """dx (N, C, S) = k1 * g + k0 + k2 * e."""
    n, c, s = src.shape
    kt = unpack(k)
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, gr, out = src[i, j], dy[i, j], dx[i, j]
        mh, ml, sc, sh = mean_hi[j], mean_lo[j], scale[j], shift[j]
        a1, a0, a2 = k1[j], k0[j], k2[j]
        if act == RELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, RELU, False, kt)
        elif act == LEAKY_RELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, LEAKY_RELU, False, kt)
        elif act == ELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, ELU, False, kt)
        elif act == SILU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, SILU, False, kt)
        else:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, IDENTITY, False, kt)


@njit(parallel=True, cache=True)
def write_dx_mc(dy, src, dx, mean_hi, mean_lo, scale, shift, k1, k0, k2, act, k):
    """dx (M, C) = k1 * g + k0 + k2 * e, channels-last."""
    m, c = src.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    mh, ml, sc, sh = mean_hi, mean_lo, scale, shift
    for q in prange((m + rows - 1) // rows):
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, gr, out = src[r], dy[r], dx[r]
            if act == RELU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, RELU, False, kt)
            elif act == LEAKY_RELU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, LEAKY_RELU, False, kt)
            elif act == ELU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, ELU, False, kt)
            elif act == SILU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, SILU, False, kt)
            else:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, IDENTITY, False, kt)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def reduce_from_output_ncs(dy, src, mean_hi, mean_lo, scale, shift, act, k):
    """Per-channel float64 (sum g, sum g*e) over (N, C, S). Inplace mode: src is the output y."""
    n, c, s = src.shape
    kt = unpack(k)
    part_g = np.empty((n, c))
    part_ge = np.empty((n, c))
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, gr, mh, ml, sc, sh = src[i, j], dy[i, j], mean_hi[j], mean_lo[j], scale[j], shift[j]
        if act == LEAKY_RELU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, LEAKY_RELU, True, kt)
        elif act == ELU:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, ELU, True, kt)
        else:
            a, b = _reduce_row_ncs(xr, gr, mh, ml, sc, sh, IDENTITY, True, kt)
        part_g[i, j] = a
        part_ge[i, j] = b
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def reduce_from_output_mc(dy, src, mean_hi, mean_lo, scale, shift, act, k):
    """Per-channel float64 (sum g, sum g*e) over channels-last (M, C). Inplace mode: src is the output y."""
    m, c = src.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    part_g = np.zeros((chunks, c))
    part_ge = np.zeros((chunks, c))
    mh, ml, sc, sh = mean_hi, mean_lo, scale, shift
    for q in prange(chunks):
        a = part_g[q]
        b = part_ge[q]
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, gr = src[r], dy[r]
            if act == LEAKY_RELU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, LEAKY_RELU, True, kt)
            elif act == ELU:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, ELU, True, kt)
            else:
                _reduce_row_mc(xr, gr, mh, ml, sc, sh, a, b, IDENTITY, True, kt)
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(parallel=True, cache=True)
def write_dx_from_output_ncs(dy, src, dx, mean_hi, mean_lo, scale, shift, k1, k0, k2, act, k):
    """dx (N, C, S) = k1 * g + k0 + k2 * e. Inplace mode: src is the output y."""
    n, c, s = src.shape
    kt = unpack(k)
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, gr, out = src[i, j], dy[i, j], dx[i, j]
        mh, ml, sc, sh = mean_hi[j], mean_lo[j], scale[j], shift[j]
        a1, a0, a2 = k1[j], k0[j], k2[j]
        if act == LEAKY_RELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, LEAKY_RELU, True, kt)
        elif act == ELU:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, ELU, True, kt)
        else:
            _write_row_ncs(xr, gr, out, mh, ml, sc, sh, a1, a0, a2, IDENTITY, True, kt)


@njit(parallel=True, cache=True)
def write_dx_from_output_mc(dy, src, dx, mean_hi, mean_lo, scale, shift, k1, k0, k2, act, k):
    """dx (M, C) = k1 * g + k0 + k2 * e, channels-last. Inplace mode: src is the output y."""
    m, c = src.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    mh, ml, sc, sh = mean_hi, mean_lo, scale, shift
    for q in prange((m + rows - 1) // rows):
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, gr, out = src[r], dy[r], dx[r]
            if act == LEAKY_RELU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, LEAKY_RELU, True, kt)
            elif act == ELU:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, ELU, True, kt)
            else:
                _write_row_mc(xr, gr, out, mh, ml, sc, sh, k1, k0, k2, IDENTITY, True, kt)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def eval_backward_ncs(dy, x, dx, mean_hi, mean_lo, scale, shift, act, k):
    """One pass: dx = g * scale and per-channel float64 (sum g, sum g*e), (N, C, S)."""
    n, c, s = x.shape
    kt = unpack(k)
    part_g = np.empty((n, c))
    part_ge = np.empty((n, c))
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        xr, gr, out = x[i, j], dy[i, j], dx[i, j]
        mh, ml, sc, sh = mean_hi[j], mean_lo[j], scale[j], shift[j]
        if act == RELU:
            a, b = _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, RELU, kt)
        elif act == LEAKY_RELU:
            a, b = _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, LEAKY_RELU, kt)
        elif act == ELU:
            a, b = _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, ELU, kt)
        elif act == SILU:
            a, b = _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, SILU, kt)
        else:
            a, b = _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, IDENTITY, kt)
        part_g[i, j] = a
        part_ge[i, j] = b
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def eval_backward_mc(dy, x, dx, mean_hi, mean_lo, scale, shift, act, k):
    """One pass: dx = g * scale and per-channel float64 (sum g, sum g*e), channels-last (M, C)."""
    m, c = x.shape
    kt = unpack(k)
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    part_g = np.zeros((chunks, c))
    part_ge = np.zeros((chunks, c))
    mh, ml, sc, sh = mean_hi, mean_lo, scale, shift
    for q in prange(chunks):
        a = part_g[q]
        b = part_ge[q]
        for r in range(q * rows, min(m, (q + 1) * rows)):
            xr, gr, out = x[r], dy[r], dx[r]
            if act == RELU:
                _eval_row_mc(xr, gr, out, mh, ml, sc, sh, a, b, RELU, kt)
            elif act == LEAKY_RELU:
                _eval_row_mc(xr, gr, out, mh, ml, sc, sh, a, b, LEAKY_RELU, kt)
            elif act == ELU:
                _eval_row_mc(xr, gr, out, mh, ml, sc, sh, a, b, ELU, kt)
            elif act == SILU:
                _eval_row_mc(xr, gr, out, mh, ml, sc, sh, a, b, SILU, kt)
            else:
                _eval_row_mc(xr, gr, out, mh, ml, sc, sh, a, b, IDENTITY, kt)
    return _sum_rows(part_g), _sum_rows(part_ge)
