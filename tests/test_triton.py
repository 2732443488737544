"""The Triton GPU backend, run here without a GPU: Triton's interpreter (TRITON_INTERPRET=1)
executes the kernels on CPU tensors, and ``triton_gpu.on_cpu()`` routes the ops to them.

Checked against the NumPy reference in float64 (kernels) and PyTorch (the layers through the
case table), as the CPU kernels are; half precision against the error PyTorch's own kernels
reach on the same input. The last test compiles the kernels with Triton's real compiler for a
GPU target (no GPU needed), which the interpreter does not exercise.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import batchnorm  # noqa: E402
from batchnorm import ops, reference  # noqa: E402
from batchnorm.activations import FUSED, INVERTIBLE, REGISTRY  # noqa: E402
from batchnorm.ops import numba_cpu, triton_gpu  # noqa: E402
from tests import test_layers  # noqa: E402
from tests.cases import CASES, assert_steps_close, module_trajectory, torch_trajectory  # noqa: E402
from tests.test_kernels import ALPHA, EPS, SLOPE, act_grad_np, act_np, mask_for  # noqa: E402
from tests.test_layers import OURS, our_module  # noqa: E402
from tests.test_variants import LAYERS, check_options  # noqa: E402
from tests.test_variants import OPTIONS as VARIANT_OPTIONS  # noqa: E402

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
STATS_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = [(5, 3, 4, 7), (2, 16, 3, 5), (7, 4), (3, 2, 9), (2, 3, 2, 3, 4), (1, 3, 40, 40)]


@pytest.fixture(autouse=True)
def interpreted():
    # "kernels": the Triton kernels for plain BN too ("auto" takes PyTorch's path for it on CUDA)
    previous = batchnorm.set_backend("kernels")
    with triton_gpu.on_cpu():
        yield
    batchnorm.set_backend(previous)


def tensors(shape, dtype, channels_last, seed=0, loc=0.7, scale=1.6):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    if channels_last:
        x, dy = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, dy))
    return x, w, b, dy


def np64(t):
    return None if t is None else t.detach().double().numpy()


def close(got, want, dtype, tol=TOL):
    np.testing.assert_allclose(np64(got), want, **tol[dtype])


# ---------------------------------------------------------------------------------------------
# the kernels against the reference


def test_activation_codes_match_the_registry():
    kernels = triton_gpu._kernels()
    for name in FUSED:
        assert getattr(kernels, name.upper()).value == REGISTRY[name].code


def test_routing_takes_cpu_tensors_only_inside_on_cpu(monkeypatch):
    x = torch.randn(2, 3, 4)
    assert ops._backend(x) == "triton" and ops._backend(x.half()) == "triton"
    assert ops._backend(x.transpose(0, 2)) == "torch"  # strides the kernels do not view
    assert ops._backend(x, torch.ones(3, dtype=torch.float64)) == "torch"  # mixed dtypes
    monkeypatch.setattr(triton_gpu, "_INTERPRET_ON_CPU", False)  # outside on_cpu()
    assert ops._backend(x) == "numba" and ops._backend(x.half()) == "torch"


# every shape in both layouts ((N, C) is both at once), 3D channels-last as (N, L, C) storage
LAYOUTS = [(shape, cl) for shape in SHAPES for cl in (False, True) if not (cl and len(shape) == 2)]


@pytest.mark.parametrize("act", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channels_last", LAYOUTS)
def test_train_forward_and_backward(act, channels_last, dtype, shape):
    x, w, b, dy = tensors(shape, dtype, channels_last)
    z_ref, state = reference.forward(np64(x), np64(w), np64(b), None, None, training=True)
    y, mean, var = triton_gpu.train_impl(x, w, b, EPS, act, SLOPE, ALPHA, False)
    assert y.stride() == x.stride() and mean.dtype == var.dtype == torch.float64
    close(mean, state.mean, dtype, STATS_TOL)
    close(var, state.var, dtype, STATS_TOL)
    close(y, act_np(z_ref, act), dtype)
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy) * act_grad_np(z_ref, act), state)
    dx, dw, db = triton_gpu.train_backward_impl(dy, x, w, b, mean, var, EPS, act, SLOPE, ALPHA,
                                                False)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    close(db, db_ref, dtype)
    if act in INVERTIBLE:  # InPlace-ABN: the same gradients from the output
        dxi, dwi, dbi = triton_gpu.train_backward_impl(dy, y, w, b, mean, var, EPS, act, SLOPE,
                                                       ALPHA, True)
        loose = {dtype: dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOL[dtype]}
        close(dxi, dx_ref, dtype, loose)
        close(dwi, dw_ref, dtype, loose)
        close(dbi, db_ref, dtype, loose)


@pytest.mark.parametrize("act", FUSED)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_forward_and_backward(act, channels_last, dtype):
    x, w, b, dy = tensors((4, 5, 3, 6), dtype, channels_last, seed=1)
    rm = torch.linspace(-0.5, 0.5, 5, dtype=dtype)
    rv = torch.linspace(0.5, 2.0, 5, dtype=dtype)
    z_ref, state = reference.forward(np64(x), np64(w), np64(b), np64(rm), np64(rv),
                                     training=False, eps=EPS)
    y = triton_gpu.eval_impl(x, w, b, rm, rv, EPS, act, SLOPE, ALPHA)
    close(y, act_np(z_ref, act), dtype)
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy) * act_grad_np(z_ref, act), state)
    dx, dw, db = triton_gpu.eval_backward_impl(dy, x, w, b, rm, rv, EPS, act, SLOPE, ALPHA)
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    close(db, db_ref, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_offset_float32_is_exact_to_float64(channels_last):
    # mean 1e4, std 1e-2: E[x^2] - E[x]^2 fails here; the shifted tiles do not
    g = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    want, state = reference.forward(np64(x), None, None, None, None, training=True)
    y, mean, var = triton_gpu.train_impl(x, None, None, EPS, "identity", SLOPE, ALPHA, False)
    np.testing.assert_allclose(np64(mean), state.mean, rtol=1e-12)
    np.testing.assert_allclose(np64(var), state.var, rtol=1e-5)
    assert np.abs(np64(y) - want).max() < 1e-3


def test_non_finite_float32_tiles_are_computed_again_in_float64():
    # squares of 1e30 overflow float32: the guard recomputes the tiles in float64
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)) * 1e30
    _, state = reference.forward(np64(x), None, None, None, None, training=True)
    _, mean, var = triton_gpu.train_impl(x, None, None, EPS, "identity", SLOPE, ALPHA, False)
    assert torch.isfinite(var).all()
    np.testing.assert_allclose(np64(var), state.var, rtol=1e-12)
    x[1, 1, 3] = float("nan")  # a NaN reaches its own channel's statistics only
    _, mean, var = triton_gpu.train_impl(x, None, None, EPS, "identity", SLOPE, ALPHA, False)
    assert torch.isnan(mean[1]) and torch.isnan(var[1]) and torch.isfinite(var[0])


def test_empty_batch():
    x = torch.empty(0, 3, 4)
    y, mean, var = triton_gpu.train_impl(x, None, None, EPS, "relu", SLOPE, ALPHA, False)
    assert y.shape == x.shape and (mean == 0).all() and torch.isnan(var).all()
    dx, dw, db = triton_gpu.train_backward_impl(x, x, None, None, mean, var, EPS, "relu", SLOPE,
                                                ALPHA, False)
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "silu"])
def test_masked_statistics_and_backward(channels_last, act):
    shape = (6, 3, 5, 4)
    x, w, b, dy = tensors(shape, torch.float64, channels_last, seed=2)
    mask = torch.from_numpy(mask_for(shape))
    z_ref, state = reference.forward(np64(x), np64(w), np64(b), None, None, training=True,
                                     mask=mask.numpy())
    count, mean, m2 = triton_gpu.masked_moments_impl(x, mask)
    assert count == mask.sum()
    close(mean, state.mean, torch.float64, STATS_TOL)
    close(m2 / count, state.var, torch.float64, STATS_TOL)
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy) * act_grad_np(z_ref, act), state)
    dx, dw, db = triton_gpu.stats_backward_impl(dy, x, w, b, mean, m2 / count, mask, count, EPS,
                                                act, SLOPE, ALPHA)
    close(dx, dx_ref, torch.float64)
    close(dw, dw_ref, torch.float64)
    close(db, db_ref, torch.float64)


def test_sync_pieces_equal_the_cpu_kernels():
    """SyncBatchNorm's local sums and dx from global sums: the numba functions' results."""
    x, w, b, dy = tensors((4, 3, 5, 5), torch.float64, False, seed=5)
    mask = torch.from_numpy(mask_for((4, 3, 5, 5)))
    n, mean, m2 = triton_gpu.moments_impl(x)
    n_cpu, mean_cpu, m2_cpu = numba_cpu.moments_impl(x)
    assert n == n_cpu
    torch.testing.assert_close(mean, mean_cpu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, m2_cpu, rtol=1e-12, atol=1e-12)
    var = m2 / n
    sums = triton_gpu.backward_sums_impl(dy, x, w, b, mean, var, EPS)
    want = numba_cpu.backward_sums_impl(dy, x, w, b, mean, var, EPS)
    for got, ref in zip(sums, want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    total = [2 * s for s in sums]  # as if a second rank had the same sums
    for m in (None, mask):
        dx = triton_gpu.backward_dx_impl(dy, x, w, b, mean, var, EPS, *total, 2.0 * n, m)
        ref = numba_cpu.backward_dx_impl(dy, x, w, b, mean, var, EPS, *total, 2.0 * n, m)
        torch.testing.assert_close(dx, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# half precision: as close to float64 as PyTorch's own kernels get


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
def test_half_precision_within_pytorchs_own_error(dtype, act):
    x, _, _, dy = tensors((8, 4, 6, 6), dtype, False, seed=7)
    w = torch.linspace(0.5, 1.5, 4)  # float32 parameters, as under autocast
    b = torch.linspace(-0.2, 0.2, 4)
    torch_act = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu}[act]
    # float64 answer, and PyTorch's own (CPU) half-precision kernel on the same input
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = torch_act(F.batch_norm(x64, None, None, w64, b64, True, 0.0, EPS))
    y64.backward(dy.double())
    xt = x.detach().requires_grad_()
    yt = torch_act(F.batch_norm(xt, None, None, w.to(dtype), b.to(dtype), True, 0.0, EPS))
    yt.backward(dy)

    y, mean, var = triton_gpu.train_impl(x, w, b, EPS, act, SLOPE, ALPHA, False)
    dx, dw, db = triton_gpu.train_backward_impl(dy, x, w, b, mean, var, EPS, act, SLOPE, ALPHA,
                                                False)
    assert y.dtype == dx.dtype == dtype and dw.dtype == db.dtype == torch.float32

    def err(a, ref):
        return (a.double() - ref).abs().max().item()

    ulp = torch.finfo(dtype).eps
    assert err(y, y64) <= max(err(yt, y64), ulp * y64.abs().max().item())
    assert err(dx, x64.grad) <= max(err(xt.grad, x64.grad), ulp * x64.grad.abs().max().item())
    assert err(dw, w64.grad) <= 1e-4 * w64.grad.abs().max().item()
    assert err(db, b64.grad) <= 1e-4 * b64.grad.abs().max().item()


# ---------------------------------------------------------------------------------------------
# the layers: the case table's small shapes through the Triton kernels


# momentum never reaches a kernel (the layer updates its buffers): one momentum, both eps
TABLE = [c for c in CASES if c.momentum == 0.1]


@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.id)
def test_case_table_matches_torch(case):
    assert_steps_close(case, module_trajectory(case, our_module(case)), torch_trajectory(case))


@pytest.mark.parametrize("act", sorted(INVERTIBLE))
def test_inplace_layer_equals_not_inplace(act):
    """A random upstream gradient (with ones, the exact dx and dweight of identity are 0, and
    the recovery of x_hat would never be exercised)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn_like(x)
    gamma, beta = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    results = []
    for inplace in (False, True):
        m = batchnorm.BatchNormAct2d(3, act=act, inplace=inplace, dtype=torch.float64)
        with torch.no_grad():  # the same parameters for both (away from 0 and 1)
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        assert m.weight.grad.abs().max() > 1e-3  # a gradient that says something
        results.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad,
                        m.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_kernels_run_inside_a_layer(monkeypatch):
    calls = []
    for name in ("train_step", "train_backward_impl", "eval_impl"):
        real = getattr(triton_gpu, name)
        monkeypatch.setattr(triton_gpu, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    m = OURS[4](3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    m(x).sum().backward()
    m.eval()(x)
    assert calls == ["train_step", "train_backward_impl", "eval_impl"]


# the options for hard training conditions (Batch Renorm, ghost batches, masks), the plain
# and the sync layer, through the Triton kernels: the same reference trajectory as on CPU
VARIANT_LAYERS = [LAYERS[2], LAYERS[5], LAYERS[6]]  # BatchNorm2d, BatchNormAct1d, SyncBatchNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts, masked", VARIANT_OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("cls, shape, act", VARIANT_LAYERS,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_layer_options_equal_reference(cls, shape, act, opts, masked, dtype, monkeypatch):
    calls = []
    real = triton_gpu._statistics
    monkeypatch.setattr(triton_gpu, "_statistics",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    check_options(cls, shape, act, opts, masked, dtype)
    assert calls, "the statistics did not come from the Triton kernels"


def test_export_keeps_one_op_and_runs_the_triton_kernels(monkeypatch):
    calls = []
    real = triton_gpu.eval_impl
    monkeypatch.setattr(triton_gpu, "eval_impl", lambda *a: calls.append(1) or real(*a))
    m = batchnorm.BatchNormAct2d(3, act="silu").eval()
    x = torch.randn(2, 3, 4, 4)
    exported = torch.export.export(m, (x,))
    assert "batchnorm.bn_act_eval" in exported.graph_module.code
    calls.clear()
    torch.testing.assert_close(exported.module()(x), m(x))
    assert len(calls) == 2  # the exported op and the eager layer both ran the Triton kernel


@pytest.mark.parametrize("check", [test_layers.test_guard_skip_keeps_buffers_and_warns_once,
                                   test_layers.test_guard_raise_changes_nothing],
                         ids=lambda f: f.__name__)
def test_the_non_finite_guard_behaves_as_on_cpu(check, monkeypatch):
    calls = []
    real = triton_gpu.train_step
    monkeypatch.setattr(triton_gpu, "train_step", lambda *a: calls.append(1) or real(*a))
    check()  # the layer tests' own check, here on the Triton kernels
    assert calls


# ---------------------------------------------------------------------------------------------
# compiled, not interpreted: Triton's real compiler turns each kernel into GPU code here too
# (no GPU needed), which catches what the interpreter lets through (e.g. a global that is not
# a tl.constexpr, a method called on a scalar argument Triton made a constant)

_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.ops import triton_kernels as k

KINDS = dict(i_total="i64", count="i64", S="i32", C="i32", tiles="i32", plane="i32", flags="i32",
             parts_ptr="*fp64", consts_ptr="*fp64", mean_ptr="*fp64", var_ptr="*fp64",
             out_ptr="*fp64", flags_ptr="*fp64", factor_ptr="*fp64", mask_ptr="*u8",
             ok_ptr="*i1")
DATA = ("x_ptr", "y_ptr", "dy_ptr", "src_ptr", "dx_ptr")

def build(fn, data, acc, types=None, **consts):
    kinds = dict(KINDS, **(types or {}))
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in kinds:
            sig[name] = kinds[name]
        else:
            sig[name] = "*" + (data if name in DATA else acc)
    index = {(fn.arg_names.index(n),): v for n, v in consts.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=index),
                   target=GPUTarget("cuda", 90, 32))

tiles = dict(BLOCK_I=1024, BLOCK_C=1)
flags = dict(HAS_W=True, HAS_B=True)
for data in ("fp32", "bf16"):  # the float64 retry of non-finite tiles compiles in both
    build(k.moments_kernel, data, "fp32", HAS_MASK=True, F64=False, BLOCK_I=64, BLOCK_C=64)
for act in range(7):  # every activation's forward and derivative
    build(k.normalize_kernel, "bf16", "fp32", dict(mean_ptr="*fp32", var_ptr="*fp32"), ACT=act,
          F64=False, **flags, **tiles)
    build(k.grad_sums_kernel, "fp32", "fp32", ACT=act, INPLACE=False, F64=False, **flags,
          **tiles)
for act in (0, 2, 3):  # the invertible ones, from the output
    build(k.write_dx_kernel, "fp16", "fp32", ACT=act, INPLACE=True, HAS_MASK=True, F64=False,
          **flags, **tiles)
build(k.normalize_kernel, "fp64", "fp64", ACT=3, F64=True, HAS_W=False, HAS_B=False,
      BLOCK_I=64, BLOCK_C=64)
for running, check, buffers in ((True, True, "fp32"), (True, True, "bf16"),
                                (True, False, "fp16"), (False, True, "fp64")):
    # the running update and its guard, buffers in each dtype
    build(k.train_normalize_kernel, "bf16", buffers, dict(factor_ptr="*fp32"), ACT=1,
          RUNNING=running, CHECK=check, F64=False, **flags, **tiles)
    build(k.finalize_moments_kernel, "fp32", buffers, VAR=True, CHECK=True, BLOCK_T=16,
          BLOCK_C=64)
build(k.finalize_moments_kernel, "fp32", "fp64", VAR=False, CHECK=False, BLOCK_T=16, BLOCK_C=64)
for mode in (0, 1, 2):
    build(k.finalize_grads_kernel, "fp32", "fp32", MODE=mode, HAS_W=mode != 2, BLOCK_T=16,
          BLOCK_C=64)
print("compiled")
"""


def test_the_kernels_compile_for_a_gpu():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
