"""The Triton GPU backend: the kernels of :mod:`.triton_kernels` on torch tensors.

Takes CUDA tensors of float32, float16 or bfloat16 (float64 too), dense as ``(N, C, *)``
contiguous or channels-last (:mod:`.layout`), with per-channel tensors in the input's dtype or
float32, when ``triton`` imports. Everything else keeps PyTorch's path (other devices, odd
strides, a missing ``triton``). The implementations here have the signatures and results of
:mod:`.numba_cpu`'s, so the same custom ops, autograd formulas and layers run them; statistics
are float32 sums inside a tile and float64 across tiles (Chan's merge), returned in float64 as
on CPU, and float16 / bfloat16 data is computed in float32 (as PyTorch's own kernels do).

No function here reads a value back from the device on the plain path (:func:`train_step`,
:func:`train_impl`, :func:`eval_impl`, the backwards): tiles whose float32 statistics are not
finite are redone in float64 inside the statistics kernel, and the running update's non-finite
guard is a flag the kernels pass along. Launches: a training forward three (running update
included), a backward three, an evaluation forward one. Constants live in cached device tensors
keyed by a layer's settings; counts go to the kernels as integers.

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
from ..numerics import elu_inverse_floor
from .layout import as_layout_of, dense, layout
from .moments import Moments, empty

__all__ = ["available", "takes", "on_cpu", "train_step", "train_impl", "eval_impl",
           "train_backward_impl", "eval_backward_impl", "moments_impl", "masked_moments_impl",
           "stats_backward_impl", "backward_sums_impl", "backward_dx_impl"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# CPU tensors come here only inside on_cpu() (Triton's interpreter)
_INTERPRET_ON_CPU = False


# looked up once, at import (triton itself is not imported here): a constant that
# torch.compile reads as one, where a cached function would be traced into (find_spec, which
# Dynamo refuses: a graph break, an error under fullgraph=True, on every CUDA input)
_AVAILABLE = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether ``triton`` can be imported (it is not imported here)."""
    return _AVAILABLE


def takes(x: Tensor, *per_channel: Tensor | None) -> bool:
    """True when these kernels handle x: CUDA (or CPU inside :func:`on_cpu`), a dtype of
    DTYPES, contiguous or channels-last, per-channel tensors on x's device in x's dtype or
    float32, and triton importable."""
    if not (x.is_cuda or (_INTERPRET_ON_CPU and x.is_cpu)):  # (attributes: no device object)
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


def _plan(x: Tensor) -> tuple[int, int, int, int, int, tuple[int, int]]:
    """(i_total, C, S, BLOCK_I, BLOCK_C, grid) of a dense tensor: its (R, C, S) view, contiguous
    (N, C, S) or channels-last (M, C, 1), and its tiles: planes of contiguous memory are read
    along i, channels-last rows along c."""
    c = x.shape[1]
    if layout(x) == "ncs":
        s = math.prod(x.shape[2:])
        i_total = x.shape[0] * s
        block_c, block_i = 1, 1024
    else:
        s, i_total = 1, x.numel() // c
        block_c = min(64, _next_power_of_2(c))
        block_i = max(16, 4096 // block_c)
    block_i = min(block_i, max(16, _next_power_of_2(i_total)))  # no idle lanes on small inputs
    return i_total, c, s, block_i, block_c, (_cdiv(i_total, block_i), _cdiv(c, block_c))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# the merge kernels take a block of channels each, over every tile
_MERGE_C, _MERGE_T = 64, 16


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: torch.device) -> Tensor:
    """float64 constants on the device (eps, an activation's slope, a momentum): kernels read
    them from memory, since a Python float argument reaches Triton as float32. Cached and keyed
    by a layer's settings only (a batch's count goes as an integer argument), so no copy to the
    device per call, nor per new batch size."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _consts(x: Tensor, eps: float, negative_slope: float, alpha: float) -> Tensor:
    """(eps, slope, alpha, floor), float64: the floor of ELU's inverse for the compute dtype."""
    floor = elu_inverse_floor(torch.finfo(_compute_dtype(x)).eps)
    return _constant((float(eps), float(negative_slope), float(alpha), floor), x.device)


def _flags(x: Tensor, weight: Tensor | None, bias: Tensor | None, act: str, plan) -> dict:
    """The compile-time constants of a pass over x's tiles."""
    return dict(ACT=REGISTRY[act].code, HAS_W=weight is not None, HAS_B=bias is not None,
                F64=x.dtype == torch.float64, BLOCK_I=plan[3], BLOCK_C=plan[4])


def _mask_bytes(mask: Tensor) -> Tensor:
    return mask.detach().contiguous().view(torch.uint8)


def _or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """t, or a tensor to pass where a kernel's HAS_* flag says it reads nothing."""
    return stand_in if t is None else t


# ---------------------------------------------------------------------------------------------
# statistics


def _statistics(x: Tensor, mask: Tensor | None, plan=None, var: bool = False,
                running: tuple = (None, None), check: bool = False):
    """float64 (mean, M2 or with ``var`` the biased variance) per channel of a dense non-empty
    x, and the scratch buffer: the tiles' float64 (count, mean, M2) (3, tiles, C), then the
    counts (C), then with ``check`` one non-finite flag per merge block (for the buffers'
    dtypes of ``running``). Two launches, the tiles (float64 where float32's are not finite)
    and their merge; returns (mean, second, scratch, where the counts start)."""
    k = _kernels()
    i_total, c, s, block_i, block_c, grid = plan or _plan(x)
    plane, blocks = grid[0] * c, _cdiv(c, _MERGE_C)
    scratch = torch.empty(3 * plane + c + blocks, dtype=torch.float64, device=x.device)
    k.moments_kernel[grid](x, x if mask is None else _mask_bytes(mask), scratch, plane, i_total,
                           s, c, HAS_MASK=mask is not None, F64=x.dtype == torch.float64,
                           BLOCK_I=block_i, BLOCK_C=block_c)
    mean, second = (torch.empty(c, dtype=torch.float64, device=x.device) for _ in range(2))
    k.finalize_moments_kernel[(blocks,)](scratch, plane, grid[0], c, mean, second,
                                         _or(running[0], mean), _or(running[1], mean), VAR=var,
                                         CHECK=check, BLOCK_T=_MERGE_T, BLOCK_C=_MERGE_C)
    return mean, second, scratch, 3 * plane


def moments_impl(x: Tensor) -> Moments:
    """``(count, mean, M2)`` per channel, float64 (:func:`.numba_cpu.moments_impl`'s)."""
    if x.numel() == 0:
        return empty(x)
    x = dense(x)
    mean, m2, _, _ = _statistics(x, None)
    return Moments(x.numel() // x.shape[1], mean, m2)


def masked_moments_impl(x: Tensor, mask: Tensor) -> Moments:
    """``(count, mean, M2)`` over the positions ``mask`` counts; nothing counted gives zeros."""
    if x.numel() == 0:
        return empty(x)
    x = dense(x)
    mean, m2, scratch, counts_at = _statistics(x, mask)
    # every channel counts the same positions; the Python float of this signature is its one
    # read back
    return Moments(float(scratch[counts_at]), mean, m2)


# ---------------------------------------------------------------------------------------------
# forwards


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float, act: str, negative_slope: float, alpha: float, plan=None) -> Tensor:
    """act(BN(x)) with given statistics: one launch."""
    plan = plan or _plan(x)
    i_total, c, s, _, _, grid = plan
    y = torch.empty_like(x)
    _kernels().normalize_kernel[grid](x, y, mean, var, _or(weight, mean), _or(bias, mean),
                                      _consts(x, eps, negative_slope, alpha), i_total, s, c,
                                      **_flags(x, weight, bias, act, plan))
    return y


def train_step(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
               factor: float | Tensor, check: bool, act: str, negative_slope: float,
               alpha: float, inplace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training forward in three launches and no read back: the tiles' statistics, their
    merge (+ the guard's flags), then act(BN(x)) whose first row of programs also updates the
    running buffers in place: ``rm += factor * (mean - rm)``, ``rv += factor * (var * n / (n -
    1) - rv)``, in float64, rounded to the buffers' dtype. ``factor`` a Python float or a 0-d
    tensor on x's device (1 / num_batches_tracked); buffers both None: no update. ``check``:
    a channel whose mean or unbiased variance, rounded to the buffers' dtype, is NaN/Inf (as
    :func:`.torch_fallback.running_update` sees them) leaves both buffers bitwise unchanged,
    decided on the device. Returns ``(y, mean, var, ok)``: float64
    batch statistics (biased var, as :func:`train_backward_impl` takes them) and ``ok``, a 0-d
    bool tensor, False where the guard skipped the update (always True with check=False: a
    tensor either way, as an op's schema wants). x is dense-able, non-empty and checked;
    ``inplace`` only concerns the backward."""
    x = dense(x)
    plan = _plan(x)
    i_total, c, s, _, _, grid = plan
    running = running_mean is not None and running_var is not None
    buffers = (running_mean, running_var) if running else (None, None)
    mean, var, scratch, counts_at = _statistics(x, None, plan, var=True, running=buffers,
                                                check=check)
    if not running:
        factor = mean
    elif not isinstance(factor, Tensor):
        factor = _constant((float(factor),), x.device)
    y = torch.empty_like(x)
    ok = torch.empty((), dtype=torch.bool, device=x.device)
    _kernels().train_normalize_kernel[grid](
        x, y, mean, var, _or(weight, mean), _or(bias, mean),
        _consts(x, eps, negative_slope, alpha), i_total, s, c,
        scratch[counts_at + c:] if check else mean, _cdiv(c, _MERGE_C), _or(buffers[0], mean),
        _or(buffers[1], mean), factor, i_total, ok, RUNNING=running, CHECK=check,
        **_flags(x, weight, bias, act, plan))
    return y, mean, var, ok


def train_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str,
               negative_slope: float, alpha: float,
               inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: :func:`train_step` without buffers, in three launches."""
    c = x.shape[1]
    if x.numel() == 0:
        return torch.empty_like(x), x.new_zeros(c, dtype=torch.float64), x.new_full(
            (c,), math.nan, dtype=torch.float64)
    x = dense(x)
    plan = _plan(x)
    mean, var, _, _ = _statistics(x, None, plan, var=True)
    return _normalize(x, mean, var, weight, bias, eps, act, negative_slope, alpha, plan), mean, var


def eval_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
              running_var: Tensor, eps: float, act: str, negative_slope: float,
              alpha: float) -> Tensor:
    """act(BN(x)) with the running statistics: one launch."""
    if x.numel() == 0:
        return torch.empty_like(x)
    x = dense(x)
    return _normalize(x, running_mean, running_var, weight, bias, eps, act, negative_slope, alpha)


# ---------------------------------------------------------------------------------------------
# backwards: sums (float32 tiles), one launch adding them in float64 and making dx's
# coefficients, then dx = k1 g + m (k0 + k2 e): three launches, each pass over the data making
# its channels' coefficients from (mean, var, weight, bias) itself

_TRAIN, _FROM_OUTPUT, _EVAL = 0, 1, 2  # finalize_grads_kernel's modes


def _sums(dy, src, mean, var, weight, bias, consts, act, inplace, plan) -> Tensor:
    """The (2, tiles, C) partial sums of g and g * e, flat."""
    i_total, c, s, _, _, grid = plan
    sums = torch.empty(2 * grid[0] * c, dtype=_compute_dtype(src), device=src.device)
    _kernels().grad_sums_kernel[grid](dy, src, sums, grid[0] * c, mean, var, _or(weight, mean),
                                      _or(bias, mean), consts, i_total, s, c,
                                      INPLACE=bool(inplace), **_flags(src, weight, bias, act, plan))
    return sums


def _grad_coefficients(sums, tiles, var, consts, weight, count, mode, src, dtype):
    """(k1, k0, k2) flat in src's compute dtype, and (sum g * x_hat, sum g) in ``dtype``, from
    the tiles' sums: one launch. ``count``: values per channel (integral)."""
    c = src.shape[1]
    ks = torch.empty(3 * c, dtype=_compute_dtype(src), device=src.device)
    sum_g, sum_gxhat = (torch.empty(c, dtype=dtype, device=src.device) for _ in range(2))
    _kernels().finalize_grads_kernel[(_cdiv(c, _MERGE_C),)](
        sums, tiles * c, tiles, c, var, consts, _or(weight, var), int(count), ks, sum_g,
        sum_gxhat, MODE=mode, HAS_W=weight is not None, BLOCK_T=_MERGE_T, BLOCK_C=_MERGE_C)
    return ks, (sum_gxhat, sum_g)


def _write_dx(dy, src, mean, var, weight, bias, ks, consts, act, inplace, mask, plan) -> Tensor:
    i_total, c, s, _, _, grid = plan
    dx = torch.empty_like(src)
    _kernels().write_dx_kernel[grid](dy, src, dx, src if mask is None else _mask_bytes(mask),
                                     mean, var, _or(weight, mean), _or(bias, mean), ks, consts,
                                     i_total, s, c, INPLACE=bool(inplace),
                                     HAS_MASK=mask is not None,
                                     **_flags(src, weight, bias, act, plan))
    return dx


def _empty_grads(src: Tensor, weight: Tensor | None):
    c = src.shape[1]
    pdtype = _pdtype(src, weight)
    return torch.empty_like(src), src.new_zeros(c, dtype=pdtype), src.new_zeros(c, dtype=pdtype)


def _pdtype(src: Tensor, weight: Tensor | None) -> torch.dtype:
    return src.dtype if weight is None else weight.dtype


def _backward(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, mode,
              mask=None, count=None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): the sums' pass, their merge, the dx pass."""
    if src.numel() == 0:
        return _empty_grads(src, weight)
    src = dense(src)
    dy = as_layout_of(dy, src)
    plan = _plan(src)
    inplace = mode == _FROM_OUTPUT
    consts = _consts(src, eps, negative_slope, alpha)
    sums = _sums(dy, src, mean, var, weight, bias, consts, act, inplace, plan)
    ks, (dweight, dbias) = _grad_coefficients(sums, plan[5][0], var, consts, weight,
                                              plan[0] if count is None else count, mode, src,
                                              _pdtype(src, weight))
    dx = _write_dx(dy, src, mean, var, weight, bias, ks, consts, act, inplace, mask, plan)
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
    plan = _plan(x)
    consts = _consts(x, eps, 0.0, 1.0)
    sums = _sums(dy, x, mean, var, weight, bias, consts, "identity", False, plan)
    _, (sum_gxhat, sum_g) = _grad_coefficients(sums, plan[5][0], var, consts, weight, 1, _EVAL,
                                               x, torch.float64)
    return sum_g, sum_gxhat


def backward_dx_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     mean: Tensor, var: Tensor, eps: float, sum_g: Tensor, sum_gxhat: Tensor,
                     count: float, mask: Optional[Tensor] = None) -> Tensor:
    """dx of the training formula from sums over ``count`` values (every rank's)."""
    x = dense(x)
    dy = as_layout_of(dy, x)
    plan = _plan(x)
    consts = _consts(x, eps, 0.0, 1.0)
    # the global sums as one "tile": sum g and sum g * (x - mean) = sum g * x_hat * sigma
    sums = torch.cat([sum_g, sum_gxhat * torch.sqrt(var.to(torch.float64) + eps)])
    ks, _ = _grad_coefficients(sums, 1, var, consts, weight, count, _TRAIN, x, torch.float64)
    return _write_dx(dy, x, mean, var, weight, bias, ks, consts, "identity", False, mask, plan)
