"""The numba CPU backend: the fused kernels of :mod:`batchnorm.kernels` on torch tensors.

Takes CPU tensors of float32 or float64 (parameters in the same dtype), dense as ``(N, C, *)``
contiguous or channels-last (:mod:`.layout`). The implementations here are the backend contract
(:mod:`.step`: ``train_step``, ``eval_impl``) and what the custom ops of :mod:`.custom_ops` run:
the training forward (statistics + normalise + affine + activation, with the running update in
``train_step``), the eval forward, the backward of each, the statistics alone, and the pieces
SyncBatchNorm and the masked options assemble. Statistics leave the training forward
in float64: the backward recomputes x - mean from them, and a float32 mean would cost float32
data far from zero (mean 1e4, std 1e-2) most of its precision.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import kernels
from ..activations import REGISTRY
from .layout import as_layout_of, dense, layout
from .memory import NUMPY_DTYPE, output_like
from .moments import Moments, empty

__all__ = ["takes", "train_step", "running_update_impl", "train_impl", "eval_impl",
           "train_backward_impl", "eval_backward_impl", "masked_moments_impl",
           "stats_backward_impl"]

DTYPES = (torch.float32, torch.float64)


def takes(x: Tensor, *per_channel: Tensor | None) -> bool:
    """True when the fused kernels handle x: CPU, float32/float64, contiguous or channels-last."""
    if not x.is_cpu or x.dtype not in DTYPES:
        return False
    for t in per_channel:
        if t is not None and (t.dtype != x.dtype or not t.is_cpu):
            return False
    return layout(x) is not None


def _kernel_array(t: Tensor, kind: str) -> np.ndarray:
    """A NumPy view of t's memory as (N, C, S) or (M, C), sharing storage."""
    a = (t.detach() if t.requires_grad else t).numpy()  # (NumPy's transposes cost less)
    if a.ndim == (3 if kind == "ncs" else 2):
        return a  # (N, C, S) or (N, C) as they are
    if kind == "ncs":
        return a.reshape(a.shape[0], a.shape[1], -1)  # (N, C, S)
    return a.transpose(0, *range(2, a.ndim), 1).reshape(-1, a.shape[1])  # (M, C)


_CODES = {name: spec.code for name, spec in REGISTRY.items()}  # act name -> kernel code


def _np(t: Tensor | None) -> np.ndarray | None:
    """A NumPy view of a per-channel tensor (detached only when it needs it: a parameter)."""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()


# Below this many elements one thread is faster: waking the others costs more than the work.
# Results do not depend on it (the kernels' chunks do not depend on the thread count).
_SERIAL_BELOW = 1 << 16


def _threads_for(x: Tensor) -> None:
    """numba's thread count for a call on x."""
    kernels.set_threads(1 if x.numel() < _SERIAL_BELOW else torch.get_num_threads())


def _run(kernel, x: Tensor, outs: list[Tensor], inputs: list[Tensor], *args):
    """Call kernel(*inputs, *args, *outs) on kernel views; inputs/outs share x's layout."""
    _threads_for(x)
    kind = layout(x)
    return kernel(*[_kernel_array(t, kind) for t in inputs], *args,
                  *[_kernel_array(t, kind) for t in outs])


def train_impl(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    act: str,
    negative_slope: float,
    alpha: float,
    inplace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    if x.numel() == 0:
        return torch.empty_like(x), x.new_zeros(c, dtype=torch.float64), x.new_full(
            (c,), math.nan, dtype=torch.float64)
    x = dense(x)
    y = output_like(x)
    code = REGISTRY[act].code
    mean, var = _run(
        lambda xv, yv: kernels.train_forward(xv, _np(weight), _np(bias), eps, code,
                                             negative_slope, alpha, yv),
        x, [y], [x],
    )
    return y, torch.from_numpy(mean), torch.from_numpy(var)


def train_step(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
               factor: float, check: bool, act: str, negative_slope: float, alpha: float,
               inplace: bool) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The backends' training step (see :mod:`batchnorm.ops.step`): statistics, normalise +
    affine + activation, then the running update of the buffers when given (one compiled call,
    guarded when ``check``: ``ok`` False and nothing changed for NaN/Inf statistics). x
    non-empty; ``mean`` / ``var`` float64."""
    kind = layout(x)
    if kind is None:
        x = x.contiguous()
        kind = layout(x)
    y = output_like(x)
    _threads_for(x)
    code = _CODES[act]
    if _at_addresses(x, weight, bias, running_mean, running_var):  # (the layers' case)
        mean, var, ok = kernels.train_step_at(
            kind, NUMPY_DTYPE[x.dtype], x.data_ptr(), y.data_ptr(), *_sizes(x, kind),
            _address(weight), _address(bias), _address(running_mean), _address(running_var),
            eps, code, negative_slope, alpha, factor, check)
        return y, torch.from_numpy(mean), torch.from_numpy(var), ok
    xv, yv, w, b = _kernel_array(x, kind), _kernel_array(y, kind), _np(weight), _np(bias)
    if running_mean is None:
        mean, var, ok = kernels.train_step(xv, w, b, eps, code, negative_slope, alpha, yv)
    elif running_mean.dtype == x.dtype == running_var.dtype:  # the update in the same call
        mean, var, ok = kernels.train_step(xv, w, b, eps, code, negative_slope, alpha, yv,
                                           _np(running_mean), _np(running_var), factor, check)
    else:  # buffers of another dtype (the ops' callers): the update's own kernel
        mean, var, _ = kernels.train_step(xv, w, b, eps, code, negative_slope, alpha, yv)
        ok = kernels.running_update(mean, var, _np(running_mean), _np(running_var),
                                    float(factor), float(x.numel() // x.shape[1]), bool(check))
    return y, torch.from_numpy(mean), torch.from_numpy(var), ok


def running_update_impl(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                        factor: float, n: int, check: bool) -> bool:
    """In place: ``running += factor * (batch - running)`` per channel, the variance unbiased
    (``var * n / (n - 1)``), in float64 rounded once to the buffers' dtype; with ``check``,
    NaN/Inf statistics (as the buffers would hold them) change nothing and give False."""
    return kernels.running_update(mean.detach().to(torch.float64).numpy(),
                                  var.detach().to(torch.float64).numpy(),
                                  running_mean.detach().numpy(), running_var.detach().numpy(),
                                  float(factor), float(n), bool(check))


def eval_impl(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    act: str,
    negative_slope: float,
    alpha: float,
) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    kind = layout(x)
    if kind is None:
        x = x.contiguous()
        kind = layout(x)
    y = output_like(x)
    _threads_for(x)
    if _at_addresses(x, weight, bias, running_mean, running_var):  # (the layers' case)
        kernels.eval_forward_at(kind, NUMPY_DTYPE[x.dtype], x.data_ptr(), y.data_ptr(),
                                *_sizes(x, kind), _address(weight), _address(bias),
                                running_mean.data_ptr(), running_var.data_ptr(), eps,
                                _CODES[act], negative_slope, alpha)
        return y
    kernels.eval_forward(_kernel_array(x, kind), _np(weight), _np(bias), _np(running_mean),
                         _np(running_var), eps, _CODES[act], negative_slope, alpha,
                         _kernel_array(y, kind))
    return y


def _at_addresses(x: Tensor, *per_channel: Tensor | None) -> bool:
    """Whether the kernels can take these tensors by address: per-channel ones (C,) contiguous
    in x's dtype (x dense, as the caller made it)."""
    c = x.shape[1]
    return all(t is None or (t.dtype == x.dtype and t.dim() == 1 and t.shape[0] == c
                             and t.is_contiguous()) for t in per_channel)


def _sizes(x: Tensor, kind: str) -> tuple[int, int, int]:
    """``(n, c, s)`` of dense x as the address kernels take them: (N, C, S) for "ncs" planes,
    (M, C, S) for "mc" rows (M = N * S; the kernels use n and c there)."""
    c = x.shape[1]
    rows = x.numel() // c  # (M of channels-last rows; N * S of planes)
    return x.shape[0] if kind == "ncs" else rows, c, rows // x.shape[0]


def _address(t: Tensor | None) -> int:
    """t's data_ptr(), 0 for an absent weight / bias."""
    return 0 if t is None else t.data_ptr()


def _backward(dy: Tensor, src: Tensor, weight: Tensor | None, kernel,
              at=None) -> tuple[Tensor, Tensor, Tensor]:
    """What both backward impls share: ``kernel(dy, src, dx) -> (dweight, dbias)`` on kernel
    views of ``dy`` (in src's strides), ``src`` and a fresh ``dx``, or ``at(kind, dy, src, dx)``,
    the same on the tensors by address, when given (its per-channel tensors can go so); an empty
    batch gives zeros."""
    c = src.shape[1]
    pdtype = src.dtype if weight is None else weight.dtype
    if src.numel() == 0:
        return torch.empty_like(src), src.new_zeros(c, dtype=pdtype), src.new_zeros(c, dtype=pdtype)
    kind = layout(src)
    if kind is None:
        src = src.contiguous()
        kind = layout(src)
    if dy.stride() != src.stride():
        dy = as_layout_of(dy, src)
    dx = output_like(src)
    _threads_for(src)
    if at is not None:
        dweight, dbias = at(kind, dy, src, dx)
    else:
        dweight, dbias = kernel(_kernel_array(dy, kind), _kernel_array(src, kind),
                                _kernel_array(dx, kind))
    to = NUMPY_DTYPE[pdtype]  # (NumPy's cast: the same rounding, a fraction of torch's call)
    return dx, torch.from_numpy(dweight.astype(to, copy=False)), torch.from_numpy(
        dbias.astype(to, copy=False))


def train_backward_impl(
    dy: Tensor,
    src: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
    act: str,
    negative_slope: float,
    alpha: float,
    inplace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    code = REGISTRY[act].code
    at = None
    if _at_addresses(src, weight, bias):  # (the layers' case)

        def at(kind, dy, src, dx):
            return kernels.train_backward_at(
                kind, NUMPY_DTYPE[src.dtype], dy.data_ptr(), src.data_ptr(), dx.data_ptr(),
                *_sizes(src, kind), _address(weight), _address(bias), mean.numpy(),
                var.numpy(), eps, code, negative_slope, alpha, inplace)

    return _backward(
        dy, src, weight,
        lambda dyv, sv, dxv: kernels.train_backward(
            dyv, sv, _np(weight), _np(bias), mean.numpy(), var.numpy(), eps, code,
            negative_slope, alpha, inplace, dxv),
        at,
    )


def eval_backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    act: str,
    negative_slope: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    code = REGISTRY[act].code
    return _backward(
        dy, x, weight,
        lambda dyv, xv, dxv: kernels.eval_backward(
            dyv, xv, _np(weight), _np(bias), _np(running_mean), _np(running_var), eps, code,
            negative_slope, alpha, dxv),
    )


# ---------------------------------------------------------------------------------------------
# the pieces SyncBatchNorm assembles around its collectives (identity activation)


def moments_impl(x: Tensor) -> Moments:
    """``(count, mean, M2)`` per channel of x, float64, by the kernels' statistics (the ones
    the training forward uses); an empty batch gives ``(0, zeros, zeros)``."""
    if x.numel() == 0:
        return empty(x)
    x = dense(x)
    mean, m2 = _run(kernels.moments, x, [], [x])
    return Moments(x.numel() // x.shape[1], torch.from_numpy(mean), torch.from_numpy(m2))


def backward_sums_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """float64 per-channel ``(sum g, sum g * x_hat)`` of this rank's batch, with the given
    (float64, global) statistics."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    sum_g, sum_ge = _run(
        lambda dyv, xv: kernels.train_backward_sums(dyv, xv, _np(weight), _np(bias),
                                                    mean.numpy(), var.numpy(), eps, 0, 0.0,
                                                    1.0, False),
        x, [], [dy, x])
    invstd = 1.0 / np.sqrt(var.numpy() + eps)
    return torch.from_numpy(sum_g), torch.from_numpy(sum_ge * invstd)


def backward_dx_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     mean: Tensor, var: Tensor, eps: float, sum_g: Tensor, sum_gxhat: Tensor,
                     count: float, mask: Optional[Tensor] = None) -> Tensor:
    """dx of the training formula from sums over ``count`` values (every rank's; with a mask,
    the counted ones, and only those get the statistics' part)."""
    x = dense(x)
    mask_view = None if mask is None else _mask_array(mask, layout(x))
    dy = as_layout_of(dy, x)
    dx = output_like(x)
    sum_ge = sum_gxhat.numpy() * np.sqrt(var.numpy() + eps)  # back to the sums of g * (x - mean)
    _run(lambda dyv, xv, dxv: kernels.train_backward_dx(
        dyv, xv, _np(weight), _np(bias), mean.numpy(), var.numpy(), eps, 0, 0.0, 1.0, False,
        sum_g.numpy(), sum_ge, count, dxv, mask_view), x, [dx], [dy, x])
    return dx


# ---------------------------------------------------------------------------------------------
# masks: statistics over the counted positions, and the masked training gradient


def _mask_array(mask: Tensor, kind: str) -> np.ndarray:
    """A NumPy view of a bool mask (N, *) as the kernels index it: (N, S) beside an (N, C, S)
    view, (M,) beside a channels-last (M, C) one (rows in (n, *spatial) order, the mask's)."""
    mask = mask.detach().contiguous()
    return mask.numpy().reshape(mask.shape[0], -1) if kind == "ncs" else mask.numpy().reshape(-1)


def masked_moments_impl(x: Tensor, mask: Tensor) -> Moments:
    """``(count, mean, M2)`` per channel of x over the positions ``mask`` counts, float64, by the
    masked statistics kernels (count a float); nothing counted gives ``(0, zeros, zeros)``."""
    if x.numel() == 0 or not bool(mask.any()):
        return empty(x)
    x = dense(x)
    kind = layout(x)
    count, mean, m2 = _run(lambda xv: kernels.moments_masked(xv, _mask_array(mask, kind)), x,
                           [], [x])
    return Moments(count, torch.from_numpy(mean), torch.from_numpy(m2))


def stats_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, var: Tensor, mask: Optional[Tensor], count: float,
                        eps: float, act: str, negative_slope: float,
                        alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The training gradient of :func:`eval_impl` run with x's own statistics ``mean`` / ``var``
    (float64) over the positions ``mask`` counts (``count`` of them per channel):

        dx = k1 * g + m * (k0 + k2 * (x - mean)),   k1 = gamma * invstd,
        k0 = -k1 * sum(g) / n,   k2 = -k1 * invstd^2 * sum(g * (x - mean)) / n

    with the sums over every position (each is normalised with the statistics): the training
    backward's two passes, the second one masked."""
    if mask is None:
        return train_backward_impl(dy, x, weight, bias, mean, var, eps, act, negative_slope,
                                   alpha, False)
    code = REGISTRY[act].code
    kind = layout(dense(x))
    return _backward(
        dy, x, weight,
        lambda dyv, xv, dxv: kernels.train_backward(
            dyv, xv, _np(weight), _np(bias), mean.numpy(), var.numpy(), eps, code,
            negative_slope, alpha, False, dxv, mask=_mask_array(mask, kind), count=count),
    )
