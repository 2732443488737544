"""The per-channel work around the passes over the data: compiled calls of their own, and the
same arithmetic as inline helpers for the kernels that do it inside a pass's call.

- :func:`prepare`: what every pass but the statistics reads, from float64 statistics and the
  affine parameters: ``invstd = 1 / sqrt(var + eps)`` and ``gamma`` in float64, then in the data's
  dtype the mean split as ``mean_hi + mean_lo`` (see ``normalize.py``), ``scale = gamma *
  invstd`` and ``shift = beta``. The same float64 operations, in the same order, as NumPy would
  do them, rounded once to the data's dtype: the results are the bits NumPy gives.
- :func:`running_update`: the running statistics after a training batch, in place:
  ``running += factor * (batch - running)`` per channel, with the unbiased variance
  ``var * n / (n - 1)``, computed in float64 and rounded once to the buffers' dtype. With
  ``check`` it first looks for NaN/Inf in the batch statistics (rounded to the buffers' dtype) and,
  finding one, changes nothing and returns False.

Written as loops over channels: a handful of NumPy calls on arrays of C values costs more in
dispatch than the arithmetic. The passes make these values inside their own calls, with the
inline forms (:func:`channel_values`, :func:`update_running`, :func:`coefficients`): on a small
input each separate call cost as much as the pass. The kernels here run the same code for the
callers that want the values alone (the running update of the ops, the tests).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._compile import specialised

__all__ = ["prepare", "channel_values", "tiled", "running_update", "update_running",
           "grad_coefficients", "coefficients", "NO_PARAMETER"]

# an empty array of each data dtype: prepare's ``like``, and what an absent weight / bias is
# passed as (its kernels are made per case of presence)
NO_PARAMETER = {np.dtype(np.float32): np.empty(0, np.float32),
                np.dtype(np.float64): np.empty(0, np.float64)}


@njit(inline="always", cache=True, error_model="numpy")  # 1 / 0 is inf, as in NumPy
def _values(like, mean, var, weight, bias, eps, has_weight, has_bias):
    """:func:`prepare`'s ``(invstd, gamma, mean_hi, mean_lo, scale, shift)``, the per-channel
    arrays made here (``like``: an array of the data's dtype)."""
    c = mean.shape[0]
    to = like.dtype.type
    invstd = np.empty(c)
    gamma = np.empty(c)
    mean_hi = np.empty(c, like.dtype)
    mean_lo = np.empty(c, like.dtype)
    scale = np.empty(c, like.dtype)
    shift = np.empty(c, like.dtype)
    for i in range(c):
        inv = 1.0 / np.sqrt(var[i] + eps)
        g = np.float64(weight[i]) if has_weight else 1.0
        hi = to(mean[i])
        invstd[i] = inv
        gamma[i] = g
        mean_hi[i] = hi
        mean_lo[i] = to(mean[i] - np.float64(hi))
        scale[i] = to(g * inv)
        shift[i] = to(bias[i]) if has_bias else to(0.0)
    return invstd, gamma, mean_hi, mean_lo, scale, shift


@specialised(error_model="numpy")
def prepare(dtype, has_weight, has_bias):
    """Kernel: ``(mean, var, weight, bias, eps, like) -> (invstd, gamma, mean_hi, mean_lo, scale,
    shift)``; ``mean`` / ``var`` float64 (C,), ``weight`` / ``bias`` (C,) arrays (anything where
    the case has none), ``like`` an array of the data's dtype (:data:`NO_PARAMETER`)."""

    def kernel(mean, var, weight, bias, eps, like):
        return _values(like, mean, var, weight, bias, eps, has_weight, has_bias)

    return kernel


@njit(inline="always", cache=True)
def channel_values(like, mean, var, weight, bias, eps):
    """:func:`prepare`'s ``(invstd, gamma, mean_hi, mean_lo, scale, shift)`` inside a pass's
    own call (``like``: the data; an empty ``weight`` / ``bias`` is an absent one, as
    :data:`NO_PARAMETER` passes it)."""
    return _values(like, mean, var, weight, bias, eps, weight.shape[0] > 0, bias.shape[0] > 0)


@njit(inline="always", cache=True)
def tiled(values, reps):
    """``values`` (C,) repeated ``reps`` times: the per-channel values of a channels-last span
    of ``reps`` rows (``statistics.span``); the array itself for one row."""
    if reps == 1:
        return values
    c = values.shape[0]
    out = np.empty(c * reps, values.dtype)
    for r in range(reps):
        for j in range(c):
            out[r * c + j] = values[j]
    return out


@njit(inline="always", cache=True, error_model="numpy")
def update_running(mean, var, running_mean, running_var, factor, n, check):
    """:func:`running_update` inline (for the kernels that normalise and update in one call)."""
    c = mean.shape[0]
    to = running_mean.dtype.type
    if check:  # as the buffers would hold them: a float64 variance past float32's range is Inf
        for i in range(c):
            if not (np.isfinite(to(mean[i])) and np.isfinite(to(var[i]))):
                return False
    bessel = n / (n - 1.0)
    for i in range(c):
        rm = np.float64(running_mean[i])
        rv = np.float64(running_var[i])
        running_mean[i] = rm + factor * (mean[i] - rm)
        running_var[i] = rv + factor * (var[i] * bessel - rv)
    return True


@specialised(error_model="numpy")
def running_update_kernel(dtype):
    """Kernel: ``(mean, var, running_mean, running_var, factor, n, check) -> ok`` for buffers of
    ``dtype`` (see :func:`running_update`)."""

    def kernel(mean, var, running_mean, running_var, factor, n, check):
        return update_running(mean, var, running_mean, running_var, factor, n, check)

    return kernel


def running_update(mean, var, running_mean, running_var, factor, n, check) -> bool:
    """In place: ``running += factor * (batch - running)`` (the variance unbiased over n values);
    False, with nothing changed, when ``check`` finds a NaN/Inf batch statistic."""
    return running_update_kernel(running_mean.dtype)(mean, var, running_mean, running_var,
                                                     float(factor), float(n), bool(check))


def grad_coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace, like):
    """``grad_coefficients_kernel(like.dtype)(...)``."""
    return grad_coefficients_kernel(like.dtype)(gamma, invstd, sum_g, sum_ge, float(m),
                                                float(eps), bool(inplace), like)


@njit(inline="always", cache=True, error_model="numpy")
def coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace, like):
    """:func:`grad_coefficients_kernel`'s values inside a pass's own call."""
    c = gamma.shape[0]
    to = like.dtype.type
    sum_gxhat = np.empty(c)
    k1 = np.empty(c, like.dtype)
    k0 = np.empty(c, like.dtype)
    k2 = np.empty(c, like.dtype)
    for i in range(c):
        a = gamma[i] * invstd[i]
        if inplace:
            g = gamma[i]
            safe = (-eps if g < 0 else eps) if abs(g) < eps else g
            s = sum_ge[i] / safe
            b = -a * s / (m * safe)
        else:
            s = sum_ge[i] * invstd[i]
            b = -a * invstd[i] * s / m
        sum_gxhat[i] = s
        k1[i] = to(a)
        k0[i] = to(-a * sum_g[i] / m)
        k2[i] = to(b)
    return sum_gxhat, k1, k0, k2


@specialised(error_model="numpy")
def grad_coefficients_kernel(dtype):
    """Kernel: the training backward's per-channel values from its sums over ``m`` values:
    ``(sum g * x_hat, k1, k0, k2)``, the k in ``like``'s dtype (see ``backward.py``); ``sum_ge``
    sums ``g * (x - mean)``, or ``g * gamma * x_hat`` when ``inplace`` (then ``|gamma| < eps``
    counts as ``sign(gamma) * eps``). The float64 operations NumPy's expressions make, in
    their order."""

    def kernel(gamma, invstd, sum_g, sum_ge, m, eps, inplace, like):
        return coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace, like)

    return kernel
