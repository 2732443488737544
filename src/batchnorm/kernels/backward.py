"""Backward kernels: activation derivative and batch-norm backward fused, two passes.

With z the pre-activation, g = dL/dz = dy * act'(z), e the centred input (x - mean) and
x_hat = e * invstd, per channel:

    pass 1 (reduce):  sum_g = sum(g),  sum_ge = sum(g * e)         float64 partials per chunk
    pass 2 (write):   dx = k1 * g + k0 + k2 * e

with ``k1 = gamma * invstd``, ``k0 = -k1 * sum_g / m`` and ``k2 = -k1 * invstd^2 * sum_ge / m``
(the training formula ``dx = gamma*invstd*(g - mean(g) - x_hat*mean(g*x_hat))``, x_hat = e*invstd);
in evaluation ``k0 = k2 = 0`` and one pass does both. Each pass makes its per-channel values
(``per_channel.channel_values``, and the k from the sums, ``per_channel.coefficients``) inside
its own call: a training backward is two compiled calls.

The sums are float64 across blocks and in the data's dtype within a block (as the statistics
are, see ``statistics.py``): ``BLOCK`` values of a long (N, C, S) plane, when the caller passes
``blocked`` (float32 data, planes of at least one BLOCK; shorter planes are summed value by
value in float64, which was faster there), or ``GRAD_ROW_BLOCK`` channels-last rows (with
fewer than ``statistics.ROW_SPAN`` channels, spans of rows: ``statistics.span``). For
float32 that halves the arithmetic of the reduction; g * e is already centred, so there is no
cancellation for the float32 rounding to grow in.

In the inplace (InPlace-ABN) mode the source is the output y: z = act^-1(y), g uses act' written
with y, and e = z - beta stands for gamma * x_hat, so x_hat = e / gamma: the caller builds the
coefficients with that. Partials are summed in a fixed order, so results do not depend on the
thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ._activation import (
    derivative,
    derivative_from_output,
    inverse,
    unpack,
)
from ._compile import specialised
from .memory import like, memory, vector
from .per_channel import channel_values, coefficients, tiled
from .statistics import REASSOC, block_sums, fold, plane_task, rows_per_chunk, span, span_rows

# channels-last reductions: rows added in the data's dtype before one float64 add per channel
GRAD_ROW_BLOCK = 16

# Each kernel is made per (activation, mode, dtype) by a factory (see _compile.py): the code and
# the inplace flag are closure constants, so every inner loop is branch-free and vectorises, and
# the helpers below compile only the one form the kernel needs (_grad_centred's overload picks
# the from-input or from-output form while numba types the kernel). The three channels-last
# reductions share one chunk skeleton (_mc_sums), the (N, C, S) ones another (_ncs_sums); each
# takes the kernel's row function as an argument (as fast as separate copies).


def _grad_from_input(src, dy, mh, ml, sc, sh, act, inplace, k):
    e = (src - mh) - ml
    return dy * derivative(e * sc + sh, act, k), e


def _grad_from_output(src, dy, mh, ml, sc, sh, act, inplace, k):
    return dy * derivative_from_output(src, act, k), inverse(src, act, k) - sh


def _grad_centred(src, dy, mh, ml, sc, sh, act, inplace, k):
    """(g, e) for one element: g = dL/dz, e = centred value (see the module docstring); src is
    x, or the output y when ``inplace`` (a compile-time constant, as the code is: the other
    form is not compiled)."""
    form = _grad_from_output if inplace else _grad_from_input
    return form(src, dy, mh, ml, sc, sh, act, inplace, k)


@overload(_grad_centred, inline="always")
def _grad_centred_form(src, dy, mh, ml, sc, sh, act, inplace, k):
    if getattr(inplace, "literal_value", None) is True:
        return _grad_from_output
    if getattr(inplace, "literal_value", None) is False:
        return _grad_from_input
    return None


@njit(inline="always", cache=True)
def _reduce_term(t, xr, gr, out, mh, ml, sc, sh, act, inplace, k):
    """(g, g * e) at one position of a plane (block_sums' term; ``out`` unused)."""
    g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, inplace, k)
    return g, g * e


@njit(inline="always", cache=True)
def _reduce_row_ncs(xr, gr, out, mh, ml, sc, sh, act, inplace, k, blocked):
    """Float64 (sum g, sum g*e) over one plane: in float32 blocks of BLOCK values when
    ``blocked`` (float32 data, long planes), else value by value in float64. ``out`` is unused
    (the signature is _ncs_sums' row function's)."""
    if blocked:
        return block_sums(_reduce_term, xr, gr, out, mh, ml, sc, sh, act, inplace, k)
    a = 0.0
    b = 0.0
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, inplace, k)
        a += np.float64(g)
        b += np.float64(g) * np.float64(e)
    return a, b


@njit(inline="always", cache=True)
def _reduce_row_mc(xr, gr, out, mh, ml, sc, sh, acc_g, acc_ge, act, inplace, k):
    """acc_g[j] += g, acc_ge[j] += g * e over one row, in the accumulators' dtype (the data's);
    ``out`` is unused (the signature is _mc_sums' row function's)."""
    for j in range(xr.shape[0]):
        g, e = _grad_centred(xr[j], gr[j], mh[j], ml[j], sc[j], sh[j], act, inplace, k)
        acc_g[j] += g
        acc_ge[j] += g * e


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
def _eval_term(t, xr, gr, out, mh, ml, sc, sh, act, inplace, k):
    """:func:`_reduce_term` that also writes ``out[t] = g * scale`` (the eval backward's dx;
    x is read, whatever ``inplace``)."""
    g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, False, k)
    out[t] = g * sc
    return g, g * e


@njit(inline="always", cache=True)
def _eval_row_ncs(xr, gr, out, mh, ml, sc, sh, act, inplace, k, blocked):
    """out = g * scale over one plane; float64 (sum g, sum g*e) as in _reduce_row_ncs
    (``inplace`` unused: the eval backward reads x)."""
    if blocked:
        return block_sums(_eval_term, xr, gr, out, mh, ml, sc, sh, act, inplace, k)
    a = 0.0
    b = 0.0
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, False, k)
        out[t] = g * sc
        a += np.float64(g)
        b += np.float64(g) * np.float64(e)
    return a, b


@njit(inline="always", cache=True)
def _eval_row_mc(xr, gr, out, mh, ml, sc, sh, acc_g, acc_ge, act, inplace, k):
    """out = g * scale over one row; accumulators as in _reduce_row_mc (``inplace`` unused: the
    eval backward reads x)."""
    for j in range(xr.shape[0]):
        g, e = _grad_centred(xr[j], gr[j], mh[j], ml[j], sc[j], sh[j], act, False, k)
        out[j] = g * sc[j]
        acc_g[j] += g
        acc_ge[j] += g * e


@njit(inline="always", cache=True)
def _flush(acc_g, acc_ge, part_g, part_ge):
    """Add the data-dtype accumulators (a span's: ``reps * C`` of them, row after row) into the
    float64 per-channel partials, in order, and zero them."""
    fold(acc_g, part_g)
    fold(acc_ge, part_ge)


@njit(cache=True)
def _sum_rows(part):
    """Column sums of (chunks, C) partials, chunk by chunk in order (fixed, thread-independent)."""
    out = np.zeros(part.shape[1])
    for q in range(part.shape[0]):
        for j in range(part.shape[1]):
            out[j] += part[q, j]
    return out


@njit(inline="always", cache=True)
def _write_values(src, mean, var, weight, bias, eps, sum_g, sum_ge, m, inplace):
    """What a dx pass reads, made inside its call: the per-channel values of the data's dtype
    (``per_channel.prepare``'s) and the coefficients from the sums over ``m`` values
    (``per_channel.grad_coefficients``'), with ``sum g * x_hat`` (dweight) to return."""
    invstd, gamma, mean_hi, mean_lo, scale, shift = channel_values(src, mean, var, weight, bias,
                                                                   eps)
    sum_gxhat, k1, k0, k2 = coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace, src)
    return mean_hi, mean_lo, scale, shift, sum_gxhat, k1, k0, k2


@njit(inline="always", cache=True)
def _mc_sums(row, dy, src, dx, mean_hi, mean_lo, scale, shift, act, inplace, k):
    """Per-channel float64 (sum g, sum g*e) over channels-last (M, C) rows, ``row`` doing one
    row (eval's also writes dx): chunks of rows_per_chunk rows, each summed into float64
    partials of its own (fixed chunks: the result does not depend on the thread count); few
    channels: ``row`` takes spans of rows (``statistics.span``), each accumulator lane one
    channel of one row of a span."""
    m, c = src.shape
    kt = unpack(k)
    reps = span_rows(c)
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    part_g = np.zeros((chunks, c))
    part_ge = np.zeros((chunks, c))
    smh, sml, ssc, ssh = (tiled(mean_hi, reps), tiled(mean_lo, reps), tiled(scale, reps),
                          tiled(shift, reps))
    sf, gf, df = src.reshape(m * c), dy.reshape(m * c), dx.reshape(m * c)
    for q in prange(chunks):
        # span accumulators in the data's dtype, added into the float64 partials every
        # GRAD_ROW_BLOCK spans; allocated here so that LLVM knows they do not alias the data
        a = np.zeros(reps * c, dy.dtype)
        b = np.zeros(reps * c, dy.dtype)
        r0 = q * rows
        r1 = min(m, r0 + rows)
        for p in range((r1 - r0 + reps - 1) // reps):
            if p > 0 and p % GRAD_ROW_BLOCK == 0:
                _flush(a, b, part_g[q], part_ge[q])
            row(span(sf, c, r0, r1, reps, p), span(gf, c, r0, r1, reps, p),
                span(df, c, r0, r1, reps, p), smh, sml, ssc, ssh, a, b, act, inplace, kt)
        _flush(a, b, part_g[q], part_ge[q])
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(inline="always", cache=True)
def _ncs_sums(row, dy, src, dx, mean_hi, mean_lo, scale, shift, act, inplace, k, blocked,
              splits):
    """Per-channel float64 (sum g, sum g*e) over (N, C, S) planes, ``row`` doing one plane
    (eval's also writes dx), ``splits`` tasks per sample: one float64 partial per plane, summed
    in order."""
    n, c, s = src.shape
    kt = unpack(k)
    part_g = np.empty((n, c))
    part_ge = np.empty((n, c))
    for q in prange(n * splits):
        i, j0, count = plane_task(q, splits, c)
        for jj in range(count):
            j = j0 + jj
            part_g[i, j], part_ge[i, j] = row(src[i, j], dy[i, j], dx[i, j], mean_hi[j],
                                              mean_lo[j], scale[j], shift[j], act, inplace, kt,
                                              blocked)
    return _sum_rows(part_g), _sum_rows(part_ge)


@njit(inline="always", cache=True)
def _pass_arrays(dy, src, weight, bias, dtype):
    """A training backward pass's arrays from arrays as they are or from tensors' memory by
    address (:mod:`.memory`): src as ``(address, *shape)``, dy of its shape, weight / bias
    (C,) (0: absent); the float64 statistics are arrays either way."""
    src = memory(src, dtype)
    c = src.shape[1]
    return like(dy, src, dtype), src, vector(weight, c, dtype), vector(bias, c, dtype)


@specialised(parallel=True, fastmath=REASSOC)
def reduce_ncs(act, inplace, dtype, at=False):
    """Kernel: per-channel float64 (sum g, sum g*e) over (N, C, S); src is y when ``inplace``.
    ``at``: the kernel of the same code taking the tensors by address (:func:`_pass_arrays`), a
    kernel (and cache) of its own; the other three training passes have that form too."""

    def kernel(dy, src, mean, var, weight, bias, eps, k, blocked, splits):
        dy, src, weight, bias = _pass_arrays(dy, src, weight, bias, dtype)
        _, _, mean_hi, mean_lo, scale, shift = channel_values(src, mean, var, weight, bias, eps)
        return _ncs_sums(_reduce_row_ncs, dy, src, src, mean_hi, mean_lo, scale, shift, act,
                         inplace, k, blocked, splits)

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def reduce_mc(act, inplace, dtype, at=False):
    """Kernel: per-channel float64 (sum g, sum g*e) over channels-last (M, C)."""

    def kernel(dy, src, mean, var, weight, bias, eps, k):
        dy, src, weight, bias = _pass_arrays(dy, src, weight, bias, dtype)
        _, _, mean_hi, mean_lo, scale, shift = channel_values(src, mean, var, weight, bias, eps)
        return _mc_sums(_reduce_row_mc, dy, src, src, mean_hi, mean_lo, scale, shift, act,
                        inplace, k)

    return kernel


@specialised(parallel=True)
def write_dx_ncs(act, inplace, dtype, at=False):
    """Kernel: dx (N, C, S) = k1 * g + k0 + k2 * e, ``splits`` tasks per sample."""

    def kernel(dy, src, dx, mean, var, weight, bias, eps, sum_g, sum_ge, m, k, splits):
        dy, src, weight, bias = _pass_arrays(dy, src, weight, bias, dtype)
        dx = like(dx, src, dtype)
        n, c, s = src.shape
        mean_hi, mean_lo, scale, shift, sum_gxhat, k1, k0, k2 = _write_values(
            src, mean, var, weight, bias, eps, sum_g, sum_ge, m, inplace)
        kt = unpack(k)
        for q in prange(n * splits):
            i, j0, count = plane_task(q, splits, c)
            for jj in range(count):
                j = j0 + jj
                _write_row_ncs(src[i, j], dy[i, j], dx[i, j], mean_hi[j], mean_lo[j], scale[j],
                               shift[j], k1[j], k0[j], k2[j], act, inplace, kt)
        return sum_gxhat

    return kernel


@specialised(parallel=True)
def write_dx_mc(act, inplace, dtype, at=False):
    """Kernel: dx (M, C) = k1 * g + k0 + k2 * e, channels-last (few channels: spans of rows)."""

    def kernel(dy, src, dx, mean, var, weight, bias, eps, sum_g, sum_ge, m_values, k):
        dy, src, weight, bias = _pass_arrays(dy, src, weight, bias, dtype)
        dx = like(dx, src, dtype)
        m, c = src.shape
        mean_hi, mean_lo, scale, shift, sum_gxhat, k1, k0, k2 = _write_values(
            src, mean, var, weight, bias, eps, sum_g, sum_ge, m_values, inplace)
        kt = unpack(k)
        reps = span_rows(c)
        smh, sml, ssc, ssh = (tiled(mean_hi, reps), tiled(mean_lo, reps), tiled(scale, reps),
                              tiled(shift, reps))
        sk1, sk0, sk2 = tiled(k1, reps), tiled(k0, reps), tiled(k2, reps)
        sf, gf, df = src.reshape(m * c), dy.reshape(m * c), dx.reshape(m * c)
        rows = rows_per_chunk(c)
        for q in prange((m + rows - 1) // rows):
            r0 = q * rows
            r1 = min(m, r0 + rows)
            for p in range((r1 - r0 + reps - 1) // reps):
                _write_row_mc(span(sf, c, r0, r1, reps, p), span(gf, c, r0, r1, reps, p),
                              span(df, c, r0, r1, reps, p), smh, sml, ssc, ssh, sk1, sk0, sk2,
                              act, inplace, kt)
        return sum_gxhat

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def eval_backward_ncs(act, dtype):
    """Kernel, one pass: dx = g * scale and per-channel float64 (sum g, sum g*e), (N, C, S)."""

    def kernel(dy, x, dx, mean, var, weight, bias, eps, k, blocked, splits):
        invstd, _, mean_hi, mean_lo, scale, shift = channel_values(x, mean, var, weight, bias, eps)
        sum_g, sum_ge = _ncs_sums(_eval_row_ncs, dy, x, dx, mean_hi, mean_lo, scale, shift, act,
                                  False, k, blocked, splits)
        return sum_ge * invstd, sum_g

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def eval_backward_mc(act, dtype):
    """Kernel, one pass: dx = g * scale and per-channel float64 (sum g, sum g*e), channels-last."""

    def kernel(dy, x, dx, mean, var, weight, bias, eps, k):
        invstd, _, mean_hi, mean_lo, scale, shift = channel_values(x, mean, var, weight, bias, eps)
        sum_g, sum_ge = _mc_sums(_eval_row_mc, dy, x, dx, mean_hi, mean_lo, scale, shift, act,
                                 False, k)
        return sum_ge * invstd, sum_g

    return kernel


@njit(inline="always", cache=True)
def _write_row_masked_ncs(xr, gr, out, mr, mh, ml, sc, sh, a1, a0, a2, act, inplace, k):
    """dx over one plane, the statistics' part only where the mask counts."""
    z = xr.dtype.type(0.0)
    for t in range(xr.shape[0]):
        g, e = _grad_centred(xr[t], gr[t], mh, ml, sc, sh, act, inplace, k)
        out[t] = a1 * g + ((a0 + a2 * e) if mr[t] else z)


@specialised(parallel=True)
def write_dx_masked_ncs(act, inplace, dtype):
    """Kernel: dx (N, C, S) = k1 * g + m * (k0 + k2 * e), m the mask (N, S) (masked BN: only the
    counted positions move the statistics)."""

    def kernel(dy, src, dx, mask, mean, var, weight, bias, eps, sum_g, sum_ge, m, k):
        n, c, s = src.shape
        mean_hi, mean_lo, scale, shift, sum_gxhat, k1, k0, k2 = _write_values(
            src, mean, var, weight, bias, eps, sum_g, sum_ge, m, inplace)
        kt = unpack(k)
        for p in prange(n * c):
            i = p // c
            j = p - i * c
            _write_row_masked_ncs(src[i, j], dy[i, j], dx[i, j], mask[i], mean_hi[j],
                                  mean_lo[j], scale[j], shift[j], k1[j], k0[j], k2[j], act,
                                  inplace, kt)
        return sum_gxhat

    return kernel


@specialised(parallel=True)
def write_dx_masked_mc(act, inplace, dtype):
    """Kernel: dx (M, C) = k1 * g + m * (k0 + k2 * e), channels-last, m the mask (M,)."""

    def kernel(dy, src, dx, mask, mean, var, weight, bias, eps, sum_g, sum_ge, m_values, k):
        m, c = src.shape
        mean_hi, mean_lo, scale, shift, sum_gxhat, k1, k0, k2 = _write_values(
            src, mean, var, weight, bias, eps, sum_g, sum_ge, m_values, inplace)
        kt = unpack(k)
        rows = rows_per_chunk(c)
        zeros = np.zeros_like(k0)
        for q in prange((m + rows - 1) // rows):
            for r in range(q * rows, min(m, (q + 1) * rows)):
                if mask[r]:
                    _write_row_mc(src[r], dy[r], dx[r], mean_hi, mean_lo, scale, shift, k1, k0,
                                  k2, act, inplace, kt)
                else:
                    _write_row_mc(src[r], dy[r], dx[r], mean_hi, mean_lo, scale, shift, k1,
                                  zeros, zeros, act, inplace, kt)
        return sum_gxhat

    return kernel
