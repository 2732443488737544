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

# the codes of batchnorm.activations.REGISTRY (a test checks they agree); a global a kernel
# reads must be a tl.constexpr
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH = (tl.constexpr(code) for code in range(7))


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
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)  # int64
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # int64 throughout: the scalars meet int64 tensors first (no method on a scalar argument,
    # which Triton may have specialised into a constant, e.g. S = 1)
    row = i // S
    offsets = (row * C * S + (i - row * S))[:, None] + (c.to(tl.int64) * S)[None, :]
    valid = (i < i_total)[:, None] & (c < C)[None, :]
    return offsets, valid, i, c


@triton.jit
def _channel(ptr, c, C):
    """A per-channel value as a (1, BLOCK_C) row."""
    return tl.load(ptr + c, mask=c < C, other=0.0)[None, :]


@triton.jit
def _shift(x_ptr, first, c, S, C, F64: tl.constexpr):
    """(BLOCK_C,): each channel's value at offset ``first`` of channel 0 (its first value, or
    its first counted one), the shift of the statistics' sums, in the compute dtype."""
    k = tl.load(x_ptr + first + c.to(tl.int64) * S, mask=c < C, other=0.0)
    return k.to(tl.float64) if F64 else k.to(tl.float32)


@triton.jit
def moments_kernel(x_ptr, first, mask_ptr, count_ptr, mean_ptr, m2_ptr, i_total, S, C,
                   HAS_MASK: tl.constexpr, F64: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Per tile and channel: the count, mean and M2 of x - shift (two passes over the tile in
    registers); the shift, one value of the channel, keeps float32 sums of data far from zero
    (mean 1e4, std 1e-2) exact."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    if HAS_MASK:
        counted = tl.load(mask_ptr + i, mask=i < i_total, other=0) != 0
        valid = valid & counted[:, None]
    k = _shift(x_ptr, first, c, S, C, F64)[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    x = x.to(tl.float64) if F64 else x.to(tl.float32)
    x = tl.where(valid, x - k, 0.0)
    ones = tl.where(valid, 1.0, 0.0).to(x.dtype)
    n = tl.sum(ones, axis=0)
    if F64:
        mean = tl.sum(x, axis=0) / tl.where(n > 0.0, n, 1.0)
    else:  # IEEE division: float32's "/" may be the approximate one on a GPU
        mean = tl.div_rn(tl.sum(x, axis=0), tl.where(n > 0.0, n, 1.0))
    e = tl.where(valid, x - mean[None, :], 0.0)
    m2 = tl.sum(e * e, axis=0)
    out = tl.program_id(0) * C + c
    keep = c < C
    tl.store(count_ptr + out, n, mask=keep)
    tl.store(mean_ptr + out, mean, mask=keep)
    tl.store(m2_ptr + out, m2, mask=keep)


@triton.jit
def _coefficients(mean, var, c, C, eps, weight_ptr, bias_ptr, mean_hi_ptr, mean_lo_ptr,
                  scale_ptr, shift_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Store what the passes over the data read, from float64 mean and var: mean as hi + lo,
    scale = gamma / sqrt(var + eps), shift = beta, in the compute dtype (the outputs')."""
    keep = c < C
    dt = mean_hi_ptr.dtype.element_ty
    invstd = 1.0 / tl.sqrt(var + eps)  # float64: IEEE-rounded
    if HAS_W:
        scale = tl.load(weight_ptr + c, mask=keep, other=1.0).to(tl.float64) * invstd
    else:
        scale = invstd
    hi = mean.to(dt)
    tl.store(mean_hi_ptr + c, hi, mask=keep)
    tl.store(mean_lo_ptr + c, (mean - hi.to(tl.float64)).to(dt), mask=keep)
    tl.store(scale_ptr + c, scale.to(dt), mask=keep)
    if HAS_B:
        tl.store(shift_ptr + c, tl.load(bias_ptr + c, mask=keep, other=0.0).to(dt), mask=keep)
    else:
        tl.store(shift_ptr + c, tl.zeros(c.shape, dt), mask=keep)


@triton.jit
def _tile_rows(t0, tiles, c, C, BLOCK_T: tl.constexpr):
    """(index, ok) of rows t0 .. t0 + BLOCK_T of a (tiles, C) array of per-tile partials."""
    t = t0 + tl.arange(0, BLOCK_T)
    return t.to(tl.int64)[:, None] * C + c[None, :], (t < tiles)[:, None] & (c < C)[None, :]


@triton.jit
def finalize_moments_kernel(x_ptr, first, count_ptr, mean_ptr, m2_ptr, tiles, S, C, eps_ptr,
                            weight_ptr, bias_ptr, n64_ptr, mean64_ptr, m2_64_ptr, mean_hi_ptr,
                            mean_lo_ptr, scale_ptr, shift_ptr, COEFFICIENTS: tl.constexpr,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tiles' (count, mean, M2) merged in float64 by Chan's formula, all at once
    (mean = sum n_t mean_t / n, M2 = sum M2_t + n_t (mean_t - mean)^2), the shift added back;
    with COEFFICIENTS, also the normalising pass's per-channel values for var = M2 / n."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    n = tl.zeros([BLOCK_C], tl.float64)
    total = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        nt = tl.load(count_ptr + index, mask=ok, other=0.0).to(tl.float64)
        n += tl.sum(nt, axis=0)
        total += tl.sum(nt * tl.load(mean_ptr + index, mask=ok, other=0.0).to(tl.float64),
                        axis=0)
    centred = total / tl.where(n > 0.0, n, 1.0)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        nt = tl.load(count_ptr + index, mask=ok, other=0.0).to(tl.float64)
        d = tl.load(mean_ptr + index, mask=ok, other=0.0).to(tl.float64) - centred[None, :]
        m2t = tl.load(m2_ptr + index, mask=ok, other=0.0).to(tl.float64)
        m2 += tl.sum(m2t + nt * d * d, axis=0)
    mean = centred + _shift(x_ptr, first, c, S, C, F64).to(tl.float64)
    tl.store(n64_ptr + c, n, mask=keep)
    tl.store(mean64_ptr + c, mean, mask=keep)
    tl.store(m2_64_ptr + c, m2, mask=keep)
    if COEFFICIENTS:
        _coefficients(mean, m2 / n, c, C, tl.load(eps_ptr), weight_ptr, bias_ptr, mean_hi_ptr,
                      mean_lo_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B)


@triton.jit
def coefficients_kernel(mean_ptr, var_ptr, C, eps_ptr, weight_ptr, bias_ptr, mean_hi_ptr,
                        mean_lo_ptr, scale_ptr, shift_ptr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel values of the passes over the data, from given statistics."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c < C, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + c, mask=c < C, other=1.0).to(tl.float64)
    _coefficients(mean, var, c, C, tl.load(eps_ptr), weight_ptr, bias_ptr, mean_hi_ptr,
                  mean_lo_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B)


@triton.jit
def finalize_grads_kernel(sum_g_ptr, sum_ge_ptr, tiles, C, var_ptr, consts64_ptr, weight_ptr,
                          k1_ptr, k0_ptr, k2_ptr, sum_g64_ptr, sum_gxhat64_ptr,
                          MODE: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """The tiles' sums added in float64, then the coefficients of dx = k1 g + m (k0 + k2 e)
    and sum(g * x_hat) (dweight) and sum(g) (dbias). MODE 0: training, e = x - mean; 1:
    training from the output, e = gamma * x_hat (|gamma| < eps taken as sign * eps); 2:
    evaluation (k0 = k2 = 0). consts64 = (eps, count)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    sg = tl.zeros([BLOCK_C], tl.float64)
    sge = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        sg += tl.sum(tl.load(sum_g_ptr + index, mask=ok, other=0.0).to(tl.float64), axis=0)
        sge += tl.sum(tl.load(sum_ge_ptr + index, mask=ok, other=0.0).to(tl.float64), axis=0)
    eps = tl.load(consts64_ptr)
    m = tl.load(consts64_ptr + 1)
    var = tl.load(var_ptr + c, mask=keep, other=1.0).to(tl.float64)
    invstd = 1.0 / tl.sqrt(var + eps)  # float64: IEEE-rounded
    if HAS_W:
        gamma = tl.load(weight_ptr + c, mask=keep, other=1.0).to(tl.float64)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float64)
    k1 = gamma * invstd
    if MODE == 1:
        safe = tl.where(tl.abs(gamma) < eps, tl.where(gamma < 0.0, -eps, eps), gamma)
        sum_gxhat = sge / safe
        k2 = -k1 * sum_gxhat / (m * safe)
        k0 = -k1 * sg / m
    elif MODE == 2:
        sum_gxhat = sge * invstd
        k2 = tl.zeros([BLOCK_C], tl.float64)
        k0 = tl.zeros([BLOCK_C], tl.float64)
    else:
        sum_gxhat = sge * invstd
        k2 = -k1 * invstd * sum_gxhat / m
        k0 = -k1 * sg / m
    dt = k1_ptr.dtype.element_ty
    tl.store(k1_ptr + c, k1.to(dt), mask=keep)
    tl.store(k0_ptr + c, k0.to(dt), mask=keep)
    tl.store(k2_ptr + c, k2.to(dt), mask=keep)
    tl.store(sum_g64_ptr + c, sg, mask=keep)
    tl.store(sum_gxhat64_ptr + c, sum_gxhat, mask=keep)


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
