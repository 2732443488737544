"""SyncBatchNorm: the math against batchnorm.reference, the layer on spawned gloo groups against
one process on the concatenated batch, DDP training, conversion, and faults out of step.

Every distributed test runs on 127.0.0.1 in processes spawned by tests/_dist.py with a short
collective timeout and a hard deadline.
"""
from __future__ import annotations

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


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 4), (0, 3, 4)])
def test_local_moments_equal_reference(shape):
    rng = np.random.default_rng(len(shape))
    x = (1e4 + 1e-2 * rng.normal(size=shape)).astype(np.float32)  # large offset: stability
    count, mean, m2 = local_moments(torch.from_numpy(x))
    want = reference.moments(x, axis=1)
    assert count == want.count[0]
    np.testing.assert_allclose(mean.numpy(), want.mean, rtol=1e-15, atol=0)
    np.testing.assert_allclose(m2.numpy(), want.m2, rtol=1e-12, atol=1e-300)


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
# One layer over ranks == one process on the concatenated batch


def _data(sizes, shape=(4, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn((n, *shape), generator=g) * 3 + 2
    dy = torch.randn((n, *shape), generator=g)
    return x, dy


def _layer_steps(rank, world, sizes, shape, momentum, affine, steps):
    """Run ``steps`` (train flags) on this rank's slice; return outputs, grads, buffers."""
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    torch.manual_seed(0)
    bn = SyncBatchNorm(shape[0], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    out = []
    for i, train in enumerate(steps):
        x, dy = _data(sizes, shape, seed=i)
        x = x[lo:hi].clone().requires_grad_(True)
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
                torch.testing.assert_close(g[k], wk, **TOL, msg=lambda m: f"rank {rank} step {step} {k}: {m}")


def _configs(rank, world, sizes):
    steps = [True, True, False]
    return [_layer_steps(rank, world, sizes, shape, momentum, affine, steps)
            for shape, momentum, affine in _CONFIGS]


_CONFIGS = [((4, 3, 5), 0.1, True), ((4, 3, 5), None, False), ((5,), 0.5, True)]


@pytest.mark.parametrize("sizes", [(4, 4), (5, 3, 0)], ids=["2ranks-equal", "3ranks-5-3-0"])
def test_layer_equals_one_process_on_whole_batch(sizes):
    results = unwrap(run_ranks(_configs, len(sizes), sizes))
    for i, (shape, momentum, affine) in enumerate(_CONFIGS):
        want = _single_steps(sizes, shape, momentum, affine, [True, True, False], len(sizes))
        _compare(sizes, [r[i] for r in results], want)


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
