"""SyncBatchNorm: the math against batchnorm.reference, the layer on spawned gloo groups against
one process on the concatenated batch, DDP training, conversion, and faults out of step.

Every distributed test runs on 127.0.0.1 in processes spawned by tests/_dist.py with a short
collective timeout and a hard deadline.
"""
from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import BatchNormError, reference
from batchnorm.sync import SyncBatchNorm, local_moments, merge_moments

from ._dist import RankError, run_ranks, unwrap

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The math, single process


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 4), (0, 3, 4)])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_local_moments_equal_reference(shape, dtype, offset):
    rng = np.random.default_rng(len(shape))
    x = (offset + 1e-2 * rng.normal(size=shape)).astype(dtype)  # large offset: stability
    count, mean, m2 = local_moments(torch.from_numpy(x))
    want = reference.moments(x, axis=1)
    assert count == want.count[0]
    # float32 input: the element-wise work is in float32 (relative rounding ~6e-8)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(mean.numpy(), want.mean, rtol=1e-15, atol=1e-2 * rtol)
    np.testing.assert_allclose(m2.numpy(), want.m2, rtol=rtol, atol=1e-300)


def test_merge_moments_equal_reference_fold():
    rng = np.random.default_rng(1)
    parts = [rng.normal(3.0, 2.0, size=(n, 4, 3)) for n in (5, 0, 1, 7, 2)]
    mom = [reference.moments(p, axis=1) for p in parts]
    want = mom[0]
    for m in mom[1:]:
        want = reference.merge(want, m)
    n, mean, m2 = merge_moments(torch.tensor([m.count[0] for m in mom]),
                                torch.tensor(np.stack([m.mean for m in mom])),
                                torch.tensor(np.stack([m.m2 for m in mom])))
    assert n == want.count[0] == 15 * 3
    np.testing.assert_allclose(mean.numpy(), want.mean, rtol=1e-13)
    np.testing.assert_allclose(m2.numpy(), want.m2, rtol=1e-13)
    whole = reference.moments(np.concatenate(parts), axis=1)
    np.testing.assert_allclose(m2.numpy(), whole.m2, rtol=1e-12)


@pytest.mark.parametrize("memory_format, strided", [(torch.contiguous_format, False),
                                                    (torch.channels_last, False),
                                                    (torch.contiguous_format, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_math_on_one_rank_is_the_plain_layers(monkeypatch, memory_format, strided, dtype):
    """The sync function with a one-rank link equals our plain layer's training step; dense
    CPU input runs the plain layer's kernels (statistics, normalisation, backward), a strided
    one PyTorch's path."""
    from batchnorm import BatchNorm2d, ops
    from batchnorm.collectives import LocalLink
    from batchnorm.sync import _SyncBatchNormFunction

    calls = []
    moments = ops.numba_cpu.moments_impl
    monkeypatch.setattr(ops.numba_cpu, "moments_impl", lambda x: calls.append(1) or moments(x))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 4, 5, 7, generator=g, dtype=dtype) * 3 + 100).contiguous(
        memory_format=memory_format)
    if strided:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    w = (torch.rand(4, generator=g, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=dtype).requires_grad_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, mean, var, n = _SyncBatchNormFunction.apply(xa, w, b, 1e-5, LocalLink(), 1)
    got = (ya, *torch.autograd.grad(ya, (xa, w, b), dy))
    assert len(calls) == (0 if strided else 1) and float(n) == x.numel() / 4
    plain = BatchNorm2d(4, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(w), plain.bias.copy_(b)
    yb = plain(xb)
    want = (yb, *torch.autograd.grad(yb, (xb, plain.weight, plain.bias), dy))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)
    m = x.numel() / 4  # the plain layer's running_var: 0.9 * 1 + 0.1 * the unbiased variance
    torch.testing.assert_close((var * m / (m - 1)).to(dtype), (plain.running_var - 0.9) / 0.1,
                               **tol)


def test_merge_moments_all_empty():
    n, mean, m2 = merge_moments(torch.zeros(2), torch.zeros(2, 3, dtype=torch.float64),
                                torch.zeros(2, 3, dtype=torch.float64))
    assert n == 0 and mean.abs().sum() == 0 and m2.abs().sum() == 0


def test_without_process_group_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    ours, theirs = SyncBatchNorm(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    for step in range(3):
        ours.train(step < 2), theirs.train(step < 2)
        torch.testing.assert_close(ours(x + step), theirs(x + step))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


# ---------------------------------------------------------------------------------------------
# The distributed checks share two spawned groups (2 ranks with batches 4 + 4, 3 ranks with
# 5 + 3 + 0): each rank runs every part of the suite and sends back all results at once.

SIZES = {2: (4, 4), 3: (5, 3, 0)}


def _suite(rank, world):
    sizes = SIZES[world]
    parts = {
        "layer": lambda: _configs(rank, world, sizes),
        "ddp": lambda: _ddp_run(rank, world, sizes, broadcast_buffers=world == 2),
        "one_value": lambda: _one_value_per_channel(rank, world) if world == 2 else None,
        "recal": lambda: _recal_run(rank, world) if world == 3 else None,
        "offset": lambda: _offset_run(rank, world),
        "subgroup": lambda: _subgroup_run(rank, world) if world == 3 else None,
        "variants": lambda: _variants_run(rank, world),
    }
    out = {}
    for name, part in parts.items():
        try:
            out[name] = part()
        except Exception as err:  # reported by the test that reads this part
            out[name] = RankError(type(err).__name__, str(err), traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def suite():
    """suite(world, part) -> that part's result on every rank (spawned once per world size)."""
    cache = {}

    def get(world, part):
        if world not in cache:
            cache[world] = unwrap(run_ranks(_suite, world))
        return unwrap([r[part] for r in cache[world]])

    return get


# ---------------------------------------------------------------------------------------------
# One layer over ranks == one process on the concatenated batch


def _data(sizes, shape=(4, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn((n, *shape), generator=g) * 3 + 2
    dy = torch.randn((n, *shape), generator=g)
    return x, dy


def _layer_steps(rank, world, sizes, shape, momentum, affine, steps, strided=False):
    """Run ``steps`` (train flags) on this rank's slice; return outputs, grads, buffers. With
    ``strided``, rank 0's input is a non-contiguous view: it takes PyTorch's path while the other
    ranks take the kernels, and the two must agree through the same messages."""
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    torch.manual_seed(0)
    bn = SyncBatchNorm(shape[0], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    out = []
    for i, train in enumerate(steps):
        x, dy = _data(sizes, shape, seed=i)
        x = x[lo:hi].clone()
        if strided and rank == 0:
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        x.requires_grad_(True)
        bn.train(train)
        bn.zero_grad()
        y = bn(x)
        (y * dy[lo:hi]).sum().backward()
        grads = {}
        if affine:  # what DDP does: average the parameter gradients over ranks
            for name in ("weight", "bias"):
                g = getattr(bn, name).grad.clone()
                torch.distributed.all_reduce(g)
                grads[name] = g / world
        out.append({"y": y.detach(), "dx": x.grad, **grads,
                    **{k: v.clone() for k, v in bn.state_dict().items()}})
    return out


def _single_steps(sizes, shape, momentum, affine, steps, world):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(shape[0], momentum=momentum, affine=affine) if len(shape) < 3 else \
        nn.BatchNorm2d(shape[0], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    out = []
    for i, train in enumerate(steps):
        x, dy = _data(sizes, shape, seed=i)
        x.requires_grad_(True)
        bn.train(train)
        bn.zero_grad()
        y = bn(x)
        (y * dy).sum().backward()
        grads = {n: getattr(bn, n).grad / world for n in ("weight", "bias")} if affine else {}
        out.append({"y": y.detach(), "dx": x.grad, **grads,
                    **{k: v.clone() for k, v in bn.state_dict().items()}})
    return out


def _compare(sizes, got_by_rank, want):
    for rank, got in enumerate(got_by_rank):
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        for step, (g, w) in enumerate(zip(got, want)):
            assert g.keys() == w.keys()
            for k in g:
                wk = w[k][lo:hi] if k in ("y", "dx") else w[k]
                torch.testing.assert_close(g[k], wk, **TOL,
                                           msg=lambda m: f"rank {rank} step {step} {k}: {m}")


def _configs(rank, world, sizes):
    steps = [True, True, False]
    return [_layer_steps(rank, world, sizes, shape, momentum, affine, steps, strided)
            for shape, momentum, affine, strided in _CONFIGS]


# (shape, momentum, affine, rank 0 on PyTorch's path)
_CONFIGS = [((4, 3, 5), 0.1, True, False), ((4, 3, 5), None, False, False),
            ((5,), 0.5, True, False), ((4, 3, 5), 0.1, True, True)]


@pytest.mark.parametrize("world", [2, 3], ids=["2ranks-equal", "3ranks-5-3-0"])
def test_layer_equals_one_process_on_whole_batch(suite, world):
    sizes = SIZES[world]
    results = suite(world, "layer")
    for i, (shape, momentum, affine, _) in enumerate(_CONFIGS):
        want = _single_steps(sizes, shape, momentum, affine, [True, True, False], len(sizes))
        _compare(sizes, [r[i] for r in results], want)


def _offset_data(sizes):
    g = torch.Generator().manual_seed(7)
    x = 1e4 + 1e-2 * torch.randn(sum(sizes), 3, 4, 4, generator=g)  # float32, large offset
    return x, torch.randn(x.shape, generator=g)


def _offset_run(rank, world):
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x, dy = _offset_data(sizes)
    x = x[lo:hi].clone().requires_grad_(True)
    bn = SyncBatchNorm(3).train()
    y = bn(x)
    (y * dy[lo:hi]).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "rv": bn.running_var.clone()}


@pytest.mark.parametrize("world", [2, 3])
def test_large_offset_float32_matches_float64_reference(suite, world):
    """mean 1e4, std 1e-2 in float32: PyTorch's CPU BN is off by ~3e-2 here; we stay exact."""
    sizes = SIZES[world]
    x, dy = _offset_data(sizes)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, state = reference.forward(x.numpy(), None, None, rm, rv, training=True)
    dx, _, _ = reference.backward(dy.numpy(), state)
    for rank, got in enumerate(suite(world, "offset")):
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        np.testing.assert_allclose(got["y"].numpy(), y[lo:hi], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["dx"].numpy(), dx[lo:hi], rtol=1e-3, atol=1e-2)
        np.testing.assert_allclose(got["rv"].numpy(), state.running_var, rtol=1e-5)


def _subgroup_run(rank, world):
    group = torch.distributed.new_group([0, 1])  # every rank calls new_group; rank 2 stays out
    if rank == 2:
        return None
    x, _ = _data((4, 6), shape=(3, 5), seed=11)
    mine = x[:4] if rank == 0 else x[4:]
    bn = SyncBatchNorm(3, process_group=group).train()
    return {"y": bn(mine).detach(), "rv": bn.running_var.clone()}


def test_process_group_limits_the_sync_to_its_ranks(suite):
    got = suite(3, "subgroup")
    assert got[2] is None
    x, _ = _data((4, 6), shape=(3, 5), seed=11)
    want = nn.BatchNorm1d(3).train()
    y = want(x)
    torch.testing.assert_close(got[0]["y"], y[:4], **TOL)
    torch.testing.assert_close(got[1]["y"], y[4:], **TOL)
    torch.testing.assert_close(got[1]["rv"], want.running_var, **TOL)


# ---------------------------------------------------------------------------------------------
# Conversion


def _model_for_conversion():
    import batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        batchnorm.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2),
        nn.Flatten(2), nn.BatchNorm1d(4, momentum=None, affine=False),
        nn.Flatten(), nn.Linear(4 * 16, 5), nn.BatchNorm1d(5, eps=1e-3),
    )
    net(torch.randn(6, 3, 6, 6))  # non-trivial running statistics
    return net


def test_convert_to_sync_and_back():
    import batchnorm
    from batchnorm.sync import SyncBatchNormAct

    net = _model_for_conversion()
    synced = batchnorm.convert(net, to="sync")
    kinds = [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [SyncBatchNorm, SyncBatchNormAct, SyncBatchNorm, SyncBatchNorm]
    assert [m.sync_name for m in synced.modules() if isinstance(m, SyncBatchNorm.__mro__[1])] == \
        ["1", "3", "5", "8"]
    assert synced[3].act == "leaky_relu" and synced[3].negative_slope == 0.2
    assert synced.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(synced.state_dict()[k], v), k
    x = torch.randn(6, 3, 6, 6)
    for mode in (False, True):  # no process group: exactly the plain layers
        net.train(mode), synced.train(mode)
        torch.testing.assert_close(synced(x), net(x))
    # back: PyTorch's classes of the original rank, and ours
    back = batchnorm.convert(synced, to="torch")
    assert [type(m) for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d]
    assert isinstance(back[3], nn.Sequential) and isinstance(back[3][1], nn.LeakyReLU)
    ours = batchnorm.convert(synced, to="batchnorm")
    assert [type(m) for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [batchnorm.BatchNorm2d, batchnorm.BatchNormAct2d, batchnorm.BatchNorm1d,
         batchnorm.BatchNorm1d]
    for k, v in synced.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # PyTorch's own SyncBatchNorm converts too, and keeps its rank-less nature
    torch_sync = nn.SyncBatchNorm(4)
    mine = batchnorm.convert(torch_sync, to="sync")
    assert type(mine) is SyncBatchNorm and mine.source_ranks is None
    assert type(batchnorm.convert(mine, to="torch")) is nn.SyncBatchNorm


def test_state_dict_loads_both_ways():
    ours, theirs = SyncBatchNorm(3), nn.BatchNorm2d(3)
    theirs.train()(torch.randn(4, 3, 2, 2))
    ours.load_state_dict(theirs.state_dict())
    nn.BatchNorm2d(3).load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_var, theirs.running_var)


def _one_value_per_channel(rank, world):
    out = {}
    bn = SyncBatchNorm(3).train()
    x = torch.arange(3.0).reshape(1, 3) + rank  # one sample per rank: two values per channel
    out["y"] = bn(x).detach()
    out["rm"], out["rv"] = bn.running_mean.clone(), bn.running_var.clone()
    try:  # one value per channel over all ranks: every rank raises, none hangs
        bn(torch.ones(1 - rank, 3))
    except BatchNormError as err:
        out["error"] = str(err)
    return out


def test_one_value_per_rank_is_fine_one_value_overall_raises(suite):
    got = suite(2, "one_value")
    x = torch.stack([torch.arange(3.0), torch.arange(3.0) + 1])
    want = nn.BatchNorm1d(3).train()
    y = want(x)
    for rank, g in enumerate(got):
        torch.testing.assert_close(g["y"], y[rank:rank + 1], **TOL)
        torch.testing.assert_close(g["rv"], want.running_var, **TOL)
        assert "more than 1 value per channel" in g["error"] and "SyncBatchNorm(3)" in g["error"]


# ---------------------------------------------------------------------------------------------
# DDP training == one process on the whole batches


def _net():
    import batchnorm

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3), batchnorm.BatchNormAct2d(6, act="silu"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5),
    )


def _batch(step, n):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 5, (n,), generator=g)


def _train(model, sizes, rank, world, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for step in range(steps):
        x, t = _batch(step, n)
        out = model(x[lo:hi])
        # DDP averages gradients over ranks: world * (local sum) / n averages to (total sum) / n
        loss = nn.functional.cross_entropy(out, t[lo:hi], reduction="sum") * world / n
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_run(rank, world, sizes, broadcast_buffers):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import batchnorm

    model = batchnorm.convert(_net(), to="sync")
    ddp = DDP(model, broadcast_buffers=broadcast_buffers)
    _train(ddp, sizes, rank, world)
    return model.state_dict()


@pytest.mark.parametrize("world", [2, 3], ids=["2ranks-broadcast", "3ranks-5-3-0-nobroadcast"])
def test_ddp_training_equals_one_process(suite, world):
    got = suite(world, "ddp")
    single = _net()
    _train(single, (sum(SIZES[world]),), rank=0, world=1)
    want = single.state_dict()
    for rank, state in enumerate(got):
        assert state.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(state[k], v, **TOL, msg=lambda m: f"rank {rank} {k}: {m}")


# ---------------------------------------------------------------------------------------------
# Distributed recalibration == one process on every rank's batches


def _recal_batches(rank):
    counts = [3, 1, 0][rank]  # ranks hold different numbers of batches, one none
    sizes = [[4, 6, 5], [7], []][rank]
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(sizes[i], 3, 6, 6, generator=g) * (1 + rank) + rank for i in range(counts)]


def _recal_run(rank, world):
    import batchnorm

    out = {}
    for estimator in ("exact", "average"):
        model = batchnorm.convert(_net(), to="sync").eval()
        batchnorm.recalibrate(model, _recal_batches(rank), progress=False, estimator=estimator,
                              process_group=torch.distributed.group.WORLD)
        assert not model.training
        out[estimator] = {k: v for k, v in model.state_dict().items()
                          if "running" in k or "tracked" in k}
    return out


@pytest.mark.parametrize("estimator", ["exact", "average"])
def test_distributed_recalibration_equals_one_process(suite, estimator):
    import batchnorm

    got = suite(3, "recal")
    single = _net().eval()
    batchnorm.recalibrate(single, [b for r in range(3) for b in _recal_batches(r)], progress=False,
                          estimator=estimator)
    want = single.state_dict()
    for rank, by_estimator in enumerate(got):
        state = by_estimator[estimator]
        assert len(state) == 9
        for k, v in state.items():
            torch.testing.assert_close(v, want[k], **TOL, msg=lambda m: f"rank {rank} {k}: {m}")
    assert int(got[0][estimator]["1.num_batches_tracked"]) == 4
    if estimator == "exact":  # the two estimators differ on these batches (unequal sizes)
        assert not torch.allclose(got[0]["exact"]["1.running_var"],
                                  got[0]["average"]["1.running_var"])


# ---------------------------------------------------------------------------------------------
# Faults: ranks out of step end in a BatchNormError naming the layer, never a hang

FAULT_TIMEOUT = 2.0  # the process group's timeout in these tests, seconds


def _two_layers():
    import batchnorm

    return batchnorm.convert(nn.ModuleDict({"stem": nn.BatchNorm2d(4), "head": nn.BatchNorm2d(4)}),
                             to="sync")


def _fault(rank, world, kind):
    import os
    import time

    net, x = _two_layers(), torch.randn(2, 4, 3, 3)
    net["stem"](x)  # one call in step
    if kind == "other_layer":  # rank 1 calls another layer of the same size
        layer = net["stem"] if rank == 0 else net["head"]
    elif rank == 1:  # rank 0 makes one call more; rank 1 waits past the timeout or dies
        if kind == "dies":
            os._exit(3)
        time.sleep(FAULT_TIMEOUT + 3)
        return {"error": None}
    else:
        layer = net["stem"]
    start = time.monotonic()
    try:
        layer(x)
    except BatchNormError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None}


def test_fault_ranks_calling_different_layers():
    got = unwrap(run_ranks(_fault, 2, "other_layer", pg_timeout=10.0))
    for rank, name in ((0, "'stem'"), (1, "'head'")):
        err = got[rank]["error"]
        assert err is not None and name in err and "call #2" in err, err
        assert f"rank {1 - rank} in forward call #" in err, err
        assert got[rank]["seconds"] < 5.0  # seen at once, not by the 10 s timeout


def test_fault_extra_call_ends_at_the_timeout():
    got = unwrap(run_ranks(_fault, 2, "waits", pg_timeout=FAULT_TIMEOUT))
    err = got[0]["error"]
    assert err is not None and "'stem'" in err and "forward call #2" in err, err
    assert FAULT_TIMEOUT * 0.5 < got[0]["seconds"] < FAULT_TIMEOUT + 3


def test_fault_dead_rank():
    got = run_ranks(_fault, 2, "dies", pg_timeout=FAULT_TIMEOUT, may_die=(1,))
    assert got[1] is None
    err = unwrap(got)[0]["error"]
    assert err is not None and "'stem'" in err and "failed collective" in err, err
    assert got[0]["seconds"] < FAULT_TIMEOUT + 3


def _fault_other_size(rank, world):
    import batchnorm

    net = batchnorm.convert(nn.ModuleDict({"small": nn.BatchNorm2d(4), "large": nn.BatchNorm2d(6)}),
                            to="sync")
    layer = net["small"] if rank == 0 else net["large"]
    try:
        layer(torch.randn(2, layer.num_features, 3, 3))
    except BatchNormError as err:
        return {"error": str(err)}
    return {"error": None}


def test_fault_layers_of_different_sizes():
    """gloo aborts the rank that receives the larger message; the other one reports the layer."""
    got = run_ranks(_fault_other_size, 2, pg_timeout=FAULT_TIMEOUT, may_die=(0,))
    err = unwrap(got)[1]["error"]
    # rank 1 sees rank 0's short message, or (a race) the connection the abort closed
    assert err is not None and "'large'" in err, err
    assert "rank 0 in a call of another size" in err or "failed collective" in err, err
    assert got[0] is None or got[0]["error"] is not None  # never a silent wrong result


# ---------------------------------------------------------------------------------------------
# Batch Renorm, masks and ghost batches over ranks == one process on the concatenated batch

RENORM = {"renorm": True, "rmax": 1.5, "dmax": 0.2}
# (options, masked, worlds): ghost batches are cut from each rank's own batch, so they equal one
# process where every rank's batch is a multiple of the piece size (world 2: 4 + 4)
VARIANTS = [(RENORM, False, (2, 3)), ({}, True, (2, 3)), (dict(RENORM), True, (2, 3)),
            ({"virtual_batch_size": 2}, False, (2,)),
            ({"virtual_batch_size": 2, **RENORM}, True, (2,))]


def _variant_data(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    mask = torch.rand(n, 5, generator=g) < 0.6
    mask[:, 0] = True  # every sample counts somewhere: each ghost batch and rank has values
    dy = torch.randn(n, 3, 5, generator=g, dtype=torch.float64)
    return x, mask, dy


def _variant_layer(cls, opts):
    from .test_variants import _layer  # the same parameters and buffers as the layer tests

    return _layer(cls, "identity", torch.float64, **opts)


def _variant_steps(m, x, mask, dy, strided, steps=2):
    if strided:  # PyTorch's path: odd strides are not the kernels'
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    x = x.clone().requires_grad_() if not strided else x.requires_grad_()
    for _ in range(steps):
        y = m(x, mask=mask)
        (y * dy).sum().backward()
    return [y.detach(), x.grad, m.weight.grad, m.bias.grad, m.running_mean.clone(),
            m.running_var.clone()]


def _variants_run(rank, world):
    sizes = SIZES[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    x, mask, dy = _variant_data(sum(sizes))
    out = []
    for opts, masked, worlds in VARIANTS:
        for strided in (False, True):
            if world not in worlds:
                out.append(None)
                continue
            m = _variant_layer(SyncBatchNorm, opts)
            out.append(_variant_steps(m, x[lo:hi], mask[lo:hi] if masked else None, dy[lo:hi],
                                      strided))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_renorm_masks_and_ghost_batches_over_ranks_equal_one_process(suite, world):
    from batchnorm import BatchNorm1d

    got = suite(world, "variants")
    sizes = SIZES[world]
    x, mask, dy = _variant_data(sum(sizes))
    k = 0
    for opts, masked, worlds in VARIANTS:
        for strided in (False, True):
            if world in worlds:
                want = _variant_steps(_variant_layer(BatchNorm1d, opts), x,
                                      mask if masked else None, dy, False)
                y = torch.cat([got[r][k][0] for r in range(world)])
                dx = torch.cat([got[r][k][1] for r in range(world)])
                dw = sum(got[r][k][2] for r in range(world))  # DDP would average these
                db = sum(got[r][k][3] for r in range(world))
                for name, a, b in (("y", y, want[0]), ("dx", dx, want[1]), ("dweight", dw, want[2]),
                                   ("dbias", db, want[3])):
                    label = f"{opts} masked={masked} strided={strided} {name}"
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=label)
                for r in range(world):  # every rank ends with the one process's buffers
                    torch.testing.assert_close(got[r][k][4], want[4], rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(got[r][k][5], want[5], rtol=1e-12, atol=1e-12)
            k += 1
