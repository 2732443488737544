"""The Triton kernels of the GPU backend: statistics, normalise + activation, the backward's two
passes. Only :mod:`.triton_gpu` imports this file, on first use (``import triton`` costs a
second, and a CPU-only user never pays it).

Every kernel sees its tensor as ``(R, C, S)`` memory: a contiguous ``(N, C, *)`` tensor is
``R = N`` rows of ``C`` planes of ``S`` values, a channels-last one ``R = N * spatial`` rows of
``C`` values (``S = 1``). Value ``i = r * S + s`` of channel ``c`` sits at
``(i // S) * C * S + c * S + i % S``; offsets are int64, so tensors past 2^31 elements index
right. A program takes a tile of ``BLOCK_I`` values by ``BLOCK_C`` channels: along ``i`` for
contiguous memory (``BLOCK_C = 1``, coalesced over a plane), along ``c`` for channels-last. The
mask of masked BN, ``(N, *)`` contiguous, is indexed by ``i`` in both layouts.

Arithmetic is float32 for float32, float16 and bfloat16 data (float64 for float64); per-channel
partials leave each tile and are merged in float64 by the caller: statistics with Chan's formula
over the tiles' (count, mean, M2), each tile's own two-pass (never ``E[x^2] - E[x]^2``); the
backward's sums added up. The activation's constants (slope, alpha, ELU's floor) come in a
small tensor of the compute dtype (a Python float argument would be float32). The activation is
a compile-time constant (its code in
:mod:`batchnorm.activations`), so each kernel compiles the one formula it needs. Conventions are
those of ``kernels/_activation.py``: the derivative at 0 is the left one, NaN passes through
relu and relu6, relu6 is ``hardtanh(z, 0, 6)``.
"""
from __future__ import annotations

import triton
import triton.language as tl

# the codes of batchnorm.activations.REGISTRY (a test checks they agree)
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH = 0, 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------
# activations: forward, derivative, inverse and derivative from the output


@triton.jit
def _expm1(z):
    # Kahan: (u - 1) * z / log(u) keeps the relative precision expm1 has near 0
    u = tl.exp(z)
    d = u - 1.0
    safe = tl.where(d == 0.0, 1.0, tl.log(u))
    return tl.where(d == 0.0, z, tl.where(d == -1.0, -1.0, d * z / safe))


@triton.jit
def _log1p(u):
    # Kahan: log(1 + u) * u / ((1 + u) - 1)
    w = 1.0 + u
    d = w - 1.0
    safe = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, u, tl.log(w) * u / safe)


@triton.jit
def _relu6(z):
    return tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))


@triton.jit
def activate(z, ACT: tl.constexpr, slope, alpha):
    if ACT == RELU:
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, z, z * slope)
    elif ACT == ELU:
        return tl.where(z > 0.0, z, alpha * _expm1(z))
    elif ACT == SILU:
        return z / (1.0 + tl.exp(-z))
    elif ACT == RELU6:
        return _relu6(z)
    elif ACT == HARDSWISH:
        return z * _relu6(z + 3.0) / 6.0
    else:
        return z


@triton.jit
def derivative(z, ACT: tl.constexpr, slope, alpha):
    if ACT == RELU:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, 1.0, slope)
    elif ACT == ELU:
        return tl.where(z > 0.0, 1.0, alpha * tl.exp(z))
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    elif ACT == RELU6:
        return tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    elif ACT == HARDSWISH:
        return tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, 1.0, z / 3.0 + 0.5))
    else:
        return tl.full(z.shape, 1.0, z.dtype)


@triton.jit
def inverse(y, ACT: tl.constexpr, slope, alpha, floor):
    # the invertible activations: identity, leaky_relu (slope > 0), elu (alpha > 0)
    if ACT == LEAKY_RELU:
        return tl.where(y > 0.0, y, y / slope)
    elif ACT == ELU:
        u = y / alpha
        return tl.where(y > 0.0, y, _log1p(tl.where(u > floor, u, floor)))
    else:
        return y


@triton.jit
def derivative_from_output(y, ACT: tl.constexpr, slope, alpha):
    if ACT == LEAKY_RELU:
        return tl.where(y > 0.0, 1.0, slope)
    elif ACT == ELU:
        return tl.where(y > 0.0, 1.0, y + alpha)
    else:
        return tl.full(y.shape, 1.0, y.dtype)


# ---------------------------------------------------------------------------------------------
# tiles


@triton.jit
def _tile(i_total, S, C, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offsets, valid, i, c) of this program's tile: program_id(0) over blocks of i (the long
    axis: a grid's axis 0 may exceed 65535 programs, its axis 1 may not), program_id(1) over
    channel blocks."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s64 = S.to(tl.int64)
    offsets = (i // s64 * (C * s64) + i % s64)[:, None] + (c.to(tl.int64) * s64)[None, :]
    valid = (i < i_total)[:, None] & (c < C)[None, :]
    return offsets, valid, i, c


@triton.jit
def _channel(ptr, c, C):
    """A per-channel value as a (1, BLOCK_C) row."""
    return tl.load(ptr + c, mask=c < C, other=0.0)[None, :]


@triton.jit
def moments_kernel(x_ptr, shift_ptr, mask_ptr, count_ptr, mean_ptr, m2_ptr, i_total, S, C,
                   HAS_MASK: tl.constexpr, F64: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Per tile and channel: the count, mean and M2 of x - shift (two passes over the tile in
    registers); the shift, one value of the channel, keeps float32 sums of data far from zero
    (mean 1e4, std 1e-2) exact."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    if HAS_MASK:
        counted = tl.load(mask_ptr + i, mask=i < i_total, other=0) != 0
        valid = valid & counted[:, None]
    k = _channel(shift_ptr, c, C)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    x = x.to(tl.float64) if F64 else x.to(tl.float32)
    x = tl.where(valid, x - k, 0.0)
    ones = tl.where(valid, 1.0, 0.0).to(x.dtype)
    n = tl.sum(ones, axis=0)
    mean = tl.sum(x, axis=0) / tl.where(n > 0.0, n, 1.0)
    e = tl.where(valid, x - mean[None, :], 0.0)
    m2 = tl.sum(e * e, axis=0)
    out = tl.program_id(0) * C + c
    keep = c < C
    tl.store(count_ptr + out, n, mask=keep)
    tl.store(mean_ptr + out, mean, mask=keep)
    tl.store(m2_ptr + out, m2, mask=keep)


@triton.jit
def normalize_kernel(x_ptr, y_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr, shift_ptr, consts_ptr,
                     i_total, S, C, ACT: tl.constexpr, F64: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(((x - mean_hi) - mean_lo) * scale + shift)."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    slope, alpha = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    x = x.to(tl.float64) if F64 else x.to(tl.float32)
    z = ((x - _channel(mean_hi_ptr, c, C)) - _channel(mean_lo_ptr, c, C)) \
        * _channel(scale_ptr, c, C) + _channel(shift_ptr, c, C)
    y = activate(z, ACT, slope, alpha)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gradient_tile(dy_ptr, src_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr, shift_ptr, consts_ptr,
                   offsets, valid, c, C, ACT: tl.constexpr, INPLACE: tl.constexpr,
                   F64: tl.constexpr):
    """(g, e) of the tile: g = dL/dz, e = x - mean, or gamma * x_hat = act^-1(y) - beta from
    the output (``INPLACE``); both 0 outside it."""
    slope, alpha = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    floor = tl.load(consts_ptr + 2)
    sh = _channel(shift_ptr, c, C)
    src = tl.load(src_ptr + offsets, mask=valid, other=0.0)
    dy = tl.load(dy_ptr + offsets, mask=valid, other=0.0)
    if F64:
        src, dy = src.to(tl.float64), dy.to(tl.float64)
    else:
        src, dy = src.to(tl.float32), dy.to(tl.float32)
    if INPLACE:
        g = dy * derivative_from_output(src, ACT, slope, alpha)
        e = inverse(src, ACT, slope, alpha, floor) - sh
    else:
        e = (src - _channel(mean_hi_ptr, c, C)) - _channel(mean_lo_ptr, c, C)
        g = dy * derivative(e * _channel(scale_ptr, c, C) + sh, ACT, slope, alpha)
    return tl.where(valid, g, 0.0), tl.where(valid, e, 0.0)


@triton.jit
def grad_sums_kernel(dy_ptr, src_ptr, sum_g_ptr, sum_ge_ptr, mean_hi_ptr, mean_lo_ptr,
                     scale_ptr, shift_ptr, consts_ptr, i_total, S, C, ACT: tl.constexpr,
                     INPLACE: tl.constexpr, F64: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Per tile and channel: sum(g) and sum(g * e), over every position."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    g, e = _gradient_tile(dy_ptr, src_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr, shift_ptr,
                          consts_ptr, offsets, valid, c, C, ACT, INPLACE, F64)
    out = tl.program_id(0) * C + c
    tl.store(sum_g_ptr + out, tl.sum(g, axis=0), mask=c < C)
    tl.store(sum_ge_ptr + out, tl.sum(g * e, axis=0), mask=c < C)


@triton.jit
def write_dx_kernel(dy_ptr, src_ptr, dx_ptr, mask_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr,
                    shift_ptr, k1_ptr, k0_ptr, k2_ptr, consts_ptr, i_total, S, C,
                    ACT: tl.constexpr, INPLACE: tl.constexpr, HAS_MASK: tl.constexpr,
                    F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = k1 * g + m * (k0 + k2 * e), m the mask (1 without one)."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    g, e = _gradient_tile(dy_ptr, src_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr, shift_ptr,
                          consts_ptr, offsets, valid, c, C, ACT, INPLACE, F64)
    rest = _channel(k0_ptr, c, C) + _channel(k2_ptr, c, C) * e
    if HAS_MASK:
        counted = tl.load(mask_ptr + i, mask=i < i_total, other=0) != 0
        rest = tl.where(counted[:, None], rest, 0.0)
    dx = _channel(k1_ptr, c, C) * g + rest
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
