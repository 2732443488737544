"""torch.library.opcheck on every custom op: schema, fake tensors, autograd registration and AOT
dispatch, over the ops' cases (layouts, dtypes, activations, inplace, parameters or none)."""
from __future__ import annotations

import pytest
import torch

from batchnorm import ops  # noqa: F401  (registers the ops)
from batchnorm.activations import FUSED, INVERTIBLE

EPS, SLOPE, ALPHA = 1e-5, 0.1, 1.3
CASES = [
    (torch.float64, None, "relu", False, True),
    (torch.float32, torch.channels_last, "silu", False, True),
    (torch.float64, torch.channels_last, "leaky_relu", True, True),
    (torch.float32, None, "elu", True, False),
    (torch.float64, None, "identity", False, False),
    (torch.float32, torch.channels_last, "relu6", False, False),
    (torch.float64, None, "hardswish", False, True),
]


def _inputs(dtype, memory_format, affine, shape=(3, 4, 5, 6)):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    w = torch.rand(shape[1], dtype=dtype) + 0.5 if affine else None
    b = torch.randn(shape[1], dtype=dtype) if affine else None
    return x.requires_grad_(), w if w is None else w.requires_grad_(), \
        b if b is None else b.requires_grad_()


def test_cases_cover_every_activation():
    assert {c[2] for c in CASES} == set(FUSED)
    assert {c[2] for c in CASES if c[3]} <= set(INVERTIBLE)


@pytest.mark.parametrize("dtype, memory_format, act, inplace, affine", CASES)
def test_forward_ops(dtype, memory_format, act, inplace, affine):
    x, w, b = _inputs(dtype, memory_format, affine)
    torch.library.opcheck(torch.ops.batchnorm.bn_act_train.default,
                          (x, w, b, EPS, act, SLOPE, ALPHA, inplace))
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    torch.library.opcheck(torch.ops.batchnorm.bn_act_eval.default,
                          (x, w, b, rm, rv, EPS, act, SLOPE, ALPHA))


@pytest.mark.parametrize("dtype, memory_format, act, inplace, affine", CASES)
def test_backward_ops(dtype, memory_format, act, inplace, affine):
    x, w, b = _inputs(dtype, memory_format, affine)
    with torch.no_grad():
        y, mean, var = torch.ops.batchnorm.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA, inplace)
    dy = torch.randn_like(y)
    src = y if inplace else x.detach()
    detached = [t if t is None else t.detach() for t in (w, b)]
    torch.library.opcheck(torch.ops.batchnorm.bn_act_train_backward.default,
                          (dy, src, *detached, mean, var, EPS, act, SLOPE, ALPHA, inplace))
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    torch.library.opcheck(torch.ops.batchnorm.bn_act_eval_backward.default,
                          (dy, x.detach(), *detached, rm, rv, EPS, act, SLOPE, ALPHA))
