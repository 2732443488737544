"""The collectives SyncBatchNorm and distributed recalibration send, with headers that catch
ranks out of step.

Every message carries a small header (layer key, call number, phase, channels) that every rank
checks: ranks that call sync layers a different number of times, or in a different order, raise
:class:`~batchnorm.BatchNormError` naming the layer instead of mixing statistics of different
layers. A rank that dies or never joins makes the collective fail after the process group's
timeout (``dist.init_process_group(..., timeout=datetime.timedelta(...))``; gloo's default is 30
minutes); that failure is re-raised as a BatchNormError naming the layer. One case stays gloo's:
a peer whose message is *longer* than this rank's (a layer with more channels) makes gloo abort
this process ("Received data size doesn't match expected size"); the peer, which sees a short
message or the closed connection, raises the BatchNormError. Never a silent wrong result.

The transport is PyTorch's ``torch.distributed`` (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from .errors import BatchNormError

__all__ = ["Link", "LocalLink", "group_world", "layer_key", "FORWARD", "BACKWARD", "RECALIBRATE"]

FORWARD, BACKWARD, RECALIBRATE = 1.0, 2.0, 3.0
PHASES = {FORWARD: "forward", BACKWARD: "backward", RECALIBRATE: "recalibration"}
HEADER = 4  # layer key, call number, phase, channels


class LocalLink:
    """A Link of one rank and no process group: gather and all-reduce return their payload
    (the sync layers' compute alone, for tests and benchmarks)."""

    name = "local"

    def gather(self, payload, phase, call, channels):
        return payload[None]

    def all_reduce(self, payload, phase, call, channels):
        return payload


class Link:
    """One sync layer's view of its process group: who it is, and how many calls it made."""

    def __init__(self, group, world: int, name: str, key: float):
        self.group = group
        self.world = world
        self.name = name
        self.key = key
        # gloo moves CPU tensors; with CUDA tensors on gloo the small messages go through the host
        self.host = dist.get_backend(group) == "gloo"

    def _device(self, payload: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.host else payload.device

    def _failed(self, phase: float, call: int, err: RuntimeError) -> BatchNormError:
        return self._fail(phase, call, f"a failed collective: {_first_line(err)}; a rank died, "
                          "stopped early or waits elsewhere; the process group's timeout bounds "
                          "the wait: dist.init_process_group(..., timeout=timedelta(seconds=...))")

    def _fail(self, phase: float, call: int, why: str) -> BatchNormError:
        return BatchNormError(
            f"{self.name}: expected every rank of the process group to make the same "
            f"SyncBatchNorm call ({PHASES[phase]} call #{call} of this layer) (got {why})"
        )

    def _header(self, phase: float, call: int, channels: int, device) -> torch.Tensor:
        return torch.tensor([self.key, float(call), phase, float(channels)],
                            dtype=torch.float64, device=device)

    def gather(self, payload: torch.Tensor, phase: float, call: int, channels: int) -> torch.Tensor:
        """All-gather a float64 vector from every rank: (W, len) without the header, checked."""
        dev, home = self._device(payload), payload.device
        header = self._header(phase, call, channels, dev)
        sent = torch.cat([payload.to(dev), header])
        # NaN marks what no rank wrote: a peer sending a shorter message leaves NaN headers
        received = torch.full((self.world * sent.numel(),), math.nan, dtype=torch.float64,
                              device=dev)
        try:
            _all_gather_single(received, sent, self.group)
        except RuntimeError as err:  # timeouts and dead peers (DistBackendError is one)
            raise self._failed(phase, call, err) from err
        rows = received.view(self.world, sent.numel())
        heads = rows[:, -HEADER:]
        bad = ~(heads == header).all(dim=1)
        if bad.any():
            r = int(bad.nonzero()[0])
            raise self._fail(phase, call, f"rank {r} in {_describe(heads[r])}")
        return rows[:, :-HEADER].to(home)

    def all_reduce(self, payload: torch.Tensor, phase: float, call: int,
                   channels: int) -> torch.Tensor:
        """Sum a float64 vector over ranks, checked: the header and its square both sum to W times
        this rank's, which holds only if every rank sent the same header
        (sum of (h_r - h)^2 = 0)."""
        dev, home = self._device(payload), payload.device
        header = self._header(phase, call, channels, dev)
        sent = torch.cat([payload.to(dev), header, header.square()])
        try:
            dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:
            raise self._failed(phase, call, err) from err
        got = sent[-2 * HEADER:]
        want = torch.cat([header, header.square()]) * self.world
        if not torch.equal(got, want):
            raise self._fail(phase, call, "another rank in a different call: the summed "
                             "headers differ from this rank's")
        return sent[: -2 * HEADER].to(home)


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp, group=group)
    else:  # torch < 2.10
        dist.all_gather_into_tensor(out, inp, group=group)


def _describe(head: torch.Tensor) -> str:
    key, call, phase, channels = head.tolist()
    plausible = phase in PHASES and all(
        math.isfinite(v) and v == int(v) and v >= 0 for v in (key, call, channels)) and channels > 0
    if not plausible:  # a message of another length landed here: the header is not a header
        return "a call of another size (a layer with other channels, or another collective)"
    return (f"{PHASES[phase]} call #{int(call)} of a layer with {int(channels)} channels "
            f"(layer key {int(key)})")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def layer_key(name: str) -> float:
    return float(zlib.crc32(name.encode()) % (1 << 20))  # small: exact in float64, even squared


def group_world(process_group) -> tuple[object, int]:
    """(group, world size) when a sync is possible, else (None, 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)
