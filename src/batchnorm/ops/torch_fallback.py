"""The PyTorch backend: ``F.batch_norm`` and the registry's activation, for everything else.

Runs what the numba backend does not take: other devices (CUDA...), bfloat16 / float16 input,
non-contiguous strides, parameters of another dtype. The InPlace-ABN mode is written in PyTorch
ops here (:class:`_InplaceTrain`): it saves only the output and recovers x_hat from it.

:func:`shifted_moments` is the one torch statement of the batch statistics, the reference's
definition (:func:`batchnorm.reference.moments`): shift by one sample of each channel, then two
passes in float64 sums. This backend's statistics on CPU and SyncBatchNorm's local partials
both come from it. Off the CPU (CUDA under ``"auto"``), where each op's launch costs the host
more than a layer's arithmetic, the training step with buffers is PyTorch's own kernel and its
statistics (:func:`batch_norm_step`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import REGISTRY
from .layout import same_format
from .moments import Moments, empty

__all__ = ["train", "train_step", "batch_norm_step", "running_update", "eval_", "shifted_moments",
           "working", "channel_view", "masked_moments", "train_stats", "mixed"]

_HALF = (torch.float16, torch.bfloat16)  # worked on in float32, as F.batch_norm does


def train(x, weight, bias, eps, act, negative_slope, alpha, inplace):
    """``(y, mean, var)``: F.batch_norm with batch statistics, then the activation; the
    statistics (detached) from :func:`shifted_moments`."""
    if inplace:
        return _InplaceTrain.apply(x, weight, bias, eps, act, negative_slope, alpha)
    z = F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)
    y = REGISTRY[act].apply(z, negative_slope, alpha)
    mean, var = _moments(x)
    return same_format(y, x), mean, var


# Devices whose training step takes its statistics from shifted_moments (float64). Elsewhere
# (CUDA...) each op is a kernel launch that costs the host more than a small layer's arithmetic,
# and the eager step is PyTorch's own kernel (see batch_norm_step); tests route CPU there too.
FLOAT64_STATS_DEVICES = ("cpu",)


def _eager() -> bool:
    """Not compiling, exporting or tracing, and no functorch transform (vmap refuses running
    statistics written in place): a compiler fuses the ops (launches cost nothing there) and may
    simplify ``x * 0`` to 0 (inductor does), which batch_norm_step's flag needs to stay NaN for
    NaN or Inf."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active())


def train_step(x, weight, bias, running_mean, running_var, eps, factor, check, act,
               negative_slope, alpha, inplace):
    """The backends' training step (see :mod:`batchnorm.ops.step`): :func:`train`, then
    :func:`running_update` of the buffers when given; off the CPU in eager mode,
    :func:`batch_norm_step` where the dtypes allow. ``y`` is differentiable here."""
    if not inplace and x.device.type not in FLOAT64_STATS_DEVICES and _eager():
        dtype = _statistics_dtype(x, weight, bias, running_mean, running_var)
        if dtype is not None:
            return batch_norm_step(x, weight, bias, running_mean, running_var, eps, factor,
                                   check, act, negative_slope, alpha, dtype)
    y, mean, var = train(x, weight, bias, eps, act, negative_slope, alpha, inplace)
    ok = True
    if running_mean is not None:
        ok = running_update(mean, var, running_mean, running_var, factor,
                            x.numel() // x.shape[1], check)
    return y, mean, var, ok


def _statistics_dtype(x, *tensors) -> torch.dtype | None:
    """The dtype in which F.batch_norm takes running statistics beside these parameters and
    buffers: theirs, when they share one that is x's (or float32 for float16 / bfloat16 input,
    as under autocast); None when they do not."""
    dtypes = {t.dtype for t in tensors if t is not None}
    allowed = (x.dtype, torch.float32) if x.dtype in _HALF else (x.dtype,)
    if len(dtypes) > 1 or not dtypes <= set(allowed):
        return None
    return dtypes.pop() if dtypes else allowed[-1]


def batch_norm_step(x, weight, bias, running_mean, running_var, eps, factor, check, act,
                    negative_slope, alpha, dtype):
    """The training step (``(y, mean, var, ok)``, see :mod:`batchnorm.ops.step`) in PyTorch's
    own kernel: 10 launches where :func:`train` and :func:`running_update` take 29 (without
    buffers 3, where :func:`train` takes 11), the layer's counter one more. F.batch_norm
    writes the batch's mean and unbiased variance into a zeroed pair of ``dtype`` (momentum 1
    gives the batch's values exactly: ``1 * batch + 0 * 0``), then the update of the buffers
    when given, ``lerp`` by ``factor`` as everywhere else, guarded on the device with
    ``check``: one flag, ``(pair * 0).sum() == 0``, False exactly when a statistic is NaN or
    infinite. The statistics are PyTorch's (on CUDA, float32 Welford: what
    torch.nn.BatchNorm2d keeps); the returned ``var`` is the biased one, from the unbiased."""
    n = x.numel() // x.shape[1]
    batch = torch.zeros(2, x.shape[1], dtype=dtype, device=x.device)
    mean, unbiased = batch[0], batch[1]
    z = F.batch_norm(x, mean, unbiased, weight, bias, training=True, momentum=1.0, eps=eps)
    y = same_format(REGISTRY[act].apply(z, negative_slope, alpha), x)
    with torch.no_grad():
        if running_mean is None:
            ok = True
        elif not check:
            running_mean.lerp_(mean, factor)
            running_var.lerp_(unbiased, factor)
            ok = True
        else:
            ok = batch.mul(0).sum() == 0
            for buffer, value in ((running_mean, mean), (running_var, unbiased)):
                torch.where(ok, torch.lerp(buffer, value, factor), buffer, out=buffer)
        return y, mean, unbiased * ((n - 1) / n), ok


@torch.no_grad()
def running_update(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                   factor: float | Tensor, n: int | Tensor, check: bool) -> Tensor | bool:
    """In place: ``running = lerp(running, batch, factor)`` with the unbiased ``var * n / (n - 1)``
    in the buffers' dtype. With ``check``, a batch whose statistics (in the buffers' dtype) hold
    NaN/Inf changes nothing, decided on the device (``torch.where`` on a flag: no host read);
    returns that flag (a 0-d bool tensor, True when updated), or True without ``check``."""
    mean = mean.to(running_mean.dtype)
    unbiased = var.to(running_var.dtype) * (n / (n - 1))  # the running estimate is unbiased
    if not check:
        running_mean.lerp_(mean, factor)
        running_var.lerp_(unbiased, factor)
        return True
    ok = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
    running_mean.copy_(torch.where(ok, torch.lerp(running_mean, mean, factor), running_mean))
    running_var.copy_(torch.where(ok, torch.lerp(running_var, unbiased, factor), running_var))
    return ok


def eval_(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    # F.batch_norm never writes running stats in eval; detach makes them constants for autograd
    z = F.batch_norm(
        x, running_mean.detach(), running_var.detach(), weight, bias, training=False, eps=eps
    )
    return same_format(REGISTRY[act].apply(z, negative_slope, alpha), x)


# ---------------------------------------------------------------------------------------------
# statistics


def shifted_moments(x: Tensor) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """``(n, shift, d, mean, M2)`` per channel of x ``(N, C, *)``: n values per channel,
    ``d = x - shift`` (shift one sample of each channel, so d is centred near 0 however large
    the offset of x), and the float64 ``mean`` and ``M2`` (sum of squared deviations).

    The moments of d come from ``torch.var_mean`` (Welford, with float64 accumulators on CPU),
    never from E[d^2] - E[d]^2. Its results are in d's dtype: for float32 data, M2 is then
    within float32 rounding (6e-8 relative), below what a float32 output can show, and the mean
    of the small, centred d loses nothing that matters. The mean and M2 leave in float64
    (two float64-accumulated ``sum`` passes would do the same several times slower). An empty
    batch gives n 0, mean 0, M2 0. Pass float32 for half types (:func:`working`).
    """
    c = x.shape[1]
    n = x.numel() // c if c else 0
    if n == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
        return 0, torch.zeros(c, dtype=x.dtype, device=x.device), x, zeros, zeros.clone()
    shift = x[0].reshape(c, -1)[:, 0]  # (C,)
    d = x - shift.view(channel_view(x))
    d_var, d_mean = torch.var_mean(d, dim=reduce_dims(d), correction=0)
    m2 = d_var.to(torch.float64) * n
    return n, shift, d, shift.to(torch.float64) + d_mean.to(torch.float64), m2


def working(x: Tensor) -> Tensor:
    """float16/bfloat16 are worked on in float32 (as F.batch_norm accumulates them)."""
    return x.float() if x.dtype in _HALF else x


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim of x (N, C, *) but the channel dim: what the statistics sum over."""
    return [0, *range(2, x.dim())]


def channel_view(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a (C,) vector over x (N, C, *)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


@torch.no_grad()
def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *), detached: x's dtype, or float32
    for float16 / bfloat16 (the precision of the running buffers PyTorch keeps for them).

    An empty batch gives mean 0 and variance NaN.
    """
    xs = working(x.detach())
    n, _, _, mean, m2 = shifted_moments(xs)
    var = m2 / n if n > 0 else torch.full_like(m2, math.nan)
    return mean.to(xs.dtype), var.to(xs.dtype)


# ---------------------------------------------------------------------------------------------
# InPlace-ABN in PyTorch ops


class _InplaceTrain(torch.autograd.Function):
    """InPlace-ABN in PyTorch ops: forward saves only y; backward recovers x_hat from it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, negative_slope, alpha):
        with torch.no_grad():
            mean, var = _moments(x)
            z = F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)
            y = same_format(REGISTRY[act].apply(z, negative_slope, alpha), x)
            invstd = torch.rsqrt(var + eps)  # float32 at least
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.params = (eps, act, negative_slope, alpha)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        y_saved, weight, bias, invstd = ctx.saved_tensors
        eps, act, negative_slope, alpha = ctx.params
        y = y_saved
        c = y.shape[1]
        shape = channel_view(y)
        # work in float32 at least, as PyTorch's half-precision batch norm does
        wdtype = torch.promote_types(y.dtype, torch.float32)
        y, dy = y.to(wdtype), dy.to(wdtype)
        z, dz_dy = REGISTRY[act].inverse(y, negative_slope, alpha)
        g = dy * dz_dy  # dL/dz
        gamma = y.new_ones(c) if weight is None else weight.detach().to(wdtype)
        beta = y.new_zeros(c) if bias is None else bias.detach().to(wdtype)
        x_hat = (z - beta.view(shape)) / _safe_gamma(gamma, eps).view(shape)
        dims = reduce_dims(y)
        n = y.numel() // c if c else 0
        sum_g = g.sum(dims)
        sum_gx = (g * x_hat).sum(dims)
        scale = (gamma * invstd.to(wdtype)).view(shape)
        if n > 0:
            dx = scale * (g - (sum_g / n).view(shape) - x_hat * (sum_gx / n).view(shape))
        else:
            dx = g
        dx = same_format(dx.to(y_saved.dtype), y_saved)
        dw = None if weight is None else sum_gx.to(weight.dtype)
        db = None if bias is None else sum_g.to(bias.dtype)
        return dx, dw, db, None, None, None, None


def _safe_gamma(gamma: Tensor, eps: float) -> Tensor:
    """gamma, moved away from 0 to sign(gamma) * eps where |gamma| < eps, so x_hat is
    recoverable."""
    sign = torch.where(gamma < 0, -1.0, 1.0).to(gamma.dtype)
    return torch.where(gamma.abs() < eps, sign * eps, gamma)


# ---------------------------------------------------------------------------------------------
# masks and given statistics (the layers' options for hard training conditions)


def masked_moments(x: Tensor, mask: Tensor) -> Moments:
    """``(count, mean, M2)`` per channel of x ``(N, C, *)`` over the positions where ``mask``
    ``(N, *)`` is True: the reference's definition (shift by one counted sample of each
    channel, two passes), in float64. No counted value gives ``(0, zeros, zeros)``."""
    c = x.shape[1]
    n = int(mask.sum())
    if n == 0:
        return empty(x)
    m = mask.unsqueeze(1)  # (N, 1, *)
    plane = mask[0].numel()
    first = int(mask.reshape(-1).nonzero()[0, 0])
    shift = x[first // plane].reshape(c, -1)[:, first % plane].to(torch.float64)  # (C,)
    view = channel_view(x)
    dims = reduce_dims(x)
    d = (x.to(torch.float64) - shift.view(view)) * m  # uncounted positions are 0
    d_mean = d.sum(dims) / n
    m2 = ((d - d_mean.view(view)) * m).square().sum(dims)
    return Moments(n, shift + d_mean, m2)


def train_stats(x, weight, bias, mean, eps, act, negative_slope, alpha, mask):
    """y normalised with x's own (masked) statistics, written in differentiable PyTorch ops so
    that autograd gives the (masked) training gradient; ``mean`` (float64, detached) is the
    shift that keeps the float32 arithmetic centred at any offset. Every position is
    normalised."""
    xs = working(x)
    view = channel_view(xs)
    d = xs - mean.to(xs.dtype).view(view)  # small values: centred by the exact mean
    var, d_mean = _counted_var_mean(d, mask)
    z = (d - d_mean.view(view)) * torch.rsqrt(var + eps).view(view)
    return _affine_act(z, weight, bias, act, negative_slope, alpha, x)


def mixed(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha, mix, mask):
    """Test-time mixed statistics in differentiable PyTorch ops: mean and variance
    ``mix * batch + (1 - mix) * running`` (the batch variance biased, over the counted
    positions), gradients through the batch part."""
    xs = working(x)
    view = channel_view(xs)
    shift = running_mean.detach().to(xs.dtype)
    d = xs - shift.view(view)
    var_b, mean_b = _counted_var_mean(d, mask)
    # in d's frame the running mean is 0
    mean = mix * mean_b
    var = mix * var_b + (1.0 - mix) * running_var.detach().to(xs.dtype)
    z = (d - mean.view(view)) * torch.rsqrt(var + eps).view(view)
    return _affine_act(z, weight, bias, act, negative_slope, alpha, x)


def _counted_var_mean(d: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Differentiable per-channel (biased var, mean) of d (N, C, *) over the positions the mask
    (N, *) counts (every position without one)."""
    dims = reduce_dims(d)
    if mask is None:
        return torch.var_mean(d, dim=dims, correction=0)
    m = mask.unsqueeze(1).to(d.dtype)
    n = m.sum()
    mean = (d * m).sum(dims) / n
    return ((d - mean.view(channel_view(d))).square() * m).sum(dims) / n, mean


def _affine_act(z: Tensor, weight, bias, act, negative_slope, alpha, like: Tensor) -> Tensor:
    """act(z * weight + bias), in like's dtype and memory format."""
    view = channel_view(z)
    if weight is not None:
        z = z * weight.to(z.dtype).view(view)
    if bias is not None:
        z = z + bias.to(z.dtype).view(view)
    return same_format(REGISTRY[act].apply(z, negative_slope, alpha).to(like.dtype), like)
