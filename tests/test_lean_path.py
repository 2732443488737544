"""The layers' call path: one backend call per forward and one per backward, the backend picked
once, the running update inside the step; and the compiled step computing the same bits."""
from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm.ops import backends, custom_ops, numba_cpu, step

NAMES = ["train_step", "train_impl", "train_backward_impl", "eval_impl", "eval_backward_impl",
         "moments_impl", "running_update_impl"]


def record(monkeypatch, module, names, into):
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k:
                            into.append(name) or real(*a, **k))


LAYERS = [
    lambda: batchnorm.BatchNorm2d(6),
    lambda: batchnorm.BatchNormAct2d(6, act="relu"),
    lambda: batchnorm.BatchNormAct2d(6, act="leaky_relu", inplace=True),
]


@pytest.mark.parametrize("make", LAYERS, ids=["bn", "bn_relu", "inplace_abn"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_backend_call_each_way(make, momentum, monkeypatch):
    m = make()
    m.momentum = momentum
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    calls, picks = [], []
    record(monkeypatch, numba_cpu, NAMES, calls)
    real_pick = step.kernels_for
    monkeypatch.setattr(step, "kernels_for", lambda *a, **k: picks.append(1) or real_pick(*a, **k))
    y = m(x)
    assert calls == ["train_step"] and len(picks) == 1
    y.backward(torch.randn_like(y))
    assert calls == ["train_step", "train_backward_impl"]
    m.eval()
    calls.clear()
    with torch.no_grad():
        m(x)
    assert calls == ["eval_impl"] and len(picks) == 2


def test_the_step_updates_the_buffers_as_pytorch_does():
    ours, theirs = batchnorm.BatchNorm2d(5, momentum=None), torch.nn.BatchNorm2d(5, momentum=None)
    for k in range(4):
        x = torch.randn(3, 5, 4, 4) * (k + 1) + k
        ours(x), theirs(x)
    # the running statistics in float64 rounded once: within a float32 ulp or two of PyTorch's
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=3e-7, atol=1e-7)
    assert int(ours.num_batches_tracked) == 4


def test_the_compiled_step_is_the_eager_step_bitwise():
    """Under torch.compile the step is the training op, then the running-update op (a node that
    mutates the buffers): the same kernels, so the same bits as eager."""
    torch._dynamo.reset()
    eager, compiled = batchnorm.BatchNorm2d(4), batchnorm.BatchNorm2d(4)
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for k in range(3):
        x = torch.randn(8, 4, 3, 3) + k
        torch.testing.assert_close(run(x), eager(x), rtol=0, atol=0)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_nan_batch_leaves_the_buffers_in_the_compiled_step_too():
    torch._dynamo.reset()
    m = batchnorm.BatchNorm2d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    for key, value in before.items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_running_update_op_is_what_torch_library_expects():
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    rm, rv = torch.zeros(5), torch.ones(5)
    torch.library.opcheck(torch.ops.batchnorm.running_update.default,
                          (mean, var, rm, rv, 0.1, None, 16, True))
    assert custom_ops.running_update(mean, var, rm, rv, 0.1, 16, True) is True
    assert backends.kernels_for(torch.randn(2, 5)) is numba_cpu


@pytest.mark.parametrize("buffers", [torch.float32, torch.float64], ids=["same", "float64"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nan"])
def test_the_step_updates_the_buffers_as_the_update_op_does(buffers, memory_format, bad):
    """The step's running update (inside the normalising kernel for buffers of x's dtype, the
    update's own kernel otherwise) gives the bits of the update op on the step's statistics,
    and a NaN batch changes nothing in either."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g).contiguous(memory_format=memory_format)
    if bad:
        x[1, 2, 3, 4] = float("nan")
    rm = torch.randn(3, generator=g, dtype=buffers)
    rv = torch.rand(3, generator=g, dtype=buffers) + 0.5
    want_m, want_v, before = rm.clone(), rv.clone(), rm.clone()
    y, mean, var, ok = numba_cpu.train_step(x, None, None, rm, rv, 1e-5, 0.3, True, "identity",
                                            0.01, 1.0, False)
    assert ok is (not bad)
    assert numba_cpu.running_update_impl(mean, var, want_m, want_v, 0.3, 100, True) is ok
    torch.testing.assert_close(rm, want_m, rtol=0, atol=0)
    torch.testing.assert_close(rv, want_v, rtol=0, atol=0)
    if not bad:
        assert not torch.equal(rm, before)  # (the update ran)
        # and the normalised output is the one without buffers (the update is after the pass)
        y0, *_ = numba_cpu.train_step(x, None, None, None, None, 1e-5, 0.3, True, "identity",
                                      0.01, 1.0, False)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# PyTorch's path off the CPU (CUDA under "auto"): the step in F.batch_norm's own kernel, routed
# here on CPU tensors


@pytest.fixture
def batch_norm_step(monkeypatch):
    from batchnorm.ops import torch_fallback

    monkeypatch.setattr(torch_fallback, "FLOAT64_STATS_DEVICES", ())
    previous = batchnorm.set_backend("torch")
    yield torch_fallback
    batchnorm.set_backend(previous)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_pytorchs_step_off_the_cpu_is_torchs_layer(batch_norm_step, momentum, dtype,
                                                   memory_format):
    torch.manual_seed(0)
    ours, theirs = batchnorm.BatchNorm2d(6, momentum=momentum), torch.nn.BatchNorm2d(6)
    theirs.momentum = momentum
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(4):
        x = (torch.randn(4, 6, 5, 5) * 3 + 2).to(dtype).contiguous(memory_format=memory_format)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        g = torch.randn_like(yo)
        yo.backward(g), yt.backward(g)
        # the same kernel, forward and backward: the same bits
        assert torch.equal(yo, yt) and torch.equal(xo.grad, xt.grad)
        assert yo.is_contiguous(memory_format=memory_format)
        assert torch.equal(ours.weight.grad, theirs.weight.grad)
    # the same batch statistics, written by lerp here and by PyTorch's EMA form there
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 4


@pytest.mark.parametrize("case", ["no buffers", "bfloat16 throughout"])
def test_pytorchs_step_off_the_cpu_other_dtypes_and_no_buffers(batch_norm_step, case,
                                                               monkeypatch):
    torch.manual_seed(0)
    kwargs = dict(track_running_stats=False) if case == "no buffers" else {}
    ours, theirs = batchnorm.BatchNorm2d(6, **kwargs), torch.nn.BatchNorm2d(6, **kwargs)
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    if case == "bfloat16 throughout":
        ours, theirs, x = ours.bfloat16(), theirs.bfloat16(), x.bfloat16()
    steps = []
    real = batch_norm_step.batch_norm_step
    monkeypatch.setattr(batch_norm_step, "batch_norm_step",
                        lambda *a: steps.append(a[-1]) or real(*a))
    for _ in range(2):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo = ours(xo)
        yt = theirs(xt)
        yo.sum().backward(), yt.sum().backward()
        assert torch.equal(yo, yt) and torch.equal(xo.grad, xt.grad)
    assert steps == [torch.float32 if case == "no buffers" else torch.bfloat16] * 2
    if case == "no buffers":
        assert ours.running_mean is None and ours.num_batches_tracked is None
    else:
        torch.testing.assert_close(ours.running_var, theirs.running_var.to(ours.running_var.dtype),
                                   rtol=1e-2 if case == "bfloat16 throughout" else 1e-6,
                                   atol=1e-6)


def test_pytorchs_step_off_the_cpu_takes_the_dtypes_f_batch_norm_takes(batch_norm_step):
    pick = batch_norm_step._statistics_dtype
    f32, f64, bf16 = (torch.ones(3, dtype=d) for d in (torch.float32, torch.float64,
                                                        torch.bfloat16))
    assert pick(f32, f32, f32, f32, f32) == torch.float32
    assert pick(bf16, f32, f32, f32, f32) == torch.float32  # autocast's mix
    assert pick(bf16, bf16, None, bf16, bf16) == torch.bfloat16
    assert pick(bf16, None, None, None, None) == torch.float32  # PyTorch's statistics dtype
    assert pick(f64, None, None, None, None) == torch.float64
    # mixes F.batch_norm refuses keep the float64 statistics' path
    assert pick(f32, f32, f32, f64, f64) is None
    assert pick(bf16, f32, f32, bf16, bf16) is None
    assert pick(f32, bf16, None, None, None) is None


def test_pytorchs_step_off_the_cpu_guards_the_buffers(batch_norm_step):
    m = batchnorm.BatchNorm2d(6)
    m(torch.randn(4, 6, 3, 3))
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 6, 3, 3)
        x[1, 2, 0, 0] = bad
        with pytest.warns(RuntimeWarning, match="1 channel"):
            m._warned_nonfinite = False
            m(x)
        after = (m.running_mean, m.running_var, m.num_batches_tracked)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    m.nonfinite = "raise"
    with pytest.raises(batchnorm.BatchNormError, match="finite batch statistics"):
        m(x)
    m.nonfinite = "update"  # PyTorch's behaviour: the batch's Inf goes into the buffers
    m(x)
    assert not m.running_mean[2].isfinite() and m.running_mean[3].isfinite()


def test_pytorchs_step_off_the_cpu_launches_few_kernels(batch_norm_step):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("empty", "detach"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m = batchnorm.BatchNorm2d(6)
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    m(x)
    with Ops() as ops:
        m(x)
    # zeros, native_batch_norm, the flag (mul, sum, eq), two lerp + where, the biased variance,
    # num_batches_tracked; the float64 statistics and their guard took 30 (on CPU the flag is
    # read on the host, _local_scalar_dense: on CUDA it is added to the counter on the device)
    launched = [op for op in ops.ops if op != "_local_scalar_dense"]
    assert len(launched) <= 11, launched
    assert "var_mean" not in launched and launched.count("native_batch_norm") == 1


def test_pytorchs_step_off_the_cpu_takes_a_device_factor(batch_norm_step):
    # momentum=None on CUDA: the cumulative factor is a device tensor (no host read)
    x, rm0, rv0 = torch.randn(4, 6, 3, 3), torch.randn(6), torch.rand(6) + 0.5
    out = []
    for factor in (0.25, torch.tensor(0.25)):
        rm, rv = rm0.clone(), rv0.clone()
        y, mean, var, ok = batch_norm_step.train_step(x, None, None, rm, rv, 1e-5, factor, True,
                                                      "identity", 0.01, 1.0, False)
        out.append((y, mean, var, rm, rv))
        assert bool(ok)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[0][2], x.var(dim=(0, 2, 3), unbiased=False))
    torch.testing.assert_close(out[0][3], rm0.lerp(x.mean(dim=(0, 2, 3)), 0.25))


def test_pytorchs_step_off_the_cpu_is_eager_only(batch_norm_step, monkeypatch):
    # compiled, the float64 statistics' ops (fused by the compiler): inductor simplifies
    # x * 0 to 0, which would make the eager step's flag pass a NaN batch into the buffers
    called = []
    real = batch_norm_step.batch_norm_step
    monkeypatch.setattr(batch_norm_step, "batch_norm_step",
                        lambda *a: called.append(1) or real(*a))
    m = batchnorm.BatchNorm2d(6)
    x = torch.randn(4, 6, 3, 3)
    m(x)
    assert called == [1]
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    compiled(x)
    assert called == [1] and int(m.num_batches_tracked) == 2
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = m.running_mean.clone()
    compiled(bad)  # (compiled, the flag is counted on the device: no warning)
    assert torch.equal(before, m.running_mean) and called == [1]
    assert int(m.num_batches_tracked) == 2


def test_pytorchs_step_off_the_cpu_leaves_vmap_its_path(batch_norm_step):
    # under vmap F.batch_norm refuses running statistics written in place (the zeroed pair):
    # functorch transforms keep the float64 statistics' path
    m = batchnorm.BatchNorm2d(6, track_running_stats=False)
    x = torch.randn(3, 4, 6, 3, 3)
    torch.testing.assert_close(torch.func.vmap(m)(x), torch.stack([m(xi) for xi in x]))


# ---------------------------------------------------------------------------------------------
# the eval forward by address: the tensors' memory, no NumPy views (kernels/memory.py)


def _far_from_zero(shape, channels_last, dtype, g):
    """The by-address tests' input: far from 0 (so mean_lo counts), in either layout."""
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1e3
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _affine(c, dtype, g):
    """(weight, bias) of the by-address tests."""
    return torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape, channels_last", [((2, 8, 4, 4), False), ((4, 6, 5, 5), True),
                                                  ((3, 5), False), ((2, 8, 70, 70), False),
                                                  ((2, 300, 3, 3), True), ((2, 3, 7), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eval_by_address_is_eval_by_arrays_bit_for_bit(shape, channels_last, dtype):
    from batchnorm import kernels

    g = torch.Generator().manual_seed(0)
    x = _far_from_zero(shape, channels_last, dtype, g)
    c = shape[1]
    w, b = _affine(c, dtype, g)
    rm = (torch.randn(c, generator=g, dtype=dtype) * 3 + 1e3)
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    kind = numba_cpu.layout(x)
    for act in ("identity", "leaky_relu"):
        for affine in ((w, b), (None, None), (w, None), (None, b)):
            got = numba_cpu.eval_impl(x, *affine, rm, rv, 1e-5, act, 0.1, 1.0)
            want = torch.empty_like(x)
            kernels.eval_forward(numba_cpu._kernel_array(x, kind), *(
                None if t is None else t.numpy() for t in affine), rm.numpy(), rv.numpy(),
                1e-5, numba_cpu._CODES[act], 0.1, 1.0, numba_cpu._kernel_array(want, kind))
            assert torch.equal(got, want), (act, [t is None for t in affine])
            assert got.stride() == x.stride()


@pytest.mark.parametrize("shape, channels_last", [((2, 8, 4, 4), False), ((4, 6, 5, 5), True),
                                                  ((3, 5), False), ((2, 8, 70, 70), False),
                                                  ((2, 32, 3, 3), False), ((2, 300, 3, 3), True),
                                                  ((2, 3, 7), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_training_step_by_address_is_by_arrays_bit_for_bit(shape, channels_last, dtype):
    # every statistics kernel (float32 blocks on 70x70 planes, a task per channel on 3x3 planes
    # of 32 channels, float64 sums, channels-last rows), with and without buffers and affine,
    # and a NaN batch (the float64 statistics' retry; the guard leaves the buffers as they were)
    from batchnorm import kernels

    g = torch.Generator().manual_seed(0)
    x = _far_from_zero(shape, channels_last, dtype, g)
    bad = x.clone()
    bad[(0,) * x.dim()] = float("nan")
    c = shape[1]
    w, b = _affine(c, dtype, g)
    kind = numba_cpu.layout(x)
    for data in (x, bad):
        for act, affine, buffers in (("identity", (w, b), True), ("leaky_relu", (None, b), True),
                                     ("relu", (w, None), False), ("identity", (None, None), True)):
            state = [(torch.randn(c, generator=g, dtype=dtype),
                      torch.rand(c, generator=g, dtype=dtype) + 0.5) if buffers else (None, None)]
            state.append(tuple(None if t is None else t.clone() for t in state[0]))
            got = numba_cpu.train_step(data, *affine, *state[0], 1e-5, 0.1, True, act, 0.1, 1.0,
                                       False)
            want_y = torch.empty_like(data)
            mean, var, ok = kernels.train_step(
                numba_cpu._kernel_array(data, kind),
                *(None if t is None else t.numpy() for t in affine), 1e-5, numba_cpu._CODES[act],
                0.1, 1.0, numba_cpu._kernel_array(want_y, kind),
                *(() if not buffers else (state[1][0].numpy(), state[1][1].numpy(), 0.1, True)))
            same = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN where NaN
            torch.testing.assert_close(got[0], want_y, **same)
            assert got[0].stride() == data.stride()
            torch.testing.assert_close(got[1], torch.from_numpy(mean), **same)
            torch.testing.assert_close(got[2], torch.from_numpy(var), **same)
            assert got[3] == ok == (data is x or not buffers)
            if buffers:
                assert torch.equal(state[0][0], state[1][0])
                assert torch.equal(state[0][1], state[1][1])


@pytest.mark.parametrize("shape, channels_last", [((2, 8, 4, 4), False), ((4, 6, 5, 5), True),
                                                  ((3, 5), False), ((2, 4, 30, 30), False),
                                                  ((2, 300, 3, 3), True), ((2, 3, 7), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_training_backward_by_address_is_by_arrays_bit_for_bit(shape, channels_last, dtype):
    # both passes (the float32-block sums on 900-value planes), affine absent / partial, the
    # inplace mode (src is the output y), a dy in other strides (copied into src's first)
    from batchnorm import kernels

    g = torch.Generator().manual_seed(1)
    x = _far_from_zero(shape, channels_last, dtype, g)
    dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(
        memory_format=torch.contiguous_format)
    c = shape[1]
    w, b = _affine(c, dtype, g)
    kind = numba_cpu.layout(x)
    for act, affine, inplace in (("identity", (w, b), False), ("relu", (None, b), False),
                                 ("leaky_relu", (w, None), True), ("elu", (None, None), True)):
        y, mean, var, _ = numba_cpu.train_step(x, *affine, None, None, 1e-5, 0.0, False, act,
                                               0.1, 1.0, inplace)
        src = y if inplace else x
        got = numba_cpu.train_backward_impl(dy, src, *affine, mean, var, 1e-5, act, 0.1, 1.0,
                                            inplace)
        want_dx = torch.empty_like(src)
        dense_dy = dy.contiguous(memory_format=torch.channels_last) if channels_last else dy
        dw, db = kernels.train_backward(
            numba_cpu._kernel_array(dense_dy, kind), numba_cpu._kernel_array(src, kind),
            *(None if t is None else t.numpy() for t in affine), mean.numpy(), var.numpy(),
            1e-5, numba_cpu._CODES[act], 0.1, 1.0, inplace,
            numba_cpu._kernel_array(want_dx, kind))
        assert torch.equal(got[0], want_dx) and got[0].stride() == src.stride(), act
        assert torch.equal(got[1], torch.from_numpy(dw).to(dtype)), act
        assert torch.equal(got[2], torch.from_numpy(db).to(dtype)), act


def test_a_layers_training_step_takes_its_tensors_by_address(monkeypatch):
    from batchnorm import kernels

    calls = []
    for name in ("train_step", "train_step_at", "train_backward", "train_backward_at"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    m = batchnorm.BatchNormAct2d(6, act="relu")
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    m(x).sum().backward()
    with torch.no_grad():
        m(torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last))
    assert calls == ["train_step_at", "train_backward_at", "train_step_at"]
    # a buffer the kernels cannot take by address: the arrays' path, the same update
    m.running_var = torch.ones(12)[::2]
    ref = torch.nn.BatchNorm2d(6)
    ref.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        y = m(x)
        want = torch.relu(ref(x))
    assert calls[-1] == "train_step"
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_a_layers_eval_takes_its_tensors_by_address(monkeypatch):
    from batchnorm import kernels

    calls = []
    for name in ("eval_forward", "eval_forward_at"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    m = batchnorm.BatchNormAct2d(6, act="relu").eval()
    with torch.no_grad():
        m(torch.randn(2, 6, 3, 3))
        m(torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last))
    assert calls == ["eval_forward_at"] * 2
    # a per-channel tensor the kernels cannot take by address: the arrays' path, same result
    m.running_var = torch.ones(12)[::2]
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        y = m(x)
    assert calls[-1] == "eval_forward"
    want = torch.relu(torch.nn.functional.batch_norm(x, m.running_mean, m.running_var.clone(),
                                                     m.weight, m.bias, False, 0.0, m.eps))
    torch.testing.assert_close(y, want)
