"""Run a function on W spawned processes joined in a gloo group on 127.0.0.1, with a deadline.

``run_ranks(fn, world, *args, pg_timeout=..., deadline=...)`` starts W processes (spawn), each
initialises ``torch.distributed`` with gloo over a file store in a fresh temporary directory
(no fixed port) and a short collective timeout, calls ``fn(rank, world, *args)`` and sends back
its return value (tensors travel as NumPy arrays and come back as tensors), or the exception it
raised as :class:`RankError`. The parent returns the list of results by rank. Children always end:
each exits with ``os._exit`` after reporting, and any still alive at the deadline is killed (the
test then fails).
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch.multiprocessing as mp


@dataclass
class RankError:
    """What a rank raised: the exception's type name, message and traceback text."""

    type: str
    message: str
    traceback: str


def _child(fn, rank, world, init_file, pg_timeout, results, args):
    result = None
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world, *args)
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        result = RankError(type(err).__name__, str(err), traceback.format_exc())
    try:
        results.put((rank, _to_numpy(result)))
        results.close()
        results.join_thread()
    finally:
        os._exit(0)  # no destroy_process_group: a peer may be stuck, and exit must not wait


def _convert(obj, leaf):
    if isinstance(obj, dict):
        return {k: _convert(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, leaf) for v in obj)
    return leaf(obj)


def _to_numpy(obj):
    # tensors would travel as shared-memory handles, which die with the exiting child
    import torch

    return _convert(obj, lambda v: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else v)


def _to_torch(obj):
    import numpy as np
    import torch

    return _convert(obj, lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v)


def run_ranks(fn, world: int, *args, pg_timeout: float = 10.0, deadline: float = 50.0,
              may_die: tuple[int, ...] = ()) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]`` computed on W gloo ranks.

    Ranks in ``may_die`` may exit without a result (their entry is then None).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child,
                             args=(fn, r, world, init_file, pg_timeout, results, args),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        end = time.monotonic() + deadline

        def done() -> bool:
            left = set(range(world)) - set(got)
            return left <= set(may_die) and not any(procs[r].is_alive() for r in left)

        try:
            while not done():
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"ranks {sorted(set(range(world)) - set(got))} gave no "
                                       f"result within {deadline} s")
                try:
                    rank, value = results.get(timeout=min(left, 0.5))
                    got[rank] = value
                except queue.Empty:
                    dead = [r for r in range(world) if r not in got and r not in may_die
                            and not procs[r].is_alive()]
                    if dead and results.empty():
                        raise RuntimeError(f"ranks {dead} exited without a result") from None
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(5.0, end - time.monotonic())))
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [_to_torch(got.get(r)) for r in range(world)]


def unwrap(results: list) -> list:
    """The results, raising AssertionError with the rank's traceback if any rank failed."""
    for rank, value in enumerate(results):
        if isinstance(value, RankError):
            raise AssertionError(f"rank {rank} raised {value.type}: {value.message}\n"
                                 f"{value.traceback}")
    return results
