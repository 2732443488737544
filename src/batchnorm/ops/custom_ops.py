"""The backends' implementations as PyTorch custom ops, and the eager route around them.

Four ops in the ``batchnorm`` namespace: two forwards (``bn_act_train``, ``bn_act_eval``), each
with its backward as an op of its own, tied together with ``register_autograd``. Fake
implementations give shapes and strides, so ``torch.compile`` and ``torch.export`` keep each op
as one node. The ops run the kernels :func:`.backends.kernels_taking` gives for their input: the
numba CPU backend (:mod:`.numba_cpu`) or the Triton GPU one (:mod:`.triton_gpu`), whose
implementations share signatures and results.

In plain eager mode the same implementations run without the op's dispatcher round trip
(:func:`train` / :func:`eval_`): directly when no gradient is recorded, through a
``torch.autograd.Function`` with the op's own autograd formula when one is. Same kernels, same
bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import expected
from . import numba_cpu, torch_fallback
from .backends import kernels_taking

__all__ = ["train", "eval_", "moments", "stats", "renorm_factors", "running_update",
           "plain_eager", "records_grad"]


# ---------------------------------------------------------------------------------------------
# the eager route: which calls need the op


def plain_eager(x: Tensor, *params: Tensor | None) -> bool:
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


def records_grad(*tensors: Tensor | None) -> bool:
    """True when autograd records a graph for an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# the implementations: the kernels of the input's backend (numba on CPU, Triton on CUDA)


def _kernels(x: Tensor):
    # the kernels that take x whatever backend is chosen: the front chose before calling an op
    return kernels_taking(x) or numba_cpu


def _train_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                act: str, negative_slope: float, alpha: float,
                inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(x).train_impl(x, weight, bias, eps, act, negative_slope, alpha, inplace)


def _train_backward_impl(dy: Tensor, src: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float, act: str,
                         negative_slope: float, alpha: float,
                         inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(src).train_backward_impl(dy, src, weight, bias, mean, var, eps, act,
                                             negative_slope, alpha, inplace)


def _eval_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
               running_var: Tensor, eps: float, act: str, negative_slope: float,
               alpha: float) -> Tensor:
    return _kernels(x).eval_impl(x, weight, bias, running_mean, running_var, eps, act,
                                 negative_slope, alpha)


def _eval_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        running_mean: Tensor, running_var: Tensor, eps: float, act: str,
                        negative_slope: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(x).eval_backward_impl(dy, x, weight, bias, running_mean, running_var, eps,
                                          act, negative_slope, alpha)


def train(x, weight, bias, eps, act, negative_slope, alpha, inplace):
    """The training op, or its implementation when nothing needs the op: ``(y, mean, var)``,
    statistics in float64."""
    args = (x, weight, bias, eps, act, negative_slope, alpha, inplace)
    if not plain_eager(x, weight, bias):
        return torch.ops.batchnorm.bn_act_train(*args)
    if records_grad(x, weight, bias):
        return _EagerTrain.apply(*args)
    return _train_impl(*args)


def eval_(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    """The eval op, or its implementation when nothing needs the op (the statistics detached)."""
    args = (x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha)
    if not plain_eager(x, weight, bias, running_mean, running_var):
        return torch.ops.batchnorm.bn_act_eval(*args)
    if records_grad(x, weight, bias):
        return _EagerEval.apply(*args)
    return _eval_impl(*args)


def _first_order(impl, op):
    """The backward op's implementation in a plain backward; the op itself under
    ``create_graph=True`` (grad mode on inside backward), so that its own autograd formula
    (:func:`_derivative_of_backward`) records the graph a second derivative needs."""
    return op if torch.is_grad_enabled() else impl


# ---------------------------------------------------------------------------------------------
# double backward: the backward ops' own derivative
#
# The kernels give the first-order gradients (the same bits with or without create_graph). Their
# derivative, for gradient penalties, Hessian-vector products or MAML-style meta-learning with
# BN, is PyTorch's: the forward recomputed with PyTorch's own differentiable ops
# (torch_fallback) at the saved inputs, its gradients taken with create_graph=True, and those
# differentiated once more. It costs a forward and two backward passes of PyTorch's BN.


def _derivative_of_backward(forward, dy, x, weight, bias, grads):
    """Gradients of sum(grads * backward(dy, x, weight, bias)) with respect to
    (dy, x, weight, bias), where backward gives (dx, dweight, dbias) of ``forward(x, w, b)``."""
    with torch.enable_grad():
        dy_ = dy.detach().requires_grad_()
        leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
        present = [t for t in leaves if t is not None]
        firsts = torch.autograd.grad(forward(*leaves), present, dy_, create_graph=True)
        incoming = [g for t, g in zip(leaves, grads) if t is not None]
        pairs = [(f, g) for f, g in zip(firsts, incoming) if g is not None]
        if not pairs:
            return None, None, None, None
        seconds = torch.autograd.grad([f for f, _ in pairs], [dy_, *present],
                                      [g for _, g in pairs], allow_unused=True)
    it = iter(seconds[1:])
    return (seconds[0], *(None if t is None else next(it) for t in leaves))


def _save_backward_inputs(ctx, inputs, output):
    dy, src, weight, bias, stat_a, stat_b, *params = inputs
    ctx.save_for_backward(dy, src, weight, bias, stat_a, stat_b)
    ctx.params = tuple(params)


def _train_backward_derivative(ctx, gdx, gdw, gdb):
    dy, x, weight, bias, _mean, _var = ctx.saved_tensors
    eps, act, negative_slope, alpha, inplace = ctx.params
    if inplace:
        raise expected("inplace=False to differentiate the gradients again (double backward)",
                       "inplace=True: the backward keeps the output, not the input")
    # the batch statistics are recomputed from x: they are functions of x, not constants
    d = _derivative_of_backward(
        lambda x, w, b: torch_fallback.train(x, w, b, eps, act, negative_slope, alpha, False)[0],
        dy, x, weight, bias, (gdx, gdw, gdb))
    return (*d, None, None, None, None, None, None, None)


def _eval_backward_derivative(ctx, gdx, gdw, gdb):
    dy, x, weight, bias, running_mean, running_var = ctx.saved_tensors
    eps, act, negative_slope, alpha = ctx.params
    d = _derivative_of_backward(
        lambda x, w, b: torch_fallback.eval_(x, w, b, running_mean, running_var, eps, act,
                                             negative_slope, alpha),
        dy, x, weight, bias, (gdx, gdw, gdb))
    return (*d, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# training: forward op, backward op, autograd

_train_op = torch.library.custom_op(
    "batchnorm::bn_act_train", _train_impl, mutates_args=())


@_train_op.register_fake
def _(x, weight, bias, eps, act, negative_slope, alpha, inplace):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=torch.float64), x.new_empty(
        c, dtype=torch.float64)


_train_backward_op = torch.library.custom_op(
    "batchnorm::bn_act_train_backward", _train_backward_impl, mutates_args=())


@_train_backward_op.register_fake
def _(dy, src, weight, bias, mean, var, eps, act, negative_slope, alpha, inplace):
    return _grads_like(src, weight)


def _grads_like(src: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
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
_train_backward_op.register_autograd(_train_backward_derivative,
                                     setup_context=_save_backward_inputs)


class _EagerTrain(torch.autograd.Function):
    """bn_act_train's op and autograd formula without the dispatcher, for plain eager calls.

    The same forward, setup_context (inplace saves y, not x) and backward as the op; under
    ``create_graph=True`` the backward op, whose own derivative gives double backward.
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
        return _train_grads(ctx, dy, _first_order(_train_backward_impl,
                                                  torch.ops.batchnorm.bn_act_train_backward))


# ---------------------------------------------------------------------------------------------
# evaluation: forward op, backward op, autograd

_eval_op = torch.library.custom_op("batchnorm::bn_act_eval", _eval_impl, mutates_args=())


@_eval_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    return torch.empty_like(x)


_eval_backward_op = torch.library.custom_op(
    "batchnorm::bn_act_eval_backward", _eval_backward_impl, mutates_args=())


@_eval_backward_op.register_fake
def _(dy, x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    return _grads_like(x, weight)


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
_eval_backward_op.register_autograd(_eval_backward_derivative,
                                    setup_context=_save_backward_inputs)


class _EagerEval(torch.autograd.Function):
    """bn_act_eval's op and autograd formula without the dispatcher, for plain eager calls."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _eval_impl(*inputs)
        _eval_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy):
        return _eval_grads(ctx, dy, _first_order(_eval_backward_impl,
                                                 torch.ops.batchnorm.bn_act_eval_backward))


# ---------------------------------------------------------------------------------------------
# statistics alone, and normalising with given batch statistics (masks, ghost batches, Batch
# Renorm): the forward is the eval kernel, the backward the (masked) training formula


def _moments_impl(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _kernels(x)
    if mask is None:
        n, mean, m2 = kernels.moments_impl(x)
    else:
        n, mean, m2 = kernels.masked_moments_impl(x, mask)
    return mean, m2, torch.tensor(float(n), dtype=torch.float64, device=x.device)


_moments_op = torch.library.custom_op("batchnorm::moments", _moments_impl, mutates_args=())


@_moments_op.register_fake
def _(x, mask):
    c = x.shape[1]
    return (x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64),
            x.new_empty((), dtype=torch.float64))


def moments(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The statistics op, or its implementation when nothing needs the op: float64
    ``(mean, M2, count)`` (count a 0-d tensor), never differentiable."""
    if not plain_eager(x, mask):
        return torch.ops.batchnorm.moments(x.detach(), mask)  # never differentiable
    return _moments_impl(x.detach(), mask)


def _stats_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                var: Tensor, mask: Optional[Tensor], count: Tensor, eps: float, act: str,
                negative_slope: float, alpha: float) -> Tensor:
    return _eval_impl(x, weight, bias, mean, var, eps, act, negative_slope, alpha)


def _stats_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, var: Tensor,
                         mask: Optional[Tensor], count: Tensor, eps: float, act: str,
                         negative_slope: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(x).stats_backward_impl(dy, x, weight, bias, mean, var, mask, float(count),
                                           eps, act, negative_slope, alpha)


_stats_op = torch.library.custom_op("batchnorm::bn_act_stats", _stats_impl, mutates_args=())


@_stats_op.register_fake
def _(x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha):
    return torch.empty_like(x)


_stats_backward_op = torch.library.custom_op(
    "batchnorm::bn_act_stats_backward", _stats_backward_impl, mutates_args=())


@_stats_backward_op.register_fake
def _(dy, x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha):
    return _grads_like(x, weight)


def _stats_setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, mask, count)
    ctx.params = (eps, act, negative_slope, alpha)


def _stats_grads(ctx, dy: Tensor, backward) -> tuple:
    x, weight, bias, mean, var, mask, count = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, weight, bias, mean, var, mask, count, *ctx.params)
    return (dx, None if weight is None else dweight, None if bias is None else dbias,
            None, None, None, None, None, None, None, None)


def _stats_backward(ctx, dy):
    return _stats_grads(ctx, dy, torch.ops.batchnorm.bn_act_stats_backward)


def _save_stats_backward_inputs(ctx, inputs, output):
    dy, x, weight, bias, mean, var, mask, count, *params = inputs
    ctx.save_for_backward(dy, x, weight, bias, mean, mask)
    ctx.params = tuple(params)


def _stats_backward_derivative(ctx, gdx, gdw, gdb):
    dy, x, weight, bias, mean, mask = ctx.saved_tensors
    eps, act, negative_slope, alpha = ctx.params
    # the statistics are functions of x: PyTorch's ops recompute them differentiably
    d = _derivative_of_backward(
        lambda x, w, b: torch_fallback.train_stats(x, w, b, mean, eps, act, negative_slope,
                                                   alpha, mask),
        dy, x, weight, bias, (gdx, gdw, gdb))
    return (*d, None, None, None, None, None, None, None, None)


_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)
_stats_backward_op.register_autograd(_stats_backward_derivative,
                                     setup_context=_save_stats_backward_inputs)


class _EagerStats(torch.autograd.Function):
    """bn_act_stats's op and autograd formula without the dispatcher, for plain eager calls."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _stats_impl(*inputs)
        _stats_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy):
        return _stats_grads(ctx, dy, _first_order(_stats_backward_impl,
                                                  torch.ops.batchnorm.bn_act_stats_backward))


def stats(x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha):
    """The given-statistics op, or its implementation when nothing needs the op."""
    args = (x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha)
    if not plain_eager(x, weight, bias, mean, var, mask, count):
        return torch.ops.batchnorm.bn_act_stats(*args)
    if records_grad(x, weight, bias):
        return _EagerStats.apply(*args)
    return _stats_impl(*args)


# ---------------------------------------------------------------------------------------------
# Batch Renorm's r and d as an op of their own: under torch.compile, AOTAutograd's partitioner
# would otherwise recompute them in the backward from the running buffers, which the forward's
# update has moved by then (measured: weight gradients off by 1% in the channels whose r or d
# changed). An op's outputs are saved, not recomputed. The clips are tensors of one element, not
# floats: a layer's schedule changes them every step, and a float argument would be a constant of
# the compiled graph (one recompile per value).


def _renorm_factors_impl(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                         eps: float, rmax: Tensor, dmax: Tensor) -> tuple[Tensor, Tensor]:
    sigma = torch.sqrt(running_var.to(torch.float64) + eps)
    rmax, dmax = rmax.to(torch.float64), dmax.to(torch.float64)
    r = (torch.sqrt(var.to(torch.float64) + eps) / sigma).clamp(rmax.reciprocal(), rmax)
    d = ((mean.to(torch.float64) - running_mean.to(torch.float64)) / sigma).clamp(-dmax, dmax)
    return r, d


_renorm_op = torch.library.custom_op("batchnorm::renorm_factors", _renorm_factors_impl,
                                     mutates_args=())


@_renorm_op.register_fake
def _(mean, var, running_mean, running_var, eps, rmax, dmax):
    return torch.empty_like(mean, dtype=torch.float64), torch.empty_like(mean,
                                                                         dtype=torch.float64)


def renorm_factors(mean, var, running_mean, running_var, eps, rmax, dmax):
    """Batch Renorm's float64 ``(r, d)``: ``r = clip(sqrt(var + eps) / sigma, 1/rmax, rmax)``,
    ``d = clip((mean - running_mean) / sigma, -dmax, dmax)``, ``sigma = sqrt(running_var +
    eps)``; the op under a compiler, its implementation otherwise. ``rmax``, ``dmax``: numbers
    or one-element tensors (a layer's, which a compiled graph takes as inputs). Never
    differentiable."""
    rmax, dmax = (v.detach().to(mean.device) if isinstance(v, Tensor) else
                  torch.tensor(float(v), dtype=torch.float64, device=mean.device)
                  for v in (rmax, dmax))
    args = (mean.detach(), var.detach(), running_mean.detach(), running_var.detach(), float(eps),
            rmax, dmax)
    if torch.compiler.is_compiling():
        return torch.ops.batchnorm.renorm_factors(*args)
    return _renorm_factors_impl(*args)


# ---------------------------------------------------------------------------------------------
# the running update as an op of its own (mutating the buffers, which the compiler sees): under
# torch.compile a layer's training step is the training op, then this one, and computes the same
# bits as the eager step, whose backend call updates the buffers itself with the same kernel


def _running_update_impl(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                         factor: float, factor_tensor: Optional[Tensor], n: int,
                         check: bool) -> Tensor:
    f = factor if factor_tensor is None else factor_tensor
    if numba_cpu.takes(running_mean, running_var) and mean.device.type == "cpu":
        ok = numba_cpu.running_update_impl(mean, var, running_mean, running_var, float(f), n,
                                           check)
        return torch.tensor(ok)
    ok = torch_fallback.running_update(mean, var, running_mean, running_var, f, n, check)
    return ok if isinstance(ok, Tensor) else torch.ones((), dtype=torch.bool,
                                                        device=mean.device)


_running_update_op = torch.library.custom_op(
    "batchnorm::running_update", _running_update_impl,
    mutates_args=("running_mean", "running_var"))


@_running_update_op.register_fake
def _(mean, var, running_mean, running_var, factor, factor_tensor, n, check):
    return mean.new_empty((), dtype=torch.bool)


def running_update(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                   factor: float | Tensor, n: int, check: bool) -> Tensor | bool:
    """The guarded running update in place (see :func:`.numba_cpu.running_update_impl`): the op
    when something needs it, else its implementation; True / False in eager on CPU, a 0-d
    bool tensor otherwise (True when the buffers were updated)."""
    tensor = factor if isinstance(factor, Tensor) else None
    number = 0.0 if tensor is not None else float(factor)
    if not plain_eager(mean, running_mean, running_var):
        return torch.ops.batchnorm.running_update(mean, var, running_mean, running_var, number,
                                                  tensor, n, check)
    if numba_cpu.takes(running_mean, running_var) and mean.device.type == "cpu":
        return numba_cpu.running_update_impl(mean, var, running_mean, running_var,
                                             float(factor), n, check)
    return torch_fallback.running_update(mean, var, running_mean, running_var, factor, n, check)
