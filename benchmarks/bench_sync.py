"""SyncBatchNorm overhead: training-step time against plain BatchNorm, and bytes on the wire.

    .venv/bin/python benchmarks/bench_sync.py [--channels 32] [--size 16] [--rounds 6]

Two gloo processes on 127.0.0.1, each with batch 16, train a ResNet-style stack (a stem conv,
then 10 residual Conv-BN-ReLU blocks) under DistributedDataParallel. In the same processes and
interleaved round by round (so load on the machine hits every variant alike), the stack runs with

- ``torch``: PyTorch's BatchNorm2d (per-rank statistics),
- ``ours``: our BatchNorm2d (per-rank statistics): the baseline,
- ``sync``: our SyncBatchNorm (statistics over both ranks).

It reports the median step time of each and the ratio to the baseline, the time the sync
layers' collectives take alone (the same messages, no compute), and the bytes each rank sends
per BN layer per step, ours against PyTorch's SyncBatchNorm scheme, computed from the message
layouts (both use an all-gather forward and an all-reduce backward):

- ours: forward all-gather of ``2C + 5`` float64 (mean, M2, count, 4-value check header),
  backward all-reduce of ``2C + 8`` float64 (sum g, sum g*x_hat, header and its square);
- PyTorch: forward all-gather of ``2C + 1`` values in the input dtype (mean, invstd, count),
  backward all-reduce of ``2C`` values in the input dtype (sum_dy, sum_dy_xmu).

Per rank, an all-gather sends its message to each of the W - 1 others; a ring all-reduce sends
``2 (W - 1) / W`` times the message.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
BATCH = 16
BLOCKS = 10


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu(self.bn(self.conv(x)))


def make_net(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        *[Block(c) for _ in range(BLOCKS)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10),
    )


def bytes_per_layer(c: int, world: int) -> dict[str, float]:
    """Bytes one rank sends per BN layer per training step (forward + backward)."""
    gather, ring = world - 1, 2 * (world - 1) / world
    return {
        "ours (float64)": gather * 8 * (2 * c + 5) + ring * 8 * (2 * c + 8),
        "PyTorch (float32)": gather * 4 * (2 * c + 1) + ring * 4 * (2 * c),
    }


def _rank(rank: int, init: str, args, out) -> None:
    import batchnorm
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    c = args.channels
    variants = {
        "torch": make_net(c),
        "ours": batchnorm.convert(make_net(c), to="batchnorm"),
        "sync": batchnorm.convert(make_net(c), to="sync"),
    }
    models = {k: DDP(m) for k, m in variants.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, 3, args.size, args.size, generator=g)
    t = torch.randint(0, 10, (BATCH,), generator=g)

    def step(name: str) -> None:
        loss = F.cross_entropy(models[name](x), t)
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()

    times = {k: [] for k in models}
    for k in models:  # warm-up: kernels compiled, buffers allocated
        for _ in range(2):
            step(k)
    for _ in range(args.rounds):
        for k in models:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(k)
            times[k].append((time.perf_counter() - start) / args.steps)

    # the sync layers' collectives alone: same sizes, same count, no compute
    n_bn = sum(1 for m in variants["sync"].modules() if isinstance(m, batchnorm.SyncBatchNorm))
    fwd = torch.zeros(2 * c + 5, dtype=torch.float64)
    gathered = torch.empty(WORLD * fwd.numel(), dtype=torch.float64)
    bwd = torch.zeros(2 * c + 8, dtype=torch.float64)
    comm = []
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps * n_bn):
            dist.all_gather_single(gathered, fwd) if hasattr(dist, "all_gather_single") else \
                dist.all_gather_into_tensor(gathered, fwd)
            dist.all_reduce(bwd)
        comm.append((time.perf_counter() - start) / args.steps)
    if rank == 0:
        params = sum(p.numel() for p in variants["ours"].parameters())
        out.put({"times": times, "comm": comm, "n_bn": n_bn, "params": params})
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank, args=(r, init, args, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        res = out.get(timeout=600)
        for p in procs:
            p.join(timeout=60)

    med = {k: statistics.median(v) for k, v in res["times"].items()}
    base = med["ours"]
    c = args.channels
    print(f"{WORLD} gloo ranks on 127.0.0.1, 1 thread each; stem + {BLOCKS} residual "
          f"Conv-BN-ReLU blocks, C={c}, {args.size}x{args.size} images, batch {BATCH} per rank, "
          f"{res['n_bn']} BN layers, {res['params']:,} parameters; medians of {args.rounds} rounds "
          f"x {args.steps} steps, variants interleaved")
    print()
    print(f"{'variant':<34}{'step ms':>10}{'vs ours BN':>12}")
    names = {"torch": "PyTorch BatchNorm2d (per rank)", "ours": "our BatchNorm2d (per rank)",
             "sync": "our SyncBatchNorm (both ranks)"}
    for k in ("torch", "ours", "sync"):
        print(f"{names[k]:<34}{med[k] * 1e3:>10.1f}{med[k] / base:>11.2f}x")
    comm = statistics.median(res["comm"])
    print(f"{'sync collectives alone':<34}{comm * 1e3:>10.1f}{comm / base:>11.2f}x"
          f"   ({res['n_bn']} x (all-gather + all-reduce) per step)")
    print()
    print(f"bytes each rank sends per BN layer per training step (C={c}, W={WORLD}):")
    for name, b in bytes_per_layer(c, WORLD).items():
        print(f"  {name:<20}{b:>8.0f} B")
    grads = 4 * res["params"] * 2 * (WORLD - 1) / WORLD
    print(f"  for scale: DDP's gradient all-reduce sends {grads:,.0f} B per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
