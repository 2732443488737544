"""Fused batch-norm + activation kernels on NumPy arrays (numba, parallel, cached on disk).

Entry points taking float32 or float64 arrays in one of two layouts:

- ``(N, C, S)``: contiguous NCHW-style memory, S the product of the spatial sizes;
- ``(M, C)``: channels-last memory (NHWC / NDHWC, or plain ``(N, C)``), M = N * spatial.

:func:`train_forward` (statistics + normalise + activation), :func:`eval_forward`,
:func:`train_backward` and :func:`eval_backward` (and the pieces: :func:`moments`,
:func:`moments_masked`, :func:`train_backward_sums`, :func:`train_backward_dx`) write into
caller-provided output arrays and return per-channel float64 results; :func:`train_step_at`,
:func:`train_backward_at` and :func:`eval_forward_at` take memory by address instead (a
tensor's ``data_ptr()``: no array views, see :mod:`.memory`). Nothing here imports torch;
:mod:`batchnorm.ops` wraps these as PyTorch custom ops.

Every reduction is cut into fixed-size chunks whose float64 partials are merged in a fixed order,
so results are bitwise identical for any thread count (:func:`set_threads`). Inside a chunk,
float32 data is summed in float32 blocks whose sums are added in float64 (half the arithmetic;
``statistics.py`` and ``backward.py`` say where and how exact); float64 data in float64.

Kernels are made per case (activation, mode, dtype; see ``_compile.py``), compile on first use
(seconds each) and are cached on disk next to this package (numba ``cache=True``); the first
compile in a process writes one line to stderr. ``batchnorm warmup`` (:mod:`batchnorm.ops.warmup`)
compiles them ahead. Numba does not notice edits to a helper in another file of this package:
after changing ``_activation.py``, ``_compile.py``, ``memory.py`` or ``statistics.py``, delete
``kernels/__pycache__``.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import threading

import numba
import numpy as np

from ._activation import consts
from ._compile import compiling_notice
from .backward import (
    eval_backward_mc,
    eval_backward_ncs,
    reduce_mc,
    reduce_ncs,
    write_dx_masked_mc,
    write_dx_masked_ncs,
    write_dx_mc,
    write_dx_ncs,
)
from .normalize import normalize_mc, normalize_ncs
from .per_channel import NO_PARAMETER, running_update
from .statistics import (
    BLOCK,
    BLOCKED_PLANE_FROM,
    SHORT_PLANE,
    SHORT_PLANE_CHANNELS,
    moments_masked_mc,
    moments_masked_ncs,
    moments_mc,
    moments_mc_blocked,
    moments_ncs,
    moments_ncs_blocked,
    moments_ncs_channels,
)

__all__ = [
    "train_forward",
    "train_step",
    "eval_forward",
    "eval_forward_at",
    "train_step_at",
    "train_backward_at",
    "train_backward",
    "train_backward_sums",
    "train_backward_dx",
    "eval_backward",
    "moments",
    "moments_masked",
    "running_update",
    "set_threads",
    "cache_directory",
    "compiling_notice",
]


def _start_pool() -> None:
    """Start numba's thread pool now, once, leaving torch's thread count as it was.

    Numba's OpenMP threading layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` when it
    starts, and that OpenMP count is the one ``torch.get_num_threads()`` reports: a user's
    ``torch.set_num_threads(1)`` became 2 at our first kernel call. Starting the pool here, at
    import (under the import lock, so once even with several Python threads) and putting torch's
    count back, keeps it. Later ``numba.set_num_threads`` calls only mask numba's own
    (thread-local) count and leave OpenMP's alone.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    numba.get_num_threads()  # launches the threading layer (once per process)
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


_start_pool()

def cache_directory() -> str:
    """Where numba keeps the compiled kernels (``NUMBA_CACHE_DIR``, else next to this package,
    else numba's user-wide fallback when the package directory is read-only)."""
    try:
        return normalize_ncs(0, np.dtype(np.float32))._cache._cache_path
    except AttributeError:  # numba internals moved: say where they would be by default
        return numba.config.CACHE_DIR or os.path.join(os.path.dirname(__file__), "__pycache__")


_THREADS = threading.local()  # numba's thread count is per Python thread: the last one set


def set_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (clipped to numba's pool size, at least 1). The count
    last set on this thread is remembered: asking numba costs more than a kernel call on a small
    input; a ``numba.set_num_threads`` elsewhere is not seen."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    if getattr(_THREADS, "n", None) != n:
        numba.set_num_threads(n)
        _THREADS.n = n


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``(mean, M2)`` of x ``(N, C, S)`` or ``(M, C)`` (non-empty).

    float32 data is summed in float32 blocks (two passes over each chunk while it is in cache),
    except short NCS planes; float64 data in float64 (see :mod:`.statistics`). A blocked result
    that is not finite is computed again with float64 sums. Planes shorter than
    ``SHORT_PLANE`` (with ``SHORT_PLANE_CHANNELS`` channels or more) are summed a channel per
    task, in float64.
    """
    if _channels_last(x):
        return _moments(x, "mc", x.dtype, x.shape[1], 1)
    return _moments(x, "ncs", x.dtype, x.shape[1], x.shape[2])


def _moments(x, kind, dtype, c, s, at=False):
    """:func:`moments` of x given as an array, or (``at``) by address as ``(address, *shape)``:
    the kernels of the statistics chosen from the layout ``kind``, the dtype, C and S."""
    if kind == "mc":
        blocked, exact = moments_mc_blocked, moments_mc
        use_blocks = dtype == np.float32
    elif s < SHORT_PLANE and c >= SHORT_PLANE_CHANNELS:
        blocked, exact, use_blocks = None, moments_ncs_channels, False
    else:
        blocked, exact = moments_ncs_blocked, moments_ncs
        use_blocks = dtype == np.float32 and s >= BLOCKED_PLANE_FROM
    if use_blocks:
        mean, m2 = (blocked(dtype, True) if at else blocked(dtype))(x)
        # all finite iff their dot product is: a NaN or Inf anywhere makes it NaN or Inf, and
        # from float32 data (|mean| < 4e38, M2 < count * 5e77) it stays far below float64's
        # 1.8e308, so it cannot overflow by itself; one NumPy call, not four
        if math.isfinite(mean @ m2):
            return mean, m2
        # NaN / Inf in the data, or float32 squares that overflow: the float64 sums decide
    return (exact(dtype, True) if at else exact(dtype))(x)


def moments_masked(x: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Per-channel float64 ``(count, mean, M2)`` of x ``(N, C, S)`` or ``(M, C)`` over the
    positions where the boolean ``mask`` (``(N, S)`` or ``(M,)``) is True; float64 sums."""
    kernel = (moments_masked_mc if _channels_last(x) else moments_masked_ncs)(x.dtype)
    # the mask as 0 / 1 in the data's dtype (1/C of the data's size): a multiply, not a branch
    count, mean, m2 = kernel(x, mask.astype(x.dtype))
    return float(count), mean, m2


def train_forward(x, weight, bias, eps, act, negative_slope, alpha, y):
    """Normalise x with its batch statistics, affine, activation, into y; return (mean, var).

    ``mean`` and the biased ``var`` are float64 arrays of shape (C,). ``weight`` / ``bias`` are
    (C,) arrays or None; ``act`` an activation's kernel code
    (``batchnorm.activations.REGISTRY[name].code``). x must be non-empty.
    """
    mean, var, _ = train_step(x, weight, bias, eps, act, negative_slope, alpha, y)
    return mean, var


def train_step(x, weight, bias, eps, act, negative_slope, alpha, y, running_mean=None,
               running_var=None, factor=0.0, check=False):
    """:func:`train_forward`, then the running update of :func:`running_update` (buffers of x's
    dtype) in the same compiled call as the normalisation; returns ``(mean, var, ok)`` (ok True
    without buffers)."""
    mean, m2 = moments(x)
    n = _count(x)
    var = m2 / n
    ok = _normalize(x, y, mean, var, weight, bias, eps, act, negative_slope, alpha,
                    running_mean, running_var, factor, n, check)
    return mean, var, ok


def train_step_at(kind, dtype, x_at, y_at, n, c, s, weight_at, bias_at, running_mean_at,
                  running_var_at, eps, act, negative_slope, alpha, factor, check):
    """:func:`train_step` on memory given by addresses, as :func:`eval_forward_at` takes it
    (``running_mean_at`` / ``running_var_at`` 0 without buffers): two compiled calls, the
    statistics and the normalising one, and no array views. The same kernel code as
    :func:`train_step`, so the same bits; returns ``(mean, var, ok)``."""
    if kind == "mc":
        x, count = (x_at, n, c), n
    else:
        x, count = (x_at, n, c, s), n * s
    mean, m2 = _moments(x, kind, dtype, c, s, at=True)
    var = m2 / count
    k, eps = _consts(dtype, float(negative_slope), float(alpha)), float(eps)
    update = (running_mean_at, running_var_at, float(factor), float(count), bool(check))
    if kind == "mc":
        return mean, var, normalize_mc(act, dtype, "train")(x, y_at, mean, var, weight_at,
                                                            bias_at, eps, k, *update)
    return mean, var, normalize_ncs(act, dtype, "train")(x, y_at, mean, var, weight_at, bias_at,
                                                         eps, k, _plane_splits(n, c, s), *update)


def eval_forward(x, weight, bias, mean, var, eps, act, negative_slope, alpha, y):
    """y = act(weight * (x - mean) / sqrt(var + eps) + bias) with given statistics."""
    _normalize(x, y, np.asarray(mean, np.float64), np.asarray(var, np.float64), weight, bias,
               eps, act, negative_slope, alpha)


def eval_forward_at(kind, dtype, x_at, y_at, n, c, s, weight_at, bias_at, mean_at, var_at, eps,
                    act, negative_slope, alpha):
    """:func:`eval_forward` on memory given by addresses (a tensor's ``data_ptr()``), one
    compiled call and no array views (:mod:`.memory`): ``kind`` "ncs" for (N, C, S) contiguous
    x / y, "mc" for (M, C) channels-last rows (``n`` = M, ``s`` unused); the per-channel
    tensors (C,) contiguous in ``dtype`` (NumPy's), ``weight_at`` / ``bias_at`` 0 when absent.
    The same kernel code as :func:`eval_forward`, so the same bits."""
    k, eps = _consts(dtype, float(negative_slope), float(alpha)), float(eps)
    if kind == "mc":
        return normalize_mc(act, dtype, True)((x_at, n, c), y_at, mean_at, var_at, weight_at,
                                              bias_at, eps, k, 0, 0, 0.0, 1.0, False)
    return normalize_ncs(act, dtype, True)((x_at, n, c, s), y_at, mean_at, var_at, weight_at,
                                           bias_at, eps, k, _plane_splits(n, c, s), 0, 0, 0.0,
                                           1.0, False)


def train_backward(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, inplace, dx,
                   mask=None, count=None):
    """Write dL/dx into dx for the training forward; return float64 (dweight, dbias).

    ``src`` is the forward's input x, or its output y when ``inplace`` (then x_hat is recovered
    as ``(act^-1(y) - bias) / weight``, with ``|weight| < eps`` replaced by ``sign * eps``).
    ``mean`` / ``var`` are the float64 batch statistics :func:`train_forward` returned, or those
    of :func:`moments_masked` over ``count`` values where ``mask`` counts (the sums then still
    run over every position, and only the counted ones get the statistics' part of dx).
    """
    sum_g, sum_ge = train_backward_sums(dy, src, weight, bias, mean, var, eps, act,
                                        negative_slope, alpha, inplace)
    m = _count(src) if mask is None else count
    return train_backward_dx(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha,
                             inplace, sum_g, sum_ge, m, dx, mask)


def train_backward_at(kind, dtype, dy_at, src_at, dx_at, n, c, s, weight_at, bias_at, mean, var,
                      eps, act, negative_slope, alpha, inplace):
    """:func:`train_backward` on memory given by addresses, as :func:`train_step_at` takes it
    (dy, src and dx dense in one layout; ``mean`` / ``var`` the float64 arrays of the forward):
    its two compiled passes and no array views, the same kernel code, so the same bits."""
    k, eps = _consts(dtype, float(negative_slope), float(alpha)), float(eps)
    act, inplace = int(act), bool(inplace)
    if kind == "mc":
        src, m = (src_at, n, c), float(n)
        sum_g, sum_ge = reduce_mc(act, inplace, dtype, True)(dy_at, src, mean, var, weight_at,
                                                             bias_at, eps, k)
        sum_gxhat = write_dx_mc(act, inplace, dtype, True)(dy_at, src, dx_at, mean, var,
                                                           weight_at, bias_at, eps, sum_g,
                                                           sum_ge, m, k)
        return sum_gxhat, sum_g
    src, m, splits = (src_at, n, c, s), float(n * s), _plane_splits(n, c, s)
    sum_g, sum_ge = reduce_ncs(act, inplace, dtype, True)(
        dy_at, src, mean, var, weight_at, bias_at, eps, k, dtype == np.float32 and s >= BLOCK,
        splits)
    sum_gxhat = write_dx_ncs(act, inplace, dtype, True)(dy_at, src, dx_at, mean, var, weight_at,
                                                        bias_at, eps, sum_g, sum_ge, m, k, splits)
    return sum_gxhat, sum_g


def train_backward_sums(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha,
                        inplace):
    """The training backward's reduction pass: float64 per-channel ``(sum g, sum g * e)``, e the
    centred value (``x - mean``, or ``gamma * x_hat`` when ``inplace``; see :mod:`.backward`).
    SyncBatchNorm adds these up over ranks before :func:`train_backward_dx`."""
    args = _pass_args(src, weight, bias, mean, var, eps, negative_slope, alpha)
    act, inplace = int(act), bool(inplace)
    if _channels_last(src):
        return reduce_mc(act, inplace, src.dtype)(dy, src, *args)
    return reduce_ncs(act, inplace, src.dtype)(dy, src, *args, _blocked_planes(src, BLOCK),
                                               _splits(src))


def train_backward_dx(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, inplace,
                      sum_g, sum_ge, m, dx, mask=None):
    """The training backward's writing pass: dx from the sums of :func:`train_backward_sums`
    over ``m`` values per channel (this batch's, or every rank's; with ``mask``, the counted
    ones); returns float64 ``(sum g * x_hat, sum g)``: dweight and dbias of the sums given."""
    mean, var, weight, bias, eps, k = _pass_args(src, weight, bias, mean, var, eps,
                                                 negative_slope, alpha)
    act, inplace, dtype = int(act), bool(inplace), src.dtype
    sums = (mean, var, weight, bias, eps, sum_g, sum_ge, float(m), k)
    if mask is None:
        if _channels_last(src):
            sum_gxhat = write_dx_mc(act, inplace, dtype)(dy, src, dx, *sums)
        else:
            sum_gxhat = write_dx_ncs(act, inplace, dtype)(dy, src, dx, *sums, _splits(src))
    else:
        write_dx = (write_dx_masked_mc if _channels_last(src) else write_dx_masked_ncs)(
            act, inplace, dtype)
        sum_gxhat = write_dx(dy, src, dx, mask, *sums)
    return sum_gxhat, sum_g


def _pass_args(src, weight, bias, mean, var, eps, negative_slope, alpha):
    """What every pass but the statistics takes, the per-channel values made inside its call:
    float64 ``mean`` / ``var``, ``weight`` / ``bias`` (:data:`NO_PARAMETER` for None), ``eps``
    and the activation constants."""
    none = NO_PARAMETER[src.dtype]
    return (mean, var, none if weight is None else weight, none if bias is None else bias,
            float(eps), _consts(src.dtype, float(negative_slope), float(alpha)))


@functools.lru_cache(maxsize=64)
def _consts(dtype, negative_slope, alpha):
    """consts(...), made once per case (the kernels only read it)."""
    k = consts(dtype, negative_slope, alpha)
    k.flags.writeable = False
    return k


def eval_backward(dy, x, weight, bias, mean, var, eps, act, negative_slope, alpha, dx):
    """Write dL/dx = act'(z) * dy * weight / sqrt(var + eps) into dx; return (dweight, dbias)."""
    args = _pass_args(x, weight, bias, np.asarray(mean, np.float64), np.asarray(var, np.float64),
                      eps, negative_slope, alpha)
    if _channels_last(x):
        return eval_backward_mc(int(act), x.dtype)(dy, x, dx, *args)
    return eval_backward_ncs(int(act), x.dtype)(dy, x, dx, *args, _blocked_planes(x, BLOCK),
                                                _splits(x))


# ---------------------------------------------------------------------------------------------


def _normalize(x, y, mean, var, weight, bias, eps, act, negative_slope, alpha,
               running_mean=None, running_var=None, factor=0.0, n=1, check=False):
    """One normalising call (per-channel values inside it, the running update after it when
    the buffers are given); its ok."""
    args = _pass_args(x, weight, bias, mean, var, eps, negative_slope, alpha)
    none = NO_PARAMETER[x.dtype]
    update = (none if running_mean is None else running_mean,
              none if running_var is None else running_var, float(factor), float(n), bool(check))
    if _channels_last(x):
        return normalize_mc(int(act), x.dtype)(x, y, *args, *update)
    return normalize_ncs(int(act), x.dtype)(x, y, *args, _splits(x), *update)


def _channels_last(x: np.ndarray) -> bool:
    """(M, C) channels-last rows, not (N, C, S) planes."""
    return x.ndim == 2


def _blocked_planes(x: np.ndarray, least: int) -> bool:
    """Whether an (N, C, S) reduction sums in float32 blocks: float32 data, planes of at least
    ``least`` values. The statistics make two passes and need longer planes to gain
    (BLOCKED_PLANE_FROM); the backward sums gain from one full BLOCK on (shorter planes, such as
    14x14 and 7x7, are mostly loop tail and lose)."""
    return x.dtype == np.float32 and x.shape[2] >= least


def _splits(x: np.ndarray) -> int:
    """Tasks per sample of an (N, C, S) pass (``statistics.plane_task``): a plane each (C), or on
    planes shorter than SHORT_PLANE as few as give each thread about four tasks of whole
    samples' consecutive channels (a task per short plane costs more than its arithmetic)."""
    return _plane_splits(*x.shape)


def _plane_splits(n: int, c: int, s: int) -> int:
    """:func:`_splits` of an (N, C, S) shape."""
    if s >= SHORT_PLANE:
        return c
    threads = getattr(_THREADS, "n", None) or numba.get_num_threads()
    return max(1, min(c, -(-4 * threads // n)))


def _count(x: np.ndarray) -> int:
    """Values per channel."""
    return x.size // x.shape[1]


