"""Folded-model latency against PyTorch's ``torch.fx.experimental.optimization.fuse``, and the
time ``batchnorm.fold`` itself takes.

Every ratio is measured in the same run: the three variants of a model (eval, fuse, fold) are
timed interleaved (order rotated each round), and the fastest round of each compared (on a shared
machine the slower rounds measure other processes). CPU, batch 8 by default.

    .venv/bin/python benchmarks/bench_fold.py            # the full table
    .venv/bin/python benchmarks/bench_fold.py --quick    # smaller inputs, fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests import replicas  # noqa: E402

import batchnorm  # noqa: E402
from batchnorm.protocol import is_batchnorm, is_fixed_affine  # noqa: E402

with warnings.catch_warnings():  # torch's module warns about its own jit use on import
    warnings.simplefilter("ignore")
    from torch.fx.experimental.optimization import fuse


def bn_left(model: nn.Module) -> int:
    """BN modules still normalising (frozen affines counted apart)."""
    return sum(1 for m in model.modules() if is_batchnorm(m) and not is_fixed_affine(m))


def frozen_left(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_fixed_affine(m))


def time_variants(variants: dict, x: torch.Tensor, rounds: int) -> dict:
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for m in variants.values():  # warm up
            m(x)
            m(x)
        names = list(variants)
        for i in range(rounds):
            # rotate the order every round: no variant always runs right after another
            for name in names[i % len(names) :] + names[: i % len(names)]:
                m = variants[name]
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    # the minimum: on a shared machine every slower round is someone else's load
    return {name: min(ts) for name, ts in times.items()}


def compare(label: str, model: nn.Module, x: torch.Tensor, rounds: int) -> dict:
    replicas.randomize_bn(model)
    model.eval()
    fused = fuse(copy.deepcopy(model))
    folded = batchnorm.fold(model)
    with torch.no_grad():
        want = model(x)
        err_fuse = ((fused(x) - want).abs().max() / want.abs().max()).item()
        err_fold = ((folded(x) - want).abs().max() / want.abs().max()).item()
    t = time_variants({"eval": model, "fuse": fused, "fold": folded}, x, rounds)
    return {
        "model": label,
        "bn": bn_left(model),
        "fuse_left": bn_left(fused),
        "fold_left": bn_left(folded),
        "fold_frozen": frozen_left(folded),
        "eval_ms": t["eval"] * 1e3,
        "fuse_ms": t["fuse"] * 1e3,
        "fold_ms": t["fold"] * 1e3,
        "fold/fuse": t["fold"] / t["fuse"],
        "fold/eval": t["fold"] / t["eval"],
        "err_fuse": err_fuse,
        "err_fold": err_fold,
    }


def fold_time(model: nn.Module, repeats: int = 3) -> tuple[int, float, float]:
    replicas.randomize_bn(model)
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        batchnorm.fold(model)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        fuse(copy.deepcopy(model).eval())
        theirs.append(time.perf_counter() - t)
    return sum(is_batchnorm(m) for m in model.modules()), min(ours), min(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--size", type=int, default=224, help="image side for ResNet/MobileNet/DenseNet"
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.rounds = 112, 5
    torch.manual_seed(0)
    n, s = args.batch, args.size
    image = torch.randn(n, 3, s, s)
    cases = [
        ("ResNet-50 replica", replicas.resnet50(), image),
        ("MobileNetV2 replica", replicas.mobilenet_v2(), image),
        (
            "DCGAN generator (ConvTranspose)",
            replicas.dcgan_generator(nz=100, ngf=64),
            torch.randn(n, 100, 1, 1),
        ),
        (
            "R3D-like (Conv3d subclass)",
            nn.Sequential(
                replicas.Conv3DSimple(3, 32),
                nn.BatchNorm3d(32),
                nn.ReLU(inplace=True),
                replicas.Conv3DSimple(32, 64, 2),
                nn.BatchNorm3d(64),
                nn.ReLU(inplace=True),
                replicas.Conv3DSimple(64, 64),
                nn.BatchNorm3d(64),
                nn.ReLU(inplace=True),
            ),
            torch.randn(n, 3, 8, 56, 56),
        ),
        ("DenseNet-121-like", replicas.densenet121(), image),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, "
        f"images {s}x{s}, fastest of {args.rounds} interleaved rounds"
    )
    header = (
        f"{'model':34s} {'BN':>4s} {'left:fuse':>9s} {'left:fold':>9s} {'eval ms':>8s} "
        f"{'fuse ms':>8s} {'fold ms':>8s} {'fold/fuse':>9s} {'fold/eval':>9s} {'err fold':>9s}"
    )
    print(header)
    print("-" * len(header))
    for label, model, x in cases:
        r = compare(label, model, x, args.rounds)
        print(
            f"{r['model']:34s} {r['bn']:4d} {r['fuse_left']:9d} "
            f"{r['fold_left']:5d}+{r['fold_frozen']:<3d} "
            f"{r['eval_ms']:8.1f} {r['fuse_ms']:8.1f} {r['fold_ms']:8.1f} {r['fold/fuse']:9.3f} "
            f"{r['fold/eval']:9.3f} {r['err_fold']:9.1e}"
        )
    print("left:fold = BN left normalising + BN turned into frozen per-channel affines")
    print()
    for label, model in [
        ("ResNet-152 replica, full width", replicas.resnet152(width=64)),
        ("ResNet-152 replica, width 8", replicas.resnet152(width=8)),
    ]:
        count, ours, theirs = fold_time(model)
        print(
            f"fold time, {label} ({count} BN): {ours:.2f} s (target < 2 s); "
            f"deepcopy + fuse: {theirs:.2f} s"
        )


if __name__ == "__main__":
    main()
