"""Activation memory of a Conv-BN-LeakyReLU stack: PyTorch's layers vs our inplace BatchNormAct2d.

Counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``),
each storage once, parameters excluded. PyTorch's block keeps three tensors alive (the conv
output for BN, the BN output for LeakyReLU, the activation for the next conv); our
``BatchNormAct2d(act="leaky_relu", inplace=True)`` saves only its output, which the next conv
saves anyway, so one tensor per block. Target: <= 0.6x PyTorch's bytes, with identical outputs
and gradients (to 1e-5, relative to each tensor's largest value).

    .venv/bin/python benchmarks/bench_memory.py [--blocks 10 --batch 8 --channels 32 --size 32]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import batchnorm


def make_stack(ours: bool, blocks: int, channels: int, slope: float = 0.01) -> nn.Sequential:
    """blocks x (Conv2d 3x3 -> BN -> LeakyReLU); same state_dict keys for both kinds."""

    def block():
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        if ours:
            return nn.Sequential(conv, batchnorm.BatchNormAct2d(channels, "leaky_relu",
                                                                negative_slope=slope, inplace=True))
        return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(slope))

    return nn.Sequential(*[block() for _ in range(blocks)])


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(output, bytes of the distinct non-parameter storages autograd saved in the forward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # saved tensors stay alive until backward, so a data_ptr is never reused among them
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return y, sum(storages.values())


def measure(blocks: int = 10, batch: int = 8, channels: int = 32, size: int = 32,
            seed: int = 0) -> dict:
    """Saved bytes of both stacks on one input, and the largest difference in y and gradients."""
    torch.manual_seed(seed)
    theirs = make_stack(False, blocks, channels)
    ours = make_stack(True, blocks, channels)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(batch, channels, size, size)
    dy = torch.randn(batch, channels, size, size)

    results = {}
    for name, model in (("torch", theirs), ("ours", ours)):
        xi = x.clone().requires_grad_(True)
        y, nbytes = saved_bytes(model, xi)
        y.backward(dy)
        grads = [xi.grad] + [p.grad for p in model.parameters()]
        results[name] = (nbytes, [y.detach()] + grads)

    max_diff = 0.0
    for a, b in zip(results["ours"][1], results["torch"][1]):
        scale = max(1.0, float(b.abs().max()))
        max_diff = max(max_diff, float((a - b).abs().max()) / scale)
    torch_bytes, our_bytes = results["torch"][0], results["ours"][0]
    return {
        "blocks": blocks, "shape": (batch, channels, size, size),
        "torch_bytes": torch_bytes, "our_bytes": our_bytes, "ratio": our_bytes / torch_bytes,
        "max_diff": max_diff,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    r = measure(args.blocks, args.batch, args.channels, args.size)
    act = r["shape"][0] * r["shape"][1] * r["shape"][2] * r["shape"][3] * 4
    print(f"{r['blocks']} x (Conv2d 3x3 -> BN -> LeakyReLU), input {r['shape']} float32 "
          f"({act / 2**20:.2f} MiB per activation)")
    print(f"{'':32}{'saved MiB':>12}{'activations':>14}")
    print(f"{'PyTorch BN + LeakyReLU':32}{r['torch_bytes'] / 2**20:12.2f}{r['torch_bytes'] / act:14.2f}")
    print(f"{'BatchNormAct2d inplace=True':32}{r['our_bytes'] / 2**20:12.2f}{r['our_bytes'] / act:14.2f}")
    ok_ratio = r["ratio"] <= 0.6
    ok_diff = r["max_diff"] <= 1e-5
    print(f"ratio ours / PyTorch: {r['ratio']:.3f}  (target <= 0.6: {'met' if ok_ratio else 'MISSED'})")
    print(f"max |difference| in output and gradients, relative: {r['max_diff']:.2e}  "
          f"(<= 1e-5: {'yes' if ok_diff else 'NO'})")
    return 0 if ok_ratio and ok_diff else 1


if __name__ == "__main__":
    raise SystemExit(main())
