"""Which backend runs: batchnorm.set_backend / BATCHNORM_BACKEND, and "auto"'s rule on CUDA
(checked with the Triton backend in its CPU interpreter, standing in for a GPU)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm import BatchNormError  # noqa: E402
from batchnorm.ops import backends, numba_cpu, torch_fallback, triton_gpu  # noqa: E402


@pytest.fixture(autouse=True)
def restore_choice():
    previous = batchnorm.get_backend()
    yield
    batchnorm.set_backend(previous)


def ran(module, names, monkeypatch, call):
    """The names of ``module``'s functions among ``names`` that ``call()`` ran, in order."""
    seen = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k:
                            seen.append(name) or real(*a, **k))
    call()
    return seen


def step(m, x):
    m.train()
    m(x.clone().requires_grad_()).sum().backward()
    m.eval()
    with torch.no_grad():
        m(x)


@pytest.mark.parametrize("choice, numba_runs", [("auto", True), ("kernels", True),
                                                 ("torch", False)])
def test_the_choice_picks_the_cpu_backend(choice, numba_runs, monkeypatch):
    assert batchnorm.set_backend(choice) in backends.BACKENDS
    assert batchnorm.get_backend() == choice
    x = torch.randn(4, 3, 5, 5)
    m, ref = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    kernels = ran(numba_cpu, ["train_step", "eval_impl"], monkeypatch, lambda: step(m, x))
    assert bool(kernels) == numba_runs
    step(ref, x)  # the same results on either path
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_torch_choice_runs_torchs_path(monkeypatch):
    batchnorm.set_backend("torch")
    seen = ran(torch_fallback, ["train_step", "eval_"], monkeypatch,
               lambda: step(batchnorm.BatchNorm2d(3), torch.randn(4, 3, 2, 2)))
    assert seen == ["train_step", "eval_"]


@pytest.mark.parametrize("choice, plain, fused", [("auto", False, True), ("kernels", True, True),
                                                  ("torch", False, False)])
def test_cuda_auto_takes_torch_for_plain_bn_and_triton_for_what_only_it_fuses(
        choice, plain, fused, monkeypatch):
    pytest.importorskip("triton")
    batchnorm.set_backend(choice)
    x = torch.randn(4, 3, 5, 5)
    with triton_gpu.on_cpu():
        plain_bn = batchnorm.BatchNorm2d(3)
        inplace = batchnorm.BatchNormAct2d(3, act="leaky_relu", inplace=True)
        mask = torch.rand(4, 5, 5) < 0.8
        assert (backends.kernels_for(x) is triton_gpu) == plain
        assert (backends.kernels_for(x, fused=True) is triton_gpu) == fused
        names = ["train_step", "train_impl", "moments_impl", "masked_moments_impl"]
        assert bool(ran(triton_gpu, names, monkeypatch, lambda: plain_bn(x))) == plain
        assert bool(ran(triton_gpu, names, monkeypatch, lambda: inplace(x))) == fused
        assert bool(ran(triton_gpu, names, monkeypatch, lambda: plain_bn(x, mask))) == fused


@pytest.mark.parametrize("bad", ["cuda", "", None, 1])
def test_a_bad_choice_is_refused_and_changes_nothing(bad):
    batchnorm.set_backend("kernels")
    with pytest.raises(BatchNormError, match="expected backend in"):
        batchnorm.set_backend(bad)
    assert batchnorm.get_backend() == "kernels"


@pytest.mark.parametrize("value, result", [("torch", "torch"), (" Kernels ", "kernels"),
                                           ("", "auto"), ("triton", "BatchNormError")])
def test_the_environment_variable(value, result):
    code = ("import batchnorm\n"
            "try:\n    print(batchnorm.get_backend())\n"
            "except batchnorm.BatchNormError as e:\n    print('BatchNormError', e)")
    env = dict(os.environ, BATCHNORM_BACKEND=value)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith(result), done.stdout + done.stderr
