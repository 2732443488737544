"""torch.library.opcheck on every custom op: schema, fake tensors, autograd registration and AOT
dispatch, over the ops' cases (layouts, dtypes, activations, inplace, parameters or none).
Every op the package registers is checked: the list below is compared with the dispatcher's."""
from __future__ import annotations

import re
from pathlib import Path

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


def _opcheck(name: str, args: tuple) -> None:
    torch.library.opcheck(getattr(torch.ops.batchnorm, name).default, args)


def test_cases_cover_every_activation():
    assert {c[2] for c in CASES} == set(FUSED)
    assert {c[2] for c in CASES if c[3]} <= set(INVERTIBLE)


@pytest.mark.parametrize("dtype, memory_format, act, inplace, affine", CASES)
def test_forward_ops(dtype, memory_format, act, inplace, affine):
    x, w, b = _inputs(dtype, memory_format, affine)
    _opcheck("bn_act_train", (x, w, b, EPS, act, SLOPE, ALPHA, inplace))
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    _opcheck("bn_act_eval", (x, w, b, rm, rv, EPS, act, SLOPE, ALPHA))


@pytest.mark.parametrize("dtype, memory_format, act, inplace, affine", CASES)
def test_backward_ops(dtype, memory_format, act, inplace, affine):
    x, w, b = _inputs(dtype, memory_format, affine)
    with torch.no_grad():
        y, mean, var = torch.ops.batchnorm.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA, inplace)
    dy = torch.randn_like(y)
    src = y if inplace else x.detach()
    detached = [t if t is None else t.detach() for t in (w, b)]
    _opcheck("bn_act_train_backward",
             (dy, src, *detached, mean, var, EPS, act, SLOPE, ALPHA, inplace))
    rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
    _opcheck("bn_act_eval_backward", (dy, x.detach(), *detached, rm, rv, EPS, act, SLOPE, ALPHA))


@pytest.mark.parametrize("dtype, memory_format, act, inplace, affine", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_given_statistics_ops(dtype, memory_format, act, inplace, affine, masked):
    """moments, then bn_act_stats and its backward (masks, ghost batches, Batch Renorm)."""
    x, w, b = _inputs(dtype, memory_format, affine)
    mask = (torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.3) if masked \
        else None
    _opcheck("moments", (x.detach(), mask))
    count, mean, m2 = torch.ops.batchnorm.moments(x.detach(), mask)
    var = m2 / count
    _opcheck("bn_act_stats", (x, w, b, mean, var, mask, count, EPS, act, SLOPE, ALPHA))
    dy = torch.randn_like(x)
    detached = [t if t is None else t.detach() for t in (w, b)]
    _opcheck("bn_act_stats_backward",
             (dy, x.detach(), *detached, mean, var, mask, count, EPS, act, SLOPE, ALPHA))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_and_running_update_ops(dtype):
    g = torch.Generator().manual_seed(2)
    mean, var = torch.randn(4, dtype=torch.float64, generator=g), \
        torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    rm, rv = torch.randn(4, dtype=dtype, generator=g), torch.rand(4, dtype=dtype, generator=g) + 0.5
    clip = torch.tensor([3.0], dtype=torch.float64)
    _opcheck("renorm_factors", (mean, var, rm, rv, EPS, clip, clip / 2))
    for factor, tensor in ((0.1, None), (0.0, torch.tensor(0.25, dtype=torch.float64))):
        _opcheck("running_update", (mean, var, rm.clone(), rv.clone(), factor, tensor, 16, True))


def test_every_registered_op_is_checked():
    """Every op in the batchnorm namespace has an opcheck call in this module (read from the
    source, so the check holds whichever tests ran, under xdist too)."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("batchnorm::")}
    checked = set(re.findall(r'_opcheck\(\s*"(\w+)"', Path(__file__).read_text()))
    assert len(registered) == 9
    assert checked == registered, sorted(registered ^ checked)
