"""What a training step sees: whole networks, one SGD step, PyTorch's BN against ours.

For each network, four variants of the same model (same weights) take SGD steps, alternating
step by step so that all four see the same machine load:

- ``torch``: the model as written (``nn.BatchNorm2d`` then the activation modules);
- ``ours``: ``batchnorm.convert(model)``, our BN layers on the fused CPU kernels;
- ``fused``: ``batchnorm.convert(model, fuse_act="graph")``, BN + the activation after it in one
  ``BatchNormAct2d`` (the graph rewrite: the ResNet blocks share one ReLU module, as
  torchvision's do, which ``fuse_act=True`` leaves unfused);
- ``no BN``: every BN replaced by ``nn.Identity``: the step without any BN cost.

"BN cost" is a variant's median step time minus the ``no BN`` median. Peak RSS is measured per
variant in a fresh process (three steps; ``VmHWM``, as ``ru_maxrss`` keeps the parent's peak
across exec). Run it in both allocator regimes:

    .venv/bin/python benchmarks/bench_train.py                       # glibc's defaults
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/bench_train.py                   # freed memory kept
    .venv/bin/python benchmarks/bench_train.py --quick               # fewer steps, no RSS
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests import replicas  # noqa: E402

import batchnorm  # noqa: E402

# name -> (builder, batch shape)
NETWORKS = {
    "CIFAR ResNet-20, b128": (
        lambda: replicas.ResNet("basic", layers=(3, 3, 3), width=16, num_classes=10),
        (128, 3, 32, 32)),
    "ResNet-50, b16, 112px": (replicas.resnet50, (16, 3, 112, 112)),
    "MobileNetV2, b32, 96px": (replicas.mobilenet_v2, (32, 3, 96, 96)),
}
VARIANTS = ("torch", "ours", "fused", "no BN")


def _without_bn(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            setattr(model, name, _without_bn(child))
    return model


def variant(model: nn.Module, name: str) -> nn.Module:
    if name == "torch":
        return copy.deepcopy(model)
    if name == "ours":
        return batchnorm.convert(model)
    if name == "fused":
        return batchnorm.convert(model, fuse_act="graph")
    return _without_bn(model)


def stepper(model: nn.Module, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    target = torch.randint(0, 10, (shape[0],), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()

    return step


RSS_CHILD = """
import sys, json
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads({threads})
import bench_train
builder, shape = bench_train.NETWORKS[{network!r}]
torch.manual_seed(0)
step = bench_train.stepper(bench_train.variant(builder(), {name!r}), shape)
for _ in range(3):
    step()
with open("/proc/self/status") as f:  # VmHWM: this process's peak (ru_maxrss survives exec)
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps(peak * 1024))
"""


def peak_rss(network: str, name: str, threads: int) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    code = RSS_CHILD.format(root=os.path.dirname(here), bench=here, threads=threads,
                            network=network, name=name)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 steps, no peak RSS")
    parser.add_argument("--network", choices=list(NETWORKS), action="append",
                        help="only this network (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps
    regime = "freed memory kept" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc defaults"
    print(f"threads={args.threads} steps={steps} torch={torch.__version__} regime: {regime}; "
          f"output cache {batchnorm.output_cache_info()['limit'] >> 20} MB")
    header = (f"{'network':<24} {'variant':<7} {'step ms':>9} {'BN cost ms':>10} "
              f"{'vs torch BN':>11} {'step vs torch':>13} {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for network in args.network or NETWORKS:
        builder, shape = NETWORKS[network]
        torch.manual_seed(0)
        model = builder()
        steps_of = {name: stepper(variant(model, name), shape) for name in VARIANTS}
        for fn in steps_of.values():  # warm-up: compile, allocate, first-touch
            fn()
            fn()
        times = {name: [] for name in VARIANTS}
        for i in range(steps):
            order = VARIANTS[i % 4:] + VARIANTS[:i % 4]  # rotate who goes first
            for name in order:
                start = time.perf_counter()
                steps_of[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        cost_torch = med["torch"] - med["no BN"]
        for name in VARIANTS:
            cost = med[name] - med["no BN"]
            rss = "" if args.quick else f"{peak_rss(network, name, args.threads) / 2**20:.0f}"
            vs_bn = "" if name == "no BN" else f"{cost / cost_torch:.2f}x"
            print(f"{network:<24} {name:<7} {med[name] * 1e3:>9.1f} "
                  f"{'' if name == 'no BN' else f'{cost * 1e3:.1f}':>10} {vs_bn:>11} "
                  f"{med['torch'] / med[name]:>12.2f}x {rss:>12}")
    print("targets (issue 12): our BN cost <= 0.5x PyTorch's on each network, fused never slower "
          "than ours, peak RSS <= PyTorch's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
