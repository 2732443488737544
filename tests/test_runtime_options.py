"""The options a training loop changes between steps (Batch Renorm's rmax / dmax, eval_mix):
plain floats for the user, runtime values for a compiled graph (a schedule compiles once), checked
when set; and the checks of the options that cannot act (rmax without renorm, "mix" without
running statistics), the messages of eval-time batch statistics, and forward's docstring.
"""
from __future__ import annotations

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import batchnorm
from batchnorm import BatchNormError, reference
from batchnorm.sync import SyncBatchNorm, SyncBatchNormAct

EPS = 1e-3
STEPS = 20
CLASSES = [batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d, SyncBatchNorm, SyncBatchNormAct]


def _layer(cls=batchnorm.BatchNorm2d, dtype=None, **opts):
    torch.manual_seed(0)
    m = cls(3, eps=EPS, dtype=dtype, **opts)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.2, 0.7, -0.9]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        m.running_mean.copy_(torch.tensor([1.0, -0.5, 0.2]))
        m.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    return m


def _batch(step, shape=(6, 3, 4, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(10 + step)
    # spread and offset away from the running statistics, so that the clips bite
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    return x.to(dtype), torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _ramp(step):
    """The paper's schedule, compressed: rmax 1 -> 3, dmax 0 -> 5 (BN exactly at step 0)."""
    t = step / (STEPS - 1)
    return 1.0 + 2.0 * t, 5.0 * t


# ---------------------------------------------------------------------------------------------
# a schedule compiles once


@pytest.mark.slow
@pytest.mark.parametrize("cls, dtype", [*((c, torch.float32) for c in CLASSES),
                                        (batchnorm.BatchNorm2d, torch.float64),
                                        (batchnorm.BatchNorm2d, torch.bfloat16)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_renorm_ramp_compiles_once_and_matches_eager(cls, dtype):
    """float32 and float64 on the kernels, bfloat16 on PyTorch's path (float32 parameters)."""
    pdtype = torch.float64 if dtype == torch.float64 else None
    torch._dynamo.reset()  # counted from a fresh cache: earlier tests' compiles of forward (other
    # shapes, other eps) leave dynamo's automatic-dynamic state behind, one recompile more
    eager, twin = _layer(cls, pdtype, renorm=True), _layer(cls, pdtype, renorm=True)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd: forward and backward graphs
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for step in range(STEPS):
        x, dy = _batch(step, dtype=dtype)
        for m in (eager, twin):
            m.rmax, m.dmax = _ramp(step)
        outs = []
        for m, fn in ((eager, eager), (twin, compiled)):
            xg = x.clone().requires_grad_()
            y = fn(xg)
            dx, dw, db = torch.autograd.grad(y, [xg, m.weight, m.bias], dy)
            outs.append((y, dx, dw, db))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, **tol, msg=f"step {step}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(twin, name), getattr(eager, name),
                                       rtol=1e-6, atol=1e-6, msg=f"step {step} {name}")
    assert counter.frame_count == 1
    assert twin.rmax == 3.0 and isinstance(twin.rmax, float)


@pytest.mark.slow
def test_eval_mix_schedule_compiles_once_and_matches_eager():
    torch._dynamo.reset()  # counted from a fresh cache, as above
    eager, twin = _layer(eval_stats="mix").eval(), _layer(eval_stats="mix").eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    for step in range(STEPS):
        x, dy = _batch(step)
        eager.eval_mix = twin.eval_mix = step / (STEPS - 1)
        outs = []
        for m, fn in ((eager, eager), (twin, compiled)):
            xg = x.clone().requires_grad_()
            y = fn(xg)
            outs.append((y, *torch.autograd.grad(y, [xg, m.weight, m.bias], dy)))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert counter.frame_count == 1
    assert torch.equal(twin.running_var, eager.running_var)


@pytest.mark.parametrize("opts, masked", [({"renorm": True, "rmax": 1.5}, False),
                                          ({"virtual_batch_size": 2}, False), ({}, True)],
                         ids=str)
def test_half_precision_running_statistics_of_the_options_are_plain_bns(opts, masked):
    """bfloat16 data: statistics in float32 on every path (the compiled renorm layer at unit
    clips takes the options' path where eager takes plain BN's), not rounded to bfloat16."""
    x, _ = _batch(0, dtype=torch.bfloat16)
    plain, other = _layer(), _layer(**opts)
    plain(x)
    other(x, mask=torch.ones(6, 4, 4, dtype=torch.bool) if masked else None)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(other, name), getattr(plain, name), rtol=1e-6,
                                   atol=1e-6)


def test_eval_mix_changed_between_forward_and_backward_uses_the_forwards_value():
    m, fresh = _layer(eval_stats="mix", eval_mix=0.3).eval(), \
        _layer(eval_stats="mix", eval_mix=0.3).eval()
    x, dy = _batch(0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = m(xa)
    m.eval_mix = 0.9
    (ya * dy).sum().backward()
    (fresh(xb) * dy).sum().backward()
    assert torch.equal(xa.grad, xb.grad)


# ---------------------------------------------------------------------------------------------
# floats for the user, tensors accepted, checked when set


def test_options_read_back_as_floats_and_take_0d_tensors():
    m = batchnorm.BatchNorm2d(3, renorm=True, rmax=torch.tensor(3.0), dmax=torch.tensor(5),
                              eval_stats="mix", eval_mix=torch.tensor(0.25, dtype=torch.float64))
    assert (m.rmax, m.dmax, m.eval_mix) == (3.0, 5.0, 0.25)
    assert all(type(v) is float for v in (m.rmax, m.dmax, m.eval_mix))
    m.rmax, m.eval_mix = torch.tensor(2.0), torch.tensor(0.5)
    assert (m.rmax, m.eval_mix) == (2.0, 0.5) and type(m.rmax) is float
    assert m.options() == {"renorm": True, "rmax": 2.0, "dmax": 5.0, "eval_stats": "mix",
                           "eval_mix": 0.5}
    want = batchnorm.BatchNorm2d(3, renorm=True, rmax=2.0, dmax=5.0)
    x, _ = _batch(0)
    assert torch.equal(m.train()(x), want(x))


@pytest.mark.parametrize("name, value, match", [
    ("rmax", 0.5, "expected rmax >= 1"),
    ("rmax", torch.tensor(0.5), "expected rmax >= 1"),
    ("rmax", float("inf"), "expected rmax to be a finite number"),
    ("dmax", -1.0, "expected dmax >= 0"),
    ("dmax", float("nan"), "expected dmax to be a finite number"),
    ("dmax", torch.tensor([1.0, 2.0]), r"expected dmax to be a number or a 0-d real tensor"),
    ("rmax", torch.tensor(True), r"expected rmax to be a number or a 0-d real tensor"),
    ("rmax", "3", "expected rmax to be a finite number"),
    ("eval_mix", 1.5, r"expected eval_mix in \[0, 1\]"),
    ("eval_mix", torch.tensor(-0.1), r"expected eval_mix in \[0, 1\]"),
])
def test_bad_values_raise_when_set_and_change_nothing(name, value, match):
    m = _layer(renorm=True, rmax=1.5, dmax=0.2, eval_stats="mix", eval_mix=0.3)
    x, _ = _batch(0)
    before = copy.deepcopy(m)
    with pytest.raises(BatchNormError, match=match):
        setattr(m, name, value)
    assert getattr(m, name) == getattr(before, name)
    assert torch.equal(m(x), before(x))  # the value the forward reads did not change either
    with pytest.raises(BatchNormError, match=match):
        _layer(**{"renorm": True, "eval_stats": "mix", name: value})


# ---------------------------------------------------------------------------------------------
# everything that copies, moves, saves or converts a layer


def test_state_dict_and_buffers_stay_pytorchs():
    ours = _layer(renorm=True, rmax=2.0, dmax=1.0, eval_stats="mix", eval_mix=0.5)
    theirs = nn.BatchNorm2d(3, eps=EPS)
    theirs.load_state_dict(ours.state_dict())  # strict
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    back = batchnorm.BatchNorm2d(3, eps=EPS, renorm=True)
    back.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_the_values_and_do_not_share_them(how):
    m = _layer(renorm=True, rmax=1.2, dmax=0.1)
    if how == "deepcopy":
        c = copy.deepcopy(m)
    elif how == "pickle":
        c = pickle.loads(pickle.dumps(m))
    else:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
    assert (c.rmax, c.dmax) == (1.2, 0.1)
    x, _ = _batch(0)
    assert torch.equal(copy.deepcopy(c)(x), copy.deepcopy(m)(x))
    c.rmax, c.dmax = 3.0, 5.0
    assert (m.rmax, m.dmax) == (1.2, 0.1)
    assert torch.equal(m(x), _layer(renorm=True, rmax=1.2, dmax=0.1)(x))


def test_pickles_of_float_attributes_load():
    """A layer pickled when rmax, dmax and eval_mix were plain attributes in its __dict__."""
    m = _layer(renorm=True, rmax=1.2, dmax=0.1, eval_stats="mix", eval_mix=0.4)
    state = m.__getstate__().copy()
    for key in [k for k in state if k.startswith("_option")]:
        del state[key]
    state.update(rmax=1.2, dmax=0.1, eval_mix=0.4)
    old = batchnorm.BatchNorm2d.__new__(batchnorm.BatchNorm2d)
    old.__setstate__(copy.deepcopy(state))
    assert (old.rmax, old.dmax, old.eval_mix) == (1.2, 0.1, 0.4)
    x, _ = _batch(0)
    assert torch.equal(old(x), m(x))  # training: Batch Renorm with the clips
    assert torch.equal(old.eval()(x), m.eval()(x))  # evaluation: "mix" with eval_mix


def test_dtype_conversions_keep_the_exact_values():
    """.half() then .double(): the clips are still 1.1 and 0.05 exactly, not their float16
    roundings (1.0996..., 0.04998...), checked against the float64 reference at 1e-10."""
    m = _layer(renorm=True, rmax=1.1, dmax=0.05).half().double()
    assert m.weight.dtype == torch.float64 and (m.rmax, m.dmax) == (1.1, 0.05)
    w, b = m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()
    rm, rv = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    x, _ = _batch(0, dtype=torch.float64)
    y = m(x)
    want, state = reference.forward(x.numpy(), w, b, rm, rv, training=True, eps=EPS,
                                    renorm=True, rmax=1.1, dmax=0.05)
    assert np.isclose(state.pieces[0].r, 1.1).any() or np.isclose(state.pieces[0].r, 1 / 1.1).any()
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)


def test_to_empty_from_meta_keeps_the_values():
    m = batchnorm.BatchNorm2d(3, device="meta", renorm=True, rmax=2.0, dmax=1.0,
                              eval_stats="mix", eval_mix=0.5)
    m.to_empty(device="cpu")
    m.reset_parameters()
    x, _ = _batch(0)
    want = batchnorm.BatchNorm2d(3, renorm=True, rmax=2.0, dmax=1.0, eval_stats="mix",
                                 eval_mix=0.5)
    assert torch.equal(m(x), want(x))
    assert torch.equal(m.eval()(x), want.eval()(x))


def test_convert_carries_the_values_and_the_layers_stay_independent():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, renorm=True, rmax=1.5))
    sync = batchnorm.convert(model, to="sync")
    assert sync[1].options() == {"renorm": True, "rmax": 1.5}
    sync[1].rmax = 2.5
    assert model[1].rmax == 1.5
    assert batchnorm.convert(sync, to="batchnorm")[1].options() == {"renorm": True, "rmax": 2.5}


# ---------------------------------------------------------------------------------------------
# options that cannot act are refused


@pytest.mark.parametrize("kwargs", [{"rmax": 3.0}, {"dmax": 5.0}, {"rmax": 3.0, "dmax": 5.0},
                                    {"renorm": False, "rmax": torch.tensor(2.0)}])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_clips_without_renorm_are_refused(cls, kwargs):
    with pytest.raises(BatchNormError, match=r"expected renorm=True to set (rmax|dmax)"):
        cls(3, **kwargs)
    cls(3, rmax=1.0, dmax=0.0)  # the defaults: fine


def test_clips_set_while_renorm_is_off_are_refused_and_turning_it_off_keeps_them():
    m = _layer()
    with pytest.raises(BatchNormError, match=r"expected renorm=True to set rmax \(the clips act "
                                             r"only in Batch Renorm\) \(got rmax=2.0 with "
                                             r"renorm=False\)"):
        m.rmax = 2.0
    assert m.rmax == 1.0
    m.rmax = 1.0  # the default: fine
    m.renorm = True
    m.rmax, m.dmax = 2.0, 1.0
    m.renorm = False  # a loop may switch it off and on again: the clips stay
    assert (m.rmax, m.dmax) == (2.0, 1.0)
    assert m.options() == {}  # they act only with renorm: convert builds the layer without them
    assert "rmax" not in repr(m)
    assert isinstance(batchnorm.convert(nn.Sequential(m), to="sync")[0], SyncBatchNorm)
    m.renorm = True
    assert m.options() == {"renorm": True, "rmax": 2.0, "dmax": 1.0}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_mix_without_running_statistics_is_refused(cls):
    with pytest.raises(BatchNormError, match="expected track_running_stats=True with "
                                             "eval_stats='mix'"):
        cls(3, track_running_stats=False, eval_stats="mix", eval_mix=0.5)


def test_mix_set_on_a_layer_without_running_statistics_raises_in_eval():
    m = batchnorm.BatchNorm2d(3, track_running_stats=False).eval()
    m.eval_stats = "mix"
    with pytest.raises(BatchNormError, match="expected track_running_stats=True with "
                                             "eval_stats='mix'"):
        m(torch.randn(4, 3, 2, 2))


# ---------------------------------------------------------------------------------------------
# messages and docstrings


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_one_value_per_channel_in_eval_with_batch_statistics_says_so(cls):
    m = cls(3, eval_stats="batch").eval()
    with pytest.raises(BatchNormError) as info:
        m(torch.randn(1, 3, 1, 1))
    message = str(info.value)
    assert "when training" not in message
    assert ("expected more than 1 value per channel for batch statistics in eval "
            "(eval_stats='batch')") in message
    with pytest.raises(BatchNormError, match="when training"):
        m.train()(torch.randn(1, 3, 1, 1))  # PyTorch's words, where they apply


def test_one_value_per_channel_in_eval_without_running_statistics_says_so():
    m = batchnorm.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(BatchNormError, match=r"for batch statistics in eval \(no running "
                                             r"statistics: track_running_stats=False\)"):
        m(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("cls", [*CLASSES, batchnorm.BatchNorm1d, batchnorm.BatchNormAct3d])
def test_forward_has_its_own_docstring(cls):
    doc = inspect.getdoc(cls.forward)  # what help() shows
    assert "Define the computation performed at every call" not in doc
    for word in ("input", "mask", "Returns", "BatchNormError"):
        assert word in doc, word


def test_layers_with_different_eps_compile_without_a_graph_break():
    """dynamo makes eps a symbolic float once two compiled layers differ in it; the eps check
    must still trace (math.isfinite on it was a graph break under fullgraph=True)."""
    torch._dynamo.reset()  # a fresh cache: earlier tests' compiles count to the recompile limit
    for eps in (1e-5, 1e-3, 1e-4):
        for opts in ({"eval_stats": "mix", "eval_mix": 0.5}, {}):
            m = batchnorm.BatchNorm2d(4, eps=eps, **opts)
            m.train(not opts)
            x = torch.randn(2, 4, 3, 3)
            ref = m(x) if not opts else None
            y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
            assert torch.isfinite(y).all()
            if ref is not None:
                torch.testing.assert_close(y, ref)
