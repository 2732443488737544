"""The opt-in output cache: same results, no block reused while anything references it."""
from __future__ import annotations

import gc

import pytest
import torch

import batchnorm
from batchnorm import BatchNormError
from batchnorm.ops.memory import MIN_BYTES

SHAPE = (8, 16, 64, 64)  # 2 MiB in float32: large enough for the cache


@pytest.fixture
def cache_on():
    previous = batchnorm.set_output_cache(1 << 30)
    batchnorm.empty_output_cache()
    yield
    batchnorm.set_output_cache(previous)
    batchnorm.empty_output_cache()


def test_off_by_default_in_a_fresh_process():
    import subprocess
    import sys

    code = "import batchnorm; print(batchnorm.output_cache_info()['limit'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _train_step(memory_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(SHAPE, generator=g).contiguous(memory_format=memory_format)
    bn = batchnorm.BatchNormAct2d(SHAPE[1], act="relu")
    y = bn(x)
    dx, dw, db = torch.autograd.grad(y, [x, bn.weight, bn.bias], dy)
    return y.detach().clone(), dx, dw, db, bn.running_mean.clone(), bn.running_var.clone()


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
def test_results_are_the_same_bits_with_and_without_the_cache(memory_format):
    before = batchnorm.set_output_cache(0)
    want = _train_step(memory_format)
    batchnorm.set_output_cache(1 << 30)
    try:
        for _ in range(3):  # the later steps run on reused blocks
            got = _train_step(memory_format)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        assert batchnorm.output_cache_info()["hits"] > 0
    finally:
        batchnorm.set_output_cache(before)
        batchnorm.empty_output_cache()


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
def test_output_keeps_the_input_memory_format(cache_on, memory_format):
    x = torch.randn(SHAPE).contiguous(memory_format=memory_format)
    with torch.no_grad():
        y = batchnorm.BatchNorm2d(SHAPE[1])(x)
    assert y.stride() == x.stride() and y.is_contiguous(memory_format=memory_format)


def test_a_live_output_is_never_handed_out_again(cache_on):
    bn = batchnorm.BatchNorm2d(SHAPE[1])
    x = torch.randn(SHAPE)
    with torch.no_grad():
        y1 = bn(x)
        kept = y1.clone()
        view = y1[:, :3]  # a view keeps the block alive too
        del y1
        gc.collect()
        y2 = bn(x * 2)
    assert y2.data_ptr() != view.data_ptr()
    assert torch.equal(view, kept[:, :3])


def test_a_dead_output_is_reused(cache_on):
    bn = batchnorm.BatchNorm2d(SHAPE[1])
    x = torch.randn(SHAPE)
    with torch.no_grad():
        y1 = bn(x)
        address = y1.data_ptr()
        del y1
        hits = batchnorm.output_cache_info()["hits"]
        y2 = bn(x)
    assert y2.data_ptr() == address
    assert batchnorm.output_cache_info()["hits"] == hits + 1


def test_saved_for_backward_output_stays_alive(cache_on):
    # inplace mode saves y itself for backward: y must not be reused before backward runs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g).requires_grad_()
    dy = torch.randn(SHAPE, generator=g)
    bn = batchnorm.BatchNormAct2d(SHAPE[1], act="leaky_relu", inplace=True)
    want = torch.autograd.grad(bn(x), x, dy)[0]
    out = bn(x) * 1.0  # the layer's own output is now referenced only by the graph
    for _ in range(3):
        with torch.no_grad():
            bn(torch.randn(SHAPE))  # outputs that would take a freed block
    got = torch.autograd.grad(out, x, dy)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_free_blocks_stay_within_the_limit(cache_on):
    nbytes = SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 4
    batchnorm.set_output_cache(nbytes + (1 << 17))  # room for one block, not two
    bn = batchnorm.BatchNorm2d(SHAPE[1])
    with torch.no_grad():
        outputs = [bn(torch.randn(SHAPE)) for _ in range(3)]
    del outputs
    info = batchnorm.output_cache_info()
    assert 0 < info["cached"] <= info["limit"]
    batchnorm.empty_output_cache()
    assert batchnorm.output_cache_info()["cached"] == 0


def test_small_outputs_bypass_the_cache(cache_on):
    x = torch.randn(2, 3, 4, 4)
    assert x.numel() * 4 < MIN_BYTES
    misses = batchnorm.output_cache_info()["misses"]
    with torch.no_grad():
        batchnorm.BatchNorm2d(3)(x)
    assert batchnorm.output_cache_info()["misses"] == misses


@pytest.mark.parametrize("bad", (-1, 1.5, True, "1GB", None))
def test_bad_limit_raises_and_changes_nothing(bad):
    before = batchnorm.output_cache_info()
    with pytest.raises(BatchNormError, match=r"expected max_bytes to be an integer >= 0 \(got "):
        batchnorm.set_output_cache(bad)
    assert batchnorm.output_cache_info() == before
