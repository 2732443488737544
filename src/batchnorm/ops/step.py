"""The layers' lean call: one backend call per forward and one per backward, nothing checked.

The layer checks its input once (the same errors as :func:`batchnorm.ops.bn_act_train`, before
any state changes), picks the backend once (:func:`backend_for`), and calls :func:`train_step` or
:func:`eval_step`. Every backend module has the same two entry points:

``train_step(x, weight, bias, running_mean, running_var, eps, factor, check, act,
negative_slope, alpha, inplace) -> (y, mean, var, ok)``
    batch statistics, normalise + affine + activation, and the running update in place
    (``running += factor * (batch - running)``, the variance unbiased) when the buffers are
    given; with ``check``, NaN/Inf statistics leave the buffers unchanged and ``ok`` is False
    (a Python bool on CPU; on CUDA a 0-d bool tensor, decided on the device).
``eval_impl(x, weight, bias, running_mean, running_var, eps, act, negative_slope, alpha)``
    normalise with given statistics.

:mod:`.numba_cpu` and :mod:`.triton_gpu` run their kernels (``y`` not differentiable by itself:
:class:`_Train` carries the training gradient, computed by the backend's
``train_backward_impl`` from what the forward saved); :mod:`.torch_fallback` runs PyTorch's ops,
differentiable as they are. Under ``torch.compile``, ``torch.export``, tracing, tensor
subclasses or modes, the kernels run as the custom ops of :mod:`.custom_ops` (one node each) and
the running update as PyTorch ops the compiler sees.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import custom_ops, torch_fallback
from .backends import kernels_for

__all__ = ["backend_for", "train_step", "eval_step"]


def backend_for(x: Tensor, *per_channel: Tensor | None, fused: bool = False) -> ModuleType:
    """The backend module that runs these tensors under the choice of
    :func:`batchnorm.set_backend`: numba_cpu, triton_gpu or torch_fallback (``fused``: the call
    needs what only our kernels do in one pass)."""
    return kernels_for(x, *per_channel, fused=fused) or torch_fallback


def train_step(backend: ModuleType, x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, eps: float,
               factor: float | Tensor, check: bool, act: str, negative_slope: float,
               alpha: float, inplace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | bool]:
    """``(y, mean, var, ok)`` of ``backend``'s training step on checked, non-empty arguments
    (see the module docstring); ``ok`` says whether the buffers were updated."""
    args = (x, weight, bias, running_mean, running_var, eps, factor, check, act, negative_slope,
            alpha, inplace)
    if backend is torch_fallback:
        return torch_fallback.train_step(*args)
    if not custom_ops.plain_eager(x, weight, bias):
        y, mean, var = torch.ops.batchnorm.bn_act_train(x, weight, bias, eps, act,
                                                        negative_slope, alpha, inplace)
        ok = True
        if running_mean is not None:
            ok = custom_ops.running_update(mean, var, running_mean, running_var, factor,
                                           x.numel() // x.shape[1], check)
        return y, mean, var, ok
    if custom_ops.records_grad(x, weight, bias):
        call = [backend, *args[3:]]  # the rest of the call; the forward appends its statistics
        y = _Train.apply(x, weight, bias, call)
        mean, var, ok = call[-1]
        return y, mean, var, ok
    return backend.train_step(*args)


def eval_step(backend: ModuleType, x: Tensor, weight: Tensor | None, bias: Tensor | None,
              running_mean: Tensor, running_var: Tensor, eps: float, act: str,
              negative_slope: float, alpha: float) -> Tensor:
    """``backend``'s eval forward on checked arguments (the statistics constants)."""
    if (backend is not torch_fallback and custom_ops.plain_eager(x, weight, bias)
            and not custom_ops.records_grad(x, weight, bias)):
        # the kernels read the statistics as they are (a view, never a graph)
        return backend.eval_impl(x, weight, bias, running_mean, running_var, eps, act,
                                 negative_slope, alpha)
    args = (x, weight, bias, running_mean.detach(), running_var.detach(), eps, act,
            negative_slope, alpha)
    if backend is torch_fallback:
        return torch_fallback.eval_(*args)
    return custom_ops.eval_(*args)  # the op, or its autograd formula


class _Train(torch.autograd.Function):
    """A kernel backend's training step under autograd: the forward saves what its backward
    reads (the output instead of the input with ``inplace``, InPlace-ABN), the backward is one
    backend call; under ``create_graph=True`` the backward op, whose own derivative gives double
    backward (see :mod:`.custom_ops`).

    Its inputs are the three tensors gradients reach and ``call``, a list of the backend and
    the step's other arguments, to which the forward appends ``(mean, var, ok)``: its one output
    is ``y``. (Each further output or argument of a Function is paid on every call: the
    statistics as outputs cost as much again as the rest of the autograd node.)
    """

    # forward with ctx, not a separate setup_context: apply() would bind the arguments to
    # forward's signature with inspect on every call
    @staticmethod
    def forward(ctx, x, weight, bias, call):
        (backend, running_mean, running_var, eps, factor, check, act, negative_slope, alpha,
         inplace) = call
        y, mean, var, ok = backend.train_step(x, weight, bias, running_mean, running_var, eps,
                                              factor, check, act, negative_slope, alpha, inplace)
        ctx.save_for_backward(y if inplace else x, weight, bias, mean, var)
        ctx.backend = backend
        ctx.params = (eps, act, negative_slope, alpha, inplace)
        call.append((mean, var, ok))
        return y

    @staticmethod
    def backward(ctx, dy):
        src, weight, bias, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the op, differentiable once more
            backward = torch.ops.batchnorm.bn_act_train_backward
        else:
            backward = ctx.backend.train_backward_impl
        dx, dweight, dbias = backward(dy, src, weight, bias, mean, var, *ctx.params)
        return dx, None if weight is None else dweight, None if bias is None else dbias, None
