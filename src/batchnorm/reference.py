"""The exact batch-norm math in NumPy: the oracle every other part of the project is tested against.

Read it beside Ioffe & Szegedy (2015), Algorithm 1. For each channel c, over every other axis
(the batch and any spatial axes), with m values per channel:

    mu     = (1/m) * sum(x)                        batch mean
    sigma2 = (1/m) * sum((x - mu)^2)               batch variance, *biased* (population)
    x_hat  = (x - mu) / sqrt(sigma2 + eps)
    y      = gamma * x_hat + beta

and, in training with running statistics (PyTorch's convention, momentum 0.1 by default):

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * sigma2 * m / (m - 1)   (*unbiased*)

``momentum=None`` makes it a cumulative average: momentum = 1 / num_batches_tracked, counted after
this batch. In evaluation the running statistics replace (mu, sigma2); without running statistics
the batch statistics are used in evaluation too.

Statistics are kept as per-channel partials ``(count, mean, M2)`` with ``M2 = sum((x - mean)^2)``.
:func:`moments` computes them stably (shifted, two-pass, float64) and :func:`merge` combines two
partials with Chan's formula, so a batch split in any way (threads, chunks, processes) gives the
statistics of the whole. The fused kernels and SyncBatchNorm use these same definitions.

Everything accumulates in float64; outputs have the input's dtype. Only numpy is imported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import (
    check_counted,
    check_eps,
    check_eval_stats,
    check_mask_shape,
    check_momentum,
    check_num_batches_tracked,
    check_pieces,
    check_renorm,
    check_values_per_channel,
    check_virtual_batch_size,
    expected,
)

__all__ = ["Moments", "Piece", "State", "moments", "merge", "forward", "backward", "variance"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Moments:
    """Per-channel partial statistics: ``count`` values, their ``mean`` and
    ``M2 = sum((x-mean)^2)``.

    All three are float64 arrays of shape (C,). An empty partial has count 0, mean 0, M2 0.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def var(self, unbiased: bool = False) -> np.ndarray:
        """Per-channel variance: biased ``M2 / n`` or unbiased ``M2 / (n - 1)``; NaN where
        undefined."""
        return variance(self, unbiased=unbiased)


@dataclass
class Piece:
    """One slice of the batch along N that is normalised with its own statistics (the whole
    batch, or a ghost batch), and what backward needs of it. Per-channel arrays are (C,)
    float64."""

    start: int
    stop: int
    count: float  # values per channel the statistics counted
    batch_mean: np.ndarray  # the piece's own (counted) mean
    mean: np.ndarray  # the mean it was normalised with (the batch's, or a mix with running)
    invstd: np.ndarray  # 1 / sqrt(var + eps) of the variance it was normalised with
    r: np.ndarray  # Batch Renorm's scale (ones without renorm)
    d: np.ndarray  # Batch Renorm's shift (zeros without renorm)


@dataclass
class State:
    """What :func:`forward` returns beside the output: the new buffers and what backward needs.

    ``running_mean``, ``running_var`` are new arrays (or None without tracking) and
    ``num_batches_tracked`` the new count; the caller's arrays are never mutated.
    """

    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: int
    mean: np.ndarray  # (C,) float64: the statistics used to normalise (the first piece's)
    var: np.ndarray  # (C,) float64, biased when they are batch statistics
    invstd: np.ndarray  # (C,) float64: 1 / sqrt(var + eps)
    x_hat: np.ndarray  # float64 (x - mean) * invstd per piece, channels moved to axis 1
    weight: np.ndarray | None  # (C,) float64
    has_bias: bool
    batch_stats: bool  # True: gradients flow through the statistics
    axis: int
    dtype: np.dtype
    shape: tuple[int, ...]
    pieces: list[Piece] = None  # the slices normalised with their own statistics
    batch_weight: float = 1.0  # a: d(statistics)/d(batch statistics); 1 batch, 0 running
    mask: np.ndarray | None = None  # float64 (N, 1, *spatial), 1 where counted


# ---------------------------------------------------------------------------------------------
# Statistics


def moments(x: np.ndarray, axis: int = 1, mask: np.ndarray | None = None) -> Moments:
    """Per-channel ``(count, mean, M2)`` of ``x`` over every axis but ``axis``, in float64.

    Numerics: the values are first shifted by one sample of their own channel, then the mean and
    the sum of squared deviations are taken in two passes. Unlike ``E[x^2] - E[x]^2``, this never
    cancels catastrophically: on float32 data with mean 1e4 and std 1e-2 it is exact to float64
    rounding, where the naive formula can even give a negative variance.

    ``mask``, a boolean array of x's shape without ``axis``, counts only the values where it is
    True (the same positions in every channel).
    """
    x = np.asarray(x)
    axis = _normalize_axis(axis, x.ndim)
    c = x.shape[axis]
    flat = np.moveaxis(x, axis, 0).reshape(c, -1).astype(np.float64)  # (C, m)
    if mask is not None:
        flat = flat[:, np.asarray(mask, bool).reshape(-1)]  # (C, counted)
    m = flat.shape[1]
    count = np.full(c, float(m))
    if m == 0:
        return Moments(count, np.zeros(c), np.zeros(c))
    shift = flat[:, :1]  # (C, 1): one sample of each channel
    d = flat - shift
    d_mean = d.mean(axis=1)
    m2 = np.square(d - d_mean[:, None]).sum(axis=1)
    return Moments(count, shift[:, 0] + d_mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """Combine two partials of the same channels (Chan, Golub & LeVeque 1979).

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

    Empty partials (count 0) are neutral.
    """
    n = a.count + b.count
    safe_n = np.where(n > 0, n, 1.0)
    delta = b.mean - a.mean
    mean = np.where(n > 0, a.mean + delta * (b.count / safe_n), 0.0)
    m2 = np.where(n > 0, a.m2 + b.m2 + delta * delta * (a.count * b.count / safe_n), 0.0)
    return Moments(n.astype(np.float64), mean, m2)


def variance(stats: Moments, unbiased: bool = False) -> np.ndarray:
    """Biased ``M2 / n`` or unbiased ``M2 / (n - 1)`` variance; NaN where n (or n - 1) is 0."""
    denom = stats.count - 1.0 if unbiased else stats.count
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, stats.m2 / np.where(denom > 0, denom, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# Forward and backward


def forward(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    num_batches_tracked: int = 0,
    renorm: bool = False,
    rmax: float = 1.0,
    dmax: float = 0.0,
    virtual_batch_size: int | None = None,
    mask: np.ndarray | None = None,
    eval_stats: str = "running",
    eval_mix: float = 0.0,
) -> tuple[np.ndarray, State]:
    r"""Batch normalization of ``x`` over every axis but ``axis``, with PyTorch's semantics.

    The options of the hard training conditions, each off by default:

    - **Batch Renorm** (Ioffe 2017), training with running statistics: with
      :math:`\sigma = \sqrt{running\_var + \epsilon}` (the buffers before this batch),
      :math:`r = clip(\sqrt{\sigma_B^2 + \epsilon} / \sigma, 1/r_{max}, r_{max})`,
      :math:`d = clip((\mu_B - running\_mean) / \sigma, -d_{max}, d_{max})` and
      :math:`\hat x = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} \cdot r + d`, r and d
      constants for the gradient. ``rmax=1, dmax=0`` is BN.
    - **Ghost BN**: in training, N is cut into pieces of ``virtual_batch_size`` samples (the last
      may be smaller), each normalised with its own statistics; the running statistics are
      updated once, from the whole batch (the pieces merged with Chan's formula).
    - **mask**: statistics over the positions where the mask is True only; every position is
      normalised; the running variance's n / (n - 1) uses the counted n.
    - **eval_stats** (evaluation with running statistics): "running" (BN), "batch" (the batch's
      own statistics, gradients through them, buffers unchanged) or "mix": mean and variance
      ``eval_mix * batch + (1 - eval_mix) * running`` (the batch variance biased), gradients
      through the batch part.

    Args:
        x: float32 or float64 array of rank 2 to 5.
        weight, bias: gamma and beta, shape (C,), or None (``affine=False``).
        running_mean, running_var: shape (C,), or both None (no tracking: batch statistics are
            used in evaluation too). Never mutated; the updated copies are in the state.
        training: normalise with batch statistics and update the running ones.
        momentum: weight of the new batch in the running update, or None for a cumulative
            average over ``num_batches_tracked``. Default: 0.1
        eps: added to the variance before the square root. Default: 1e-5
        axis: the channel axis, negative allowed. Default: 1
        num_batches_tracked: batches seen so far; incremented in training with tracking.
            Default: 0
        renorm, rmax, dmax: Batch Renorm (needs running statistics). Default: False, 1.0, 0.0
        virtual_batch_size: Ghost BN's piece size, or None. Default: None
        mask: boolean, x's shape without ``axis``, True = counted. Default: None
        eval_stats, eval_mix: the statistics of evaluation. Default: "running", 0.0

    Returns:
        ``(y, state)``: ``y`` with the dtype and shape of ``x``; ``state`` holds the new buffers
        and what :func:`backward` needs.

    An empty batch (a zero-size axis other than the channel axis) returns an empty output and,
    in training with tracking, increments ``num_batches_tracked`` while leaving the running
    statistics as they were, as PyTorch does.

    Raises:
        BatchNormError: on any bad argument, before anything is computed.

    >>> x = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
    >>> y, state = forward(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
    ...                    training=True)
    >>> y.dtype, state.num_batches_tracked
    (dtype('float32'), 1)
    """
    x, axis = _check_input(x, axis)
    c = x.shape[axis]
    weight = _check_per_channel("weight", weight, c, x.dtype)
    bias = _check_per_channel("bias", bias, c, x.dtype)
    running_mean = _check_per_channel("running_mean", running_mean, c, x.dtype)
    running_var = _check_per_channel("running_var", running_var, c, x.dtype)
    tracking = _check_running(running_mean, running_var)
    training = bool(training)
    eps = check_eps(eps, training=training)
    momentum = check_momentum(momentum)
    nbt = check_num_batches_tracked(num_batches_tracked)
    renorm, rmax, dmax = check_renorm(renorm, rmax, dmax)
    vbs = check_virtual_batch_size(virtual_batch_size)
    eval_stats, eval_mix = check_eval_stats(eval_stats, eval_mix)
    if renorm and not tracking:
        raise expected("running statistics with renorm=True", "running_mean=None")
    spatial_shape = x.shape[:axis] + x.shape[axis + 1:]
    if mask is not None:
        mask = np.asarray(mask)
        check_mask_shape(mask.shape, spatial_shape, mask.dtype == np.bool_, mask.dtype)

    batch_weight = 1.0  # a: how much the statistics follow the batch's (1), or the running (0)
    if not training and tracking:
        batch_weight = {"running": 0.0, "batch": 1.0, "mix": eval_mix}[eval_stats]
    batch_stats = batch_weight > 0.0 or eval_stats == "mix" and not training and tracking
    if training and mask is None and vbs is None:
        check_values_per_channel(x.shape, axis)

    xc = np.moveaxis(x, axis, 1).astype(np.float64)  # (N, C, *): channels on axis 1
    n = xc.shape[0]  # the pieces of Ghost BN are cut along N, the first axis but the channels'
    bounds = [(0, n)]
    if training and vbs is not None and n > 0:
        check_pieces(n, math.prod(xc.shape[2:]), vbs)
        bounds = [(i, min(n, i + vbs)) for i in range(0, n, vbs)]
    per_channel = (1, c) + (1,) * (x.ndim - 2)  # broadcasts a (C,) array against xc
    mask_c = None if mask is None else np.expand_dims(
        np.moveaxis(np.expand_dims(mask, axis), axis, 1)[:, 0], 1).astype(np.float64)
    # (N, 1, *spatial)
    new_mean, new_var = running_mean, running_var
    if tracking:
        new_mean, new_var = running_mean.copy(), running_var.copy()
    r_mean = None if not tracking else running_mean.astype(np.float64)
    r_var = None if not tracking else running_var.astype(np.float64)

    pieces, total = [], None
    for start, stop in bounds:
        piece_mask = None if mask_c is None else mask_c[start:stop, 0] > 0  # (n, *spatial)
        stats = moments(xc[start:stop], axis=1, mask=piece_mask)
        if batch_stats and mask is not None and n > 0:
            check_counted(int(stats.count[0]), "the mask" if len(bounds) == 1
                          else f"the mask in every ghost batch (samples {start}:{stop})")
        total = stats if total is None else merge(total, stats)
        if batch_stats:
            b_mean, b_var = stats.mean, variance(stats)
            mean = batch_weight * b_mean + (1 - batch_weight) * r_mean \
                if batch_weight < 1 else b_mean
            var = batch_weight * b_var + (1 - batch_weight) * r_var \
                if batch_weight < 1 else b_var
        else:
            b_mean = mean = r_mean
            var = r_var
        with np.errstate(invalid="ignore", divide="ignore"):
            invstd = 1.0 / np.sqrt(var + eps)
        r, d = np.ones(c), np.zeros(c)
        if renorm and training:
            sigma = np.sqrt(r_var + eps)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / rmax, rmax)
                d = np.clip((mean - r_mean) / sigma, -dmax, dmax)
        pieces.append(Piece(start, stop, float(stats.count[0]) if c else 0.0, b_mean, mean,
                            invstd, r, d))

    if training and tracking:
        nbt += 1
        if total.count[0] > 0:  # an empty batch leaves the running statistics alone
            factor = 1.0 / nbt if momentum is None else momentum
            new_mean = _ema(running_mean, total.mean, factor)
            new_var = _ema(running_var, variance(total, unbiased=True), factor)

    x_hat = np.empty_like(xc)
    out = np.empty_like(xc)
    with np.errstate(invalid="ignore", divide="ignore"):
        for p in pieces:
            part = slice(p.start, p.stop)
            x_hat[part] = (xc[part] - p.mean.reshape(per_channel)) * p.invstd.reshape(per_channel)
            out[part] = x_hat[part] * p.r.reshape(per_channel) + p.d.reshape(per_channel)
    w64 = None if weight is None else weight.astype(np.float64)
    y = out
    if w64 is not None:
        y = y * w64.reshape(per_channel)
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(per_channel)
    y = np.moveaxis(y, 1, axis).astype(x.dtype)

    first = pieces[0]
    state = State(
        running_mean=new_mean,
        running_var=new_var,
        num_batches_tracked=nbt,
        mean=first.mean,
        var=variance(total) if batch_stats and batch_weight == 1 and len(pieces) == 1
        else (1.0 / first.invstd ** 2 - eps),
        invstd=first.invstd,
        x_hat=x_hat,
        weight=w64,
        has_bias=bias is not None,
        batch_stats=batch_weight > 0,
        axis=axis,
        dtype=x.dtype,
        shape=x.shape,
        pieces=pieces,
        batch_weight=batch_weight,
        mask=mask_c,
    )
    return y, state


def backward(
    dy: np.ndarray, state: State
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients of a loss with respect to x, weight and bias, given ``dy = dL/dy``.

    With g = dy, n values per channel and x_hat the normalised input:

        dbias   = sum(g)
        dweight = sum(g * x_hat)
        dx      = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat))   batch statistics
        dx      = gamma * invstd * g                                         running statistics

    In evaluation with running statistics, the statistics are constants. ``dweight`` / ``dbias``
    are None when the forward had no weight / bias.

    With the options of :func:`forward`, per piece (the whole batch, or each ghost batch), with
    m the mask (1 where counted), n the counted number, a the weight of the batch statistics
    (1 in training, ``eval_mix`` for "mix") and x_b = (x - batch mean) * invstd:

        dweight = sum over pieces of  r * sum(g * x_hat) + d * sum(g)
        dx      = gamma * r * invstd * (g - a * m * (sum(g) + x_b * sum(g * x_hat)) / n)

    (the sums over every position: every position is normalised, so every one depends on the
    statistics; only the counted ones move them).
    """
    dy = np.asarray(dy)
    if dy.shape != state.shape:
        raise expected(f"dy of shape {state.shape}", f"shape {dy.shape}")
    if dy.dtype != state.dtype:
        raise expected(f"dy of dtype {state.dtype}", f"dtype {dy.dtype}")
    c = state.shape[state.axis]
    per_channel = (1, c) + (1,) * (len(state.shape) - 2)
    reduce_axes = tuple(i for i in range(len(state.shape)) if i != 1)
    g = np.moveaxis(dy, state.axis, 1).astype(np.float64)  # (N, C, *)
    gamma = np.ones(c) if state.weight is None else state.weight
    a = state.batch_weight
    dx = np.empty_like(g)
    dweight, dbias = np.zeros(c), np.zeros(c)
    for p in state.pieces:
        part = slice(p.start, p.stop)
        gp, x_hat = g[part], state.x_hat[part]
        sum_g = gp.sum(axis=reduce_axes)
        sum_g_xhat = (gp * x_hat).sum(axis=reduce_axes)
        dbias += sum_g
        dweight += p.r * sum_g_xhat + p.d * sum_g
        scale = (gamma * p.r * p.invstd).reshape(per_channel)
        if a > 0 and p.count > 0:
            m = 1.0 if state.mask is None else state.mask[part]
            x_b = x_hat + ((p.mean - p.batch_mean) * p.invstd).reshape(per_channel)
            coef = a * m / p.count
            dx[part] = scale * (gp - coef * (sum_g.reshape(per_channel)
                                             + x_b * sum_g_xhat.reshape(per_channel)))
        elif a > 0:
            dx[part] = gp
        else:
            dx[part] = scale * gp

    dx = np.moveaxis(dx, 1, state.axis).astype(state.dtype)
    dweight = None if state.weight is None else dweight.astype(state.dtype)
    dbias = dbias.astype(state.dtype) if state.has_bias else None
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Checks and small helpers


def _ema(running: np.ndarray, batch: np.ndarray, factor: float) -> np.ndarray:
    """running <- (1 - factor) * running + factor * batch, computed in float64."""
    return ((1.0 - factor) * running.astype(np.float64) + factor * batch).astype(running.dtype)


def _normalize_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise expected("axis to be an integer", repr(axis))
    if not -ndim <= axis < ndim:
        raise expected(f"axis in [{-ndim}, {ndim - 1}] for a {ndim}D input", axis)
    return int(axis) % ndim


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise expected(f"{name} of dtype float32 or float64", f"dtype {dtype}")


def _check_input(x: object, axis: int) -> tuple[np.ndarray, int]:
    if not isinstance(x, np.ndarray):
        raise expected("x to be a numpy array", type(x).__name__)
    if not 2 <= x.ndim <= 5:
        raise expected("2D to 5D input", f"{x.ndim}D input")
    _check_dtype("x", x.dtype)
    return x, _normalize_axis(axis, x.ndim)


def _check_per_channel(name: str, value: object, c: int, dtype: np.dtype) -> np.ndarray | None:
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise expected(f"{name} to be a numpy array or None", type(value).__name__)
    if value.shape != (c,):
        raise expected(f"{name} of shape ({c},) for {c} channels", f"shape {value.shape}")
    _check_dtype(name, value.dtype)
    if value.dtype != dtype:
        raise expected(f"{name} of dtype {dtype}, the input's", f"dtype {value.dtype}")
    return value


def _check_running(mean: np.ndarray | None, var: np.ndarray | None) -> bool:
    """Running statistics come as a pair, finite, with a non-negative variance."""
    if (mean is None) != (var is None):
        raise expected(
            "running_mean and running_var both arrays or both None",
            f"running_mean={'None' if mean is None else 'array'}, "
            f"running_var={'None' if var is None else 'array'}",
        )
    if mean is None:
        return False
    for name, value in (("running_mean", mean), ("running_var", var)):
        bad = ~np.isfinite(value)
        if bad.any():
            raise expected(f"finite {name}",
                           f"{int(bad.sum())} non-finite values, e.g. {value[bad][0]}")
    if (var < 0).any():
        raise expected("running_var >= 0", f"min {var.min()}")
    return True
