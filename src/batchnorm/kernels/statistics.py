"""Per-channel batch statistics: the reference's moments and merge, in parallel numba kernels.

Same definitions as :func:`batchnorm.reference.moments` / :func:`batchnorm.reference.merge`:
each fixed-size chunk yields a partial ``(count, mean, M2)`` and the partials are combined with
Chan's formula in a fixed order. Chunks do not depend on the thread count, so the result is
bitwise the same with 1 or 16 threads.

Chunks: in the ``(N, C, S)`` layout one chunk is one ``(n, c)`` plane of S contiguous values; in
the channels-last ``(M, C)`` layout one chunk is a block of ``rows_per_chunk(C)`` rows. Short
``(N, C, S)`` planes (fewer than ``SHORT_PLANE`` values, 14x14 and below) with enough channels
(``SHORT_PLANE_CHANNELS``) are one chunk per channel instead: each task sums its channel's N
planes in float64, and no N x C partials are merged one after another.

Two ways to get a chunk's partial:

- **float64 sums** (float64 data, and float32 planes shorter than ``BLOCKED_PLANE_FROM``): every
  value is shifted by one sample of its channel (the first) and its shifted sum and sum of
  squares are accumulated in float64. Exact to about 1e-15 relative.
- **float32 blocks, two passes in cache** (other float32 data): the chunk is read twice while it
  sits in L1/L2 (a plane is at most ~50 KB, a channels-last chunk 1 MB), so memory is still read
  once. Pass 1 takes the chunk's mean as a rough centre ``k`` (rounded to float32); pass 2 sums
  ``d = x - k`` and ``d * d``. Both passes add up to ``BLOCK`` values (or ``STATS_ROW_BLOCK`` rows)
  in float32, then add each block's sum into float64. Centring on the chunk's own mean, not on one
  sample, leaves no cancellation to amplify the float32 rounding: the partial's M2 is within
  float32 rounding of the float64 one (tests/test_kernels.py bounds it against the reference),
  and merged over chunks the errors average out. Half the arithmetic of float64, which is the
  bottleneck of the statistics pass.
  When a blocked result is not finite (NaN or Inf in the data, or values so large that float32
  squares overflow, |x - k| > ~1e19), the caller (:func:`batchnorm.kernels.moments`) computes
  the whole batch again with the float64 sums, so non-finite input gives the float64 kernels'
  statistics and large finite values stay finite. (Kept out of these kernels: chunk by chunk it
  would add to their compile time.)

``fastmath`` is limited to ``reassoc`` (lets LLVM vectorise the sums inside a chunk): no
``nnan`` / ``ninf``, so a NaN or Inf in the batch reaches the statistics, where the layer's
non-finite guard looks for it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._compile import specialised
from .memory import memory

REASSOC = {"reassoc"}

# float32 values summed before one float64 add (NCS): 8 per lane of LLVM's vector accumulators
BLOCK = 256
# NCS planes of at least this many values take the float32 blocks; shorter planes are mostly
# loop remainders there, and float64 sums are as fast
BLOCKED_PLANE_FROM = 2048
# channels-last: rows summed four at a time, STATS_ROW_BLOCK rows per float64 add
STATS_ROW_BLOCK = 32
# (N, C, S) planes shorter than this are summed one task per channel, when there are at least
# SHORT_PLANE_CHANNELS channels to share out: on short planes the serial merge of the N x C
# plane partials costs more than the sums
SHORT_PLANE = 256
SHORT_PLANE_CHANNELS = 16


# channels-last rows of fewer than ROW_SPAN values are taken ROW_SPAN // C at a time, as one
# row of a wider view (:func:`span`, :func:`spans`): an inner loop over 16 or 32 channels is
# mostly loop overhead (a pass over (128, 16, 32, 32) NHWC ran at a third of its NCHW speed)
ROW_SPAN = 256


@njit(cache=True)
def rows_per_chunk(c):
    """Rows of a channels-last chunk: about 256k values, at least 128 rows, a whole number of
    :func:`span_rows` (fixed, not per thread)."""
    reps = span_rows(c)
    return -(-max(128, 262144 // max(c, 1)) // reps) * reps


@njit(inline="always", cache=True)
def span_rows(c):
    """Channels-last rows of C values that make one span of at least ROW_SPAN values (1 from
    ROW_SPAN channels on)."""
    return max(1, ROW_SPAN // max(c, 1))


@njit(inline="always", cache=True)
def span(flat, c, r0, r1, reps, p):
    """Span ``p`` of rows r0:r1 of channels-last (M, C) data given ``flat`` (its (M * C,)
    view): ``reps`` rows from row ``r0 + p * reps`` (fewer in the last span) as one slice;
    rows r0:r1 make ``-(-(r1 - r0) // reps)`` spans."""
    a = r0 + p * reps
    return flat[a * c:min(r1, a + reps) * c]


@njit(inline="always", cache=True)
def spans(x, r0, r1, reps):
    """Rows r0:r1 of channels-last x (M, C) as a (spans, reps * C) view of whole spans of
    ``reps`` rows, and the first row after them (rows from there to r1 are left over: fewer
    than ``reps``)."""
    n = (r1 - r0) // reps
    end = r0 + n * reps
    return x[r0:end].reshape(n, reps * x.shape[1]), end


@njit(inline="always", cache=True)
def plane_task(q, splits, c):
    """(n, first channel, number of channels) of task ``q`` when each of the N samples of an
    (N, C, S) tensor is split into ``splits`` tasks of consecutive channels: ``splits = C`` is a
    plane per task; on short planes a few whole samples per thread save each plane its task's
    indexing (the planes, and any partial of a plane, are the same either way).

    Callers loop ``for jj in range(count): j = j0 + jj``: with ``j0`` clamped at 0 the compiler
    sees every index is non-negative and drops numba's negative-index wraparound from each
    plane's indexing (``range(j0, j1)`` kept it: a third of a pass's time on 4x4 planes)."""
    i = max(q // splits, 0)
    part = q - i * splits
    j0 = max(part * c // splits, 0)
    return i, j0, max((part + 1) * c // splits - j0, 0)


@njit(inline="always", cache=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of two partials (n_a > 0 or n_b > 0)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@njit(inline="always", cache=True)
def _finish(a, b, cnt):
    """(mean of d, M2) from the sums of d and d * d over cnt values."""
    mean_d = a / cnt
    m2 = b - a * mean_d
    if m2 < 0.0:  # rounding; NaN stays NaN
        m2 = 0.0
    return mean_d, m2


# ---------------------------------------------------------------------------------------------
# chunk partials: float64 sums


@njit(inline="always", cache=True, fastmath=REASSOC)
def _plane_f64(row, k):
    """Sums of d = x - k and d * d over one plane, in float64."""
    a = 0.0
    b = 0.0
    for t in range(row.shape[0]):
        d = np.float64(row[t]) - k
        a += d
        b += d * d
    return a, b


@njit(inline="always", cache=True, fastmath=REASSOC)
def _rows_f64(x, r0, r1, shift, a, b):
    """a[j] / b[j] = sums of d = x - shift[j] and d * d over rows r0:r1, in float64."""
    for j in range(x.shape[1]):
        a[j] = 0.0
        b[j] = 0.0
    for r in range(r0, r1):
        row = x[r]
        for j in range(x.shape[1]):
            d = np.float64(row[j]) - shift[j]
            a[j] += d
            b[j] += d * d


# ---------------------------------------------------------------------------------------------
# chunk partials: float32 blocks, two passes


@njit(inline="always", cache=True, fastmath=REASSOC)
def block_sums(term, xr, gr, out, mh, ml, sc, sh, act, inplace, k):
    """float64 ``(sum u, sum v)`` of ``u, v = term(t, xr, gr, out, mh, ml, sc, sh, act, inplace,
    k)`` over the positions ``t`` of the plane ``xr``: each BLOCK of values summed in the data's
    dtype, the block sums added in float64, in order, the tail last. The one blocked sum of the
    kernels: a plane's centred statistics here, the backward's sums of g and g * e
    (``backward.py``), each term with the row functions' arguments (unused ones are anything)."""
    s = xr.shape[0]
    z = xr.dtype.type(0.0)
    full = s // BLOCK * BLOCK
    a = 0.0
    b = 0.0
    for t0 in range(0, full, BLOCK):
        sa = z
        sb = z
        for t in range(t0, t0 + BLOCK):
            u, v = term(t, xr, gr, out, mh, ml, sc, sh, act, inplace, k)
            sa += u
            sb += v
        a += np.float64(sa)
        b += np.float64(sb)
    sa = z
    sb = z
    for t in range(full, s):
        u, v = term(t, xr, gr, out, mh, ml, sc, sh, act, inplace, k)
        sa += u
        sb += v
    return a + np.float64(sa), b + np.float64(sb)


@njit(inline="always", cache=True)
def _centred(t, xr, gr, out, mh, ml, sc, sh, act, inplace, k):
    """d and d * d of one value, d = xr[t] - mh (block_sums' term; the rest unused)."""
    d = xr[t] - mh
    return d, d * d


@njit(inline="always", cache=True, fastmath=REASSOC)
def _plane_blocked(row, shift):
    """(mean - shift, M2) of one plane, two passes in float32 blocks (see the module docstring)."""
    s = row.shape[0]
    z = row.dtype.type(0.0)
    full = s // BLOCK * BLOCK
    total = 0.0
    for t0 in range(0, full, BLOCK):
        acc = z
        for t in range(t0, t0 + BLOCK):
            acc += row[t]
        total += np.float64(acc)
    acc = z
    for t in range(full, s):
        acc += row[t]
    total += np.float64(acc)
    k = row.dtype.type(total / s)
    a, b = block_sums(_centred, row, row, row, k, k, k, k, 0, False, 0)
    mean_d, m2 = _finish(a, b, np.float64(s))
    return (np.float64(k) - shift) + mean_d, m2


@njit(inline="always", cache=True)
def fold(acc, out):
    """``out[j] += acc`` of channel j over a span's rows (row after row), in float64; then
    ``acc`` is zeroed. ``acc``: ``reps * C`` data-dtype accumulators, ``out``: C float64."""
    c = out.shape[0]
    for r in range(acc.shape[0] // c):
        for j in range(c):
            out[j] += np.float64(acc[r * c + j])
            acc[r * c + j] = 0.0


@njit(inline="always", cache=True, fastmath=REASSOC)
def _rows_blocked(x, r0, r1, shift, part_mean, part_m2):
    """part_mean[j] = mean - shift[j], part_m2[j] = M2 over rows r0:r1 (channels-last), two
    passes in float32 blocks of STATS_ROW_BLOCK rows; few channels: of spans of rows
    (:func:`spans`, each accumulator lane one channel of one row of a span), the rows left
    over after the spans added into the first row's lanes."""
    c = x.shape[1]
    reps = span_rows(c)
    t = reps * c
    # accumulators allocated here, not passed in: LLVM then knows they do not alias x and
    # vectorises the row loops without runtime overlap checks
    a32 = np.zeros(t, x.dtype)
    b32 = np.zeros(t, x.dtype)
    k = np.empty(t, x.dtype)
    out_mean = np.zeros(c)
    out_m2 = np.zeros(c)
    cnt = np.float64(r1 - r0)
    xs, rest = spans(x, r0, r1, reps)
    q4 = xs.shape[0] // 4  # spans p, p + q4, p + 2 q4, p + 3 q4: four long streams
    # pass 1: the chunk's mean, the centre k
    for p in range(q4):
        x0, x1, x2, x3 = xs[p], xs[p + q4], xs[p + 2 * q4], xs[p + 3 * q4]
        for i in range(t):
            a32[i] += (x0[i] + x1[i]) + (x2[i] + x3[i])
        if (p + 1) % (STATS_ROW_BLOCK // 4) == 0:
            fold(a32, out_mean)
    for p in range(4 * q4, xs.shape[0]):
        x0 = xs[p]
        for i in range(t):
            a32[i] += x0[i]
    for r in range(rest, r1):
        if (r - rest) % STATS_ROW_BLOCK == 0:
            fold(a32, out_mean)
        x0 = x[r]
        for j in range(c):
            a32[j] += x0[j]
    fold(a32, out_mean)
    for j in range(c):
        k[j] = out_mean[j] / cnt
        out_mean[j] = 0.0
        for r in range(1, reps):
            k[r * c + j] = k[j]
    # pass 2: sums of d = x - k and d * d
    for p in range(q4):
        x0, x1, x2, x3 = xs[p], xs[p + q4], xs[p + 2 * q4], xs[p + 3 * q4]
        for i in range(t):
            ki = k[i]
            d0 = x0[i] - ki
            d1 = x1[i] - ki
            d2 = x2[i] - ki
            d3 = x3[i] - ki
            a32[i] += (d0 + d1) + (d2 + d3)
            b32[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        if (p + 1) % (STATS_ROW_BLOCK // 4) == 0:
            fold(a32, out_mean)
            fold(b32, out_m2)
    for p in range(4 * q4, xs.shape[0]):
        x0 = xs[p]
        for i in range(t):
            d0 = x0[i] - k[i]
            a32[i] += d0
            b32[i] += d0 * d0
    for r in range(rest, r1):
        if (r - rest) % STATS_ROW_BLOCK == 0:
            fold(a32, out_mean)
            fold(b32, out_m2)
        x0 = x[r]
        for j in range(c):
            d0 = x0[j] - k[j]
            a32[j] += d0
            b32[j] += d0 * d0
    fold(a32, out_mean)
    fold(b32, out_m2)
    # element by element: a slice assignment compiles numba's shape-mismatch error message
    # (string formatting: 6 s of this kernel's 12 s compile)
    for j in range(c):
        mean_d, m2 = _finish(out_mean[j], out_m2[j], cnt)
        part_mean[j] = (np.float64(k[j]) - shift[j]) + mean_d
        part_m2[j] = m2


# ---------------------------------------------------------------------------------------------
# kernels


@njit(inline="always", cache=True)
def _merge_planes(part_mean, part_m2, s, shift):
    """Chan merge of the (N, C) plane partials (means relative to shift), plane by plane in
    order (serial: N * C partials are cheap next to the data)."""
    n, c = part_mean.shape
    mean = part_mean[0].copy()
    m2 = part_m2[0].copy()
    for i in range(1, n):
        for j in range(c):
            mean[j], m2[j] = _chan(np.float64(i * s), mean[j], m2[j], np.float64(s),
                                   part_mean[i, j], part_m2[i, j])
    for j in range(c):
        mean[j] += shift[j]
    return mean, m2


@njit(inline="always", cache=True)
def _ncs_setup(x):
    """What both (N, C, S) kernels start with: the shift (each channel's first value) and the
    (N, C) float64 arrays of the planes' partials (means relative to the shift)."""
    n, c, _ = x.shape
    shift = np.empty(c)
    for j in range(c):
        shift[j] = x[0, j, 0]
    return shift, np.empty((n, c)), np.empty((n, c))


@njit(inline="always", cache=True, fastmath=REASSOC)
def _plane_moments_f64(row, shift):
    """(mean - shift, M2) of one plane from float64 sums."""
    a, b = _plane_f64(row, shift)
    return _finish(a, b, np.float64(row.shape[0]))


@njit(inline="always", cache=True)
def _ncs_moments(plane, x):
    """Per-channel (mean, M2) of x (N, C, S): ``plane`` gives each (n, c) plane's partial, and
    the partials are merged in order (both (N, C, S) kernels)."""
    n, c, s = x.shape
    shift, part_mean, part_m2 = _ncs_setup(x)
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        part_mean[i, j], part_m2[i, j] = plane(x[i, j], shift[j])
    return _merge_planes(part_mean, part_m2, s, shift)


@specialised(parallel=True, fastmath=REASSOC)
def moments_ncs(dtype, at=False):
    """Per-channel (mean, M2) in float64 of x (N, C, S), N * S > 0, from float64 sums. ``at``:
    the kernel of the same code taking x by address, ``(address, N, C, S)`` (:mod:`.memory`),
    a kernel (and cache) of its own; every statistics kernel here has that form."""

    def kernel(x):
        return _ncs_moments(_plane_moments_f64, memory(x, dtype))

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def moments_ncs_channels(dtype, at=False):
    """Per-channel (mean, M2) in float64 of x (N, C, S), N * S > 0, one task per channel from
    float64 sums (each channel shifted by its first value)."""

    def kernel(x):
        x = memory(x, dtype)
        n, c, s = x.shape
        mean = np.empty(c)
        m2 = np.empty(c)
        for j in prange(c):
            k = np.float64(x[0, j, 0])
            a = 0.0
            b = 0.0
            for i in range(n):
                pa, pb = _plane_f64(x[i, j], k)
                a += pa
                b += pb
            mean_d, m2[j] = _finish(a, b, np.float64(n * s))
            mean[j] = k + mean_d
        return mean, m2

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def moments_ncs_blocked(dtype, at=False):
    """Per-channel (mean, M2) in float64 of float32 x (N, C, S), N * S > 0, from float32 blocks."""

    def kernel(x):
        return _ncs_moments(_plane_blocked, memory(x, dtype))

    return kernel


@njit(inline="always", cache=True)
def _merge_chunks(part_mean, part_m2, m, rows, shift):
    """Chan merge of the (chunks, C) row-chunk partials (means relative to shift), in order."""
    chunks, c = part_mean.shape
    mean = part_mean[0].copy()
    m2 = part_m2[0].copy()
    for q in range(1, chunks):
        n_a = np.float64(q * rows)
        n_b = np.float64(min(m, (q + 1) * rows) - q * rows)
        for j in range(c):
            mean[j], m2[j] = _chan(n_a, mean[j], m2[j], n_b, part_mean[q, j], part_m2[q, j])
    for j in range(c):
        mean[j] += shift[j]
    return mean, m2


@njit(inline="always", cache=True)
def _mc_setup(x):
    """What both channels-last kernels start with: the shift (each channel's first value), the
    rows per chunk, and the (chunks, C) float64 partial arrays."""
    m, c = x.shape
    shift = np.empty(c)
    for j in range(c):
        shift[j] = x[0, j]
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    return shift, rows, np.empty((chunks, c)), np.empty((chunks, c))


@njit(inline="always", cache=True, fastmath=REASSOC)
def _rows_moments_f64(x, r0, r1, shift, part_mean, part_m2):
    """part_mean[j] = mean - shift[j], part_m2[j] = M2 over rows r0:r1 (channels-last), from
    float64 sums."""
    _rows_f64(x, r0, r1, shift, part_mean, part_m2)
    for j in range(x.shape[1]):
        part_mean[j], part_m2[j] = _finish(part_mean[j], part_m2[j], np.float64(r1 - r0))


@njit(inline="always", cache=True)
def _mc_moments(chunk, x):
    """Per-channel (mean, M2) of channels-last x (M, C): ``chunk`` writes each chunk of rows'
    partials, and the partials are merged in order (both channels-last kernels)."""
    m, c = x.shape
    shift, rows, part_mean, part_m2 = _mc_setup(x)
    for q in prange(part_mean.shape[0]):
        r0 = q * rows
        chunk(x, r0, min(m, r0 + rows), shift, part_mean[q], part_m2[q])
    return _merge_chunks(part_mean, part_m2, m, rows, shift)


@specialised(parallel=True, fastmath=REASSOC)
def moments_mc(dtype, at=False):
    """Per-channel (mean, M2) in float64 of channels-last x (M, C), M > 0, from float64 sums."""

    def kernel(x):
        return _mc_moments(_rows_moments_f64, memory(x, dtype))

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def moments_mc_blocked(dtype, at=False):
    """Per-channel (mean, M2) in float64 of float32 channels-last x (M, C), M > 0, from float32
    blocks."""

    def kernel(x):
        return _mc_moments(_rows_blocked, memory(x, dtype))

    return kernel


# ---------------------------------------------------------------------------------------------
# masked statistics: only the positions where the mask is True count (the same in every channel)
#
# Each chunk (an (n, c) plane, or a block of channels-last rows) is read twice while in cache:
# its counted mean first, then the squared deviations from it, both in float64; the chunks'
# partials are merged with Chan's formula in order, weighted by their counted numbers (a chunk
# counting nothing is neutral). Same definitions as the reference's moments with a mask.


@njit(inline="always", cache=True, fastmath=REASSOC)
def _plane_masked(row, mrow, cnt, shift):
    """(mean, M2) of one plane's counted values (cnt > 0 of them), two passes over the values
    shifted by one sample of the channel (so float32 data far from zero keeps its precision):
    sums in the data's dtype over BLOCK values, each block's sum added in float64; the second
    pass centred on the plane's counted mean."""
    z = row.dtype.type(0.0)
    k0 = row.dtype.type(shift)
    s = row.shape[0]
    a = 0.0
    for t0 in range(0, s, BLOCK):
        sa = z
        for t in range(t0, min(s, t0 + BLOCK)):
            sa += (row[t] - k0) * mrow[t]  # the mask as 0 / 1: a multiply, no branch
        a += np.float64(sa)
    mean = a / cnt  # relative to the shift
    k = row.dtype.type(mean)
    b = 0.0
    for t0 in range(0, s, BLOCK):
        sb = z
        for t in range(t0, min(s, t0 + BLOCK)):
            d = ((row[t] - k0) - k) * mrow[t]
            sb += d * d
        b += np.float64(sb)
    # the centre k is the mean rounded to the data's dtype: correct M2 for the rest
    delta = mean - np.float64(k)
    return np.float64(k0) + mean, max(b - cnt * delta * delta, 0.0)


@njit(inline="always", cache=True)
def _merge_counted(counts, part_mean, part_m2):
    """(count, mean, M2) per channel of the (chunks, C) partials of counted values, chunk q
    holding counts[q] of them (0: neutral), merged with Chan's formula in order."""
    c = part_mean.shape[1]
    mean = np.zeros(c)
    m2 = np.zeros(c)
    cnt = 0.0
    for q in range(part_mean.shape[0]):
        nb = counts[q]
        if nb == 0.0:
            continue
        for j in range(c):
            if cnt == 0.0:
                mean[j], m2[j] = part_mean[q, j], part_m2[q, j]
            else:
                mean[j], m2[j] = _chan(cnt, mean[j], m2[j], nb, part_mean[q, j], part_m2[q, j])
        cnt += nb
    return cnt, mean, m2


@specialised(parallel=True, fastmath=REASSOC)
def moments_masked_ncs(dtype):
    """Per-channel float64 (count, mean, M2) of x (N, C, S) over the positions where mask (N, S)
    (0 / 1 bytes) is 1: each (n, c) plane's partial in memory order, then each channel's planes
    merged in order."""

    def kernel(x, mask):
        n, c, s = x.shape
        counts = np.zeros(n)
        for i in range(n):
            for t in range(s):
                counts[i] += np.float64(mask[i, t])
        shift, part_mean, part_m2 = _ncs_setup(x)
        for p in prange(n * c):
            i = p // c
            j = p - i * c
            if counts[i] > 0.0:
                part_mean[i, j], part_m2[i, j] = _plane_masked(x[i, j], mask[i], counts[i],
                                                               shift[j])
        return _merge_counted(counts, part_mean, part_m2)

    return kernel


@specialised(parallel=True, fastmath=REASSOC)
def moments_masked_mc(dtype):
    """Per-channel float64 (count, mean, M2) of channels-last x (M, C) over the rows where mask
    (M,) is True; chunks of rows_per_chunk rows, merged in order."""

    def kernel(x, mask):
        m, c = x.shape
        rows = rows_per_chunk(c)
        chunks = (m + rows - 1) // rows
        part_n = np.zeros(chunks)
        part_mean = np.zeros((chunks, c))
        part_m2 = np.zeros((chunks, c))
        for q in prange(chunks):
            r0 = q * rows
            r1 = min(m, r0 + rows)
            acc = np.zeros(c)
            cnt = 0.0
            for r in range(r0, r1):
                if mask[r]:
                    cnt += 1.0
                    for j in range(c):
                        acc[j] += np.float64(x[r, j])
            if cnt == 0.0:
                continue
            for j in range(c):
                part_mean[q, j] = acc[j] / cnt
                acc[j] = 0.0
            for r in range(r0, r1):
                if mask[r]:
                    for j in range(c):
                        d = np.float64(x[r, j]) - part_mean[q, j]
                        acc[j] += d * d
            part_n[q] = cnt
            for j in range(c):
                part_m2[q, j] = acc[j]
        return _merge_counted(part_n, part_mean, part_m2)

    return kernel
