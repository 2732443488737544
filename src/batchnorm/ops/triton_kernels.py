"""The Triton kernels of the GPU backend: statistics, normalise + activation (+ the running
update), the backward's two passes. Only :mod:`.triton_gpu` imports this file, on first use
(``import triton`` costs a second, and a CPU-only user never pays it).

Every kernel sees its tensor as ``(R, C, S)`` memory: a contiguous ``(N, C, *)`` tensor is
``R = N`` rows of ``C`` planes of ``S`` values, a channels-last one ``R = N * spatial`` rows of
``C`` values (``S = 1``). Value ``i = r * S + s`` of channel ``c`` sits at
``(i // S) * C * S + c * S + i % S``; offsets are int64, so tensors past 2^31 elements index
right. A program takes a tile of ``BLOCK_I`` values by ``BLOCK_C`` channels: along ``i`` for
contiguous memory (``BLOCK_C = 1``, coalesced over a plane), along ``c`` for channels-last. The
mask of masked BN, ``(N, *)`` contiguous, is indexed by ``i`` in both layouts.

Arithmetic is float32 for float32, float16 and bfloat16 data (float64 for float64); per-channel
partials leave each tile and are merged in float64 by a small kernel over every tile:
statistics with Chan's formula over the tiles' (count, mean, M2), each tile's own two-pass
(never ``E[x^2] - E[x]^2``); the backward's sums added up. The passes over the data work out
their channels' coefficients (mean, 1 / sqrt(var + eps), gamma, beta) themselves, so no launch
makes them. Constants (eps, slope, alpha, ELU's floor) come in a small float64 tensor (a Python
float argument would be float32); counts are integer arguments. The activation is a
compile-time constant (its code in :mod:`batchnorm.activations`), so each kernel compiles the
one formula it needs. Conventions are those of ``kernels/_activation.py``: the derivative at 0
is the left one, NaN passes through relu and relu6, relu6 is ``hardtanh(z, 0, 6)``.
"""
from __future__ import annotations

import triton
import triton.language as tl

# the codes of batchnorm.activations.REGISTRY (a test checks they agree); a global a kernel
# reads must be a tl.constexpr
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH = (tl.constexpr(code) for code in range(7))
INF = tl.constexpr(float("inf"))
GUARD_BLOCK = tl.constexpr(64)  # the non-finite guard's flags read per step


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
# tiles and per-channel values


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
def _finite(v):
    """True where v is neither NaN nor +-Inf."""
    return tl.abs(v) < INF


@triton.jit
def _compute(v, F64: tl.constexpr):
    return v.to(tl.float64) if F64 else v.to(tl.float32)


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """float64 v in ``dtype``, through float32 below float64: as PyTorch's casts from float64
    round (and Triton's interpreter casts float64 to bfloat16 wrongly)."""
    if dtype != tl.float64:
        v = v.to(tl.float32)
    return v.to(dtype)


@triton.jit
def _coefficients(mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, c, C, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, F64: tl.constexpr):
    """(mean_hi, mean_lo, scale, shift) rows (1, BLOCK_C) in the compute dtype, from statistics
    in any dtype: worked out in float64 (scale = gamma / sqrt(var + eps), IEEE-rounded) and
    rounded once; mean as hi + lo keeps x - mean exact to the compute dtype. Each program makes
    its own channels' (no launch of its own)."""
    keep = c < C
    mean = tl.load(mean_ptr + c, mask=keep, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + c, mask=keep, other=1.0).to(tl.float64)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = tl.load(weight_ptr + c, mask=keep, other=1.0).to(tl.float64) * scale
    if HAS_B:
        shift = _compute(tl.load(bias_ptr + c, mask=keep, other=0.0), F64)
    else:
        shift = _compute(tl.zeros(c.shape, tl.float32), F64)
    hi = _compute(mean, F64)
    lo = _compute(mean - hi.to(tl.float64), F64)
    return hi[None, :], lo[None, :], _compute(scale, F64)[None, :], shift[None, :]


@triton.jit
def _tile_rows(t0, tiles, c, C, BLOCK_T: tl.constexpr):
    """(index, ok) of rows t0 .. t0 + BLOCK_T of a (tiles, C) array of per-tile partials."""
    t = t0 + tl.arange(0, BLOCK_T)
    return t.to(tl.int64)[:, None] * C + c[None, :], (t < tiles)[:, None] & (c < C)[None, :]


# ---------------------------------------------------------------------------------------------
# statistics: per tile, then Chan's merge (+ the non-finite guard's flags)


@triton.jit
def _tile_moments(x, k, valid, F64: tl.constexpr):
    """(count, mean, M2) per channel of the tile's x - k (two passes in registers), in x's
    dtype."""
    x = tl.where(valid, x - k[None, :], 0.0)
    n = tl.sum(tl.where(valid, 1.0, 0.0).to(x.dtype), axis=0)
    if F64:
        mean = tl.sum(x, axis=0) / tl.where(n > 0.0, n, 1.0)
    else:  # IEEE division: float32's "/" may be the approximate one on a GPU
        mean = tl.div_rn(tl.sum(x, axis=0), tl.where(n > 0.0, n, 1.0))
    e = tl.where(valid, x - mean[None, :], 0.0)
    return n, mean, tl.sum(e * e, axis=0)


@triton.jit
def moments_kernel(x_ptr, mask_ptr, parts_ptr, plane, i_total, S, C, HAS_MASK: tl.constexpr,
                   F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per tile and channel, float64 (count, mean, M2) into ``parts`` (3, tiles, C), ``plane``
    = tiles * C. Sums are of x - k, k the channel's first (counted) value in the tile, which
    keeps float32 sums of data far from zero (mean 1e4, std 1e-2) exact. A tile whose float32
    result is not finite (squares or sums past float32's range, or NaN/Inf data) is computed
    again in float64 from the values already in registers: no launch, no read back, and no
    cost to the other tiles."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    if HAS_MASK:
        counted = tl.load(mask_ptr + i, mask=i < i_total, other=0) != 0
        valid = valid & counted[:, None]
    x = _compute(tl.load(x_ptr + offsets, mask=valid, other=0.0), F64)
    rows = tl.arange(0, BLOCK_I)[:, None]
    if HAS_MASK:
        first = tl.min(tl.where(valid, rows, BLOCK_I), axis=0)[None, :]
    else:
        first = 0  # row 0 of a tile is in the tensor
    k = tl.sum(tl.where(valid & (rows == first), x, 0.0), axis=0)  # 0 where nothing counted
    n, mean, m2 = _tile_moments(x, k, valid, F64)
    keep = c < C
    overflow = tl.sum(tl.where(keep & ~(_finite(mean) & _finite(m2)), 1, 0), axis=0)
    n, mean, m2 = n.to(tl.float64), mean.to(tl.float64) + k.to(tl.float64), m2.to(tl.float64)
    if not F64:
        if overflow > 0:  # x holds the data exactly (float32 from float32, float16, bfloat16)
            k64 = k.to(tl.float64)
            n, mean, m2 = _tile_moments(x.to(tl.float64), k64, valid, True)
            mean = mean + k64
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(parts_ptr + out, n, mask=keep)
    tl.store(parts_ptr + plane + out, mean, mask=keep)
    tl.store(parts_ptr + 2 * plane + out, m2, mask=keep)


@triton.jit
def finalize_moments_kernel(parts_ptr, plane, tiles, C, mean_ptr, out_ptr, rm_ptr, rv_ptr,
                            VAR: tl.constexpr, CHECK: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """The tiles' (count, mean, M2) merged in float64 by Chan's formula, all at once, about
    tile 0's mean m0: mean = m0 + sum n_t (mean_t - m0) / n, M2 = sum M2_t + n_t (mean_t -
    mean)^2. Stores mean, and M2 (or with VAR the biased variance M2 / n) in ``out``; after
    the partials, ``parts`` gets the counts (C) and, with CHECK (and VAR), one flag per
    program: 1.0 where a channel's mean or unbiased variance var n / (n - 1), rounded to the
    running buffers' dtype (those of rm_ptr and rv_ptr), is NaN/Inf. A channel nothing counted
    has mean 0 and M2 0."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    m0 = tl.load(parts_ptr + plane + c, mask=keep, other=0.0)
    n = tl.zeros([BLOCK_C], tl.float64)
    total = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        nt = tl.load(parts_ptr + index, mask=ok, other=0.0)
        n += tl.sum(nt, axis=0)
        total += tl.sum(nt * (tl.load(parts_ptr + plane + index, mask=ok, other=0.0)
                              - m0[None, :]), axis=0)
    centred = total / tl.where(n > 0.0, n, 1.0)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        nt = tl.load(parts_ptr + index, mask=ok, other=0.0)
        d = (tl.load(parts_ptr + plane + index, mask=ok, other=0.0) - m0[None, :]) \
            - centred[None, :]
        # a tile that counted nothing (masks) adds 0, even where d * d overflows
        m2 += tl.sum(tl.load(parts_ptr + 2 * plane + index, mask=ok, other=0.0)
                     + tl.where(nt > 0.0, nt * d * d, 0.0), axis=0)
    mean = m0 + centred
    second = m2 / n if VAR else m2
    tl.store(mean_ptr + c, mean, mask=keep)
    tl.store(out_ptr + c, second, mask=keep)
    tl.store(parts_ptr + 3 * plane + c, n, mask=keep)
    if CHECK:
        unbiased = second * (n / (n - 1.0))  # what the running update adds
        fine = _finite(_rounded(mean, rm_ptr.dtype.element_ty)) & _finite(
            _rounded(unbiased, rv_ptr.dtype.element_ty))
        bad = tl.sum(tl.where(keep & ~fine, 1.0, 0.0), axis=0).to(tl.float64)
        tl.store(parts_ptr + 3 * plane + C + tl.program_id(0), bad)


# ---------------------------------------------------------------------------------------------
# forwards: y = act(((x - mean_hi) - mean_lo) * scale + shift), the training one with the
# running update


@triton.jit
def _normalize_tile(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, consts_ptr, i_total,
                    S, C, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    hi, lo, scale, shift = _coefficients(mean_ptr, var_ptr, weight_ptr, bias_ptr,
                                         tl.load(consts_ptr), c, C, HAS_W, HAS_B, F64)
    slope = _compute(tl.load(consts_ptr + 1), F64)
    alpha = _compute(tl.load(consts_ptr + 2), F64)
    x = _compute(tl.load(x_ptr + offsets, mask=valid, other=0.0), F64)
    y = activate(((x - hi) - lo) * scale + shift, ACT, slope, alpha)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)
    return c


@triton.jit
def normalize_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, consts_ptr, i_total,
                     S, C, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """y from given statistics (the running ones, or a batch's); consts = (eps, slope, alpha,
    ...) in float64."""
    _normalize_tile(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, consts_ptr, i_total,
                    S, C, ACT, HAS_W, HAS_B, F64, BLOCK_I, BLOCK_C)


@triton.jit
def train_normalize_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, consts_ptr,
                           i_total, S, C, flags_ptr, flags, rm_ptr, rv_ptr, factor_ptr, count,
                           ok_ptr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           RUNNING: tl.constexpr, CHECK: tl.constexpr, F64: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """y from the batch's float64 statistics; the programs of row 0 also update their channels'
    running buffers (RUNNING): rm += f (mean - rm), rv += f (var n / (n - 1) - rv) in float64,
    rounded once to the buffers' dtype, f read from factor_ptr (a momentum or 1 /
    num_batches_tracked on the device), n = ``count``. With CHECK, every one of them reads the
    merge's ``flags`` flags (one per channel block, earlier in the same stream) and leaves the
    buffers untouched if any is set; program (0, 0) stores ok (True without CHECK)."""
    c = _normalize_tile(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, consts_ptr,
                        i_total, S, C, ACT, HAS_W, HAS_B, F64, BLOCK_I, BLOCK_C)
    if tl.program_id(0) == 0:
        keep = c < C
        ok = tl.full([], 1, tl.int1)
        if CHECK:
            bad = tl.zeros([GUARD_BLOCK], tl.float64)
            for f0 in range(0, flags, GUARD_BLOCK):
                f = f0 + tl.arange(0, GUARD_BLOCK)
                bad += tl.load(flags_ptr + f, mask=f < flags, other=0.0)
            ok = tl.sum(bad, axis=0) == 0.0
            keep = tl.where(ok, keep, False)  # (the interpreter refuses keep & ok)
        if RUNNING:
            f = tl.load(factor_ptr).to(tl.float64)
            n = tl.zeros([BLOCK_C], tl.float64) + count
            mean = tl.load(mean_ptr + c, mask=keep, other=0.0)
            unbiased = tl.load(var_ptr + c, mask=keep, other=0.0) * (n / (n - 1.0))
            rm = tl.load(rm_ptr + c, mask=keep, other=0.0).to(tl.float64)
            rv = tl.load(rv_ptr + c, mask=keep, other=0.0).to(tl.float64)
            tl.store(rm_ptr + c, _rounded(rm + f * (mean - rm), rm_ptr.dtype.element_ty),
                     mask=keep)
            tl.store(rv_ptr + c, _rounded(rv + f * (unbiased - rv), rv_ptr.dtype.element_ty),
                     mask=keep)
        if tl.program_id(1) == 0:
            tl.store(ok_ptr, ok)


# ---------------------------------------------------------------------------------------------
# backward: sums per tile, their float64 merge into dx's coefficients, then dx


@triton.jit
def _gradient_tile(dy_ptr, src_ptr, hi, lo, scale, shift, consts_ptr, offsets, valid,
                   ACT: tl.constexpr, INPLACE: tl.constexpr, F64: tl.constexpr):
    """(g, e) of the tile: g = dL/dz, e = x - mean, or gamma * x_hat = act^-1(y) - beta from
    the output (``INPLACE``); both 0 outside it."""
    slope = _compute(tl.load(consts_ptr + 1), F64)
    alpha = _compute(tl.load(consts_ptr + 2), F64)
    src = _compute(tl.load(src_ptr + offsets, mask=valid, other=0.0), F64)
    dy = _compute(tl.load(dy_ptr + offsets, mask=valid, other=0.0), F64)
    if INPLACE:
        floor = _compute(tl.load(consts_ptr + 3), F64)
        g = dy * derivative_from_output(src, ACT, slope, alpha)
        e = inverse(src, ACT, slope, alpha, floor) - shift
    else:
        e = (src - hi) - lo
        g = dy * derivative(e * scale + shift, ACT, slope, alpha)
    return tl.where(valid, g, 0.0), tl.where(valid, e, 0.0)


@triton.jit
def grad_sums_kernel(dy_ptr, src_ptr, sums_ptr, plane, mean_ptr, var_ptr, weight_ptr, bias_ptr,
                     consts_ptr, i_total, S, C, ACT: tl.constexpr, INPLACE: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per tile and channel: sum(g) and sum(g * e) into ``sums`` (2, tiles, C), ``plane`` =
    tiles * C."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    hi, lo, scale, shift = _coefficients(mean_ptr, var_ptr, weight_ptr, bias_ptr,
                                         tl.load(consts_ptr), c, C, HAS_W, HAS_B, F64)
    g, e = _gradient_tile(dy_ptr, src_ptr, hi, lo, scale, shift, consts_ptr, offsets, valid,
                          ACT, INPLACE, F64)
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(sums_ptr + out, tl.sum(g, axis=0), mask=c < C)
    tl.store(sums_ptr + plane + out, tl.sum(g * e, axis=0), mask=c < C)


@triton.jit
def finalize_grads_kernel(sums_ptr, plane, tiles, C, var_ptr, consts_ptr, weight_ptr, count,
                          ks_ptr, sum_g_ptr, sum_gxhat_ptr, MODE: tl.constexpr,
                          HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tiles' sums added in float64, then the coefficients of dx = k1 g + m (k0 + k2 e)
    into ``ks`` (3, C) and sum(g * x_hat) (dweight) and sum(g) (dbias). MODE 0: training, e =
    x - mean; 1: training from the output, e = gamma * x_hat (|gamma| < eps taken as sign *
    eps); 2: evaluation (k0 = k2 = 0). ``count``: the values per channel, an integer."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    sg = tl.zeros([BLOCK_C], tl.float64)
    sge = tl.zeros([BLOCK_C], tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        index, ok = _tile_rows(t0, tiles, c, C, BLOCK_T)
        sg += tl.sum(tl.load(sums_ptr + index, mask=ok, other=0.0).to(tl.float64), axis=0)
        sge += tl.sum(tl.load(sums_ptr + plane + index, mask=ok, other=0.0).to(tl.float64),
                      axis=0)
    eps = tl.load(consts_ptr)
    m = tl.zeros([BLOCK_C], tl.float64) + count
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
    dt = ks_ptr.dtype.element_ty
    tl.store(ks_ptr + c, k1.to(dt), mask=keep)
    tl.store(ks_ptr + C + c, k0.to(dt), mask=keep)
    tl.store(ks_ptr + 2 * C + c, k2.to(dt), mask=keep)
    tl.store(sum_g_ptr + c, sg.to(sum_g_ptr.dtype.element_ty), mask=keep)
    tl.store(sum_gxhat_ptr + c, sum_gxhat.to(sum_gxhat_ptr.dtype.element_ty), mask=keep)


@triton.jit
def write_dx_kernel(dy_ptr, src_ptr, dx_ptr, mask_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
                    ks_ptr, consts_ptr, i_total, S, C, ACT: tl.constexpr, INPLACE: tl.constexpr,
                    HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = k1 * g + m * (k0 + k2 * e), m the mask (1 without one)."""
    offsets, valid, i, c = _tile(i_total, S, C, BLOCK_I, BLOCK_C)
    hi, lo, scale, shift = _coefficients(mean_ptr, var_ptr, weight_ptr, bias_ptr,
                                         tl.load(consts_ptr), c, C, HAS_W, HAS_B, F64)
    g, e = _gradient_tile(dy_ptr, src_ptr, hi, lo, scale, shift, consts_ptr, offsets, valid,
                          ACT, INPLACE, F64)
    k1 = _compute(tl.load(ks_ptr + c, mask=c < C, other=0.0), F64)[None, :]
    k0 = _compute(tl.load(ks_ptr + C + c, mask=c < C, other=0.0), F64)[None, :]
    k2 = _compute(tl.load(ks_ptr + 2 * C + c, mask=c < C, other=0.0), F64)[None, :]
    rest = k0 + k2 * e
    if HAS_MASK:
        counted = tl.load(mask_ptr + i, mask=i < i_total, other=0) != 0
        rest = tl.where(counted[:, None], rest, 0.0)
    dx = k1 * g + rest
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
