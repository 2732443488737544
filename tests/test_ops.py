"""batchnorm.ops: the custom ops against PyTorch (F.batch_norm + activation) and the plain path.

Also: gradcheck in float64, the inplace (InPlace-ABN) mode, memory formats, thread-count
determinism, large-offset stability, empty batches, errors, torch.compile and torch.export.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm import BatchNormError, kernels, ops

SLOPE, ALPHA, EPS = 0.1, 1.3, 1e-5
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def torch_act(z, act):
    """PyTorch's own activations (the independent reference)."""
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
        "elu": lambda t: F.elu(t, ALPHA),
        "silu": F.silu,
        "relu6": F.relu6,
        "hardswish": F.hardswish,
    }[act](z)


def make(shape, dtype, memory_format=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.5
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    w = torch.randn(c, generator=g, dtype=dtype) * 0.5 + 1.0
    b = torch.randn(c, generator=g, dtype=dtype) * 0.5
    dy = torch.randn(shape, generator=g, dtype=dtype)
    return x, w, b, dy


def outputs_and_grads(fn, x, w, b, dy):
    """(y, dx, dw, db, *extra outputs) of fn(x, w, b) for the loss sum(y * dy)."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    y, extra = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    return [y.detach(), dx, dw, db, *extra]


def assert_all_close(got, want, dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


CASES = [  # (shape, memory format)
    ((6, 3, 5, 4), None),
    ((6, 3, 5, 4), torch.channels_last),
    ((3, 2, 3, 4, 5), torch.channels_last_3d),
    ((7, 4), None),
    ((4, 3, 9), None),
    ((2, 16, 16, 32), None),  # wider: more planes per channel merge
]


# ---------------------------------------------------------------------------------------------
# against PyTorch


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape,memory_format", CASES)
def test_train_matches_torch(shape, memory_format, act, dtype):
    x, w, b, dy = make(shape, dtype, memory_format)

    def torch_train(x, w, b):
        z = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
        dims = [0, *range(2, x.dim())]
        return torch_act(z, act), x.mean(dims).detach(), x.var(dims, correction=0).detach()

    got = outputs_and_grads(lambda x, w, b: ops.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA),
                            x, w, b, dy)
    assert_all_close(got, outputs_and_grads(torch_train, x, w, b, dy), dtype)
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape,memory_format", CASES)
def test_eval_matches_torch(shape, memory_format, act, dtype):
    x, w, b, dy = make(shape, dtype, memory_format)
    rm = torch.linspace(-1, 1, shape[1], dtype=dtype)
    rv = torch.linspace(0.5, 2, shape[1], dtype=dtype)

    def torch_eval(x, w, b):
        return torch_act(F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS), act)

    got = outputs_and_grads(
        lambda x, w, b: ops.bn_act_eval(x, w, b, rm, rv, EPS, act, SLOPE, ALPHA), x, w, b, dy)
    assert_all_close(got, outputs_and_grads(torch_eval, x, w, b, dy), dtype)
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_other_dtypes_and_strides_take_pytorchs_path(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "train_forward", lambda *a: calls.append(a))
    x, w, b, dy = make((8, 3, 6, 6), dtype)
    x = x.transpose(2, 3)  # neither contiguous nor channels-last
    y, mean, var = ops.bn_act_train(x, w, b, EPS, "relu")
    want = F.relu(F.batch_norm(x, None, None, w, b, training=True, eps=EPS))
    torch.testing.assert_close(y, want)
    assert not calls and mean.dtype == torch.float32 and y.stride() == x.stride()


@pytest.mark.parametrize("dtype,rtol", ((torch.float16, 1e-6), (torch.bfloat16, 1e-6)))
@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
def test_reduced_dtypes_keep_float32_statistics_as_torch(dtype, rtol, memory_format):
    # PyTorch computes half-precision batch statistics in float32 and keeps float32 buffers
    from batchnorm import BatchNorm2d

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 5, 9, 9, generator=g) * 2 + 3).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    theirs, ours = torch.nn.BatchNorm2d(5), BatchNorm2d(5)
    for _ in range(3):
        want_y, got_y = theirs(x), ours(x)
    torch.testing.assert_close(got_y, want_y)
    assert got_y.dtype == dtype
    for name in ("running_mean", "running_var"):
        got, want = getattr(ours, name), getattr(theirs, name)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    _, mean, var = ops.bn_act_train(x, None, None, EPS)
    assert mean.dtype == var.dtype == torch.float32
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), correction=0), rtol=1e-6, atol=0)


def test_kernels_run_for_cpu_float_dense_input(monkeypatch):
    calls = []
    original = kernels.train_forward
    monkeypatch.setattr(kernels, "train_forward", lambda *a: calls.append(1) or original(*a))
    for mf in (None, torch.channels_last):
        x, w, b, _ = make((4, 3, 5, 5), torch.float32, mf)
        ops.bn_act_train(x, w, b, EPS, "relu")
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("act", ("identity", "leaky_relu", "elu", "silu"))
@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
def test_gradcheck_train_and_eval(act, memory_format):
    x, w, b, _ = make((2, 2, 3, 3), torch.float64, memory_format)
    rm, rv = (torch.tensor([0.3, -0.2], dtype=torch.float64),
              torch.tensor([0.7, 1.4], dtype=torch.float64))
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA)[0], inputs)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.bn_act_eval(x, w, b, rm, rv, EPS, act, SLOPE, ALPHA), inputs)


@pytest.mark.parametrize("act", ops.INVERTIBLE)
@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_inplace_equals_non_inplace(act, memory_format, dtype):
    x, w, b, dy = make((6, 3, 5, 4), dtype, memory_format)
    w[1] = -w[1]
    grads = [
        outputs_and_grads(
            lambda x, w, b: ops.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA, inplace=inplace),
            x, w, b, dy)
        for inplace in (False, True)
    ]
    assert_all_close(grads[1], grads[0], dtype)


@pytest.mark.parametrize("act", ops.INVERTIBLE)
def test_inplace_on_pytorchs_path_equals_non_inplace(act):
    x, w, b, dy = make((6, 3, 5, 4), torch.float64)
    x, dy = x.transpose(2, 3), dy.transpose(2, 3)  # strides the kernels do not take
    grads = [
        outputs_and_grads(
            lambda x, w, b: ops.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA, inplace=inplace),
            x, w, b, dy)
        for inplace in (False, True)
    ]
    assert_all_close(grads[1], grads[0], torch.float64)


@pytest.mark.parametrize("plain", (False, True))
def test_inplace_saves_the_output_not_the_input(plain):
    x, w, b, _ = make((4, 3, 5, 6), torch.float32)
    if plain:
        x = x.transpose(2, 3)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, _, _ = ops.bn_act_train(x, w, b, EPS, "leaky_relu", SLOPE, inplace=True)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()


# ---------------------------------------------------------------------------------------------
# numerics, determinism, edge cases


@pytest.mark.parametrize("shape", ((16, 4, 8, 8), (2, 16, 16, 32), (2, 4, 64, 64)))
@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
def test_large_offset_float32_within_1e_6_of_exact(memory_format, shape):
    g = torch.Generator().manual_seed(7)
    x = (1e4 + 1e-2 * torch.randn(*shape, generator=g, dtype=torch.float64))
    exact = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), correction=0, keepdim=True) + EPS)
    x32 = x.float().contiguous(memory_format=memory_format or torch.contiguous_format)
    y, _, _ = ops.bn_act_train(x32, None, None, EPS)
    # the float32 input itself is rounded: compare with the exact result of that input
    x32d = x32.double()
    exact = (x32d - x32d.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x32d.var((0, 2, 3), correction=0, keepdim=True) + EPS)
    # measured 3.5e-7 (the output's own float32 rounding); PyTorch CPU: 3e-2, channels-last 3.8
    assert (y.double() - exact).abs().max() < 1e-6


@pytest.mark.parametrize("shape,memory_format", [
    ((40, 1024, 2, 2), torch.channels_last),
    ((40, 1024, 2, 2), torch.contiguous_format),
    ((4, 16, 32, 32), torch.contiguous_format),  # long planes, channels merged in parallel
])
def test_one_and_two_threads_give_identical_bits(shape, memory_format):
    x, w, b, dy = make(shape, torch.float32, memory_format)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(outputs_and_grads(
                lambda x, w, b: ops.bn_act_train(x, w, b, EPS, "relu"), x, w, b, dy))
            runs[-1] += outputs_and_grads(
                lambda x, w, b: ops.bn_act_eval(x, w, b, b.detach(), w.detach() ** 2, EPS, "silu"),
                x, w, b, dy)
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


THREADS_SCRIPT = """
import torch
torch.set_num_threads(1)
assert torch.get_num_threads() == 1  # torch's OpenMP is initialised before numba's pool starts
import batchnorm
from batchnorm import kernels
kernels.set_threads(2)  # numba's pool starts here or earlier; torch's count must stay 1
after_set = torch.get_num_threads()
m = batchnorm.BatchNormAct2d(4, act="relu")
m(torch.randn(64, 4, 32, 32)).sum().backward()  # > 64k elements: the kernels run threaded
print(after_set, torch.get_num_threads())
"""


def test_kernels_leave_torchs_thread_count_alone():
    # a fresh process: numba's OpenMP layer used to reset torch's count when its pool started
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]


def test_two_python_threads_at_once_give_the_sequential_results():
    import threading

    shapes = [(64, 8, 16, 16), (32, 16, 8, 8)]  # > 64k and < 64k elements per call
    inputs = [make(shape, torch.float32, seed=i) for i, shape in enumerate(shapes)]

    def run(i):
        return outputs_and_grads(lambda x, w, b: ops.bn_act_train(x, w, b, EPS, "silu"),
                                 *inputs[i])

    want = [run(i) for i in range(2)]
    got: list = [[], []]

    def work(i):
        for _ in range(20):
            got[i].append(run(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(got[i]) == 20
        for result in got[i]:
            for g, w in zip(result, want[i], strict=True):
                assert torch.equal(g, w)


@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
def test_empty_batch(memory_format):
    x = torch.empty(0, 3, 4, 4).contiguous(memory_format=memory_format or torch.contiguous_format)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    x.requires_grad_()
    y, mean, var = ops.bn_act_train(x, w, b, EPS, "relu")
    assert y.shape == x.shape and torch.equal(mean, torch.zeros(3)) and var.isnan().all()
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert (dx.shape == x.shape and torch.equal(dw, torch.zeros(3))
            and torch.equal(db, torch.zeros(3)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(act="gelu"), "expected act in"),
        (dict(act="relu", inplace=True), "expected an invertible act"),
        (dict(act="leaky_relu", negative_slope=0.0, inplace=True), "negative_slope > 0"),
        (dict(eps=0.0), "eps > 0 in training"),
        (dict(weight=torch.ones(4)), "weight of shape (3,)"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(x=torch.randn(4, 3, 2), weight=None, bias=None, eps=EPS)
    args.update(kwargs)
    with pytest.raises(BatchNormError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.bn_act_train(**args)


def test_bad_input_raises():
    with pytest.raises(BatchNormError, match="2D to 5D"):
        ops.bn_act_eval(torch.randn(4), None, None, torch.zeros(4), torch.ones(4), EPS)
    with pytest.raises(BatchNormError, match="floating-point"):
        ops.bn_act_train(torch.ones(4, 3, dtype=torch.int64), None, None, EPS)


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.export see one op


class ConvBNReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.rand(4) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return ops.bn_act_train(self.conv(x), self.weight, self.bias, EPS, "relu")[0]


@pytest.mark.slow
def test_compile_matches_eager_without_graph_break():
    model = ConvBNReLU()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), list(model.parameters()))
    compiled_y = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_y.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled_y, eager_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_contains_the_batchnorm_op():
    program = torch.export.export(ConvBNReLU(), (torch.randn(2, 3, 6, 6),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "batchnorm.bn_act_train.default" in targets
    assert not any("batch_norm" in t for t in targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
def test_cuda_takes_pytorchs_path_and_matches_torch(memory_format):
    x, w, b, dy = (t.cuda() for t in make((8, 4, 5, 5), torch.float32, memory_format))
    for inplace in (False, True):
        got = outputs_and_grads(
            lambda x, w, b: ops.bn_act_train(x, w, b, EPS, "leaky_relu", SLOPE, inplace=inplace),
            x, w, b, dy)

        def torch_train(x, w, b):
            z = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
            return (F.leaky_relu(z, SLOPE), x.mean((0, 2, 3)).detach(),
                    x.var((0, 2, 3), correction=0).detach())

        assert_all_close(got, outputs_and_grads(torch_train, x, w, b, dy), torch.float32)
        assert got[0].is_cuda and got[0].stride() == x.stride()


@pytest.mark.parametrize("train", [True, False])
def test_eager_without_autograd_skips_the_dispatcher_with_the_same_bits(train):
    """No graph to record: the op's implementation runs directly (same kernels, same bits);
    with gradients it runs through _EagerTrain / _EagerEval (tested against the op below)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5

    def call(x_, w_):
        if train:
            return ops.bn_act_train(x_, w_, b, 1e-5, "leaky_relu", 0.1)[0]
        return ops.bn_act_eval(x_, w_, b, rm, rv, 1e-5, "leaky_relu", 0.1)

    with torch.no_grad():
        plain = call(x, w)
    assert plain.grad_fn is None
    wg = w.clone().requires_grad_()
    recorded = call(x, wg)
    assert recorded.grad_fn is not None
    assert torch.equal(plain, recorded.detach())


# ---------------------------------------------------------------------------------------------
# eager with autograd: _EagerTrain / _EagerEval instead of the op's dispatcher round trip

RM, RV = [0.3, -0.2, 0.1], [0.7, 1.4, 0.2]


def eager_and_op(train, x, w, b, inplace=False):
    """(eager route, op route) callables of (x, w, b) -> outputs, statistics in x's dtype."""
    rm, rv = (torch.tensor(v, dtype=x.dtype) for v in (RM, RV))
    if train:
        def eager(x, w, b):
            return ops.bn_act_train(x, w, b, EPS, "leaky_relu", SLOPE, ALPHA, inplace)

        def op(x, w, b):  # the custom op called directly, as torch.compile and export see it
            y, mean, var = torch.ops.batchnorm.bn_act_train(
                x, w, b, EPS, "leaky_relu", SLOPE, ALPHA, inplace)
            return y, mean.to(x.dtype), var.to(x.dtype)
        return eager, op

    def eager(x, w, b):
        return ops.bn_act_eval(x, w, b, rm, rv, EPS, "leaky_relu", SLOPE, ALPHA)

    def op(x, w, b):
        return torch.ops.batchnorm.bn_act_eval(x, w, b, rm, rv, EPS, "leaky_relu", SLOPE, ALPHA)
    return eager, op


def grad_fn_name(fn, x, w, b):
    out = fn(*(t.detach().clone().requires_grad_() for t in (x, w, b)))
    return type((out[0] if isinstance(out, tuple) else out).grad_fn).__name__


@pytest.mark.parametrize("train,inplace", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_eager_autograd_route_matches_the_op_bit_for_bit(train, inplace, memory_format, dtype):
    x, w, b, dy = make((6, 3, 5, 4), dtype, memory_format)
    w[1] = -w[1]  # a negative scale: the inplace inversion divides by it
    eager, op = eager_and_op(train, x, w, b, inplace)
    want = "_EagerTrainBackward" if train else "_EagerEvalBackward"
    assert grad_fn_name(eager, x, w, b) == want
    assert "bn_act" in grad_fn_name(op, x, w, b)
    got, want = outputs_and_grads(eager, x, w, b, dy), outputs_and_grads(op, x, w, b, dy)
    assert len(got) == (6 if train else 4)  # y, dx, dw, db (, mean, var)
    for g, o in zip(got, want, strict=True):
        assert g.dtype == o.dtype and g.stride() == o.stride() and torch.equal(g, o)


@pytest.mark.parametrize("train", (True, False))
def test_eager_autograd_route_without_weight_or_bias_matches_the_op(train):
    x, _, _, dy = make((4, 3, 5, 5), torch.float64, torch.channels_last)
    eager, op = eager_and_op(train, x, None, None)
    grads = []
    for fn in (eager, op):
        xg = x.clone().requires_grad_()
        out = fn(xg, None, None)
        y = out[0] if train else out
        grads.append((y.detach(), *torch.autograd.grad(y, xg, dy)))
    for g, o in zip(*grads, strict=True):
        assert torch.equal(g, o)


def test_eager_autograd_route_skips_the_dispatcher(monkeypatch):
    """The profiler records every dispatcher call: none of the batchnorm ops forward or backward
    on the eager route; all four with the route forced back to the op."""
    torch.manual_seed(0)
    x, dy = torch.randn(4, 3, 5, 5, requires_grad=True), torch.randn(4, 3, 5, 5)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)

    def names():
        with torch.autograd.profiler.profile() as prof:
            y = ops.bn_act_train(x, w, b, EPS, "relu")[0]
            torch.autograd.grad(y, (x, w, b), dy)
            y = ops.bn_act_eval(x, w, b, rm, rv, EPS, "relu")
            torch.autograd.grad(y, (x, w, b), dy)
        return {e.name for e in prof.function_events if e.name.startswith("batchnorm::")}

    assert names() == set()
    monkeypatch.setattr(ops.custom_ops, "plain_eager", lambda *a: False)
    assert names() == {"batchnorm::bn_act_train", "batchnorm::bn_act_train_backward",
                       "batchnorm::bn_act_eval", "batchnorm::bn_act_eval_backward"}


@pytest.mark.parametrize("act,inplace", [("silu", False), ("elu", True), ("leaky_relu", True)])
@pytest.mark.parametrize("memory_format", (None, torch.channels_last))
def test_gradcheck_through_the_eager_route(act, inplace, memory_format):
    x, w, b, _ = make((3, 2, 3, 2), torch.float64, memory_format)
    rm, rv = torch.tensor(RM[:2], dtype=torch.float64), torch.tensor(RV[:2], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))

    def train(x, w, b):
        y = ops.bn_act_train(x, w, b, EPS, act, SLOPE, ALPHA, inplace)[0]
        assert type(y.grad_fn).__name__ == "_EagerTrainBackward"
        return y

    def evaluate(x, w, b):
        y = ops.bn_act_eval(x, w, b, rm, rv, EPS, act, SLOPE, ALPHA)
        assert type(y.grad_fn).__name__ == "_EagerEvalBackward"
        return y

    assert torch.autograd.gradcheck(train, inputs)
    assert torch.autograd.gradcheck(evaluate, inputs)


@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("route", ("eager", "op"))
def test_double_backward_on_both_routes(train, route):
    """create_graph=True gives the first-order gradients (the same bits as without it), and
    differentiating them again gives PyTorch's second derivatives, on either route."""
    x, w, b, dy = make((4, 3, 5, 5), torch.float64)
    fn = dict(zip(("eager", "op"), eager_and_op(train, x, w, b)))[route]
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    y = out[0] if train else out
    first = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    plain = torch.autograd.grad(fn(x, w, b)[0] if train else fn(x, w, b), (x, w, b), dy)
    assert all(torch.equal(f, p) for f, p in zip(first, plain, strict=True))
    second = torch.autograd.grad(first[0].square().sum() + first[1].sum(), (x, w, b))

    # PyTorch's BN + LeakyReLU (what eager_and_op runs), the same statistics in eval
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = torch.tensor(RM, dtype=torch.float64), torch.tensor(RV, dtype=torch.float64)
    yt = F.leaky_relu(F.batch_norm(xt, None if train else rm, None if train else rv, wt, bt,
                                   training=train, eps=EPS), SLOPE)
    first_t = torch.autograd.grad(yt, (xt, wt, bt), dy, create_graph=True)
    second_t = torch.autograd.grad(first_t[0].square().sum() + first_t[1].sum(), (xt, wt, bt))
    for got, want in zip(second, second_t, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_double_backward_of_the_inplace_mode_is_a_clear_error():
    x, w, b, dy = make((4, 3, 5, 5), torch.float64)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.bn_act_train(x, w, b, EPS, "leaky_relu", SLOPE, ALPHA, inplace=True)[0]
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    with pytest.raises(BatchNormError, match="expected inplace=False to differentiate"):
        torch.autograd.grad(dx.square().sum(), x)


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", (True, False))
def test_modes_see_the_op_with_or_without_autograd(grad):
    x, w, b, dy = make((4, 3, 5, 5), torch.float32)
    x.requires_grad_(grad)
    with OpRecorder() as mode:
        y = ops.bn_act_train(x, w, b, EPS, "relu")[0]
        if grad:
            torch.autograd.grad(y, x, dy)
    want = {"batchnorm.bn_act_train.default"} | ({"batchnorm.bn_act_train_backward.default"}
                                                 if grad else set())
    assert want <= mode.names
    with torch.no_grad():
        assert torch.equal(y, ops.bn_act_train(x, w, b, EPS, "relu")[0])

