"""Batch norm + activation as PyTorch functions: fused numba kernels on CPU, PyTorch's own path elsewhere.

Two entry points, used by the layers in ``layers.py``:

- :func:`bn_act_train` normalises with the batch statistics (gradients flow through them) and
  returns them, so the caller can update its running buffers. It never touches buffers itself.
- :func:`bn_act_eval` normalises with given statistics (constants for autograd).

Both apply an optional affine transform and then an activation (``ACTIVATIONS``).

Which path runs:

- CPU, float32 or float64, memory dense as ``(N, C, *)`` contiguous or channels-last
  (``torch.channels_last`` / ``channels_last_3d``, or ``(N, L, C)`` storage for 3D input): the
  fused numba kernels in :mod:`batchnorm.kernels`, registered as custom ops in the ``batchnorm``
  namespace so that autograd, ``torch.compile`` and ``torch.export`` see a single op. In plain
  eager mode the same implementations run without the op's dispatcher round trip: directly when
  no gradient is recorded, through a ``torch.autograd.Function`` with the op's own autograd
  formula when one is (same kernels, same bits; see ``_plain_eager``).
- Anything else (CUDA or other devices, bfloat16 / float16, non-contiguous strides): PyTorch's own
  path, ``F.batch_norm`` followed by the activation from ``torch.nn.functional``.

The output always has the memory format of the input.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels, output_cache
from .errors import check_eps, expected

__all__ = ["ACTIVATIONS", "INVERTIBLE", "bn_act_train", "bn_act_eval", "check_act"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu")
INVERTIBLE = ("identity", "leaky_relu", "elu")


# ---------------------------------------------------------------------------------------------
# Public functions


def bn_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Batch-normalise ``x`` with its own statistics, apply the affine map, then the activation.

    .. math::
        \mu_c = \frac{1}{m}\sum x_c, \quad \sigma^2_c = \frac{1}{m}\sum (x_c - \mu_c)^2, \quad
        y = \mathrm{act}\Big(\gamma_c \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c\Big)

    over every axis but the channel axis 1 (m values per channel). The variance is the *biased*
    one, the one used to normalise; the caller turns it into the unbiased ``var * m / (m - 1)``
    for its running buffer. Running statistics are never read or written here.

    Autograd: gradients to ``x``, ``weight`` and ``bias`` flow through the batch statistics (the
    training formula). ``mean`` and ``var`` are returned detached. On the kernel path the
    backward is itself an op without a derivative: first-order gradients only (a backward with
    ``create_graph=True`` works, differentiating its gradients again raises RuntimeError).

    Paths: on CPU with float32/float64 input that is contiguous or channels-last, the fused numba
    kernels run (one pass for the statistics, one for normalise + affine + activation; backward
    one reduction pass and one pass writing ``dx``). Other devices (CUDA...), dtypes (bfloat16,
    float16) and strides take PyTorch's own path (``F.batch_norm`` then the activation).

    Args:
        x: input of shape ``(N, C, *)``, rank 2 to 5, floating point.
        weight: gamma, shape ``(C,)``, or None (no scaling).
        bias: beta, shape ``(C,)``, or None (no shift).
        eps: added to the variance before the square root; must be > 0.
        act: one of ``ACTIVATIONS``: "identity", "relu", "leaky_relu", "elu", "silu".
            Default: "identity"
        negative_slope: slope of "leaky_relu" for negative inputs. Default: 0.01
        alpha: the "elu" scale, ``alpha * (exp(z) - 1)`` for z <= 0. Default: 1.0
        inplace: save only the output ``y`` for backward and recover the normalised input from it,
            ``x_hat = (act^-1(y) - beta) / gamma`` (the InPlace-ABN method), instead of saving
            ``x``. Needs an invertible activation (``INVERTIBLE``: identity, leaky_relu with
            ``negative_slope > 0``, elu with ``alpha > 0``). ``x`` itself is not overwritten: the
            memory saved is the input the backward no longer keeps alive. Where
            ``|gamma| < eps`` the division uses ``sign(gamma) * eps`` instead, so the recovered
            ``x_hat`` (and ``dweight``) are inexact for such near-zero scales; an ELU output that
            saturated at ``-alpha`` in the input's precision recovers a clamped pre-activation.
            Default: False

    Returns:
        ``(y, mean, var)``: ``y`` of the shape, dtype and memory format of ``x``; ``mean`` and the
        biased ``var`` of shape ``(C,)`` in the dtype of ``x`` (float32 for float16 / bfloat16
        input: computed in float32, as PyTorch's own batch norm does), detached. For an empty batch
        (``N * prod(spatial) == 0``) ``y`` is empty, ``mean`` is 0 and ``var`` is NaN (the
        variance of nothing is undefined; :func:`batchnorm.reference.variance` says the same).

    Raises:
        BatchNormError: bad rank, dtype, parameter shape, eps, activation, or ``inplace`` with an
            activation that cannot be inverted.

    Shape:
        - x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``
        - y: same as x; mean, var: ``(C,)``

    >>> x = torch.randn(8, 3, 4, 4)
    >>> y, mean, var = bn_act_train(x, torch.ones(3), torch.zeros(3), 1e-5, act="relu")
    >>> y.shape, mean.shape, bool((y >= 0).all())
    (torch.Size([8, 3, 4, 4]), torch.Size([3]), True)
    """
    eps = check_eps(eps, training=True)
    c = _check_input(x)
    _check_param("weight", weight, x, c)
    _check_param("bias", bias, x, c)
    negative_slope, alpha = check_act(act, negative_slope, alpha, inplace)
    if _kernels_take(x, weight, bias):
        args = (x, weight, bias, eps, act, negative_slope, alpha, inplace)
        if not _plain_eager(x, weight, bias):
            y, mean, var = torch.ops.batchnorm.bn_act_train(*args)
        elif _records_grad(x, weight, bias):
            y, mean, var = _EagerTrain.apply(*args)
        else:
            y, mean, var = _train_impl(*args)
        # the op returns float64 statistics; the contract is the input's dtype, detached
        return y, mean.detach().to(x.dtype), var.detach().to(x.dtype)
    if inplace:
        return _PlainInplaceTrain.apply(x, weight, bias, eps, act, negative_slope, alpha)
    return _plain_train(x, weight, bias, eps, act, negative_slope, alpha)


def bn_act_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Tensor:
    r"""Normalise ``x`` with given statistics, apply the affine map, then the activation.

    .. math::
        y = \mathrm{act}\Big(\gamma_c \frac{x - \mathrm{mean}_c}{\sqrt{\mathrm{var}_c + \epsilon}}
        + \beta_c\Big)

    ``running_mean`` / ``running_var`` are constants for autograd (no gradient flows into them);
    gradients flow to ``x``, ``weight`` and ``bias``: ``dx = act'(z) * dy * gamma / sigma``.

    Paths: on CPU with float32/float64 input that is contiguous or channels-last, one fused
    numba pass (per-channel scale and shift precomputed); other devices, dtypes and strides take
    PyTorch's own path (``F.batch_norm`` then the activation).

    Args:
        x: input of shape ``(N, C, *)``, rank 2 to 5, floating point.
        weight: gamma, shape ``(C,)``, or None.
        bias: beta, shape ``(C,)``, or None.
        running_mean: the mean to subtract, shape ``(C,)``.
        running_var: the variance to divide by (after adding eps), shape ``(C,)``.
        eps: added to the variance; must be >= 0.
        act: one of ``ACTIVATIONS``. Default: "identity"
        negative_slope: slope of "leaky_relu" for negative inputs. Default: 0.01
        alpha: the "elu" scale. Default: 1.0

    Returns:
        ``y`` with the shape, dtype and memory format of ``x``.

    Shape:
        - x, y: ``(N, C, *)``; weight, bias, running_mean, running_var: ``(C,)``

    >>> x = torch.randn(2, 3, 4)
    >>> y = bn_act_eval(x, None, None, torch.zeros(3), torch.ones(3), 0.0)
    >>> torch.equal(y, x)
    True
    """
    eps = check_eps(eps, training=False)
    c = _check_input(x)
    _check_param("weight", weight, x, c)
    _check_param("bias", bias, x, c)
    _check_param("running_mean", running_mean, x, c, required=True)
    _check_param("running_var", running_var, x, c, required=True)
    negative_slope, alpha = check_act(act, negative_slope, alpha, inplace=False)
    if _kernels_take(x, weight, bias, running_mean, running_var):
        args = (x, weight, bias, running_mean.detach(), running_var.detach(), eps, act,
                negative_slope, alpha)
        if not _plain_eager(x, weight, bias, running_mean, running_var):
            return torch.ops.batchnorm.bn_act_eval(*args)
        if _records_grad(x, weight, bias):
            return _EagerEval.apply(*args)
        return _eval_impl(*args)
    return _plain_eval(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha)


# ---------------------------------------------------------------------------------------------
# The custom ops over the numba kernels
#
# Four ops in the "batchnorm" namespace: two forwards, each with its backward as an op of its
# own, tied together with register_autograd. Fake implementations give shapes and strides, so
# torch.compile and torch.export keep each op as one node. Statistics leave the training op in
# float64: the backward recomputes x - mean from them, and a float32 mean would cost float32 data
# far from zero (mean 1e4, std 1e-2) most of its precision.

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _plain_eager(x: Tensor, *params: Tensor | None) -> bool:
    """True when nothing needs the custom op: eager, plain tensors, no mode or transform active.

    The op's dispatcher round trip costs about 0.1 ms a call forward and again backward (as much
    as the whole kernel on a (8, 512, 14, 14) input), and buys nothing without a compiler, a
    tracer, a tensor subclass or a mode that wants to see the op; then the op's implementation is
    called directly (under autograd through ``_EagerTrain`` / ``_EagerEval``, which carry the
    op's own autograd formula). Same kernels, same bits. Anything else (torch.compile,
    torch.export, jit or fx tracing, FakeTensor, subclasses, torch function or dispatch modes,
    functorch transforms) gets the op, which they know how to trace.
    """
    # is_compiling first: under dynamo the other checks are never traced
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not Tensor:
        return False
    if any(t is not None and type(t) not in _PLAIN_TYPES for t in params):
        return False
    # modes: a dispatch mode (FakeTensorMode, export's proxy mode included) or a torch function
    # mode (torch.device as a context manager among them) must see the op
    return not (torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active())


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _records_grad(*tensors: Tensor | None) -> bool:
    """True when autograd records a graph for an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernels_take(x: Tensor, *per_channel: Tensor | None) -> bool:
    """True when the fused kernels handle x: CPU, float32/float64, contiguous or channels-last."""
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return False
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in per_channel):
        return False
    return _layout(x) is not None


def _layout(t: Tensor) -> str | None:
    """"ncs" for (N, C, S) contiguous memory, "mc" for channels-last (M, C), None otherwise."""
    if t.is_contiguous():
        return "mc" if math.prod(t.shape[2:]) == 1 else "ncs"
    if t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return "mc"
    return None


def _kernel_array(t: Tensor, layout: str) -> np.ndarray:
    """A NumPy view of t's memory as (N, C, S) or (M, C), sharing storage."""
    n, c = t.shape[0], t.shape[1]
    if layout == "ncs":
        return t.detach().numpy().reshape(n, c, -1)  # (N, C, S)
    return t.detach().permute(0, *range(2, t.dim()), 1).numpy().reshape(-1, c)  # (M, C)


def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _as_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t (same shape as like) copied into like's strides if they differ (e.g. an expanded dy)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


# Below this many elements one thread is faster: waking the others costs more than the work.
# Results do not depend on it (the kernels' chunks do not depend on the thread count).
_SERIAL_BELOW = 1 << 16


def _run(kernel, x: Tensor, outs: list[Tensor], inputs: list[Tensor], *args):
    """Call kernel(*inputs, *args, *outs) on kernel views; inputs/outs share x's layout."""
    kernels.set_threads(1 if x.numel() < _SERIAL_BELOW else torch.get_num_threads())
    layout = _layout(x)
    return kernel(*[_kernel_array(t, layout) for t in inputs], *args,
                  *[_kernel_array(t, layout) for t in outs])


# Outputs of at least this many bytes come from a fresh mmap (glibc's largest mmap threshold):
# every 4 KB page faults at its first write, and on the ResNet shapes those faults (and the
# kernel zeroing each page) took as long as the kernel itself. Asking for transparent huge pages
# on such an output (what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for its own allocations) makes
# that 512x fewer faults. Advice only: contents, strides and ownership do not change.
# Measured here (2 threads, fwd+bwd, 30 calls each): medians 30% lower at 51-103 MB, means
# lower in 5 of 6 cases, but a heavier tail (p90 up to 2x the plain one: some huge-page faults
# stall). Below 32 MB the blocks are reused heap memory that does not fault: no gain there,
# only the stalls, hence the threshold.
_HUGE_PAGES_FROM = 32 << 20
_PAGE_2M = 1 << 21
_MADV_HUGEPAGE = 14  # Linux


def _libc_madvise():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def _output_like(x: Tensor) -> Tensor:
    """torch.empty_like(x) (x dense), from the opt-in output cache when it is on
    (:mod:`batchnorm.output_cache`), else with huge pages asked for when it is large (see above)."""
    cached = output_cache.empty_like_cached(x, _advise_huge_pages)
    if cached is not None:
        return cached
    out = torch.empty_like(x)
    _advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask for transparent huge pages on the whole 2 MB pages of a block of 32 MB or more."""
    if _madvise is not None and nbytes >= _HUGE_PAGES_FROM:
        start = -(-address // _PAGE_2M) * _PAGE_2M  # whole 2 MB pages inside it
        end = (address + nbytes) // _PAGE_2M * _PAGE_2M
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a failure only loses the speed-up


def _dense(x: Tensor) -> Tensor:
    """x itself if the kernels can view it, else a contiguous copy (ops called with odd strides)."""
    return x if _layout(x) is not None else x.contiguous()


def _train_impl(
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
    x = _dense(x)
    y = _output_like(x)
    mean, var = _run(
        lambda xv, yv: kernels.train_forward(xv, _np(weight), _np(bias), eps, act,
                                             negative_slope, alpha, yv),
        x, [y], [x],
    )
    return y, torch.from_numpy(mean), torch.from_numpy(var)


_train_op = torch.library.custom_op("batchnorm::bn_act_train", _train_impl, mutates_args=())


@_train_op.register_fake
def _(x, weight, bias, eps, act, negative_slope, alpha, inplace):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=torch.float64), x.new_empty(
        c, dtype=torch.float64)


def _backward(dy: Tensor, src: Tensor, weight: Tensor | None, kernel) -> tuple[Tensor, Tensor, Tensor]:
    """What both backward ops share: ``kernel(dy, src, dx) -> (dweight, dbias)`` on kernel views
    of ``dy`` (in src's strides), ``src`` and a fresh ``dx``; an empty batch gives zeros."""
    c = src.shape[1]
    pdtype = src.dtype if weight is None else weight.dtype
    if src.numel() == 0:
        return torch.empty_like(src), src.new_zeros(c, dtype=pdtype), src.new_zeros(c, dtype=pdtype)
    src = _dense(src)
    dy = _as_layout_of(dy, src)
    dx = _output_like(src)
    dweight, dbias = _run(kernel, src, [dx], [dy, src])
    return dx, torch.from_numpy(dweight).to(pdtype), torch.from_numpy(dbias).to(pdtype)


def _train_backward_impl(
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
    return _backward(
        dy, src, weight,
        lambda dyv, sv, dxv: kernels.train_backward(
            dyv, sv, _np(weight), _np(bias), mean.numpy(), var.numpy(), eps, act,
            negative_slope, alpha, inplace, dxv),
    )


_train_backward_op = torch.library.custom_op(
    "batchnorm::bn_act_train_backward", _train_backward_impl, mutates_args=())


@_train_backward_op.register_fake
def _(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, inplace):
    c = src.shape[1]
    pdtype = src.dtype if weight is None else weight.dtype
    return torch.empty_like(src), src.new_empty(c, dtype=pdtype), src.new_empty(c, dtype=pdtype)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, eps, act, negative_slope, alpha, inplace = inputs
    y, mean, var = output
    # InPlace-ABN: keep the output (which the next layer keeps anyway), not the input
    ctx.save_for_backward(y if inplace else x, weight, bias, mean, var)
    ctx.params = (eps, act, negative_slope, alpha, inplace)
    ctx.mark_non_differentiable(mean, var)


def _train_grads(ctx, dy: Tensor, backward) -> tuple:
    """The gradients of the training forward's inputs, ``backward`` computing (dx, dw, db)."""
    src, weight, bias, mean, var = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, src, weight, bias, mean, var, *ctx.params)
    return (dx, None if weight is None else dweight, None if bias is None else dbias,
            None, None, None, None, None)


def _train_backward(ctx, dy, _dmean, _dvar):
    return _train_grads(ctx, dy, torch.ops.batchnorm.bn_act_train_backward)


_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)


class _EagerTrain(torch.autograd.Function):
    """bn_act_train's op and autograd formula without the dispatcher, for plain eager calls.

    The same forward, setup_context (inplace saves y, not x) and backward as the op; first-order
    only, like the op (see ``_first_order``).
    """

    # forward with ctx, not a separate setup_context: apply() would bind the arguments to
    # forward's signature with inspect on every call (measured 40 us a call here)
    @staticmethod
    def forward(ctx, *inputs):
        output = _train_impl(*inputs)
        _train_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _train_grads(
            ctx, dy, _first_order(_train_backward_impl, torch.ops.batchnorm.bn_act_train_backward))


def _first_order(impl, op):
    """The backward op's implementation in a plain backward; the op itself under
    ``create_graph=True`` (grad mode on inside backward).

    The op records an autograd node on its inputs that raises "no autograd formula was registered"
    when differentiated again: the error the op route gives. ``@once_differentiable`` would not
    do: its error node is not connected to the inputs, so ``torch.autograd.grad(dx.sum(), x)``
    reports "appears to not have been used in the graph" instead of the reason.
    """
    return op if torch.is_grad_enabled() else impl


def _eval_impl(
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
    x = _dense(x)
    y = _output_like(x)
    _run(
        lambda xv, yv: kernels.eval_forward(xv, _np(weight), _np(bias), _np(running_mean),
                                            _np(running_var), eps, act, negative_slope, alpha, yv),
        x, [y], [x],
    )
    return y


_eval_op = torch.library.custom_op("batchnorm::bn_act_eval", _eval_impl, mutates_args=())


@_eval_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    return torch.empty_like(x)


def _eval_backward_impl(
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
    return _backward(
        dy, x, weight,
        lambda dyv, xv, dxv: kernels.eval_backward(
            dyv, xv, _np(weight), _np(bias), _np(running_mean), _np(running_var), eps, act,
            negative_slope, alpha, dxv),
    )


_eval_backward_op = torch.library.custom_op(
    "batchnorm::bn_act_eval_backward", _eval_backward_impl, mutates_args=())


@_eval_backward_op.register_fake
def _(dy, x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    c = x.shape[1]
    pdtype = x.dtype if weight is None else weight.dtype
    return torch.empty_like(x), x.new_empty(c, dtype=pdtype), x.new_empty(c, dtype=pdtype)


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.params = (eps, act, negative_slope, alpha)


def _eval_grads(ctx, dy: Tensor, backward) -> tuple:
    """The gradients of the eval forward's inputs, ``backward`` computing (dx, dw, db)."""
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, weight, bias, running_mean, running_var, *ctx.params)
    # the statistics are constants in evaluation: no gradient flows into them
    return (dx, None if weight is None else dweight, None if bias is None else dbias,
            None, None, None, None, None, None)


def _eval_backward(ctx, dy):
    return _eval_grads(ctx, dy, torch.ops.batchnorm.bn_act_eval_backward)


_eval_op.register_autograd(_eval_backward, setup_context=_eval_setup_context)


class _EagerEval(torch.autograd.Function):
    """bn_act_eval's op and autograd formula without the dispatcher, for plain eager calls."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _eval_impl(*inputs)
        _eval_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy):
        return _eval_grads(
            ctx, dy, _first_order(_eval_backward_impl, torch.ops.batchnorm.bn_act_eval_backward))


# ---------------------------------------------------------------------------------------------
# PyTorch's own path


def _plain_train(x, weight, bias, eps, act, negative_slope, alpha):
    """F.batch_norm with batch statistics, then the activation; statistics computed beside it."""
    z = F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)
    y = _activate(z, act, negative_slope, alpha)
    mean, var = _plain_moments(x)
    return _same_format(y, x), mean, var


def _plain_eval(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    # F.batch_norm never writes running stats in eval; detach makes them constants for autograd
    z = F.batch_norm(
        x, running_mean.detach(), running_var.detach(), weight, bias, training=False, eps=eps
    )
    return _same_format(_activate(z, act, negative_slope, alpha), x)


@torch.no_grad()
def _plain_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *), detached: x's dtype, or float32
    for float16 / bfloat16 (the precision of the running buffers PyTorch keeps for them).

    An empty batch gives mean 0 and variance NaN.
    """
    c = x.shape[1]
    # half types: accumulate in float32, as F.batch_norm does
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.numel() == 0:
        return xs.new_zeros(c), xs.new_full((c,), math.nan)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    return mean, var


def _activate(z: Tensor, act: str, negative_slope: float, alpha: float) -> Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if act == "elu":
        return F.elu(z, alpha)
    if act == "silu":
        return F.silu(z)
    return z


class _PlainInplaceTrain(torch.autograd.Function):
    """InPlace-ABN in PyTorch ops: forward saves only y; backward recovers x_hat from it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, negative_slope, alpha):
        with torch.no_grad():
            mean, var = _plain_moments(x)
            z = F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=eps)
            y = _same_format(_activate(z, act, negative_slope, alpha), x)
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
        shape = (1, c) + (1,) * (y.dim() - 2)
        # work in float32 at least, as PyTorch's half-precision batch norm does
        wdtype = torch.promote_types(y.dtype, torch.float32)
        y, dy = y.to(wdtype), dy.to(wdtype)
        z, dz_dy = _invert(y, act, negative_slope, alpha)
        g = dy * dz_dy  # dL/dz
        gamma = y.new_ones(c) if weight is None else weight.detach().to(wdtype)
        beta = y.new_zeros(c) if bias is None else bias.detach().to(wdtype)
        x_hat = (z - beta.view(shape)) / _safe_gamma(gamma, eps).view(shape)
        dims = [0, *range(2, y.dim())]
        n = y.numel() // c if c else 0
        sum_g = g.sum(dims)
        sum_gx = (g * x_hat).sum(dims)
        scale = (gamma * invstd.to(wdtype)).view(shape)
        if n > 0:
            dx = scale * (g - (sum_g / n).view(shape) - x_hat * (sum_gx / n).view(shape))
        else:
            dx = g
        dx = _same_format(dx.to(y_saved.dtype), y_saved)
        dw = None if weight is None else sum_gx.to(weight.dtype)
        db = None if bias is None else sum_g.to(bias.dtype)
        return dx, dw, db, None, None, None, None


def _safe_gamma(gamma: Tensor, eps: float) -> Tensor:
    """gamma, moved away from 0 to sign(gamma) * eps where |gamma| < eps, so x_hat is recoverable."""
    sign = torch.where(gamma < 0, -1.0, 1.0).to(gamma.dtype)
    return torch.where(gamma.abs() < eps, sign * eps, gamma)


def _invert(y: Tensor, act: str, negative_slope: float, alpha: float) -> tuple[Tensor, Tensor]:
    """Pre-activation z = act^-1(y) and the derivative act'(z), both written in terms of y."""
    if act == "leaky_relu":
        neg = y < 0
        slope = y.new_full((), negative_slope)  # a bare float would be taken as float32
        return torch.where(neg, y / negative_slope, y), torch.where(neg, slope, 1.0)
    if act == "elu":
        neg = y <= 0
        # ELU saturates at -alpha: clamp so log1p stays finite (z >= log(tiny) instead of -inf)
        tiny = torch.finfo(y.dtype).eps
        u = torch.clamp(y / alpha, min=-1.0 + tiny)
        return torch.where(neg, torch.log1p(u), y), torch.where(neg, y + alpha, 1.0)
    return y, torch.ones_like(y)


# ---------------------------------------------------------------------------------------------
# Checks and small helpers


def _same_format(y: Tensor, like: Tensor) -> Tensor:
    """y with the strides of ``like`` when ``like`` is dense (channels-last in, channels-last out)."""
    if y.stride() == like.stride() or not _is_dense(like):
        return y
    perm = sorted(range(like.dim()), key=lambda d: (-like.stride(d), -d))
    inverse = [perm.index(d) for d in range(like.dim())]
    return y.permute(perm).contiguous().permute(inverse)


def _is_dense(x: Tensor) -> bool:
    """True when x occupies exactly x.numel() elements of storage in some axis order."""
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -d))
    return x.permute(perm).is_contiguous()


def _check_input(x: object) -> int:
    if not isinstance(x, Tensor):
        raise expected("x to be a torch.Tensor", type(x).__name__)
    if not 2 <= x.dim() <= 5:
        raise expected("2D to 5D input (N, C, *)", f"{x.dim()}D input")
    if not x.is_floating_point():
        raise expected("floating-point input", f"dtype {x.dtype}")
    return x.shape[1]


def _check_param(name: str, value: object, x: Tensor, c: int, required: bool = False) -> None:
    if value is None:
        if required:
            raise expected(f"{name} to be a tensor", "None")
        return
    if not isinstance(value, Tensor):
        raise expected(f"{name} to be a torch.Tensor or None", type(value).__name__)
    if value.shape != (c,):
        raise expected(f"{name} of shape ({c},) for {c} channels", f"shape {tuple(value.shape)}")
    if value.device != x.device:
        raise expected(f"{name} on {x.device}, the input's device", f"device {value.device}")


def check_act(act: object, negative_slope: object, alpha: object, inplace: bool):
    """The activation arguments of the ops and of BatchNormAct: ``(negative_slope, alpha)``
    as floats, or BatchNormError."""
    if act not in ACTIVATIONS:
        raise expected(f"act in {ACTIVATIONS}", repr(act))
    for name, value in (("negative_slope", negative_slope), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise expected(f"{name} to be a finite number", repr(value))
    if inplace:
        if act not in INVERTIBLE:
            raise expected(f"an invertible act {INVERTIBLE} with inplace=True", repr(act))
        if act == "leaky_relu" and negative_slope <= 0:
            raise expected("negative_slope > 0 with inplace=True", negative_slope)
        if act == "elu" and alpha <= 0:
            raise expected("alpha > 0 with inplace=True", alpha)
    return float(negative_slope), float(alpha)
