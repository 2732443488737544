"""batchnorm.BatchNorm*d / BatchNormAct*d against PyTorch's modules (the case table and more)."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormError
from batchnorm.activations import FUSED
from tests.cases import (
    CASES,
    Case,
    assert_steps_close,
    make_module,
    module_trajectory,
    torch_module,
    torch_trajectory,
)

OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
        5: batchnorm.BatchNorm3d}
ACTS = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d,
        5: batchnorm.BatchNormAct3d}
TORCH_ACT = {"identity": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1),
             "elu": nn.ELU(0.7), "silu": nn.SiLU(), "relu6": nn.ReLU6(),
             "hardswish": nn.Hardswish()}
ACT_ARGS = {"negative_slope": 0.1, "alpha": 0.7}


def our_module(case: Case, cls=None, **kwargs) -> nn.Module:
    return make_module(case, cls or OURS[len(case.shape)], **kwargs)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on one thread: under `pytest -n 2` on 2 shared cores, a 2-thread OpenMP
    barrier costs milliseconds per op (100x the op). Threads are tested on their own below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_table_matches_torch(case):
    m = our_module(case)
    want = torch_trajectory(case)
    assert_steps_close(case, module_trajectory(case, m), want)

    # state_dict both ways: ours -> torch's module and back, after the trajectory
    theirs = torch_module(case)
    theirs.load_state_dict(m.state_dict())
    assert_state_dicts_equal(theirs.state_dict(), m.state_dict())
    again = our_module(case)
    again.load_state_dict(theirs.state_dict())
    assert_state_dicts_equal(again.state_dict(), theirs.state_dict())


# the inplace (InPlace-ABN) path through the same table: identity is BN itself. float64 only: the
# recovery x_hat = (y - beta) / gamma costs precision where |gamma| is small, beyond 1e-5 in float32
INPLACE_CASES = [c for c in CASES if c.dtype == "float64" and c.eps == 1e-5]


@pytest.mark.parametrize("case", INPLACE_CASES, ids=lambda c: c.id)
def test_case_table_inplace_identity_matches_torch(case):
    m = our_module(case, ACTS[len(case.shape)], act="identity", inplace=True)
    assert_steps_close(case, module_trajectory(case, m), torch_trajectory(case))


# ------------------------------------------------------------------------------------------------
# gradcheck (float64), train and eval, plain and each activation


def _gradcheck(m: nn.Module, x: torch.Tensor) -> None:
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    names = list(params)

    def f(x_, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x_,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


GRADCHECK_MODULES = [(None, False)] + [(act, False) for act in TORCH_ACT] + [
    (act, True) for act in ("identity", "leaky_relu", "elu")]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act,inplace", GRADCHECK_MODULES, ids=lambda v: str(v))
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(training, act, inplace, channels_last):
    torch.manual_seed(0)
    if act is None:  # plain BatchNorm2d
        m = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    else:
        m = batchnorm.BatchNormAct2d(3, act, inplace=inplace, dtype=torch.float64, **ACT_ARGS)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
    m.train(training)
    x = torch.randn(3, 3, 3, 2, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _gradcheck(m, x.requires_grad_(True))


# ------------------------------------------------------------------------------------------------
# BatchNormAct == BatchNorm + PyTorch's activation; inplace == not inplace


def _run(m: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    params = list(m.parameters())
    for p in params:
        p.grad = None
    y = m(x)
    y.backward(dy)
    bufs = [b.clone() for b in m.buffers()]
    return [y.detach(), x.grad] + [p.grad for p in params] + bufs


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("act", list(TORCH_ACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_act_equals_torch_bn_then_activation(rank, act, dtype):
    torch.manual_seed(rank)
    shape = (4, 5, 6, 3, 2)[:rank]
    ref = nn.Sequential(torch_module(Case(shape, 1, True, True, 0.1, 1e-5, str(dtype)[6:])),
                        TORCH_ACT[act]).to(dtype)
    ours = ACTS[rank](5, act, **ACT_ARGS, dtype=dtype)
    ours.load_state_dict(ref[0].state_dict())  # a separate BN's checkpoint loads
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for training in (True, True, False):
        ref.train(training)
        ours.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        dy = torch.randn(shape, dtype=dtype)
        for a, b in zip(_run(ours, x, dy), _run(ref, x, dy)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_equals_not_inplace(rank, act, dtype):
    torch.manual_seed(10 + rank)
    shape = (4, 5, 6, 3, 2)[:rank]
    plain = ACTS[rank](5, act, **ACT_ARGS, dtype=dtype)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    inplace = ACTS[rank](5, act, **ACT_ARGS, inplace=True, dtype=dtype)
    inplace.load_state_dict(plain.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for training in (True, True, False):
        plain.train(training)
        inplace.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 - 0.3
        dy = torch.randn(shape, dtype=dtype)
        x_before = x.clone()
        got, want = _run(inplace, x, dy), _run(plain, x, dy)
        assert torch.equal(x, x_before)  # the input is not overwritten
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# Non-finite guard


def _nan_batch(shape=(4, 3, 2, 2)):
    x = torch.randn(shape)
    x[1, 2, 0, 0] = float("nan")  # channel 2 only
    return x


def test_guard_skip_keeps_buffers_and_warns_once():
    m = batchnorm.BatchNorm2d(3, momentum=None)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non|NaN"):
        y = m(_nan_batch())
    assert y.shape == (4, 3, 2, 2)
    assert torch.isfinite(y[:, :2]).all() and torch.isnan(y[:, 2]).all()  # output still returned
    assert_state_dicts_equal(m.state_dict(), before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second bad batch does not warn again
        m(_nan_batch())
        m(torch.full((4, 3, 2, 2), float("inf")))
    assert_state_dicts_equal(m.state_dict(), before)
    # a good batch afterwards updates as if the bad ones never came (momentum=None: 1/2)
    x = torch.randn(4, 3, 2, 2)
    m(x)
    assert int(m.num_batches_tracked) == 2
    torch.testing.assert_close(m.running_mean, (before["running_mean"] + x.mean((0, 2, 3))) / 2)


def test_guard_raise_changes_nothing():
    m = batchnorm.BatchNormAct2d(3, nonfinite="raise")
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(BatchNormError, match="expected finite batch statistics"):
        m(_nan_batch())
    assert_state_dicts_equal(m.state_dict(), before)


def test_guard_update_is_pytorch():
    ours, theirs = batchnorm.BatchNorm2d(3, nonfinite="update"), nn.BatchNorm2d(3)
    x = _nan_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ours(x)
    torch.testing.assert_close(y, theirs(x), equal_nan=True)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], equal_nan=True)
    assert torch.isnan(ours.running_mean[2])


@pytest.mark.parametrize("momentum", [0.3, None])
def test_guard_branch_free_path_equals_eager(momentum, monkeypatch):
    """The path torch.compile takes (no Python bool) updates exactly as the eager one."""
    batches = [torch.randn(4, 3, 2, 2), _nan_batch(), torch.randn(4, 3, 2, 2) * 2, _nan_batch()]
    eager = batchnorm.BatchNorm2d(3, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in batches:
            eager(x)
    # the guard's compiled branch, in eager (patching torch.compiler.is_compiling itself would
    # stay cached in dynamo and break later torch.compile tests in the same process)
    monkeypatch.setattr(batchnorm.layers, "_is_compiling", lambda: True)
    monkeypatch.setattr(batchnorm.ops.custom_ops, "plain_eager", lambda *a: False)
    traced = batchnorm.BatchNorm2d(3, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on that path
        for x in batches:
            traced(x)
    assert int(traced.num_batches_tracked) == 2
    assert_state_dicts_equal(traced.state_dict(), eager.state_dict())


def test_guard_rejects_unknown_mode():
    message = "expected nonfinite in ('skip', 'raise', 'update')"
    with pytest.raises(BatchNormError, match=re.escape(message)):
        batchnorm.BatchNorm2d(3, nonfinite="ignore")


# ------------------------------------------------------------------------------------------------
# Bad input: BatchNormError, raised before any buffer changes


BAD_INPUTS = [
    ("rank", lambda: batchnorm.BatchNorm2d(3), torch.randn(2, 3, 4),
     "expected 4D input (got 3D input)"),
    ("rank1d", lambda: batchnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 4),
     "expected 2D or 3D input (got 4D input)"),
    ("rank3d", lambda: batchnorm.BatchNormAct3d(3), torch.randn(2, 3, 4, 4), "expected 5D input"),
    ("channels", lambda: batchnorm.BatchNorm2d(3), torch.randn(2, 4, 3, 3), "expected 3 channels"),
    ("int", lambda: batchnorm.BatchNorm2d(3), torch.ones(2, 3, 3, 3, dtype=torch.long),
     "expected floating-point input"),
    ("mixed", lambda: batchnorm.BatchNorm2d(3), torch.randn(2, 3, 3, 3, dtype=torch.float64),
     "mixed dtypes"),
    ("one value", lambda: batchnorm.BatchNorm2d(3), torch.randn(1, 3, 1, 1),
     "expected more than 1 value per channel"),
    ("one value 1d", lambda: batchnorm.BatchNorm1d(3), torch.randn(1, 3), "more than 1 value"),
    ("eps 0 training", lambda: _with(batchnorm.BatchNorm2d(3), eps=0.0), torch.randn(2, 3, 2, 2),
     "expected eps > 0 in training"),
    ("momentum", lambda: _with(batchnorm.BatchNorm2d(3), momentum=1.5), torch.randn(2, 3, 2, 2),
     "expected momentum in"),
]


def _with(m, **attrs):
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("name,make,x,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_and_changes_nothing(name, make, x, message):
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(BatchNormError, match=re.escape(message)):
        m(x)
    assert_state_dicts_equal(m.state_dict(), before)
    assert isinstance(BatchNormError(), ValueError)


def test_eval_accepts_what_training_refuses():
    m = batchnorm.BatchNorm2d(3).eval()
    x = torch.ones(1, 3, 1, 1)
    torch.testing.assert_close(m(x), nn.BatchNorm2d(3).eval()(x))
    m.eps = 0.0  # eps >= 0 in eval, as PyTorch
    m(torch.ones(2, 3, 1, 1))


@pytest.mark.parametrize("make,message", [
    (lambda: batchnorm.BatchNorm2d(0), "expected num_features to be a positive integer"),
    (lambda: batchnorm.BatchNorm2d(3, eps=-1.0), "expected eps >= 0"),
    (lambda: batchnorm.BatchNorm2d(3, momentum=2.0), "expected momentum in"),
    (lambda: batchnorm.BatchNormAct2d(3, "gelu"), "expected act in"),
    (lambda: batchnorm.BatchNormAct2d(3, "relu", inplace=True), "expected an invertible act"),
    (lambda: batchnorm.BatchNormAct2d(3, "silu", inplace=True), "expected an invertible act"),
    (lambda: batchnorm.BatchNormAct2d(3, "leaky_relu", negative_slope=0.0, inplace=True),
     "expected negative_slope > 0"),
    (lambda: batchnorm.BatchNormAct2d(3, "elu", alpha=-1.0, inplace=True), "expected alpha > 0"),
    (lambda: batchnorm.BatchNormAct2d(3, "elu", alpha=float("nan")),
     "expected alpha to be a finite"),
])
def test_bad_construction(make, message):
    with pytest.raises(BatchNormError, match=message):
        make()


# ------------------------------------------------------------------------------------------------
# PyTorch compatibility beyond the table


@pytest.mark.parametrize("cls,theirs", [(batchnorm.BatchNorm1d, nn.BatchNorm1d),
                                        (batchnorm.BatchNorm2d, nn.BatchNorm2d),
                                        (batchnorm.BatchNormAct3d, nn.BatchNorm3d)])
def test_module_surface_is_pytorchs(cls, theirs):
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"bias": False},
                   {"momentum": None}):
        ours, ref = cls(4, **kwargs), theirs(4, **kwargs)
        assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        assert_state_dicts_equal(ours.state_dict(), ref.state_dict())
        assert ours._version == ref._version == 2
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(ours, attr) == getattr(ref, attr)
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())


def test_pytorch_tools_recognise_ours():
    """swa_utils.update_bn and fusion.fuse_conv_bn_eval find and use our layers as PyTorch's."""
    torch.manual_seed(8)
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ours = batchnorm.convert(theirs)
    loader = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    for model in (theirs, ours):
        torch.optim.swa_utils.update_bn(loader, model)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    assert int(ours[1].num_batches_tracked) == 3 and ours[1].momentum == 0.1  # restored
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(ours[0].eval(), ours[1].eval())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), ours[1](ours[0](x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 4])
def test_bias_false_matches_torch(rank):
    shape = (4, 3, 5, 2)[:rank]
    ours = OURS[rank](3, bias=False)
    ref = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[rank](3, bias=False)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x, dy = torch.randn(shape), torch.randn(shape)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        for a, b in zip(_run(ours, x, dy), _run(ref, x, dy)):
            torch.testing.assert_close(a, b)


def test_old_checkpoint_without_num_batches_tracked():
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(4, 3, 2, 2))
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    for m in (batchnorm.BatchNorm2d(3), batchnorm.BatchNormAct2d(3), nn.BatchNorm2d(3)):
        m.num_batches_tracked.fill_(5)
        m.load_state_dict(sd)  # strict: filled in, as PyTorch does
        assert int(m.num_batches_tracked) == 5
        torch.testing.assert_close(m.running_mean, ref.running_mean)
    sd._metadata[""]["version"] = 2  # a version-2 checkpoint must have it
    for m in (batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(sd)


def test_empty_batch_is_pytorchs():
    ours, ref = batchnorm.BatchNormAct2d(3, "identity"), nn.BatchNorm2d(3)
    for m in (ours, ref):
        m(torch.randn(4, 3, 2, 2) + 1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(0, 3, 2, 2)
    got, want = _run(ours, x, torch.randn(0, 3, 2, 2)), _run(ref, x, torch.randn(0, 3, 2, 2))
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_track_running_stats_toggled_after_construction():
    """PyTorch's rules read the attribute and the buffers at call time."""
    ours, ref = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    for m in (ours, ref):
        m.track_running_stats = False
    x = torch.randn(4, 3, 2, 2)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        torch.testing.assert_close(ours(x), ref(x))
        assert_state_dicts_equal(ours.state_dict(), ref.state_dict())


def test_momentum_none_cumulative_average_matches_torch():
    ours, ref = batchnorm.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    for _ in range(5):
        x = torch.randn(7, 3) * 3
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 5


# ------------------------------------------------------------------------------------------------
# Threads, torch.compile


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_results_identical_with_1_and_2_threads(memory_format):
    torch.manual_seed(3)
    x = torch.randn(8, 16, 24, 24).to(memory_format=memory_format)
    dy = torch.randn(8, 16, 24, 24).to(memory_format=memory_format)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(4)
            m = batchnorm.BatchNormAct2d(16, "leaky_relu", inplace=True)
            results.append(_run(m, x, dy) + _run(m.eval(), x, dy))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_conv_bn_relu_matches_eager():
    torch.manual_seed(5)

    def make():
        torch.manual_seed(6)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNormAct2d(8, "relu"))

    eager, compiled_model = make(), make()
    probe = make()
    for training in (True, False):  # one graph: no break in checks, op or buffer update
        explained = torch._dynamo.explain(probe.train(training))(torch.randn(4, 3, 8, 8))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(compiled_model)
    for training in (True, False):
        eager.train(training)
        compiled_model.train(training)
        x, dy = torch.randn(4, 3, 8, 8), torch.randn(4, 8, 8, 8)
        for a, b in zip(_run(compiled, x, dy), _run(eager, x, dy)):
            # inductor may reorder float32 sums (conv, bias gradients): rounding-level differences
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert int(compiled_model[1].num_batches_tracked) == 1

    # the non-finite guard holds in the compiled model too (no warning there: no Python bool)
    compiled_model.train()
    before = {k: v.clone() for k, v in compiled_model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")  # NaN in every channel after the 3x3 conv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
    for key, value in compiled_model.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------------------
# Memory: the inplace stack keeps <= 0.6x the activation bytes of PyTorch's BN + LeakyReLU


def _bench_memory():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inplace_stack_saves_at_most_0_6x_the_activation_bytes():
    result = _bench_memory().measure(blocks=10, batch=2, channels=8, size=12)
    assert result["ratio"] <= 0.6, result
    assert result["diff64"] <= 1e-10, result  # the same computation (float32: see bench_memory)


def test_inplace_with_the_default_relu_says_which_activations_work():
    with pytest.raises(BatchNormError) as err:
        batchnorm.BatchNormAct2d(64, inplace=True)  # act defaults to relu
    message = str(err.value)
    assert "act='leaky_relu'" in message and "act='elu'" in message and "'identity'" in message
    assert "act='relu'" in message


# ---------------------------------------------------------------------------------------------
# double backward: gradgradcheck in float64 over the case table's shapes, train and eval


@pytest.mark.parametrize("shape", sorted({c.shape for c in CASES}))
@pytest.mark.parametrize("act", FUSED)
@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck_every_layer_and_activation(shape, act, training):
    torch.manual_seed(0)
    rank = len(shape)
    cls = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d,
           4: batchnorm.BatchNormAct2d, 5: batchnorm.BatchNormAct3d}[rank]
    m = cls(shape[1], act=act, negative_slope=0.2, alpha=1.3, dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    m.train(training)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    if training and math.prod(shape) // shape[1] == 1:
        pytest.skip("one value per channel: no training")
    # fast_mode: a random projection of the Jacobians, checked against finite differences
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)
