"""Compiling ahead and the cold-cache notice: ``batchnorm warmup`` compiles and caches a case's
kernels, a later process loads them silently, and a process that has to compile says so once.

Each test runs fresh processes on an empty numba cache of its own (NUMBA_CACHE_DIR), with the
cheapest cases (float64, identity / relu), so that what they measure is the cache, not a shared
state left by other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchnorm import BatchNormError, ops
from batchnorm.kernels._compile import NOTICE
from batchnorm.ops.warmup import Case, cases, warmup

EVAL_STEP = """
import torch, batchnorm
m = batchnorm.BatchNormAct2d(3, act={act!r}, dtype=torch.float64).eval()
with torch.no_grad():
    m(torch.randn(2, 3, 4, 4, dtype=torch.float64))
"""


def _run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_warmup_compiles_once_and_a_later_process_loads_silently(tmp_path):
    args = ["-m", "batchnorm", "warmup", "--dtype", "float64", "--layout", "nchw", "--act",
            "identity", "relu", "--json"]
    cold = _run([*args, "--jobs", "2"], tmp_path)  # two processes, one case each
    assert cold.returncode == 0, cold.stderr
    report = json.loads(cold.stdout)
    assert report["cases"] == 2 and report["compile_seconds"] > 0
    assert report["cache"].startswith(str(tmp_path))
    assert NOTICE not in cold.stderr  # a warmup says what it does: no notice
    # one cache entry per index file: no two kernels share numba's unlocked index
    indexes = sorted(tmp_path.rglob("*.nbi"))
    assert indexes and all(len(list(i.parent.glob(i.name[:-len(".nbi")] + ".*.nbc"))) == 1
                           for i in indexes)
    warm = _run(args, tmp_path)  # in this process: everything loads from the disk cache
    assert json.loads(warm.stdout)["compile_seconds"] == 0
    # a layer step of the warmed case compiles nothing and prints nothing
    quiet = _run(["-c", EVAL_STEP.format(act="identity")], tmp_path)
    assert quiet.returncode == 0 and NOTICE not in quiet.stderr, quiet.stderr


def test_a_process_that_compiles_says_so_once(tmp_path):
    cold = _run(["-c", EVAL_STEP.format(act="relu") + EVAL_STEP.format(act="identity")],
                tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.count(NOTICE) == 1  # two cases compiled, one line
    warm = _run(["-c", EVAL_STEP.format(act="relu")], tmp_path)
    assert NOTICE not in warm.stderr


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float16"], "expected dtype one of float32, float64 (got 'float16')"),
    (["--act", "gelu"], "expected act one of identity, relu"),
    (["--layout", "nhcw"], "expected layout one of nchw, nhwc (got 'nhcw')"),
    (["--jobs", "0"], "expected --jobs >= 1 (got 0)"),
])
def test_warmup_bad_arguments_are_one_line_and_exit_2(tmp_path, argv, message):
    done = _run(["-m", "batchnorm", "warmup", *argv], tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not list(tmp_path.rglob("*.nbc"))  # refused before compiling anything


def test_warmup_api_checks_its_arguments():
    assert len(cases(("float32", "float64"), ("nchw", "nhwc"), ("relu",))) == 4
    with pytest.raises(BatchNormError, match="expected jobs to be an int >= 1"):
        warmup(("float64",), ("nchw",), ("identity",), jobs=0)
    with pytest.raises(BatchNormError, match="expected dtype one of"):
        warmup(("bfloat16",))


@pytest.mark.parametrize("act, fn", [("relu6", F.relu6), ("hardswish", F.hardswish)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_relu6_and_hardswish_at_their_kinks_are_torchs(act, fn, memory_format):
    # eps = 0 and unit statistics: the kernel's pre-activation is x itself, so the kinks
    # (0 and 6; -3 and 3) are hit exactly
    z = torch.tensor([-4.0, -3.0, -1.0, -0.0, 0.0, 1.0, 3.0, 4.0, 6.0, 7.0, float("nan")],
                     dtype=torch.float64)
    x = z.reshape(1, 1, 1, -1).repeat(2, 3, 1, 1).contiguous(memory_format=memory_format)
    assert ops._backend(x) == "numba"
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ops.bn_act_eval(xa, None, None, zeros, ones, 0.0, act)
    yb = fn(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
    dy = torch.randn_like(x)
    (ga,), (gb,) = torch.autograd.grad(ya, xa, dy), torch.autograd.grad(yb, xb, dy)
    finite = ~x.isnan()
    torch.testing.assert_close(ga[finite], gb[finite], rtol=0, atol=0)


@pytest.mark.parametrize("dtype, layout", [("float32", "nchw"), ("float32", "nhwc")])
def test_a_float32_case_runs_every_op_it_warms(dtype, layout):
    # float32 is what `make` warms first: its statistics come back in another dtype than the
    # input, so a case that passed the ops' results in the wrong order fails here (float64's
    # equal dtypes hid it)
    seconds = Case(dtype, layout, "relu").run()
    assert seconds >= 0
