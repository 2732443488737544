"""On a CUDA device (skipped without one): our layers run the Triton kernels (PyTorch's own
path without ``triton``) and match PyTorch's layers.

CI has no GPU; these run when a GPU machine is lent (see the issue notes for the last run). The
kernels themselves are tested here without a GPU, in Triton's interpreter (test_triton.py).
"""
from __future__ import annotations

import pytest
import torch

import batchnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def our_kernels():
    """The Triton kernels for plain BN too ("auto" takes PyTorch's path for it on CUDA)."""
    previous = batchnorm.set_backend("kernels")
    yield
    batchnorm.set_backend(previous)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm2d_on_cuda_matches_torch(dtype, channels_last):
    torch.manual_seed(0)
    ours = batchnorm.BatchNorm2d(8).cuda()
    theirs = torch.nn.BatchNorm2d(8).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 8, 6, 6, device="cuda").to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for _ in range(3):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        g = torch.randn_like(yo)
        yo.backward(g)
        yt.backward(g)
        tol = TOL[dtype]
        torch.testing.assert_close(yo, yt, rtol=tol, atol=tol)
        torch.testing.assert_close(xo.grad, xt.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("act,module", [("relu", torch.nn.ReLU()), ("silu", torch.nn.SiLU()),
                                        ("leaky_relu", torch.nn.LeakyReLU(0.1))])
def test_batchnorm_act_on_cuda(act, module):
    torch.manual_seed(0)
    fused = batchnorm.BatchNormAct2d(8, act=act, negative_slope=0.1).cuda()
    bn = torch.nn.BatchNorm2d(8).cuda()
    bn.load_state_dict(fused.state_dict())
    x = torch.randn(4, 8, 5, 5, device="cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), module(bn(xb))
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


def test_model_tools_on_cuda_keep_the_device():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    model.train()(x)
    model.eval()
    want = model(x)
    folded = batchnorm.fold(model, x)
    assert next(folded.parameters()).is_cuda
    torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
    ours = batchnorm.convert(model, to="batchnorm")
    assert next(ours.parameters()).is_cuda
    torch.testing.assert_close(ours.eval()(x), want)
    frozen = batchnorm.convert(model, to="frozen")
    torch.testing.assert_close(frozen(x), want, rtol=1e-5, atol=1e-5)


def test_sync_batchnorm_single_rank_nccl(tmp_path):
    """World size 1 over NCCL: plain BN (the multi-rank path needs more than one GPU)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        sync = batchnorm.SyncBatchNorm(8).cuda()
        ref = torch.nn.BatchNorm2d(8).cuda()
        x = torch.randn(4, 8, 5, 5, device="cuda")
        torch.testing.assert_close(sync(x), ref(x))
        torch.testing.assert_close(sync.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def _triton():
    return pytest.importorskip("triton")


def test_cuda_runs_the_triton_kernels():
    _triton()
    from batchnorm import ops

    x = torch.randn(2, 8, 4, 4, device="cuda")
    assert ops._backend(x) == "triton"
    assert ops._backend(x.bfloat16(), torch.ones(8, device="cuda")) == "triton"
    assert ops._backend(x.transpose(2, 3)) == "torch"  # strides the kernels do not view


@pytest.mark.parametrize("act", ["identity", "leaky_relu", "elu"])
def test_inplace_on_cuda_equals_not_inplace(act):
    _triton()
    torch.manual_seed(0)
    x = torch.randn(8, 16, 9, 9, device="cuda")
    dy = torch.randn_like(x)  # not ones: their exact dx and dweight of identity are 0
    gamma, beta = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    out = []
    for inplace in (False, True):
        m = batchnorm.BatchNormAct2d(16, act=act, inplace=inplace).cuda()
        with torch.no_grad():  # the same parameters for both (away from 0 and 1)
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_var.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_and_export_see_one_op_on_cuda():
    _triton()
    torch.manual_seed(0)
    m = batchnorm.BatchNormAct2d(8, act="relu").cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    want = m(x)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), want)
    graph = torch.export.export(m.eval(), (x.detach(),)).graph_module.code
    assert "batchnorm.bn_act_eval" in graph


@pytest.mark.parametrize("channels_last", [False, True])
def test_auto_on_cuda_runs_pytorchs_kernel_with_the_guard_and_no_sync(channels_last):
    # "auto" on CUDA: torch_fallback.batch_norm_step (F.batch_norm into a zeroed pair, the
    # buffers' guarded lerp on the device)
    previous = batchnorm.set_backend("auto")
    try:
        torch.manual_seed(0)
        ours, theirs = batchnorm.BatchNorm2d(8).cuda(), torch.nn.BatchNorm2d(8).cuda()
        x = torch.randn(4, 8, 6, 6, device="cuda") * 3 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        for _ in range(3):
            xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
            torch.cuda.set_sync_debug_mode("error")
            try:
                yo = ours(xo)
                yo.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            yt = theirs(xt)
            yt.sum().backward()
            assert torch.equal(yo, yt) and torch.equal(xo.grad, xt.grad)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
        assert int(ours.num_batches_tracked) == 3
        before = [t.clone() for t in ours.buffers()]
        bad = x.clone()
        bad[0, 1, 0, 0] = float("nan")
        ours(bad)  # on CUDA the guard skips without its warning (that would read the flag)
        assert all(torch.equal(a, b) for a, b in zip(before, ours.buffers()))
    finally:
        batchnorm.set_backend(previous)
