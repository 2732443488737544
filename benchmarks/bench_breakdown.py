"""Where a layer's training step goes beyond its kernels, on CIFAR ResNet-20's BN shapes.

For each shape (batch 128, float32, NCHW and channels-last) it times, alternating, medians over
``--repeats`` rounds:

- ``layer``    : ``BatchNorm2d`` forward + backward (``y.backward(g)``), as a network sees it;
- ``torch``    : ``torch.nn.BatchNorm2d`` the same way (the baseline);
- ``kernels``  : the numba kernels alone, forward then backward, into preallocated outputs
  (``batchnorm.kernels.train_forward`` / ``train_backward`` on NumPy views);
- ``alloc``    : the two outputs the step allocates (y, dx) from ``output_like`` (not written:
  a page fault at the first write, where there is one, lands in ``rest``);
- ``host``     : the same layer step at (2, C, 4, 4), where the arithmetic is nothing: the
  Python and dispatch of one forward + backward (timed in a loop of its own);

and the rest, ``layer - kernels - alloc - host``: what autograd and the gradient's handling
(``as_layout_of`` copies of a non-matching ``dy``, the engine's own work) add. ``autograd`` is
PyTorch's whole step at (2, C, 4, 4), its host cost for comparison.

    .venv/bin/python benchmarks/bench_breakdown.py [--repeats 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.ops.memory import output_like

SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def _views(t: torch.Tensor, channels_last: bool) -> np.ndarray:
    n, c = t.shape[:2]
    if channels_last:
        return t.permute(0, 2, 3, 1).numpy().reshape(-1, c)
    return t.numpy().reshape(n, c, -1)


def timers(shape, channels_last: bool) -> tuple[dict, dict]:
    """Zero-argument callables, one per column: the large calls, and the small ones (timed in
    a loop of their own: alternating with large calls, the kernels' thread count would change
    every call, one thread below 65536 values, which no network does layer to layer)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    c = shape[1]
    ours, theirs = batchnorm.BatchNorm2d(c), torch.nn.BatchNorm2d(c)
    small = (2, c, 4, 4)
    xs = torch.randn(small, generator=g).contiguous(memory_format=fmt).requires_grad_()
    dys = torch.randn(small, generator=g).contiguous(memory_format=fmt)
    xg = x.clone().requires_grad_()
    y, dx = torch.empty_like(x), torch.empty_like(x)
    xv, yv, dyv, dxv = (_views(t, channels_last) for t in (x, y, dy, dx))
    w, b = ours.weight.detach().numpy(), ours.bias.detach().numpy()

    def kernels_only():
        mean, var = kernels.train_forward(xv, w, b, 1e-5, 0, 0.01, 1.0, yv)
        kernels.train_backward(dyv, xv, w, b, mean, var, 1e-5, 0, 0.01, 1.0, False, dxv)

    def alloc():
        for _ in range(2):
            output_like(x)

    return {
        "torch": lambda: theirs(xg).backward(dy),
        "layer": lambda: ours(xg).backward(dy),
        "kernels": kernels_only,
        "alloc": alloc,
    }, {
        "host": lambda: ours(xs).backward(dys),
        "autograd": lambda: theirs(xs).backward(dys),
    }


def median_ms(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # compile, warm the caches
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per training forward + "
          f"backward, median of {args.repeats} alternating rounds")
    cols = ("torch", "layer", "kernels", "alloc", "host", "rest", "autograd")
    print(f"{'shape':20} {'layout':6} " + " ".join(f"{c:>8}" for c in cols))
    for shape in SHAPES:
        for channels_last in (False, True):
            large, small = timers(shape, channels_last)
            t = median_ms(large, args.repeats) | median_ms(small, args.repeats)
            t["rest"] = t["layer"] - t["kernels"] - t["alloc"] - t["host"]
            print(f"{str(shape):20} {'NHWC' if channels_last else 'NCHW':6} "
                  + " ".join(f"{t[c]:8.3f}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
