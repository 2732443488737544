"""Per-channel batch statistics: the reference's moments and merge, in parallel numba kernels.

Same definitions as :func:`batchnorm.reference.moments` / :func:`batchnorm.reference.merge`:
every channel is shifted by one of its own samples (the first), each fixed-size chunk yields a
partial ``(count, mean, M2)`` from its shifted sums accumulated in float64, and the partials are
combined with Chan's formula in a fixed order. Chunks do not depend on the thread count, so the
result is bitwise the same with 1 or 16 threads.

Chunks: in the ``(N, C, S)`` layout one chunk is one ``(n, c)`` plane of S contiguous values; in
the channels-last ``(M, C)`` layout one chunk is a block of ``rows_per_chunk(C)`` rows.

``fastmath`` is limited to ``reassoc`` (lets LLVM vectorise the sums inside a chunk): no
``nnan`` / ``ninf``, so a NaN or Inf in the batch reaches the statistics, where the layer's
non-finite guard looks for it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

REASSOC = {"reassoc"}


@njit(cache=True)
def rows_per_chunk(c):
    """Rows of a channels-last chunk: about 256k values, at least 128 rows (fixed, not per thread)."""
    return max(128, 262144 // max(c, 1))


@njit(inline="always", cache=True)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of two partials (n_a > 0 or n_b > 0)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def moments_ncs(x):
    """Per-channel (mean, M2) in float64 of x (N, C, S), N * S > 0."""
    n, c, s = x.shape
    shift = np.empty(c)
    for j in range(c):
        shift[j] = x[0, j, 0]
    part_mean = np.empty((n, c))  # shifted mean of each plane
    part_m2 = np.empty((n, c))
    for p in prange(n * c):
        i = p // c
        j = p - i * c
        row = x[i, j]
        k = shift[j]
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
        part_mean[i, j] = mean_d
        part_m2[i, j] = m2
    # merge plane by plane, in order (serial: N * C partials are cheap next to the data)
    mean = part_mean[0].copy()
    m2 = part_m2[0].copy()
    for i in range(1, n):
        for j in range(c):
            mean[j], m2[j] = _chan(np.float64(i * s), mean[j], m2[j], np.float64(s),
                                   part_mean[i, j], part_m2[i, j])
    for j in range(c):
        mean[j] += shift[j]
    return mean, m2


@njit(parallel=True, cache=True, fastmath=REASSOC)
def moments_mc(x):
    """Per-channel (mean, M2) in float64 of channels-last x (M, C), M > 0."""
    m, c = x.shape
    shift = np.empty(c)
    for j in range(c):
        shift[j] = x[0, j]
    rows = rows_per_chunk(c)
    chunks = (m + rows - 1) // rows
    part_mean = np.zeros((chunks, c))
    part_m2 = np.zeros((chunks, c))
    for q in prange(chunks):
        r0 = q * rows
        r1 = min(m, r0 + rows)
        a = part_mean[q]
        b = part_m2[q]
        for r in range(r0, r1):
            row = x[r]
            for j in range(c):
                d = np.float64(row[j]) - shift[j]
                a[j] += d
                b[j] += d * d
        cnt = np.float64(r1 - r0)
        for j in range(c):
            mean_d = a[j] / cnt
            v = b[j] - a[j] * mean_d
            if v < 0.0:
                v = 0.0
            a[j] = mean_d
            b[j] = v
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
