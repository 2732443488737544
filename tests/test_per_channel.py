"""The kernels' per-channel work (kernels/per_channel.py) against NumPy written out."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm.kernels import running_update
from batchnorm.kernels.per_channel import NO_PARAMETER, grad_coefficients, prepare

rng = np.random.default_rng(0)


def numpy_prepare(mean, var, weight, bias, eps, dtype):
    with np.errstate(divide="ignore", invalid="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
        gamma = np.ones(len(mean)) if weight is None else np.asarray(weight, np.float64)
        mean_hi = mean.astype(dtype)
        mean_lo = (mean - mean_hi).astype(dtype)
        scale = (gamma * invstd).astype(dtype)
    shift = np.zeros(len(mean), dtype) if bias is None else np.asarray(bias).astype(dtype)
    return invstd, gamma, mean_hi, mean_lo, scale, shift


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wdtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("bdtype", [None, np.float32, np.float64])
def test_prepare_gives_numpys_bits(dtype, wdtype, bdtype):
    c = 37
    mean = rng.normal(size=c) * 1e4 + rng.normal(size=c) * 1e-3  # far from zero: mean_lo matters
    var = rng.uniform(0, 3, c)
    mean[1], var[0], var[2] = np.inf, np.nan, -1e-5  # NaN, Inf and var + eps == 0 (1/0)
    weight = None if wdtype is None else rng.normal(size=c).astype(wdtype)
    bias = None if bdtype is None else rng.normal(size=c).astype(bdtype)
    none = NO_PARAMETER[np.dtype(dtype)]
    got = prepare(np.dtype(dtype), weight is not None, bias is not None)(
        mean, var, none if weight is None else weight, none if bias is None else bias, 1e-5,
        none)
    want = numpy_prepare(mean, var, weight, bias, 1e-5, dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_update_is_the_ema_of_the_unbiased_variance(dtype):
    c, n, factor = 9, 12, 0.1
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2, c)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    want_m = ((1 - factor) * rm.astype(np.float64) + factor * mean).astype(dtype)
    want_v = ((1 - factor) * rv.astype(np.float64) + factor * var * n / (n - 1)).astype(dtype)
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
    exact_m = (rm64 + factor * (mean - rm64)).astype(dtype)  # the documented form, in float64
    exact_v = (rv64 + factor * (var * (n / (n - 1.0)) - rv64)).astype(dtype)
    assert running_update(mean, var, rm, rv, factor, float(n), True)
    # the documented float64 arithmetic rounded once: NumPy's bits
    np.testing.assert_array_equal(rm, exact_m)
    np.testing.assert_array_equal(rv, exact_v)
    # and the EMA it is: the two float64 forms round differently, by a few ulp of the terms
    # (not of the result: a running mean near 0 comes from terms near 1)
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(rm - want_m) <= 4 * eps * (np.abs(rm64) + np.abs(mean)))
    assert np.all(np.abs(rv - want_v) <= 4 * eps * (np.abs(rv64) + np.abs(var) * n / (n - 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_running_update_checks_before_it_changes_anything(bad):
    mean, var = np.zeros(4), np.ones(4)
    var[3] = bad
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    assert not running_update(mean, var, rm, rv, 0.1, 8.0, True)
    assert (rm == 0.5).all() and (rv == 2.0).all()
    assert running_update(mean, var, rm, rv, 0.1, 8.0, False)  # check off: PyTorch's update
    assert np.isnan(rv[3]) or np.isinf(rv[3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_coefficients_give_numpys_bits(dtype, inplace):
    c, m, eps = 23, 96, 1e-3
    gamma, invstd = rng.normal(size=c), rng.uniform(0.1, 3, c)
    gamma[:3] = [0.0, -1e-4, 1e-4]  # |gamma| < eps: sign(gamma) * eps stands in (0 counts as +)
    sum_g, sum_ge = rng.normal(size=c), rng.normal(size=c)
    k1 = gamma * invstd
    if inplace:
        safe = np.where(np.abs(gamma) < eps, np.where(gamma < 0, -eps, eps), gamma)
        sum_gxhat = sum_ge / safe
        k2 = -k1 * sum_gxhat / (m * safe)
    else:
        sum_gxhat = sum_ge * invstd
        k2 = -k1 * invstd * sum_gxhat / m
    k0 = -k1 * sum_g / m
    want = (sum_gxhat, k1.astype(dtype), k0.astype(dtype), k2.astype(dtype))
    got = grad_coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace,
                            NO_PARAMETER[np.dtype(dtype)])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
