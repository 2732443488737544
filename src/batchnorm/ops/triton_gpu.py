"""The Triton GPU backend: the kernels of :mod:`.triton_kernels` on torch tensors.

Takes CUDA tensors of float32, float16 or bfloat16 (float64 too), dense as ``(N, C, *)``
contiguous or channels-last (:mod:`.layout`), with per-channel tensors in the input's dtype or
float32, when ``triton`` imports. Everything else keeps PyTorch's path (other devices, odd
strides, a missing ``triton``). The implementations here have the signatures and results of
:mod:`.numba_cpu`'s, so the same custom ops, autograd formulas and layers run them; statistics
are float32 sums inside a tile and float64 across tiles (Chan's merge), returned in float64 as
on CPU, and float16 / bfloat16 data is computed in float32 (as PyTorch's own kernels do). The
running buffers stay the layer's, updated in float32 for half-precision input as PyTorch does.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: :func:`on_cpu` (for tests)
sets ``TRITON_INTERPRET=1`` before the kernels are first compiled and routes CPU tensors here.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..activations import REGISTRY
from .layout import as_layout_of, dense, layout

__all__ = ["available", "takes", "on_cpu", "train_impl", "eval_impl", "train_backward_impl",
           "eval_backward_impl", "moments_impl", "masked_moments_impl", "stats_backward_impl",
           "backward_sums_impl", "backward_dx_impl"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# CPU tensors come here only inside on_cpu() (Triton's interpreter)
_INTERPRET_ON_CPU = False


@functools.cache
def available() -> bool:
    """Whether ``triton`` can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def takes(x: Tensor, *per_channel: Tensor | None) -> bool:
    """True when these kernels handle x: CUDA (or CPU inside :func:`on_cpu`), a dtype of
    DTYPES, contiguous or channels-last, per-channel tensors on x's device in x's dtype or
    float32, and triton importable."""
    device = x.device.type
    if not (device == "cuda" or (device == "cpu" and _INTERPRET_ON_CPU)):
        return False
    if x.dtype not in DTYPES or layout(x) is None or not available():
        return False
    return all(t is None or (t.device == x.device and t.dtype in (x.dtype, torch.float32))
               for t in per_channel)


@contextlib.contextmanager
def on_cpu():
    """Run this backend on CPU tensors in Triton's interpreter (for tests on machines without
    a GPU): every op call inside the block that the CPU kernels would take comes here."""
    global _INTERPRET_ON_CPU
    previous, routed = os.environ.get("TRITON_INTERPRET"), _INTERPRET_ON_CPU
    os.environ["TRITON_INTERPRET"] = "1"
    kernels = _kernels()
    if not _interpreted(kernels.moments_kernel):
        raise RuntimeError("the Triton kernels were compiled before TRITON_INTERPRET=1 was set; "
                           "set it before the first kernel call")
    _INTERPRET_ON_CPU = True
    try:
        # the interpreter computes with NumPy, which warns on inf - inf or overflow where a
        # GPU computes silently: those warnings are the interpreter's, not the kernels'
        with np.errstate(all="ignore"):
            yield
    finally:
        _INTERPRET_ON_CPU = routed
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


@functools.cache
def _kernels():
    from . import triton_kernels

    if not _interpreted(triton_kernels.moments_kernel):
        # no silent wait: Triton compiles each kernel on its first launch (cached on disk after)
        print("batchnorm: compiling the Triton kernels this process needs on first use "
              "(seconds each; Triton caches them on disk)", file=sys.stderr)
    return triton_kernels


# ---------------------------------------------------------------------------------------------
# the (R, C, S) view, tiles and per-channel values


def _view(t: Tensor) -> tuple[int, int, int]:
    """(i_total, C, S) of a dense tensor: contiguous (N, C, S) or channels-last (M, C, 1)."""
    c = t.shape[1]
    if layout(t) == "ncs":
        s = math.prod(t.shape[2:])
        return t.shape[0] * s, c, s
    return t.numel() // c, c, 1


def _tiles(i_total: int, c: int, s: int) -> tuple[int, int, tuple[int, int]]:
    """(BLOCK_I, BLOCK_C, grid): planes of contiguous memory are read along i, channels-last
    rows along c."""
    if s > 1:
        block_c = 1
        block_i = 1024
    else:
        block_c = min(64, _next_power_of_2(c))
        block_i = max(16, 4096 // block_c)
    block_i = min(block_i, max(16, _next_power_of_2(i_total)))  # no idle lanes on small inputs
    return block_i, block_c, (_cdiv(i_total, block_i), _cdiv(c, block_c))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                 bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mean split as hi + lo in the compute dtype, scale = gamma * invstd, shift = beta (from
    float64 mean and invstd)."""
    dt = _compute_dtype(x)
    gamma = _gamma(weight, x)
    mean_hi = mean.to(dt)
    mean_lo = (mean - mean_hi.to(torch.float64)).to(dt)
    scale = (gamma * invstd).to(dt)
    shift = torch.zeros_like(mean, dtype=dt) if bias is None else bias.detach().to(dt)
    return mean_hi.contiguous(), mean_lo.contiguous(), scale.contiguous(), shift.contiguous()


def _gamma(weight: Tensor | None, x: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    return weight.detach().to(torch.float64)


def _invstd(var: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(var.to(torch.float64) + eps)


def _consts(negative_slope: float, alpha: float, x: Tensor) -> Tensor:
    """(slope, alpha, floor) in the compute dtype: ELU's inverse clamps y / alpha at -1 + that
    dtype's eps so log1p stays finite."""
    dt = _compute_dtype(x)
    floor = -1.0 + torch.finfo(dt).eps
    return torch.tensor([negative_slope, alpha, floor], dtype=dt, device=x.device)


def _mask_bytes(mask: Tensor) -> Tensor:
    return mask.detach().contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# statistics


def _moments(x: Tensor, mask: Tensor | None, force64: bool = False):
    """float64 (count per channel, mean, M2) of a dense non-empty x by tiles merged with Chan's
    formula; a non-finite float32 result is computed again with float64 tiles (as on CPU)."""
    k = _kernels()
    i_total, c, s = _view(x)
    block_i, block_c, grid = _tiles(i_total, c, s)
    dt = torch.float64 if force64 else _compute_dtype(x)
    parts = [torch.empty((grid[0], c), dtype=dt, device=x.device) for _ in range(3)]
    src = x.to(torch.float64) if force64 and x.dtype != torch.float64 else x
    shift = _first_values(src, mask).to(dt).contiguous()
    mask_arg = _mask_bytes(mask) if mask is not None else src
    k.moments_kernel[grid](src, shift, mask_arg, *parts, i_total, s, c,
                           HAS_MASK=mask is not None, F64=dt == torch.float64, BLOCK_I=block_i,
                           BLOCK_C=block_c)
    n_t, mean_t, m2_t = (p.to(torch.float64) for p in parts)  # (tiles, C)
    # Chan's merge of every tile at once: mean = sum n_t mean_t / n, M2 = sum M2_t + sum n_t
    # (mean_t - mean)^2, in float64, then the shift added back
    n = n_t.sum(0)
    centred = (n_t * mean_t).sum(0) / n.clamp(min=1.0)
    m2 = m2_t.sum(0) + (n_t * (mean_t - centred) ** 2).sum(0)
    mean = centred + shift.to(torch.float64)
    if not force64 and dt != torch.float64 and not bool(
            torch.isfinite(mean).all() & torch.isfinite(m2).all()):
        return _moments(x, mask, force64=True)
    return n, mean, m2


def _first_values(x: Tensor, mask: Tensor | None) -> Tensor:
    """(C,): each channel's first value (the first counted one with a mask), the shift of the
    statistics' sums."""
    first = 0
    if mask is not None:
        first = int(mask.detach().reshape(-1).to(torch.uint8).argmax())  # the first True
    index = torch.unravel_index(torch.tensor(first), (x.shape[0], *x.shape[2:]))
    return x[(int(index[0]), slice(None), *(int(j) for j in index[1:]))]


def moments_impl(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, M2)`` per channel, float64 (:func:`.numba_cpu.moments_impl`'s)."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(c, dtype=torch.float64)
        return 0, zeros, zeros.clone()
    x = dense(x)
    _, mean, m2 = _moments(x, None)
    return x.numel() // c, mean, m2


def masked_moments_impl(x: Tensor, mask: Tensor) -> tuple[float, Tensor, Tensor]:
    """``(count, mean, M2)`` over the positions ``mask`` counts; nothing counted gives zeros."""
    c = x.shape[1]
    if x.numel() == 0 or not bool(mask.any()):
        zeros = x.new_zeros(c, dtype=torch.float64)
        return 0.0, zeros, zeros.clone()
    x = dense(x)
    n, mean, m2 = _moments(x, mask)
    return float(n[0]), mean, m2


# ---------------------------------------------------------------------------------------------
# forwards


def _normalize(x: Tensor, per_channel, act: str, negative_slope: float, alpha: float) -> Tensor:
    k = _kernels()
    y = torch.empty_like(x)
    i_total, c, s = _view(x)
    block_i, block_c, grid = _tiles(i_total, c, s)
    k.normalize_kernel[grid](x, y, *per_channel, _consts(negative_slope, alpha, x), i_total, s,
                             c, ACT=REGISTRY[act].code, F64=x.dtype == torch.float64,
                             BLOCK_I=block_i, BLOCK_C=block_c)
    return y


def train_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str,
               negative_slope: float, alpha: float,
               inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    if x.numel() == 0:
        return torch.empty_like(x), x.new_zeros(c, dtype=torch.float64), x.new_full(
            (c,), math.nan, dtype=torch.float64)
    x = dense(x)
    n, mean, m2 = _moments(x, None)
    var = m2 / n
    y = _normalize(x, _per_channel(x, mean, _invstd(var, eps), weight, bias), act,
                   negative_slope, alpha)
    return y, mean, var


def eval_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
              running_var: Tensor, eps: float, act: str, negative_slope: float,
              alpha: float) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    x = dense(x)
    mean = running_mean.detach().to(torch.float64)
    per_channel = _per_channel(x, mean, _invstd(running_var.detach(), eps), weight, bias)
    return _normalize(x, per_channel, act, negative_slope, alpha)


# ---------------------------------------------------------------------------------------------
# backwards: sums (float32 tiles, float64 across), then dx = k1 g + m (k0 + k2 e)


def _sums(dy: Tensor, src: Tensor, per_channel, act, negative_slope, alpha,
          inplace) -> tuple[Tensor, Tensor]:
    k = _kernels()
    i_total, c, s = _view(src)
    block_i, block_c, grid = _tiles(i_total, c, s)
    dt = _compute_dtype(src)
    sum_g = torch.empty((grid[0], c), dtype=dt, device=src.device)
    sum_ge = torch.empty_like(sum_g)
    k.grad_sums_kernel[grid](dy, src, sum_g, sum_ge, *per_channel,
                             _consts(negative_slope, alpha, src), i_total, s, c,
                             ACT=REGISTRY[act].code, INPLACE=bool(inplace),
                             F64=dt == torch.float64, BLOCK_I=block_i, BLOCK_C=block_c)
    return sum_g.to(torch.float64).sum(0), sum_ge.to(torch.float64).sum(0)


def _write_dx(dy, src, per_channel, k1, k0, k2, act, negative_slope, alpha, inplace,
              mask=None) -> Tensor:
    k = _kernels()
    dx = torch.empty_like(src)
    i_total, c, s = _view(src)
    block_i, block_c, grid = _tiles(i_total, c, s)
    dt = _compute_dtype(src)
    coefficients = [t.to(dt).contiguous() for t in (k1, k0, k2)]
    mask_arg = _mask_bytes(mask) if mask is not None else src
    k.write_dx_kernel[grid](dy, src, dx, mask_arg, *per_channel, *coefficients,
                            _consts(negative_slope, alpha, src), i_total, s, c,
                            ACT=REGISTRY[act].code, INPLACE=bool(inplace),
                            HAS_MASK=mask is not None, F64=dt == torch.float64,
                            BLOCK_I=block_i, BLOCK_C=block_c)
    return dx


def _coefficients(gamma, invstd, sum_g, sum_ge, m, eps, inplace):
    """(k1, k0, k2, sum g * x_hat) of the training backward (see kernels/__init__.py)."""
    k1 = gamma * invstd
    if inplace:
        safe = torch.where(gamma.abs() < eps, torch.where(gamma < 0, -eps, eps), gamma)
        sum_gxhat = sum_ge / safe  # e = gamma * x_hat
        k2 = -k1 * sum_gxhat / (m * safe)
    else:
        sum_gxhat = sum_ge * invstd  # e = x - mean
        k2 = -k1 * invstd * sum_gxhat / m
    return k1, -k1 * sum_g / m, k2, sum_gxhat


def _empty_grads(src: Tensor, weight: Tensor | None):
    c = src.shape[1]
    pdtype = src.dtype if weight is None else weight.dtype
    return torch.empty_like(src), src.new_zeros(c, dtype=pdtype), src.new_zeros(c, dtype=pdtype)


def _pdtype(src: Tensor, weight: Tensor | None) -> torch.dtype:
    return src.dtype if weight is None else weight.dtype


def train_backward_impl(dy: Tensor, src: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, var: Tensor, eps: float, act: str, negative_slope: float,
                        alpha: float, inplace: bool, mask: Optional[Tensor] = None,
                        count: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    if src.numel() == 0:
        return _empty_grads(src, weight)
    src = dense(src)
    dy = as_layout_of(dy, src)
    invstd = _invstd(var, eps)
    per_channel = _per_channel(src, mean.to(torch.float64), invstd, weight, bias)
    sum_g, sum_ge = _sums(dy, src, per_channel, act, negative_slope, alpha, inplace)
    m = src.numel() // src.shape[1] if mask is None else count
    k1, k0, k2, sum_gxhat = _coefficients(_gamma(weight, src), invstd, sum_g, sum_ge, m, eps,
                                          inplace)
    dx = _write_dx(dy, src, per_channel, k1, k0, k2, act, negative_slope, alpha, inplace, mask)
    pdtype = _pdtype(src, weight)
    return dx, sum_gxhat.to(pdtype), sum_g.to(pdtype)


def eval_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Tensor, running_var: Tensor, eps: float, act: str,
                       negative_slope: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        return _empty_grads(x, weight)
    x = dense(x)
    dy = as_layout_of(dy, x)
    invstd = _invstd(running_var.detach(), eps)
    per_channel = _per_channel(x, running_mean.detach().to(torch.float64), invstd, weight, bias)
    sum_g, sum_ge = _sums(dy, x, per_channel, act, negative_slope, alpha, False)
    k1 = _gamma(weight, x) * invstd
    zeros = torch.zeros_like(k1)
    dx = _write_dx(dy, x, per_channel, k1, zeros, zeros, act, negative_slope, alpha, False)
    pdtype = _pdtype(x, weight)
    return dx, (sum_ge * invstd).to(pdtype), sum_g.to(pdtype)


def stats_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, var: Tensor, mask: Optional[Tensor], count: float,
                        eps: float, act: str, negative_slope: float,
                        alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The training gradient with given statistics over the positions ``mask`` counts
    (:func:`.numba_cpu.stats_backward_impl`'s)."""
    return train_backward_impl(dy, x, weight, bias, mean, var, eps, act, negative_slope, alpha,
                               False, mask, count)


# ---------------------------------------------------------------------------------------------
# the pieces SyncBatchNorm assembles around its collectives (identity activation)


def backward_sums_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """float64 per-channel ``(sum g, sum g * x_hat)`` of this rank's batch, with the given
    (float64, global) statistics."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    invstd = _invstd(var, eps)
    per_channel = _per_channel(x, mean.to(torch.float64), invstd, weight, bias)
    sum_g, sum_ge = _sums(dy, x, per_channel, "identity", 0.0, 1.0, False)
    return sum_g, sum_ge * invstd


def backward_dx_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     mean: Tensor, var: Tensor, eps: float, sum_g: Tensor, sum_gxhat: Tensor,
                     count: float, mask: Optional[Tensor] = None) -> Tensor:
    """dx of the training formula from sums over ``count`` values (every rank's)."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    invstd = _invstd(var, eps)
    per_channel = _per_channel(x, mean.to(torch.float64), invstd, weight, bias)
    gamma = _gamma(weight, x)
    k1, k0, k2, _ = _coefficients(gamma, invstd, sum_g, sum_gxhat / invstd, count, eps, False)
    return _write_dx(dy, x, per_channel, k1, k0, k2, "identity", 0.0, 1.0, False, mask)

