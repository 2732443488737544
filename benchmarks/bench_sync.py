"""SyncBatchNorm overhead: training-step time against plain BatchNorm, and bytes on the wire.

    .venv/bin/python benchmarks/bench_sync.py [--channels 32] [--size 16] [--rounds 6]

Two gloo processes on 127.0.0.1, each with batch 16, train a ResNet-style stack (a stem conv,
then 10 residual Conv-BN-ReLU blocks) under DistributedDataParallel. In the same processes and
interleaved round by round (so load on the machine hits every variant alike), the stack runs with

- ``torch``: PyTorch's BatchNorm2d (per-rank statistics): the baseline,
- ``ours``: our BatchNorm2d (per-rank statistics),
- ``sync``: our SyncBatchNorm (statistics over both ranks).

It reports the median and the best round's step time of each and their ratio to the baseline
(on a shared machine the best round is the least disturbed by other processes), the time the sync
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
import queue
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


def layer_compute(c: int, size: int, repeats: int = 20) -> dict[str, float]:
    """Seconds for one BN layer's forward + backward, single process: PyTorch's BatchNorm2d
    against SyncBatchNorm's autograd function with the exchange stubbed out (interleaved)."""
    from batchnorm.collectives import LocalLink
    from batchnorm.sync import _SyncBatchNormFunction

    torch.set_num_threads(1)
    x0 = torch.randn(BATCH, c, size, size)
    bn = nn.BatchNorm2d(c)
    w, b = bn.weight, bn.bias

    def torch_bn():
        x = x0.clone().requires_grad_(True)
        bn(x).sum().backward()

    def sync_fn():
        x = x0.clone().requires_grad_(True)
        _SyncBatchNormFunction.apply(x, w, b, 1e-5, LocalLink(), 1)[0].sum().backward()

    runs = {"torch": [], "sync": []}
    for f in (torch_bn, sync_fn):
        f()
    for _ in range(repeats):
        for name, f in (("torch", torch_bn), ("sync", sync_fn)):
            start = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in runs.items()}


def _rank(rank: int, init: str, args, out) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import batchnorm

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the hostname says
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
    cpu = {k: [] for k in models}
    for k in models:  # warm-up: kernels compiled, buffers allocated
        for _ in range(2):
            step(k)
    for _ in range(args.rounds):
        for k in models:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(k)
            times[k].append((time.perf_counter() - start) / args.steps)
            cpu[k].append((time.process_time() - start_cpu) / args.steps)

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
        out.put({"times": times, "cpu": cpu, "comm": comm, "n_bn": n_bn, "params": params})
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
        res = None
        while res is None:
            try:
                res = out.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    print("a benchmark process failed (its traceback is above)", file=sys.stderr)
                    return 1
        for p in procs:
            p.join(timeout=60)

    med = {k: statistics.median(v) for k, v in res["times"].items()}
    best = {k: min(v) for k, v in res["times"].items()}
    c = args.channels
    print(f"{WORLD} gloo ranks on 127.0.0.1, 1 thread each; stem + {BLOCKS} residual "
          f"Conv-BN-ReLU blocks, C={c}, {args.size}x{args.size} images, batch {BATCH} per rank, "
          f"{res['n_bn']} BN layers, {res['params']:,} parameters; medians of {args.rounds} rounds "
          f"x {args.steps} steps, variants interleaved")
    print()
    cpu = {k: statistics.median(v) for k, v in res["cpu"].items()}
    print(f"{'variant':<34}{'median ms':>10}{'ratio':>8}{'best ms':>10}{'ratio':>8}"
          f"{'CPU ms':>9}{'ratio':>8}")
    names = {"torch": "PyTorch BatchNorm2d (per rank)", "ours": "our BatchNorm2d (per rank)",
             "sync": "our SyncBatchNorm (both ranks)"}
    for k in ("torch", "ours", "sync"):
        print(f"{names[k]:<34}{med[k] * 1e3:>10.1f}{med[k] / med['torch']:>7.2f}x"
              f"{best[k] * 1e3:>10.1f}{best[k] / best['torch']:>7.2f}x"
              f"{cpu[k] * 1e3:>9.1f}{cpu[k] / cpu['torch']:>7.2f}x")
    comm, comm_best = statistics.median(res["comm"]), min(res["comm"])
    print(f"{'sync collectives alone':<34}{comm * 1e3:>10.1f}{comm / med['torch']:>7.2f}x"
          f"{comm_best * 1e3:>10.1f}{comm_best / best['torch']:>7.2f}x"
          f"   ({res['n_bn']} x (all-gather + all-reduce) per step)")
    print("ratios are to PyTorch's BatchNorm2d in the same processes; 'best' is the fastest round;"
          " 'CPU' is rank 0's CPU time per step (median), which other processes on a busy machine"
          " disturb least")
    print()
    print(f"bytes each rank sends per BN layer per training step (C={c}, W={WORLD}):")
    for name, b in bytes_per_layer(c, WORLD).items():
        print(f"  {name:<20}{b:>8.0f} B")
    grads = 4 * res["params"] * 2 * (WORLD - 1) / WORLD
    print(f"  for scale: DDP's gradient all-reduce sends {grads:,.0f} B per step")
    one = layer_compute(c, args.size)
    print()
    print("one BN layer, forward + backward, single process, 1 thread, "
          f"({BATCH}, {c}, {args.size}, {args.size}), fastest of 20: "
          f"PyTorch BatchNorm2d {one['torch'] * 1e3:.2f} ms, "
          f"SyncBatchNorm's compute without messages {one['sync'] * 1e3:.2f} ms "
          f"({one['sync'] / one['torch']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
