"""The numba kernels against the NumPy oracle (batchnorm.reference), in float64 NumPy.

Every kernel, both layouts ((N, C, S) and channels-last (M, C)), both dtypes, every activation;
the activation and its derivative are applied to the reference's output here, in float64.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from batchnorm import kernels, reference
from batchnorm.activations import FUSED, REGISTRY
from batchnorm.kernels.statistics import (
    BLOCK,
    BLOCKED_PLANE_FROM,
    SHORT_PLANE,
    SHORT_PLANE_CHANNELS,
    moments_ncs,
    moments_ncs_channels,
    rows_per_chunk,
)

ACTS = FUSED  # identity, relu, leaky_relu, elu, silu, relu6, hardswish
SLOPE, ALPHA, EPS = 0.1, 1.3, 1e-5
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}
# batch statistics: float32 data is summed in float32 blocks (kernels/statistics.py)
STATS_TOL = {np.float32: dict(rtol=1e-7, atol=1e-7), np.float64: dict(rtol=1e-12, atol=1e-12)}


# ---------------------------------------------------------------------------------------------
# float64 NumPy statements of the activations


def code(act: str) -> int:
    """The kernel code of an activation (the registry's)."""
    return REGISTRY[act].code



def act_np(z, act):
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "leaky_relu":
        return np.where(z > 0, z, z * SLOPE)
    if act == "elu":
        return np.where(z > 0, z, ALPHA * np.expm1(z))
    if act == "silu":
        return z / (1.0 + np.exp(-z))
    if act == "relu6":
        return np.clip(z, 0.0, 6.0)
    if act == "hardswish":
        return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0
    return z


def act_grad_np(z, act):
    if act == "relu":
        return (z > 0).astype(np.float64)
    if act == "leaky_relu":
        return np.where(z > 0, 1.0, SLOPE)
    if act == "elu":
        return np.where(z > 0, 1.0, ALPHA * np.exp(z))
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if act == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if act == "hardswish":
        return np.where(z <= -3, 0.0, np.where(z >= 3, 1.0, z / 3.0 + 0.5))
    return np.ones_like(z)


# ---------------------------------------------------------------------------------------------
# layouts: (N, C, *) logical arrays to and from the kernels' views


def to_kernel(a, layout):
    n, c = a.shape[:2]
    if layout == "ncs":
        return np.ascontiguousarray(a).reshape(n, c, -1)  # (N, C, S)
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(-1, c)  # (M, C)


def from_kernel(k, shape, layout):
    if layout == "ncs":
        return k.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return np.moveaxis(k.reshape(moved), -1, 1)


def data(shape, dtype, seed=0, loc=0.7, scale=1.6):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.normal(loc, scale, size=shape)).astype(dtype)
    w = rng.normal(1.0, 0.5, size=c).astype(dtype)
    b = rng.normal(0.0, 0.5, size=c).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    return x, w, b, dy


SHAPE = (5, 3, 4, 7)
# more channels and longer planes: several tasks per channel merge and per thread
WIDE = (2, 16, 8, 64)
# planes long enough for the float32-block reductions, with a partial block
LONG = (2, 3, 45, 50)
SHAPES = (SHAPE, WIDE, LONG)
LAYOUTS = ("ncs", "mc")
DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("ncs", "ncs-few-channels", "ncs-mid", "ncs-long", "mc",
                                    "mc-spans", "mc-one-channel"))
def test_moments_match_reference_over_many_chunks(layout, dtype):
    c = 1024
    rng = np.random.default_rng(1)
    if layout.startswith("mc"):  # channels-last (M, C): 3 full chunks of rows and a partial
        # one; few channels: spans of span_rows(c) rows (10 rows of 24, 256 of 1), the last
        # chunk ending in rows left over after its spans
        c = {"mc": c, "mc-spans": 24, "mc-one-channel": 1}[layout]
        x = rng.normal(3.0, 2.0, size=(3 * rows_per_chunk(c) + 37, c)).astype(dtype)
    elif layout == "ncs":  # (N, C, S), short planes: one task per channel, float64 sums
        x = rng.normal(3.0, 2.0, size=(7, c, 61)).astype(dtype)
    elif layout == "ncs-few-channels":  # short planes, too few channels: plane partials
        x = rng.normal(3.0, 2.0, size=(7, SHORT_PLANE_CHANNELS - 1, 61)).astype(dtype)
    elif layout == "ncs-mid":  # one chunk per (n, c) plane, float64 sums
        x = rng.normal(3.0, 2.0, size=(7, 64, SHORT_PLANE + 5)).astype(dtype)
    else:  # planes long enough for the float32 blocks, with a partial block at the end
        x = rng.normal(3.0, 2.0, size=(5, 64, BLOCKED_PLANE_FROM + BLOCK + 37)).astype(dtype)
    want = reference.moments(x, axis=1)
    mean, m2 = kernels.moments(x)
    if dtype == np.float64:
        np.testing.assert_allclose(mean, want.mean, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(m2, want.m2, rtol=1e-11)
    else:
        # float32 blocks: measured 8e-9 sd on the mean, 4e-8 relative on M2 here
        sd = np.sqrt(want.m2 / want.count)
        assert np.all(np.abs(mean - want.mean) <= 1e-7 * sd)
        np.testing.assert_allclose(m2, want.m2, rtol=3e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", (1e20, 3e37))
def test_float32_blocks_fall_back_to_float64_where_squares_overflow(layout, scale):
    # (x - k)^2 overflows float32 above ~1e19: the batch is summed in float64 instead
    x = (scale * np.random.default_rng(4).normal(size=(3, 4, BLOCKED_PLANE_FROM))).astype(
        np.float32)
    want = reference.moments(x, axis=1)
    mean, m2 = kernels.moments(to_kernel(x, layout))
    np.testing.assert_allclose(mean, want.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(m2, want.m2, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_planes_a_channel_per_task_equal_the_plane_partials(dtype):
    # the two float64 ways agree to rounding, far from zero too, and the channel kernel's bits
    # do not depend on the thread count
    x = np.random.default_rng(5).normal(1e4, 1.0, size=(33, 40, 16)).astype(dtype)
    by_channel = moments_ncs_channels(x.dtype)(x)
    by_plane = moments_ncs(x.dtype)(x)
    want = reference.moments(x, axis=1)
    for got in (by_channel, by_plane):
        np.testing.assert_allclose(got[0], want.mean, rtol=1e-14)
        np.testing.assert_allclose(got[1], want.m2, rtol=1e-11)
    np.testing.assert_array_equal(kernels.moments(x)[1], by_channel[1])
    threads = numba.get_num_threads()
    kernels.set_threads(1)
    try:
        one = moments_ncs_channels(x.dtype)(x)
    finally:
        kernels.set_threads(threads)
    np.testing.assert_array_equal(one[0], by_channel[0])
    np.testing.assert_array_equal(one[1], by_channel[1])


@pytest.mark.parametrize("inplace", (False, True))
def test_short_planes_take_the_same_bits_whatever_the_tasks(monkeypatch, inplace):
    # short planes are split into a few tasks of whole samples (kernels._splits), long ones a
    # plane per task: the normalisation, dx, dweight and dbias are the same bits either way,
    # and equal the reference
    x, w, b, dy = data((6, 20, 9), np.float64)
    relu = code("leaky_relu")
    assert kernels._splits(x) < 20 == kernels._splits(np.empty((6, 20, SHORT_PLANE)))
    results = []
    for splits in (None, 1, 3, 20):
        if splits is not None:
            monkeypatch.setattr(kernels, "_splits", lambda x, n=splits: n)
        y = np.empty_like(x)
        mean, var = kernels.train_forward(x, w, b, EPS, relu, SLOPE, ALPHA, y)
        dx = np.empty_like(x)
        src = y if inplace else x
        dw, db = kernels.train_backward(dy, src, w, b, mean, var, EPS, relu, SLOPE, ALPHA,
                                        inplace, dx)
        ey = np.empty_like(x)
        kernels.eval_forward(x, w, b, mean, var, EPS, relu, SLOPE, ALPHA, ey)
        edx = np.empty_like(x)
        edw, edb = kernels.eval_backward(dy, x, w, b, mean, var, EPS, relu, SLOPE, ALPHA, edx)
        results.append((y, dx, dw, db, ey, edx, edw, edb))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a, b_)
    want, _ = reference.forward(x, w, b, None, None, training=True, eps=EPS)
    np.testing.assert_allclose(results[0][0], np.where(want > 0, want, SLOPE * want), rtol=1e-12,
                               atol=1e-12)


def test_moments_equal_chan_merge_of_halves():
    x = np.random.default_rng(2).normal(size=(6, 4, 50))
    halves = reference.merge(reference.moments(x[:3]), reference.moments(x[3:]))
    mean, m2 = kernels.moments(x)
    np.testing.assert_allclose(mean, halves.mean, rtol=1e-13)
    np.testing.assert_allclose(m2, halves.m2, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_a_channel_reaches_its_statistics(layout):
    x, w, b, _ = data(SHAPE, np.float32)
    x[2, 1, 0, 3] = np.nan
    y = np.empty_like(to_kernel(x, layout))
    mean, var = kernels.train_forward(to_kernel(x, layout), w, b, EPS, code("relu"), SLOPE, ALPHA,
                                      y)
    assert np.isnan(mean[1]) and np.isnan(var[1])
    assert np.isfinite(mean[[0, 2]]).all() and np.isfinite(var[[0, 2]]).all()


@pytest.mark.parametrize("shape", ((16, 4, 8, 8), (2, 16, 16, 32), (2, 4, 64, 64)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_offset_float32_is_exact_to_float64(layout, shape):
    # mean 1e4, std 1e-2: E[x^2] - E[x]^2 fails here; PyTorch CPU is off by ~3e-2
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.normal(size=shape)).astype(np.float32)
    want, state = reference.forward(x.astype(np.float64), None, None, None, None, training=True)
    xk = to_kernel(x, layout)
    y = np.empty_like(xk)
    mean, var = kernels.train_forward(xk, None, None, EPS, code("identity"), SLOPE, ALPHA, y)
    np.testing.assert_allclose(mean, state.mean, rtol=1e-15)
    np.testing.assert_allclose(var, state.var, rtol=1e-9)
    assert np.abs(from_kernel(y, x.shape, layout) - want).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# forward and backward against the reference


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_and_backward(act, layout, dtype, shape):
    x, w, b, dy = data(shape, dtype)
    z_ref, state = reference.forward(x.astype(np.float64), w.astype(np.float64),
                                     b.astype(np.float64), None, None, training=True)
    y_ref = act_np(z_ref, act)
    xk, dyk = to_kernel(x, layout), to_kernel(dy, layout)
    y = np.empty_like(xk)
    mean, var = kernels.train_forward(xk, w, b, EPS, code(act), SLOPE, ALPHA, y)
    np.testing.assert_allclose(mean, state.mean, **STATS_TOL[dtype])
    np.testing.assert_allclose(var, state.var, **STATS_TOL[dtype])
    np.testing.assert_allclose(from_kernel(y, x.shape, layout), y_ref, **TOL[dtype])

    g = dy.astype(np.float64) * act_grad_np(z_ref, act)  # dL/dz
    dx_ref, dw_ref, db_ref = reference.backward(g, state)
    dx = np.empty_like(xk)
    dw, db = kernels.train_backward(dyk, xk, w, b, mean, var, EPS, code(act), SLOPE, ALPHA, False,
                                    dx)
    np.testing.assert_allclose(from_kernel(dx, x.shape, layout), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(dw, dw_ref, **TOL[dtype])
    np.testing.assert_allclose(db, db_ref, **TOL[dtype])


@pytest.mark.parametrize("act", ("identity", "leaky_relu", "elu"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_inplace_backward_from_output_equals_backward_from_input(act, layout, dtype, shape):
    x, w, b, dy = data(shape, dtype)
    w[1] = -w[1]  # a negative gamma must invert too
    xk, dyk = to_kernel(x, layout), to_kernel(dy, layout)
    y = np.empty_like(xk)
    mean, var = kernels.train_forward(xk, w, b, EPS, code(act), SLOPE, ALPHA, y)
    dx_in, dx_out = np.empty_like(xk), np.empty_like(xk)
    want = kernels.train_backward(dyk, xk, w, b, mean, var, EPS, code(act), SLOPE, ALPHA, False,
                                  dx_in)
    got = kernels.train_backward(dyk, y, w, b, mean, var, EPS, code(act), SLOPE, ALPHA, True,
                                 dx_out)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dx_out, dx_in, **tol)
    np.testing.assert_allclose(got[0], want[0], **tol)
    np.testing.assert_allclose(got[1], want[1], **tol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_forward_and_backward(act, layout, dtype):
    x, w, b, dy = data(SHAPE, dtype)
    rng = np.random.default_rng(4)
    rm = rng.normal(size=3).astype(dtype)
    rv = rng.uniform(0.5, 2.0, size=3).astype(dtype)
    z_ref, state = reference.forward(x.astype(np.float64), w.astype(np.float64),
                                     b.astype(np.float64), rm.astype(np.float64),
                                     rv.astype(np.float64), training=False)
    xk, dyk = to_kernel(x, layout), to_kernel(dy, layout)
    y = np.empty_like(xk)
    kernels.eval_forward(xk, w, b, rm, rv, EPS, code(act), SLOPE, ALPHA, y)
    np.testing.assert_allclose(from_kernel(y, x.shape, layout), act_np(z_ref, act), **TOL[dtype])

    g = dy.astype(np.float64) * act_grad_np(z_ref, act)
    dx_ref, dw_ref, db_ref = reference.backward(g, state)
    dx = np.empty_like(xk)
    dw, db = kernels.eval_backward(dyk, xk, w, b, rm, rv, EPS, code(act), SLOPE, ALPHA, dx)
    np.testing.assert_allclose(from_kernel(dx, x.shape, layout), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(dw, dw_ref, **TOL[dtype])
    np.testing.assert_allclose(db, db_ref, **TOL[dtype])


def test_without_weight_and_bias_is_gamma_one_beta_zero():
    x, _, _, dy = data(SHAPE, np.float64)
    ones, zeros = np.ones(3), np.zeros(3)
    xk, dyk = to_kernel(x, "ncs"), to_kernel(dy, "ncs")
    y1, y2, dx1, dx2 = (np.empty_like(xk) for _ in range(4))
    s1 = kernels.train_forward(xk, None, None, EPS, code("elu"), SLOPE, ALPHA, y1)
    kernels.train_forward(xk, ones, zeros, EPS, code("elu"), SLOPE, ALPHA, y2)
    np.testing.assert_array_equal(y1, y2)
    g1 = kernels.train_backward(dyk, xk, None, None, *s1, EPS, code("elu"), SLOPE, ALPHA, False,
                                dx1)
    g2 = kernels.train_backward(dyk, xk, ones, zeros, *s1, EPS, code("elu"), SLOPE, ALPHA, False,
                                dx2)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(g1[0], g2[0])


# ---------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("shape", ((3 * 128 + 5, 1024, 1, 1), (4, 8, 48, 48),
                                   (3 * 10930 + 7, 24, 1, 1)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_and_two_threads_give_identical_bits(layout, shape):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    # several channels-last chunks and many planes, so both threads get work; 48x48 planes
    # take the float32-block statistics and backward sums
    x, w, b, dy = data(shape, np.float32, seed=5)
    xk, dyk = to_kernel(x, layout), to_kernel(dy, layout)
    results = []
    for threads in (1, 2):
        kernels.set_threads(threads)
        y, dx, dx_eval = np.empty_like(xk), np.empty_like(xk), np.empty_like(xk)
        mean, var = kernels.train_forward(xk, w, b, EPS, code("silu"), SLOPE, ALPHA, y)
        grads = kernels.train_backward(dyk, xk, w, b, mean, var, EPS, code("silu"), SLOPE, ALPHA,
                                       False, dx)
        eval_grads = kernels.eval_backward(dyk, xk, w, b, mean, var, EPS, code("silu"), SLOPE,
                                           ALPHA, dx_eval)
        results.append((mean, var, y, dx, *grads, dx_eval, *eval_grads))
    kernels.set_threads(numba.config.NUMBA_NUM_THREADS)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# channels-last backward: rows_per_chunk(1024) = 256-row chunks, float32 row sums added into
# float64 every ROW_BLOCK rows; the last chunk has 7 rows. With 24 channels: spans of 10 rows,
# the last one 7 rows
@pytest.mark.parametrize("act", ("identity", "elu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", (1024, 24))
def test_channels_last_backward_over_many_chunks_and_leftover_rows(act, dtype, c):
    shape = (3 * rows_per_chunk(c) + 7, c, 1, 1)
    x, w, b, dy = data(shape, dtype, seed=6)
    z_ref, state = reference.forward(x.astype(np.float64), w.astype(np.float64),
                                     b.astype(np.float64), None, None, training=True)
    g = dy.astype(np.float64) * act_grad_np(z_ref, act)
    dx_ref, dw_ref, db_ref = reference.backward(g, state)
    xk, dyk = to_kernel(x, "mc"), to_kernel(dy, "mc")
    y = np.empty_like(xk)
    mean, var = kernels.train_forward(xk, w, b, EPS, code(act), SLOPE, ALPHA, y)
    np.testing.assert_allclose(from_kernel(y, shape, "mc"), act_np(z_ref, act), **TOL[dtype])
    for src, inplace in ((xk, False), (y, True)):
        dx = np.empty_like(xk)
        dw, db = kernels.train_backward(dyk, src, w, b, mean, var, EPS, code(act), SLOPE, ALPHA,
                                        inplace, dx)
        tol = TOL[dtype] if not inplace or dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(from_kernel(dx, shape, "mc"), dx_ref, **tol)
        np.testing.assert_allclose(dw, dw_ref, **tol)
        np.testing.assert_allclose(db, db_ref, **tol)

    # evaluation with the batch's own statistics: g scaled, the same sums
    _, state_eval = reference.forward(x.astype(np.float64), w.astype(np.float64),
                                      b.astype(np.float64), state.mean, state.var,
                                      training=False)
    dx_ref, dw_ref, db_ref = reference.backward(g, state_eval)
    dx = np.empty_like(xk)
    dw, db = kernels.eval_backward(dyk, xk, w, b, state.mean, state.var, EPS, code(act), SLOPE,
                                   ALPHA, dx)
    np.testing.assert_allclose(from_kernel(dx, shape, "mc"), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(dw, dw_ref, **TOL[dtype])
    np.testing.assert_allclose(db, db_ref, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# masked BN: statistics over the counted positions, dx with the statistics' part only there


def mask_for(shape, seed=4, p=0.6):
    mask = np.random.default_rng(seed).random((shape[0], *shape[2:])) < p
    mask.reshape(-1)[:2] = True
    return mask


def mask_to_kernel(mask, layout):
    """The mask as the kernels index it: (N, S) beside (N, C, S), (M,) beside (M, C)."""
    return mask.reshape(mask.shape[0], -1) if layout == "ncs" else mask.reshape(-1)


@pytest.mark.parametrize("act", ("identity", "leaky_relu", "silu"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", (*SHAPES, (3 * 128 + 5, 7, 1, 1)))
def test_masked_statistics_and_backward(act, layout, dtype, shape):
    x, w, b, dy = data(shape, dtype)
    mask = mask_for(shape)
    z_ref, state = reference.forward(x.astype(np.float64), w.astype(np.float64),
                                     b.astype(np.float64), None, None, training=True, mask=mask)
    xk, dyk, mk = to_kernel(x, layout), to_kernel(dy, layout), mask_to_kernel(mask, layout)
    count, mean, m2 = kernels.moments_masked(xk, mk)
    assert count == mask.sum()
    np.testing.assert_allclose(mean, state.mean, **STATS_TOL[dtype])
    np.testing.assert_allclose(m2 / count, state.var, **STATS_TOL[dtype])
    var = m2 / count
    g = dy.astype(np.float64) * act_grad_np(z_ref, act)
    dx_ref, dw_ref, db_ref = reference.backward(g, state)
    dx = np.empty_like(xk)
    dw, db = kernels.train_backward(dyk, xk, w, b, mean, var, EPS, code(act), SLOPE, ALPHA,
                                    False, dx, mask=mk, count=count)
    scale = np.abs(dx_ref).max()
    np.testing.assert_allclose(from_kernel(dx, x.shape, layout) / scale, dx_ref / scale,
                               **TOL[dtype])
    np.testing.assert_allclose(dw, dw_ref, **TOL[dtype])
    np.testing.assert_allclose(db, db_ref, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_statistics_at_a_large_offset_and_planes_counting_nothing(layout):
    shape = (6, 4, 8, 8)
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.normal(size=shape)).astype(np.float32)
    mask = mask_for(shape)
    mask[1] = False  # a sample (a plane per channel) that counts nothing is neutral
    _, state = reference.forward(x.astype(np.float64), None, None, None, None, training=True,
                                 mask=mask)
    count, mean, m2 = kernels.moments_masked(to_kernel(x, layout), mask_to_kernel(mask, layout))
    np.testing.assert_allclose(mean, state.mean, rtol=1e-15)
    np.testing.assert_allclose(m2 / count, state.var, rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_kernels_give_identical_bits_on_one_and_two_threads(layout):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    shape = (3 * 128 + 5, 64, 2, 2) if layout == "mc" else (4, 8, 48, 48)
    x, w, b, dy = data(shape, np.float32, seed=6)
    xk, dyk = to_kernel(x, layout), to_kernel(dy, layout)
    mk = mask_to_kernel(mask_for(shape), layout)
    results = []
    for threads in (1, 2):
        kernels.set_threads(threads)
        count, mean, m2 = kernels.moments_masked(xk, mk)
        dx = np.empty_like(xk)
        grads = kernels.train_backward(dyk, xk, w, b, mean, m2 / count, EPS, code("relu"),
                                       SLOPE, ALPHA, False, dx, mask=mk, count=count)
        results.append((mean, m2, dx, *grads))
    kernels.set_threads(numba.config.NUMBA_NUM_THREADS)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
