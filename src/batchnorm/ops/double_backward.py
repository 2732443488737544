"""Double backward of the kernel ops: the derivative of their backward ops.

The kernels give the first-order gradients (the same bits with or without ``create_graph``).
Their derivative, for gradient penalties, Hessian-vector products or MAML-style meta-learning
with BN, is PyTorch's: the forward recomputed with PyTorch's own differentiable ops
(:mod:`.torch_fallback`) at the saved inputs, its gradients taken with ``create_graph=True``, and
those differentiated once more. It costs a forward and two backward passes of PyTorch's BN.

:mod:`.custom_ops` registers :func:`derivative_of_backward` as each backward op's autograd
formula, with the family's differentiable forward below.
"""
from __future__ import annotations

import torch

from ..errors import expected
from . import torch_fallback

__all__ = ["derivative_of_backward", "train_forward", "eval_forward", "stats_forward"]


def derivative_of_backward(forward, dy, x, weight, bias, grads):
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


def train_forward(stats, params):
    """The training forward ``(x, w, b) -> y``: the batch statistics recomputed from x (they are
    functions of x, not constants). ``stats``: the saved (mean, var), unused."""
    eps, act, negative_slope, alpha, inplace = params
    if inplace:
        raise expected("inplace=False to differentiate the gradients again (double backward)",
                       "inplace=True: the backward keeps the output, not the input")
    return lambda x, w, b: torch_fallback.train(x, w, b, eps, act, negative_slope, alpha,
                                                False)[0]


def eval_forward(stats, params):
    """The eval forward ``(x, w, b) -> y`` with the saved running statistics as constants."""
    running_mean, running_var = stats
    return lambda x, w, b: torch_fallback.eval_(x, w, b, running_mean, running_var, *params)


def stats_forward(stats, params):
    """The given-statistics forward ``(x, w, b) -> y``: the statistics are functions of x,
    recomputed (masked) by PyTorch's ops around the saved mean's shift."""
    mean, _var, mask, _count = stats
    return lambda x, w, b: torch_fallback.train_stats(x, w, b, mean, *params, mask)
