"""The Triton backend's lean call path, in Triton's interpreter (TRITON_INTERPRET=1, as in
test_triton.py): ``train_step`` (statistics, normalisation + activation, the running update and
its non-finite guard in one call) against the NumPy reference, and what a call costs: no value
read back from the device, a bounded number of launches, no constant copied to the device for
a new batch size.

A host read is a call of a Tensor method that makes the host wait for the device (``bool``,
``item``, ``cpu``...) whose nearest caller outside torch is the package's code (Triton's
interpreter copies every argument to the host, from its own frames). A launch is a Triton
kernel run or a torch op the package calls that computes (views and allocations do not launch a
kernel on a GPU). On CPU tensors a device-to-host copy looks like any copy, so ``copy_`` is not
counted; the package's code calls none.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import contextlib  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")

import batchnorm  # noqa: E402
from batchnorm import reference  # noqa: E402
from batchnorm.ops import triton_gpu  # noqa: E402
from tests.test_kernels import ALPHA, EPS, SLOPE, act_grad_np, act_np  # noqa: E402

PACKAGE = str(pathlib.Path(batchnorm.__file__).parent)
TORCH = str(pathlib.Path(torch.__file__).parent)
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def interpreted():
    with triton_gpu.on_cpu():
        yield


def batch(shape, dtype, channels_last=False, seed=0, scale=1.6):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.7).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    pdtype = torch.float32 if dtype in HALF else dtype  # half data, float32 parameters (AMP)
    w = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1).to(pdtype)
    b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(pdtype)
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(pdtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pdtype)
    if channels_last:
        x, dy = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, dy))
    return x, dy, w, b, rm, rv


def np64(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------------------------
# train_step against the reference


CASES = [(torch.float32, (4, 3, 5, 6), False), (torch.float32, (4, 3, 5, 6), True),
         (torch.float32, (9, 5), False), (torch.bfloat16, (4, 3, 5, 6), False),
         (torch.float16, (4, 3, 5, 6), True), (torch.float64, (3, 4, 7), False)]


@pytest.mark.parametrize("act", ["identity", "silu"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("dtype, shape, channels_last", CASES, ids=str)
def test_train_step_equals_the_reference(dtype, shape, channels_last, momentum, act):
    x, dy, w, b, rm, rv = batch(shape, dtype, channels_last)
    nbt = 2  # batches before this one: momentum None averages over 3
    factor = 0.1 if momentum is not None else torch.tensor(1.0, dtype=rm.dtype) / (nbt + 1)
    z, state = reference.forward(np64(x), np64(w), np64(b), np64(rm), np64(rv), training=True,
                                 momentum=momentum, eps=EPS, num_batches_tracked=nbt)
    rm_new, rv_new = rm.clone(), rv.clone()
    y, mean, var, ok = triton_gpu.train_step(x, w, b, rm_new, rv_new, EPS, factor, True, act,
                                             SLOPE, ALPHA, False)
    assert ok.shape == () and ok.dtype == torch.bool and bool(ok)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert mean.dtype == var.dtype == torch.float64 and rm_new.dtype == rm.dtype
    stats = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np64(mean), state.mean, **stats)
    np.testing.assert_allclose(np64(var), state.var, **stats)
    # the buffers: float32 (or float64) rounding of the float64 update
    buffers = stats if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np64(rm_new), state.running_mean, **buffers)
    np.testing.assert_allclose(np64(rv_new), state.running_var, **buffers)
    ulp = {torch.float32: 2e-5, torch.float64: 1e-10}.get(dtype, torch.finfo(dtype).eps)
    np.testing.assert_allclose(np64(y), act_np(z, act), rtol=ulp, atol=ulp)
    # the same kernels as train_impl's, bitwise, and the backward takes these statistics
    y0, mean0, var0 = triton_gpu.train_impl(x, w, b, EPS, act, SLOPE, ALPHA, False)
    assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(var, var0)
    if dtype in (torch.float32, torch.float64):
        want = reference.backward(np64(dy) * act_grad_np(z, act), state)
        got = triton_gpu.train_backward_impl(dy, x, w, b, mean, var, EPS, act, SLOPE, ALPHA,
                                             False)
        for g, ref in zip(got, want):
            np.testing.assert_allclose(np64(g), ref, rtol=1e-4 if dtype == torch.float32
                                       else 1e-10, atol=2e-5 if dtype == torch.float32 else 1e-10)


def test_train_step_without_buffers_or_affine():
    x, *_ = batch((5, 2, 3, 3), torch.float32)
    z, state = reference.forward(np64(x), None, None, None, None, training=True, eps=EPS)
    y, mean, var, ok = triton_gpu.train_step(x, None, None, None, None, EPS, 0.1, True, "relu",
                                             SLOPE, ALPHA, False)
    assert bool(ok)
    np.testing.assert_allclose(np64(var), state.var, rtol=1e-6)
    np.testing.assert_allclose(np64(y), act_np(z, "relu"), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_buffers_are_rounded_once(dtype):
    # a module wholly in half precision: the update in float64, rounded to the buffers' dtype
    x, _, w, b, rm, rv = batch((4, 3, 5, 6), dtype)
    rm, rv = rm.to(dtype), rv.to(dtype)
    _, state = reference.forward(np64(x), None, None, np64(rm), np64(rv), training=True, eps=EPS)
    triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True, "identity", SLOPE, ALPHA, False)
    assert rm.dtype == rv.dtype == dtype
    # exact for float16; Triton's interpreter truncates float32 to bfloat16 (a GPU rounds to
    # nearest), so one bfloat16 step there
    tol = dict(rtol=2.0 ** -7, atol=0.0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(rm, torch.from_numpy(state.running_mean).to(dtype), **tol)
    torch.testing.assert_close(rv, torch.from_numpy(state.running_var).to(dtype), **tol)


# ---------------------------------------------------------------------------------------------
# the non-finite guard, decided on the device


def bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_batch_leaves_the_buffers_bitwise_unchanged(dtype):
    x, _, w, b, rm, rv = batch((4, 3, 5, 5), dtype)
    x[1, 2, 3, 4] = float("nan")
    before = bits(rm), bits(rv)
    y, mean, var, ok = triton_gpu.train_step(x, w, b, rm, rv, EPS, 0.1, True, "identity", SLOPE,
                                             ALPHA, False)
    assert ok.dtype == torch.bool and not bool(ok)
    assert torch.equal(bits(rm), before[0]) and torch.equal(bits(rv), before[1])
    assert torch.isnan(mean[2]) and torch.isfinite(mean[:2]).all()  # other channels computed
    assert torch.isfinite(y[:, :2]).all()


def test_one_non_finite_channel_of_many_guards_every_buffer():
    # 4200 channels: the merge's flags come from 66 programs, read in two steps by each updater
    x, _, _, _, rm, rv = batch((3, 4200), torch.float32)
    x[2, 4199] = float("inf")
    before = bits(rm), bits(rv)
    _, mean, _, ok = triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True, "identity",
                                           SLOPE, ALPHA, False)
    assert not bool(ok) and torch.isfinite(mean[:4199]).all()
    assert torch.equal(bits(rm), before[0]) and torch.equal(bits(rv), before[1])
    x[2, 4199] = 0.0
    _, _, _, ok = triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True, "identity", SLOPE,
                                        ALPHA, False)
    assert bool(ok) and not torch.equal(bits(rm), before[0])


def test_without_check_a_nan_batch_updates_the_buffers():
    # PyTorch's behaviour: the NaN channel's buffers become NaN, the others update
    x, _, w, b, rm, rv = batch((4, 3, 5, 5), torch.float32)
    x[0, 1, 0, 0] = float("nan")
    _, state = reference.forward(np64(x[:, [0, 2]]), None, None, np64(rm[[0, 2]]),
                                 np64(rv[[0, 2]]), training=True, eps=EPS)
    y, mean, var, ok = triton_gpu.train_step(x, w, b, rm, rv, EPS, 0.1, False, "identity",
                                             SLOPE, ALPHA, False)
    assert bool(ok)  # check=False: always True
    assert torch.isnan(rm[1]) and torch.isnan(rv[1])
    np.testing.assert_allclose(np64(rm[[0, 2]]), state.running_mean, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np64(rv[[0, 2]]), state.running_var, rtol=2e-6, atol=1e-6)


def test_the_guard_sees_statistics_as_rounded_to_the_buffers():
    # float64 data whose variance (1e60) is finite in float64 but not in float32 buffers
    x, _, _, _, rm, rv = batch((4, 2, 3, 3), torch.float64, scale=1e30)
    rm, rv = rm.float(), rv.float()
    before = bits(rm), bits(rv)
    _, _, var, ok = triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True, "identity",
                                          SLOPE, ALPHA, False)
    assert torch.isfinite(var).all() and not bool(ok)
    assert torch.equal(bits(rm), before[0]) and torch.equal(bits(rv), before[1])
    # float16 buffers: a variance (60025) finite in float16 whose unbiased value, the one the
    # update adds (80033 with n = 4), is not
    x = torch.tensor([[245.0, 1.0], [-245.0, 2.0], [245.0, 3.0], [-245.0, 4.0]]).half()
    rm, rv = torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float16)
    _, _, var, ok = triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True, "identity",
                                          SLOPE, ALPHA, False)
    assert torch.isfinite(var.half()).all() and not bool(ok)
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_overflow_is_computed_again_in_float64_on_the_device(dtype):
    # squares of 5e18 overflow float32 tile sums (1024 of them), yet var (2.5e37) fits float32
    x, _, _, _, rm, rv = batch((4, 2, 16, 16), dtype, scale=5e18)
    rm, rv = rm.float(), rv.float()
    _, state = reference.forward(np64(x), None, None, np64(rm), np64(rv), training=True, eps=EPS)
    with host_reads() as reads:
        _, mean, var, ok = triton_gpu.train_step(x, None, None, rm, rv, EPS, 0.1, True,
                                                 "identity", SLOPE, ALPHA, False)
    assert not reads
    assert bool(ok) and torch.isfinite(rv).all()
    np.testing.assert_allclose(np64(var), state.var, rtol=1e-12)
    np.testing.assert_allclose(np64(rv), state.running_var, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# what a call costs: host reads, launches, constants

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "__format__", "cpu",
         "numpy", "__array__", "nonzero")


def _callers_is_package(frame) -> bool:
    """Whether the nearest frame outside torch is the package's."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE)


@contextlib.contextmanager
def host_reads():
    """The package's calls that read a device value on the host, as (name, file:line)."""
    calls = []

    def wrap(name, real):
        def counted(self, *args, **kwargs):
            frame = sys._getframe(1)
            to_cpu = name != "to" or any(str(a) == "cpu" for a in (*args, *kwargs.values()))
            if to_cpu and _callers_is_package(frame):
                calls.append((name, f"{frame.f_code.co_filename}:{frame.f_lineno}"))
            return real(self, *args, **kwargs)
        return counted

    mp = pytest.MonkeyPatch()
    for name in (*READS, "to"):
        mp.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        mp.undo()


class _TorchLaunches(TorchDispatchMode):
    """The torch ops the package calls that compute (no view, no allocation)."""

    ALLOCATE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in self.ALLOCATE) and _callers_is_package(sys._getframe(1)):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def launches(torch_ops: bool = True):
    """Triton kernel runs (kernel[grid](...) in the interpreter) and the package's torch ops
    (``torch_ops=False``: the runs alone, for a layer, whose path a dispatch mode would turn
    to the custom ops)."""
    calls = []
    kernels = type(triton_gpu._kernels().moments_kernel)
    real = kernels.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            calls.append(self.__name__)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(kernels, "run", run)
    mode = _TorchLaunches() if torch_ops else contextlib.nullcontext()
    try:
        with mode:
            yield calls
    finally:
        mp.undo()
        calls.extend(mode.ops if torch_ops else [])


def _calls(dtype, channels_last, act, check=True):
    """(name, call) of train_step, train_impl, train_backward_impl (x and from the output) and
    eval_impl on one batch."""
    x, dy, w, b, rm, rv = batch((4, 3, 5, 6), dtype, channels_last)
    y, mean, var = triton_gpu.train_impl(x, w, b, EPS, act, SLOPE, ALPHA, False)
    factor = torch.tensor(0.5, dtype=rm.dtype)
    calls = [
        ("train_step", lambda: triton_gpu.train_step(x, w, b, rm, rv, EPS, 0.1, check, act,
                                                     SLOPE, ALPHA, False)),
        ("train_step(tensor factor)", lambda: triton_gpu.train_step(
            x, w, b, rm, rv, EPS, factor, check, act, SLOPE, ALPHA, False)),
        ("train_impl", lambda: triton_gpu.train_impl(x, w, b, EPS, act, SLOPE, ALPHA, False)),
        ("train_backward_impl", lambda: triton_gpu.train_backward_impl(
            dy, x, w, b, mean, var, EPS, act, SLOPE, ALPHA, False)),
        ("eval_impl", lambda: triton_gpu.eval_impl(x, w, b, rm, rv, EPS, act, SLOPE, ALPHA)),
    ]
    if act == "leaky_relu":  # InPlace-ABN's backward, from the output
        calls.append(("train_backward_impl(inplace)", lambda: triton_gpu.train_backward_impl(
            dy, y, w, b, mean, var, EPS, act, SLOPE, ALPHA, True)))
    return calls


LIMITS = {"train_step": 3, "train_step(tensor factor)": 3, "train_impl": 3,
          "train_backward_impl": 3, "train_backward_impl(inplace)": 3, "eval_impl": 1}


@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_no_host_read(dtype, channels_last, act):
    for check in (True, False):
        for name, call in _calls(dtype, channels_last, act, check):
            call()  # compiled, cached
            with host_reads() as reads:
                call()
            assert reads == [], f"{name} read the device from the host: {reads}"


def test_no_host_read_for_non_finite_data():
    # the float32 overflow retry and the guard: decided on the device too
    x, dy, w, b, rm, rv = batch((4, 3, 5, 6), torch.float32, scale=1e30)
    x[0, 0, 0, 0] = float("nan")
    with host_reads() as reads:
        _, mean, var, ok = triton_gpu.train_step(x, w, b, rm, rv, EPS, 0.1, True, "identity",
                                                 SLOPE, ALPHA, False)
        triton_gpu.train_impl(x, w, b, EPS, "identity", SLOPE, ALPHA, False)
        triton_gpu.train_backward_impl(dy, x, w, b, mean, var, EPS, "identity", SLOPE, ALPHA,
                                       False)
    assert reads == []


def test_masked_statistics_read_only_their_count():
    # the signature's Python float count is the one read left (no mask.any(), no argmax)
    x, *_ = batch((4, 3, 5, 6), torch.float32)
    mask = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    with host_reads() as reads:
        count, mean, m2 = triton_gpu.masked_moments_impl(x, mask)
    assert count == mask.sum() and len(reads) == 1
    with host_reads() as reads:
        count, mean, m2 = triton_gpu.masked_moments_impl(x, torch.zeros_like(mask))
    assert count == 0 and (mean == 0).all() and (m2 == 0).all() and len(reads) == 1


@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "channels_last"])
def test_launches_per_call(channels_last, act):
    for name, call in _calls(torch.float32, channels_last, act):
        call()
        with launches() as ran:
            call()
        assert 0 < len(ran) <= LIMITS[name], f"{name}: {ran}"


def test_a_new_batch_size_copies_no_constant():
    made = []

    def wrap(real):
        def counted(*args, **kwargs):
            if _callers_is_package(sys._getframe(1)):
                made.append(args)
            return real(*args, **kwargs)
        return counted

    eps = 1.25e-5  # settings of this test only: its first batch size fills the cache
    for size in (13, 17, 19):
        x, dy, w, b, rm, rv = batch((size, 3, 2, 3), torch.float32)
        made.clear()
        with pytest.MonkeyPatch.context() as mp:
            for name in ("tensor", "as_tensor", "scalar_tensor", "full"):
                mp.setattr(torch, name, wrap(getattr(torch, name)))
            y, mean, var, _ = triton_gpu.train_step(x, w, b, rm, rv, eps, 0.1, True, "relu",
                                                    SLOPE, ALPHA, False)
            triton_gpu.train_backward_impl(dy, x, w, b, mean, var, eps, "relu", SLOPE, ALPHA,
                                           False)
            triton_gpu.eval_impl(x, w, b, rm, rv, eps, "relu", SLOPE, ALPHA)
        if size != 13:
            assert made == [], f"batch of {size}: constants copied to the device: {made}"


def test_the_layer_runs_three_kernels_each_way_and_one_in_eval():
    # (num_batches_tracked's add_ is the training forward's fourth launch on CUDA, a device
    # flag added to the counter; counting torch ops here would need a dispatch mode, which
    # turns a layer to the custom ops)
    previous = batchnorm.set_backend("kernels")
    try:
        m = batchnorm.BatchNorm2d(3)
        x = batch((4, 3, 5, 6), torch.float32)[0].requires_grad_()
        m(x).sum().backward()
        with launches(torch_ops=False) as ran:
            y = m(x)
        assert ran == ["moments_kernel", "finalize_moments_kernel", "train_normalize_kernel"]
        with launches(torch_ops=False) as ran:
            y.backward(torch.ones_like(y))
        assert len(ran) == 3, ran
        with launches(torch_ops=False) as ran, torch.no_grad():
            m.eval()(x)
        assert len(ran) == 1, ran
    finally:
        batchnorm.set_backend(previous)


def test_compiled_code_asks_for_the_triton_backend_without_a_graph_break():
    # on CUDA, a compiled layer runs triton_gpu.takes(x) first: under fullgraph=True a lookup
    # that Dynamo refuses to trace (importlib's find_spec, behind a cache) is an error there
    # (torch 2.11 on CUDA); this torch traces it, warning that it ignores the cache
    torch._dynamo.reset()
    f = torch.compile(lambda t: t * 2 if triton_gpu.takes(t) else t, fullgraph=True,
                      backend="eager")
    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(f(x), x * 2)
    assert not [w for w in caught if "cache" in str(w.message)], caught[0].message
