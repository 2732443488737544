"""Fine-tuning with frozen BN: PyTorch's eval-mode BN against ``batchnorm.fuse_frozen``.

A ResNet-50-style replica (``tests/replicas.resnet50``, bottleneck blocks) is fine-tuned with
frozen BN, as detection and segmentation backbones are: every BN in eval mode with its
parameters frozen, everything else training. Two variants of the same weights, one SGD step at
a time, alternating, same batch (16 images of 112 px, 2 threads):

- ``torch``: the model as written, BN in eval mode (a pass of its own, its input kept for
  backward);
- ``fused``: ``batchnorm.fuse_frozen(model)``, each conv computing conv + BN in one layer.

It reports the median step time, the activation bytes autograd saves (every tensor packed by
``torch.autograd.graph.saved_tensors_hooks`` during one forward, each storage counted once;
parameters excluded) and the largest gradient difference between the two variants, against
the targets of issue 16 (<= 0.65x the bytes, <= 0.9x the step time, gradients equal to 1e-5).

    .venv/bin/python benchmarks/bench_finetune.py [--steps 10] [--threads 2] [--batch 16]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests import replicas  # noqa: E402

import batchnorm  # noqa: E402


def frozen_bn_model(seed: int = 0) -> nn.Module:
    """The replica with running statistics from a few batches, then every BN frozen (eval
    mode, parameters not trained)."""
    torch.manual_seed(seed)
    model = replicas.resnet50()
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 112, 112))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    return model


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters
    excluded: (activations, other), activations being the tensors with the batch on dim 0 and
    "other" the rest (the fused variant's per-forward weights ``W * s``, which its convs save)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            activation = t.dim() > 0 and t.shape[0] == x.shape[0]
            seen[storage.data_ptr()] = (storage.nbytes(), activation)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return (sum(n for n, a in seen.values() if a), sum(n for n, a in seen.values() if not a))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = frozen_bn_model()
    fused = batchnorm.fuse_frozen(base)
    from batchnorm.fusion import FoldedAway

    # fine-tuning: every module trains but the frozen BN (flags set one by one: train() recurses)
    for m in fused.modules():
        m.training = not isinstance(m, FoldedAway)
    for m in base.modules():
        m.training = not isinstance(m, nn.modules.batchnorm._BatchNorm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 112, 112, generator=g)
    target = torch.randint(0, 1000, (args.batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    # gradients of one step from the same weights, and PyTorch's model in float64 as the
    # reference both float32 variants are judged against (in float32 a deep ReLU network's
    # gradients move by ~1e-3 when rounding flips a unit near 0, in either variant)
    reference = copy.deepcopy(base).double()
    grads = {}
    for name, model, inp in (("torch", base, x), ("fused", fused, x),
                             ("float64", reference, x.double())):
        model.zero_grad(set_to_none=True)
        loss_fn(model(inp), target).backward()
        grads[name] = [p.grad.double().clone() for p in model.parameters() if p.requires_grad]
    del reference

    def worst(a_list, b_list):
        return max(float((a - b).abs().max() / (b.abs().max() + 1e-30))
                   for a, b in zip(a_list, b_list))

    worst_fused = worst(grads["fused"], grads["torch"])
    worst_vs64 = {k: worst(grads[k], grads["float64"]) for k in ("torch", "fused")}
    nbytes = {name: saved_bytes(model, x) for name, model in (("torch", base), ("fused", fused))}

    times = {"torch": [], "fused": []}
    optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for name, m in (("torch", base), ("fused", fused))}
    models = {"torch": base, "fused": fused}
    for _ in range(args.steps + 1):
        for name in ("torch", "fused"):
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            loss_fn(models[name](x), target).backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}

    print(f"threads={args.threads} steps={args.steps} batch={args.batch} "
          f"torch={torch.__version__} ResNet-50-style replica, 112 px, frozen BN (eval, "
          "no grad), SGD")
    print(f"{'variant':<8} {'step ms':>9} {'saved activations MiB':>22} {'other saved MiB':>16}")
    for name in ("torch", "fused"):
        act, other = nbytes[name]
        print(f"{name:<8} {med[name] * 1e3:>9.1f} {act / 2**20:>22.1f} {other / 2**20:>16.1f}")
    act_ratio = nbytes["fused"][0] / nbytes["torch"][0]
    all_ratio = sum(nbytes["fused"]) / sum(nbytes["torch"])
    time_ratio = med["fused"] / med["torch"]
    print(f"fused / torch: saved activations {act_ratio:.2f}x (target <= 0.65), all saved bytes "
          f"{all_ratio:.2f}x, step time {time_ratio:.2f}x (target <= 0.9)")
    print(f"largest relative gradient difference (per parameter tensor): fused vs torch "
          f"{worst_fused:.1e} (target <= 1e-5); against the float64 model: torch "
          f"{worst_vs64['torch']:.1e}, fused {worst_vs64['fused']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
