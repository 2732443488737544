"""The backends' implementations as PyTorch custom ops, and the eager route around them.

Nine ops in the ``batchnorm`` namespace. Three families, each a forward and its backward as an
op of its own, tied together with ``register_autograd`` by one helper (:func:`_family`):
``bn_act_train`` (batch statistics), ``bn_act_eval`` (given running statistics) and
``bn_act_stats`` (given batch statistics: masks, ghost batches, Batch Renorm), with
``*_backward``; the backward ops' own derivative (double backward) is :mod:`.double_backward`.
Three ops without gradients: ``moments`` (the statistics alone), ``renorm_factors`` (Batch
Renorm's r and d) and ``running_update`` (mutating the buffers). Fake implementations give
shapes and strides, so ``torch.compile`` and ``torch.export`` keep each op as one node. The
ops run the kernels :func:`.backends.kernels_taking` gives for their input: the numba CPU
backend (:mod:`.numba_cpu`) or the Triton GPU one (:mod:`.triton_gpu`), whose implementations
share signatures and results.

In plain eager mode the same implementations run without the op's dispatcher round trip
(:func:`train`, :func:`eval_`, :func:`stats`): directly when no gradient is recorded, through a
``torch.autograd.Function`` with the op's own autograd formula when one is. Same kernels, same
bits.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from . import double_backward, numba_cpu, torch_fallback
from .backends import kernels_taking
from .moments import Moments

__all__ = ["train", "eval_", "moments", "stats", "renorm_factors", "running_update",
           "plain_eager", "records_grad"]


# ---------------------------------------------------------------------------------------------
# the eager route: which calls need the op


def plain_eager(x: Tensor, *params: Tensor | None) -> bool:
    """True when nothing needs the custom op: eager, plain tensors, no mode or transform active.

    The op's dispatcher round trip costs as much as a small layer's whole kernel, forward and
    again backward (``benchmarks/bench_host.py``), and buys nothing without a compiler, a
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


# ---------------------------------------------------------------------------------------------
# the three families: a forward op, its backward op, their autograd, and the eager route


def _grads_like(src: Tensor, weight: Tensor | None, *_) -> tuple[Tensor, Tensor, Tensor]:
    """The backward ops' fake outputs: (dx, dweight, dbias) in the input's and parameters'
    dtypes (what every backward implementation returns)."""
    c = src.shape[1]
    pdtype = src.dtype if weight is None else weight.dtype
    return torch.empty_like(src), src.new_empty(c, dtype=pdtype), src.new_empty(c, dtype=pdtype)


def _family(name: str, impl, fake, save, backward_impl, recompute):
    """Define ``batchnorm::NAME`` and ``batchnorm::NAME_backward`` as custom ops tied together
    with ``register_autograd``, and return the ``torch.autograd.Function`` that carries the same
    formula for plain eager calls (no dispatcher round trip; same kernels, same bits).

    Every family has the same shape. The forward ``impl`` takes ``(x, weight, bias, ...)``
    (``fake`` gives its outputs' shapes); ``save(inputs, output)`` gives ``(tensors, params)``,
    the tensors starting ``(src, weight, bias)``; the backward op is
    ``backward_impl(dy, *tensors, *params) -> (dx, dweight, dbias)``, its fake
    :func:`_grads_like`; ``recompute(stats, params)`` gives the differentiable forward ``(x,
    weight, bias) -> y`` in PyTorch's ops whose derivative makes the double backward
    (:mod:`.double_backward`), ``stats`` the saved tensors after ``(src, weight, bias)``."""
    op = torch.library.custom_op(f"batchnorm::{name}", impl, mutates_args=())
    op.register_fake(fake)
    backward_op = torch.library.custom_op(f"batchnorm::{name}_backward", backward_impl,
                                          mutates_args=())
    backward_op.register_fake(_grads_like)
    n_inputs = len(inspect.signature(impl).parameters)
    backward_inputs = inspect.signature(backward_impl).parameters.values()
    n_backward_inputs = len(backward_inputs)
    # dy and the saved tensors come first, then the numbers and names (eps, act, ...)
    n_backward_tensors = sum("Tensor" in str(p.annotation) for p in backward_inputs)
    backward_overload = getattr(torch.ops.batchnorm, f"{name}_backward")

    def setup_context(ctx, inputs, output):
        tensors, ctx.params = save(inputs, output)
        ctx.save_for_backward(*tensors)
        if isinstance(output, tuple):  # the training op's statistics
            ctx.mark_non_differentiable(*output[1:])

    def grads(ctx, dy: Tensor, backward) -> tuple:
        saved = ctx.saved_tensors
        dx, dweight, dbias = backward(dy, *saved, *ctx.params)
        weight, bias = saved[1], saved[2]
        return (dx, None if weight is None else dweight, None if bias is None else dbias,
                *(None,) * (n_inputs - 3))

    def backward(ctx, dy, *_statistics):
        return grads(ctx, dy, backward_overload)

    def save_backward_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_backward_tensors])
        ctx.params = tuple(inputs[n_backward_tensors:])

    def derivative(ctx, gdx, gdw, gdb):
        dy, x, weight, bias, *stats = ctx.saved_tensors
        d = double_backward.derivative_of_backward(recompute(stats, ctx.params), dy, x, weight,
                                                   bias, (gdx, gdw, gdb))
        return (*d, *(None,) * (n_backward_inputs - 4))

    op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(derivative, setup_context=save_backward_inputs)

    # forward with ctx, not a separate setup_context: apply() would bind the arguments to
    # forward's signature with inspect on every call
    def eager_forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def eager_backward(ctx, dy, *_statistics):
        # under create_graph=True (grad mode on inside backward) the backward op, whose own
        # derivative records the graph a second derivative needs
        return grads(ctx, dy, backward_overload if torch.is_grad_enabled() else backward_impl)

    title = "".join(part.capitalize() for part in name.split("_")[2:])  # bn_act_train: Train
    return type(f"_Eager{title}", (torch.autograd.Function,), {
        "__doc__": f"batchnorm::{name}'s op and autograd formula without the dispatcher, for "
                   "plain eager calls.",
        "forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})


# training: the batch statistics; InPlace-ABN keeps the output (which the next layer keeps
# anyway), not the input


def _train_fake(x, weight, bias, eps, act, negative_slope, alpha, inplace):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


def _train_save(inputs, output):
    x, weight, bias, eps, act, negative_slope, alpha, inplace = inputs
    y, mean, var = output
    return (y if inplace else x, weight, bias, mean, var), (eps, act, negative_slope, alpha,
                                                            inplace)


_EagerTrain = _family("bn_act_train", _train_impl, _train_fake, _train_save,
                      _train_backward_impl, double_backward.train_forward)


# evaluation: the statistics are constants, no gradient flows into them


def _eval_fake(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha):
    return torch.empty_like(x)


def _eval_save(inputs, output):
    x, weight, bias, running_mean, running_var, *params = inputs
    return (x, weight, bias, running_mean, running_var), tuple(params)


_EagerEval = _family("bn_act_eval", _eval_impl, _eval_fake, _eval_save, _eval_backward_impl,
                     double_backward.eval_forward)


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


# ---------------------------------------------------------------------------------------------
# statistics alone, and normalising with given batch statistics (masks, ghost batches, Batch
# Renorm): the forward is the eval kernel, the backward the (masked) training formula


def _moments_impl(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _kernels(x)
    n, mean, m2 = kernels.moments_impl(x) if mask is None else kernels.masked_moments_impl(x,
                                                                                           mask)
    return torch.tensor(float(n), dtype=torch.float64, device=x.device), mean, m2


_moments_op = torch.library.custom_op("batchnorm::moments", _moments_impl, mutates_args=())


@_moments_op.register_fake
def _(x, mask):
    c = x.shape[1]
    return (x.new_empty((), dtype=torch.float64), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


def moments(x: Tensor, mask: Optional[Tensor]) -> Moments:
    """The statistics op, or its implementation when nothing needs the op: float64
    :class:`.moments.Moments` (count a 0-d tensor), never differentiable."""
    if not plain_eager(x, mask):
        return Moments(*torch.ops.batchnorm.moments(x.detach(), mask))  # never differentiable
    return Moments(*_moments_impl(x.detach(), mask))


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


def _stats_fake(x, weight, bias, mean, var, mask, count, eps, act, negative_slope, alpha):
    return torch.empty_like(x)


def _stats_save(inputs, output):
    x, weight, bias, mean, var, mask, count, *params = inputs
    return (x, weight, bias, mean, var, mask, count), tuple(params)


_EagerStats = _family("bn_act_stats", _stats_impl, _stats_fake, _stats_save,
                      _stats_backward_impl, double_backward.stats_forward)


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
# update has moved by then (weight gradients then differ in the channels whose r or d changed;
# tests/test_variants.py compares compiled and eager). An op's outputs are saved, not
# recomputed. The clips are tensors of one element, not floats: a layer's schedule changes them
# every step, and a float argument would be a constant of the compiled graph (one recompile per
# value).


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
