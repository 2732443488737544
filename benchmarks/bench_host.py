"""Host cost per call: our layers against PyTorch's where the arithmetic is nothing.

At (2, 8, 4, 4) and (2, 8) float32 a BN call does almost no arithmetic, so its time is the call
path: Python, checks, dispatch, allocation, autograd. For each shape it times

- ``BatchNorm2d`` / ``BatchNorm1d`` against ``torch.nn``'s, and
- ``BatchNormAct(act="relu")`` against ``torch.nn`` BN followed by ``nn.ReLU()``,

in three cases: a training forward (no autograd graph), a training forward + backward
(``y.backward(g)`` with a fixed random ``g``) and an eval forward. PyTorch and ours run
alternately, ``--repeats`` rounds of ``--calls`` calls each, and each row is the median
microseconds per call with the ratio ours / PyTorch's (the target: at most ``--limit``, 1.5).

    .venv/bin/python benchmarks/bench_host.py [--calls 300] [--repeats 9] [--threads 2]
                                              [--limit 1.5] [--path kernels|torch]

``--path torch`` times our layers on PyTorch's path as ``"auto"`` runs it on CUDA (the eager
step in F.batch_norm's kernel, ``torch_fallback.batch_norm_step``), here on CPU tensors: a
proxy, on this host, for what our layer adds to PyTorch's on a GPU's host.

Run it in both allocator regimes (glibc defaults, and freed memory kept:
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296``); at these sizes they
should agree. Exits 1 when a ratio is over the limit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import batchnorm

CASES = ("train fwd", "fwd+bwd", "eval")


def pairs(shape: tuple[int, ...]) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, PyTorch's module, ours) for BN and BN + ReLU at this input rank."""
    c = shape[1]
    ours_bn = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
    ours_act = batchnorm.BatchNormAct2d if len(shape) == 4 else batchnorm.BatchNormAct1d
    theirs_bn = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    return [
        (ours_bn.__name__, theirs_bn(c), ours_bn(c)),
        (f"{ours_act.__name__}(relu)", nn.Sequential(theirs_bn(c), nn.ReLU()),
         ours_act(c, act="relu")),
    ]


def calls_of(module: nn.Module, case: str, x: torch.Tensor, xg: torch.Tensor, g: torch.Tensor):
    """A zero-argument function making one call of ``case`` on ``module`` (set to its mode)."""
    module.train(case != "eval")
    if case == "fwd+bwd":
        return lambda: module(xg).backward(g)

    def forward():
        with torch.no_grad():
            module(x)
    return forward


def time_calls(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=float, default=1.5)
    parser.add_argument("--path", choices=("kernels", "torch"), default="kernels",
                        help="torch: PyTorch's path as CUDA's \"auto\" runs it, on CPU")
    args = parser.parse_args(argv)
    if args.path == "torch":
        from batchnorm.ops import torch_fallback

        batchnorm.set_backend("torch")
        torch_fallback.FLOAT64_STATS_DEVICES = ()  # the path off the CPU, on CPU tensors
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    worst = 0.0
    print(f"torch {torch.__version__}, {args.threads} threads, our {args.path} path; "
          f"microseconds per call, median of {args.repeats} alternating rounds of "
          f"{args.calls} calls")
    print(f"{'shape':14s} {'layer':24s} {'case':10s} {'torch':>8s} {'ours':>8s} {'ratio':>6s}")
    for shape in ((2, 8, 4, 4), (2, 8)):
        x = torch.randn(*shape)
        xg = x.clone().requires_grad_(True)
        g = torch.randn(*shape)
        for name, theirs, ours in pairs(shape):
            for case in CASES:
                fns = [calls_of(m, case, x, xg, g) for m in (theirs, ours)]
                for fn in fns:  # warm: first calls compile or load kernels, start threads
                    for _ in range(20):
                        fn()
                times = ([], [])
                for _ in range(args.repeats):
                    for side, fn in enumerate(fns):
                        times[side].append(time_calls(fn, args.calls))
                t, o = (statistics.median(v) for v in times)
                worst = max(worst, o / t)
                print(f"{str(shape):14s} {name:24s} {case:10s} {t:8.1f} {o:8.1f} {o / t:6.2f}")
    print(f"worst ratio {worst:.2f} (limit {args.limit})")
    return 0 if worst <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
