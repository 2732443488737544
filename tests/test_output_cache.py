"""The output cache: on by default, capped and decaying; same results, no block reused while
anything references it, idle blocks back to the OS."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

import batchnorm
from batchnorm import BatchNormError
from batchnorm.ops.memory import DEFAULT_FRACTION, ENV, MIN_BYTES

SHAPE = (8, 16, 64, 64)  # 2 MiB in float32: large enough for the cache


@pytest.fixture
def cache_on():
    previous = batchnorm.set_output_cache(1 << 30)
    batchnorm.empty_output_cache()
    yield
    batchnorm.set_output_cache(previous)
    batchnorm.empty_output_cache()


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh process with glibc's default allocator (the regime where freed
    memory goes back to the OS) and the given environment variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", ENV))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env}, timeout=300)


def test_on_by_default_capped_at_an_eighth_of_the_memory():
    out = _fresh("import batchnorm; print(batchnorm.output_cache_info()['limit'])")
    assert out.returncode == 0, out.stderr
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert int(out.stdout) == int(ram * DEFAULT_FRACTION) > 0


@pytest.mark.parametrize("value, limit", [("0", 0), ("off", 0), ("256M", 256 << 20),
                                          ("2G", 2 << 30), ("1000", 1000)])
def test_environment_variable_sets_or_turns_off_the_cap(value, limit):
    out = _fresh("import batchnorm; print(batchnorm.output_cache_info()['limit'])",
                 **{ENV: value})
    assert out.returncode == 0 and int(out.stdout) == limit, out.stderr


def test_bad_environment_variable_is_a_clear_error():
    out = _fresh("import batchnorm; batchnorm.output_cache_info()", **{ENV: "lots"})
    assert out.returncode != 0
    assert f"expected {ENV} to be 0, off, or a size such as 512M or 2G (got 'lots')" in out.stderr


IDLE_RSS = """
import gc, time, torch, batchnorm
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
batchnorm.set_output_cache(1 << 30, idle_seconds=0.5)
bn = batchnorm.BatchNorm2d(64).eval()
x = torch.randn(16, 64, 128, 128)  # 64 MiB: above glibc's largest mmap threshold
with torch.no_grad():
    ys = [bn(x) for _ in range(6)]
for y in ys:
    y.fill_(1.0)  # every page touched
base = rss()
del ys, y
gc.collect()
held, cached = rss(), batchnorm.output_cache_info()["cached"]
time.sleep(2.0)
info = batchnorm.output_cache_info()
print(base, held, cached, rss(), info["cached"], info["released"])
"""


def test_idle_blocks_go_back_to_the_os():
    out = _fresh(IDLE_RSS)
    assert out.returncode == 0, out.stderr
    base, held, cached, after, cached_after, released = map(int, out.stdout.split())
    mib = 1 << 20
    assert cached >= 6 * 64 * mib and held > base - 64 * mib  # freed outputs kept, resident
    assert cached_after == 0 and released == 6
    assert held - after >= 5 * 64 * mib, (held / mib, after / mib)  # and then returned


def test_idle_seconds_is_checked():
    before = batchnorm.output_cache_info()
    for bad in (0, -1.0, "10", True):
        with pytest.raises(BatchNormError, match=r"expected idle_seconds to be a number > 0"):
            batchnorm.set_output_cache(1 << 20, idle_seconds=bad)
    assert batchnorm.output_cache_info() == before


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


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
def test_a_cached_output_can_be_modified_in_place_by_the_next_layer(cache_on, memory_format):
    # nn.ReLU(inplace=True) after BN, as in every torchvision ResNet: autograd refuses to let
    # a custom Function's output be modified in place when that output is a view
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).contiguous(memory_format=memory_format)
    dy = torch.randn(SHAPE, generator=g)
    ours, theirs = batchnorm.BatchNorm2d(SHAPE[1]), torch.nn.BatchNorm2d(SHAPE[1])
    results = []
    for bn in (ours, theirs):
        for _ in range(2):  # the second step runs on a reused block
            xi = x.clone().requires_grad_()
            y = torch.nn.ReLU(inplace=True)(bn(xi))
            results.append((y.detach(), torch.autograd.grad(y, xi, dy)[0]))
    assert batchnorm.output_cache_info()["hits"] > 0
    for got, want in zip(results[1], results[3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert results[1][0].is_contiguous(memory_format=memory_format)
