"""Activation memory of a Conv-BN-LeakyReLU stack: PyTorch's layers vs our inplace BatchNormAct2d.

Counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``),
each storage once, parameters excluded. PyTorch's block keeps three tensors alive (the conv
output for BN, the BN output for LeakyReLU, the activation for the next conv); our
``BatchNormAct2d(act="leaky_relu", inplace=True)`` saves only its output, which the next conv
saves anyway, so one tensor per block. Target: <= 0.6x PyTorch's bytes, with identical outputs
and gradients (to 1e-5, relative to each tensor's largest value; checked in float64, where
LeakyReLU's kink cannot split the two, and reported in float32 against the float64 answer).

    .venv/bin/python benchmarks/bench_memory.py [--blocks 10 --batch 8 --channels 32 --size 32]
"""
from __future__ import annotations

import argparse
import copy

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


def _run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """(saved bytes, [y, dx, every parameter's gradient]) for one forward and backward."""
    xi = x.clone().requires_grad_(True)
    y, nbytes = saved_bytes(model, xi)
    y.backward(dy)
    return nbytes, [y.detach(), xi.grad] + [p.grad for p in model.parameters()]


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| over the lists, each tensor's difference relative to max(1, max |b|)."""
    return max(float((u.double() - v.double()).abs().max()) / max(1.0, float(v.abs().max()))
               for u, v in zip(a, b, strict=True))


def measure(blocks: int = 10, batch: int = 8, channels: int = 32, size: int = 32,
            seed: int = 0) -> dict:
    """Saved bytes of both stacks (float32), and how far apart their outputs and gradients are.

    ``diff64``: ours vs PyTorch's, both in float64: the check that both compute the same thing.
    In float32 the two can legitimately differ by more: an element whose pre-activation lies
    within rounding of LeakyReLU's kink takes slope 1 in one and 0.01 in the other, and changes
    a bias gradient by about |dy|. So float32 is reported against the float64 answer for both
    (``err32_ours``, ``err32_torch``), and ours vs PyTorch's directly (``diff32``).
    """
    torch.manual_seed(seed)
    theirs = make_stack(False, blocks, channels)
    ours = make_stack(True, blocks, channels)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(batch, channels, size, size)
    dy = torch.randn(batch, channels, size, size)

    runs = {}
    for dtype in (torch.float32, torch.float64):
        for name, model in (("torch", theirs), ("ours", ours)):
            runs[name, dtype] = _run(copy.deepcopy(model).to(dtype), x.to(dtype), dy.to(dtype))
    torch_bytes, our_bytes = runs["torch", torch.float32][0], runs["ours", torch.float32][0]
    truth = runs["torch", torch.float64][1]
    return {
        "blocks": blocks, "shape": (batch, channels, size, size),
        "torch_bytes": torch_bytes, "our_bytes": our_bytes, "ratio": our_bytes / torch_bytes,
        "diff64": _max_rel_diff(runs["ours", torch.float64][1], truth),
        "diff32": _max_rel_diff(runs["ours", torch.float32][1], runs["torch", torch.float32][1]),
        "err32_ours": _max_rel_diff(runs["ours", torch.float32][1], truth),
        "err32_torch": _max_rel_diff(runs["torch", torch.float32][1], truth),
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
    for label, nbytes in (("PyTorch BN + LeakyReLU", r["torch_bytes"]),
                          ("BatchNormAct2d inplace=True", r["our_bytes"])):
        print(f"{label:32}{nbytes / 2**20:12.2f}{nbytes / act:14.2f}")
    ok_ratio = r["ratio"] <= 0.6
    ok_diff = r["diff64"] <= 1e-5
    print(f"ratio ours / PyTorch: {r['ratio']:.3f}  "
          f"(target <= 0.6: {'met' if ok_ratio else 'MISSED'})")
    print("max |difference| in output and all gradients, relative to each tensor's max:")
    print(f"  ours vs PyTorch, float64:            {r['diff64']:.2e}  "
          f"(<= 1e-5: {'yes' if ok_diff else 'NO'})")
    print(f"  ours vs PyTorch, float32:            {r['diff32']:.2e}")
    print(f"  float32 vs the float64 answer: ours  {r['err32_ours']:.2e}, "
          f"PyTorch {r['err32_torch']:.2e}")
    print("  (float32 differences above ~1e-5 come from elements within rounding of LeakyReLU's "
          "kink)")
    return 0 if ok_ratio and ok_diff else 1


if __name__ == "__main__":
    raise SystemExit(main())
