"""Train a small Conv-BN-ReLU network on scikit-learn's digits with DDP and SyncBatchNorm on CPU.

    torchrun --nproc_per_node=2 examples/train_ddp.py

Each step takes one global batch of 64 images and splits it across the ranks (the last batch of
an epoch is smaller, so ranks get uneven slices). SyncBatchNorm normalises every slice with the
statistics of the whole global batch, so the distributed run computes what one process computes
on the full batches. At the end rank 0 replays the same training in a single process with plain
BatchNorm and checks that the running statistics agree; it prints PASS or FAIL, and every rank
exits with status 1 on FAIL. The run is in float64 so that the check is sharp (see TOLERANCE).

    torchrun --nproc_per_node=2 examples/train_ddp.py --without-sync   # plain BN per rank: FAIL
"""
from __future__ import annotations

import argparse
import datetime
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm

BATCH = 64
# The run is in float64 so that the check is sharp: the distributed and the single-process run
# then agree to ~1e-12. In float32 they differ by rounding (sums taken in another order), which
# SGD amplifies over hundreds of steps (to ~1e-1 after three epochs here) and would hide an error.
TOLERANCE = 1e-10


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process and in the replay
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    # x: (N, 1, 8, 8)
    x = torch.tensor(digits.images, dtype=torch.get_default_dtype()).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:297], order[297:]
    return x[train], y[train], x[test], y[test]


def batches(n: int, epoch: int):
    """The global batches of one epoch, as index tensors (the same in every process)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
    return order.split(BATCH)


def train(model: nn.Module, x, y, epochs: int, rank: int, world: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for idx in batches(len(y), epoch):
            mine = np.array_split(idx.numpy(), world)[rank]  # uneven on the last batch
            out = model(x[mine])
            # DDP averages gradients over ranks, so scale the local sum to give the global mean
            loss = F.cross_entropy(out, y[mine], reduction="sum") * world / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--without-sync", action="store_true",
                        help="keep plain BatchNorm (statistics of each rank's slice): "
                             "the check fails")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)

    # a short timeout turns a stuck or dead rank into an error instead of a 30-minute hang
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y, x_test, y_test = load()

    model = make_model() if args.without_sync else batchnorm.convert(make_model(), to="sync")
    train(DDP(model), x, y, args.epochs, rank, world)
    got = running_stats(model)
    print(f"rank {rank}: trained {args.epochs} epochs on its slices; "
          f"test accuracy {accuracy(model, x_test, y_test):.3f}", flush=True)

    status = torch.zeros(1)
    if rank == 0:
        reference = make_model()
        train(reference, x, y, args.epochs, rank=0, world=1)
        want = running_stats(reference)
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        scale = max(float(want[k].abs().max()) for k in want)
        ok = all(torch.allclose(got[k], want[k], rtol=TOLERANCE, atol=TOLERANCE) for k in want)
        print(f"single process on the full batches: test accuracy "
              f"{accuracy(reference, x_test, y_test):.3f}")
        print(f"running statistics of {len(want) // 2} BN layers vs one process: "
              f"max |difference| {worst:.2e} (values up to {scale:.2f}; tolerance {TOLERANCE:g})")
        print("PASS" if ok else "FAIL", flush=True)
        status.fill_(0 if ok else 1)
    dist.broadcast(status, src=0)  # every rank exits with the verdict
    dist.destroy_process_group()
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
