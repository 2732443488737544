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


# the merge and coefficient kernels take a block of channels each, over every tile
_MERGE_C, _MERGE_T = 64, 16


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of constants (eps, a count, an activation's slope...) in ``dtype`` on the
    device: kernels read them from memory, since a Python float argument reaches Triton as
    float32. Cached: a layer's constants do not change, so no copy to the device per call."""
    return torch.tensor(values, dtype=dtype, device=device)


def _consts(negative_slope: float, alpha: float, x: Tensor) -> Tensor:
    """(slope, alpha, floor) in the compute dtype: ELU's inverse clamps y / alpha at -1 + that
    dtype's eps so log1p stays finite."""
    dt = _compute_dtype(x)
    floor = -1.0 + torch.finfo(dt).eps
    return _constant((float(negative_slope), float(alpha), floor), dt, x.device)


def _eps(eps: float, device, count: float = 0.0) -> Tensor:
    return _constant((float(eps), float(count)), torch.float64, device)


def _mask_bytes(mask: Tensor) -> Tensor:
    return mask.detach().contiguous().view(torch.uint8)


def _coefficients(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                  bias: Tensor | None) -> list[Tensor]:
    """(mean_hi, mean_lo, scale, shift) in x's compute dtype, from given statistics: one
    launch."""
    c = x.shape[1]
    out = [torch.empty(c, dtype=_compute_dtype(x), device=x.device) for _ in range(4)]
    _kernels().coefficients_kernel[(_cdiv(c, _MERGE_C),)](
        mean.detach(), var.detach(), c, _eps(eps, x.device), _or(weight, mean), _or(bias, mean),
        *out, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=_MERGE_C)
    return out


def _or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """t detached, or a tensor to pass where a kernel's HAS_* flag says it reads nothing."""
    return stand_in if t is None else t.detach()


# ---------------------------------------------------------------------------------------------
# statistics


def _statistics(x: Tensor, mask: Tensor | None, eps: float | None = None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                force64: bool = False):
    """float64 (count, mean, M2) per channel of a dense non-empty x: tiles, then one merge
    launch (Chan's formula); with ``eps``, also the normalising pass's coefficients for
    var = M2 / count (else None). ``force64``: float64 tiles (the non-finite guard's retry)."""
    k = _kernels()
    i_total, c, s = _view(x)
    block_i, block_c, grid = _tiles(i_total, c, s)
    dt = torch.float64 if force64 else _compute_dtype(x)
    src = x.to(torch.float64) if force64 and x.dtype != torch.float64 else x
    parts = [torch.empty((grid[0], c), dtype=dt, device=x.device) for _ in range(3)]
    first = _first_offset(x, mask)
    mask_arg = _mask_bytes(mask) if mask is not None else src
    k.moments_kernel[grid](src, first, mask_arg, *parts, i_total, s, c,
                           HAS_MASK=mask is not None, F64=dt == torch.float64, BLOCK_I=block_i,
                           BLOCK_C=block_c)
    n, mean, m2 = (torch.empty(c, dtype=torch.float64, device=x.device) for _ in range(3))
    coefficients = None
    if eps is not None:
        coefficients = [torch.empty(c, dtype=_compute_dtype(x), device=x.device)
                        for _ in range(4)]
    k.finalize_moments_kernel[(_cdiv(c, _MERGE_C),)](
        src, first, *parts, grid[0], s, c, _eps(eps or 0.0, x.device), _or(weight, n),
        _or(bias, n), n, mean, m2, *(coefficients or [n] * 4),
        COEFFICIENTS=eps is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        F64=dt == torch.float64, BLOCK_T=_MERGE_T, BLOCK_C=_MERGE_C)
    return n, mean, m2, coefficients


def _finite(*tensors: Tensor) -> bool:
    """Whether every value is finite (one sum, one read back)."""
    return bool(torch.isfinite(sum(tensors)).all())


def _guarded_statistics(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of :func:`_statistics`, from float64 tiles where float32's are not
    finite (the non-finite guard)."""
    n, mean, m2, _ = _statistics(x, mask)
    if not _finite(mean, m2):
        n, mean, m2, _ = _statistics(x, mask, force64=True)
    return n, mean, m2


def _first_offset(x: Tensor, mask: Tensor | None) -> int:
    """The offset of channel 0's first value (its first counted one with a mask): each
    channel's value there shifts its sums."""
    if mask is None:
        return 0  # (0, 0, ...) in both layouts
    first = int(mask.detach().reshape(-1).to(torch.uint8).argmax())  # the first True
    _, c, s = _view(x)
    return first // s * c * s + first % s


def moments_impl(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, M2)`` per channel, float64 (:func:`.numba_cpu.moments_impl`'s)."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(c, dtype=torch.float64)
        return 0, zeros, zeros.clone()
    x = dense(x)
    _, mean, m2 = _guarded_statistics(x, None)
    return x.numel() // c, mean, m2


def masked_moments_impl(x: Tensor, mask: Tensor) -> tuple[float, Tensor, Tensor]:
    """``(count, mean, M2)`` over the positions ``mask`` counts; nothing counted gives zeros."""
    c = x.shape[1]
    if x.numel() == 0 or not bool(mask.any()):
        zeros = x.new_zeros(c, dtype=torch.float64)
        return 0.0, zeros, zeros.clone()
    x = dense(x)
    n, mean, m2 = _guarded_statistics(x, mask)
    return float(n[0]), mean, m2


# ---------------------------------------------------------------------------------------------
# forwards


def _normalize(x: Tensor, coefficients, act: str, negative_slope: float, alpha: float,
               y: Tensor | None = None) -> Tensor:
    k = _kernels()
    y = torch.empty_like(x) if y is None else y
    i_total, c, s = _view(x)
    block_i, block_c, grid = _tiles(i_total, c, s)
    k.normalize_kernel[grid](x, y, *coefficients, _consts(negative_slope, alpha, x), i_total, s,
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
    n, mean, m2, coefficients = _statistics(x, None, eps, weight, bias)
    y = _normalize(x, coefficients, act, negative_slope, alpha)
    # the non-finite guard, read after the normalising pass is queued: a non-finite float32
    # result (NaN/Inf data, or squares past float32's range) is computed again in float64
    if not _finite(mean, m2):
        n, mean, m2, coefficients = _statistics(x, None, eps, weight, bias, force64=True)
        _normalize(x, coefficients, act, negative_slope, alpha, y)
    return y, mean, m2 / n


def eval_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
              running_var: Tensor, eps: float, act: str, negative_slope: float,
              alpha: float) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    x = dense(x)
    coefficients = _coefficients(x, running_mean, running_var, eps, weight, bias)
    return _normalize(x, coefficients, act, negative_slope, alpha)


# ---------------------------------------------------------------------------------------------
# backwards: sums (float32 tiles), one launch adding them in float64 and making the
# coefficients, then dx = k1 g + m (k0 + k2 e)

_TRAIN, _FROM_OUTPUT, _EVAL = 0, 1, 2  # finalize_grads_kernel's modes


def _sums(dy: Tensor, src: Tensor, coefficients, act, negative_slope, alpha,
          inplace) -> tuple[Tensor, Tensor]:
    """The (tiles, C) partial sums of g and g * e."""
    k = _kernels()
    i_total, c, s = _view(src)
    block_i, block_c, grid = _tiles(i_total, c, s)
    dt = _compute_dtype(src)
    sum_g = torch.empty((grid[0], c), dtype=dt, device=src.device)
    sum_ge = torch.empty_like(sum_g)
    k.grad_sums_kernel[grid](dy, src, sum_g, sum_ge, *coefficients,
                             _consts(negative_slope, alpha, src), i_total, s, c,
                             ACT=REGISTRY[act].code, INPLACE=bool(inplace),
                             F64=dt == torch.float64, BLOCK_I=block_i, BLOCK_C=block_c)
    return sum_g, sum_ge


def _grad_coefficients(sum_g, sum_ge, var, eps, weight, count, mode, src, dtype):
    """(k1, k0, k2) in src's compute dtype and (sum g * x_hat, sum g) in ``dtype``, from the
    tiles' sums: one launch."""
    c = sum_g.shape[1]
    device = sum_g.device
    ks = [torch.empty(c, dtype=_compute_dtype(src), device=device) for _ in range(3)]
    sums = [torch.empty(c, dtype=dtype, device=device) for _ in range(2)]
    _kernels().finalize_grads_kernel[(_cdiv(c, _MERGE_C),)](
        sum_g, sum_ge, sum_g.shape[0], c, var.detach(), _eps(eps, device, count),
        _or(weight, var), *ks, sums[1], sums[0], MODE=mode, HAS_W=weight is not None,
        BLOCK_T=_MERGE_T, BLOCK_C=_MERGE_C)
    return ks, sums


def _write_dx(dy, src, coefficients, ks, act, negative_slope, alpha, inplace,
              mask=None) -> Tensor:
    k = _kernels()
    dx = torch.empty_like(src)
    i_total, c, s = _view(src)
    block_i, block_c, grid = _tiles(i_total, c, s)
    mask_arg = _mask_bytes(mask) if mask is not None else src
    k.write_dx_kernel[grid](dy, src, dx, mask_arg, *coefficients, *ks,
                            _consts(negative_slope, alpha, src), i_total, s, c,
                            ACT=REGISTRY[act].code, INPLACE=bool(inplace),
                            HAS_MASK=mask is not None, F64=src.dtype == torch.float64,
                            BLOCK_I=block_i, BLOCK_C=block_c)
    return dx


def _empty_grads(src: Tensor, weight: Tensor | None):
    c = src.shape[1]
    pdtype = _pdtype(src, weight)
    return torch.empty_like(src), src.new_zeros(c, dtype=pdtype), src.new_zeros(c, dtype=pdtype)


def _pdtype(src: Tensor, weight: Tensor | None) -> torch.dtype:
    return src.dtype if weight is None else weight.dtype


def _backward(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, mode,
              mask=None, count=None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): coefficients, the sums' pass, their merge, the dx pass."""
    if src.numel() == 0:
        return _empty_grads(src, weight)
    src = dense(src)
    dy = as_layout_of(dy, src)
    inplace = mode == _FROM_OUTPUT
    coefficients = _coefficients(src, mean, var, eps, weight, bias)
    sums = _sums(dy, src, coefficients, act, negative_slope, alpha, inplace)
    m = src.numel() // src.shape[1] if count is None else count
    ks, (dweight, dbias) = _grad_coefficients(*sums, var, eps, weight, m, mode, src,
                                              _pdtype(src, weight))
    dx = _write_dx(dy, src, coefficients, ks, act, negative_slope, alpha, inplace, mask)
    return dx, dweight, dbias


def train_backward_impl(dy: Tensor, src: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, var: Tensor, eps: float, act: str, negative_slope: float,
                        alpha: float, inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha,
                     _FROM_OUTPUT if inplace else _TRAIN)


def eval_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Tensor, running_var: Tensor, eps: float, act: str,
                       negative_slope: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, bias, running_mean, running_var, eps, act, negative_slope,
                     alpha, _EVAL)


def stats_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        mean: Tensor, var: Tensor, mask: Optional[Tensor], count: float,
                        eps: float, act: str, negative_slope: float,
                        alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The training gradient with given statistics over the positions ``mask`` counts
    (:func:`.numba_cpu.stats_backward_impl`'s)."""
    return _backward(dy, x, weight, bias, mean, var, eps, act, negative_slope, alpha, _TRAIN,
                     mask, count)


# ---------------------------------------------------------------------------------------------
# the pieces SyncBatchNorm assembles around its collectives (identity activation)


def backward_sums_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """float64 per-channel ``(sum g, sum g * x_hat)`` of this rank's batch, with the given
    (float64, global) statistics."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    coefficients = _coefficients(x, mean, var, eps, weight, bias)
    sums = _sums(dy, x, coefficients, "identity", 0.0, 1.0, False)
    _, (sum_gxhat, sum_g) = _grad_coefficients(*sums, var, eps, weight, 1.0, _EVAL, x,
                                               torch.float64)
    return sum_g, sum_gxhat


def backward_dx_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     mean: Tensor, var: Tensor, eps: float, sum_g: Tensor, sum_gxhat: Tensor,
                     count: float, mask: Optional[Tensor] = None) -> Tensor:
    """dx of the training formula from sums over ``count`` values (every rank's)."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    coefficients = _coefficients(x, mean, var, eps, weight, bias)
    # the global sums as one "tile": sum g and sum g * (x - mean) = sum g * x_hat * sigma
    sum_ge = sum_gxhat * torch.sqrt(var.to(torch.float64) + eps)
    ks, _ = _grad_coefficients(sum_g.view(1, -1), sum_ge.view(1, -1), var, eps, weight, count,
                               _TRAIN, x, torch.float64)
    return _write_dx(dy, x, coefficients, ks, "identity", 0.0, 1.0, False, mask)
