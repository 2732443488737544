"""Where the CPU kernels' outputs come from: huge pages for large ones, and a bounded cache.

Every batch-norm layer returns a fresh output, and its backward a fresh gradient
(:func:`output_like` makes both). Two policies apply, both advice only (contents, strides and
ownership are a plain tensor's):

**Huge pages.** Outputs of 32 MB or more come from a fresh mmap (glibc's largest mmap
threshold): every 4 KB page faults at its first write, and on the ResNet shapes those faults (and
the kernel zeroing each page) took as long as the kernel itself. Asking for transparent huge pages
on such an output (what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for its own allocations) makes
that 512x fewer faults: lower medians on large outputs, but a heavier tail (some huge-page
faults stall). Below 32 MB the blocks are reused heap memory that does not fault: no gain there,
only the stalls, hence the threshold.

**The output cache** (on by default). glibc hands large freed blocks back to the operating
system, so the next training step faults every page of them in again, and the kernel zeroes each
page: at batch 32 that costs about as much as the batch norm itself (for PyTorch's layers as for
ours). With the cache, the memory of an output of ours that is no longer referenced anywhere
goes back to the cache instead, and the next output of the same size reuses it. Two bounds keep
it from holding memory a process does not use:

- **idle blocks go back to the OS**: a free block not reused within ``IDLE_SECONDS`` (10 s, the
  order of jemalloc's dirty-page decay; a training step reuses its blocks within one step) is
  released, by a daemon thread that sleeps until the oldest block's time is up (it exits when
  the cache is empty);
- **a cap** on the free bytes held: ``DEFAULT_FRACTION`` (1/8) of physical memory.

``set_output_cache(0)`` or ``BATCHNORM_OUTPUT_CACHE=0`` turns it off; the variable also takes a
size (``512M``, ``2G``, bytes) for the cap. :func:`empty_output_cache` gives the free blocks back
now.

How a block comes back: the output tensor is a view of a NumPy array over the block
(``torch.from_numpy``), and a ``weakref.finalize`` on that array returns the block when the last
tensor, view or saved-for-backward reference to it dies. So a block is never handed out while
anything can still read or write it. One difference from a plain tensor: the storage of a cached
output cannot be resized (``Tensor.resize_`` to a larger size raises), as for any tensor made by
``torch.from_numpy``.
"""
from __future__ import annotations

import os
import re
import threading
import time
import weakref
from numbers import Integral, Real

import numpy as np
import torch

from ..errors import expected

__all__ = ["set_output_cache", "empty_output_cache", "output_cache_info", "output_like",
           "NUMPY_DTYPE"]

# below this, glibc serves blocks from its heap without faulting them in again
MIN_BYTES = 1 << 20
_ALIGN = 4096  # block start; also keeps 64-byte alignment for vector loads
_GRAIN = 1 << 16  # sizes are rounded up to this, so near sizes share blocks


IDLE_SECONDS = 10.0
DEFAULT_FRACTION = 1 / 8
ENV = "BATCHNORM_OUTPUT_CACHE"


class _Cache:
    def __init__(self, limit: int) -> None:
        # a finalizer may run inside take() (garbage collection): reentrant
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.limit = limit
        self.idle = IDLE_SECONDS
        self.free: dict[int, list[tuple[np.ndarray, float]]] = {}  # size -> [(block, freed at)]
        self.cached = 0
        self.hits = 0
        self.misses = 0
        self.released = 0  # blocks given back to the OS after idling
        self.reaper: threading.Thread | None = None

    def take(self, size: int) -> np.ndarray | None:
        with self.lock:
            blocks = self.free.get(size)
            if blocks:
                self.cached -= size
                self.hits += 1
                return blocks.pop()[0]  # the most recently freed: its pages are warmest
            self.misses += 1
            return None

    def give(self, block: np.ndarray) -> None:
        with self.lock:
            if self.cached + block.nbytes <= self.limit:
                self.free.setdefault(block.nbytes, []).append((block, time.monotonic()))
                self.cached += block.nbytes
                self._start_reaper()
            # else: dropped, and NumPy frees it

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.cached = 0
            self.wake.notify_all()

    def _start_reaper(self) -> None:
        if self.reaper is None:
            self.reaper = threading.Thread(target=self._reap, name="batchnorm-output-cache",
                                           daemon=True)
            self.reaper.start()

    def _reap(self) -> None:
        """Release blocks idle for ``self.idle`` seconds; sleep until the oldest one's time."""
        with self.lock:
            while True:
                oldest = min((blocks[0][1] for blocks in self.free.values() if blocks),
                             default=None)
                if oldest is None:
                    self.reaper = None
                    return
                wait = oldest + self.idle - time.monotonic()
                if wait > 0:
                    self.wake.wait(wait)
                    continue
                deadline = time.monotonic() - self.idle
                for size, blocks in list(self.free.items()):
                    kept = [(b, t) for b, t in blocks if t > deadline]
                    self.released += len(blocks) - len(kept)
                    self.cached -= size * (len(blocks) - len(kept))
                    if kept:
                        self.free[size] = kept
                    else:
                        del self.free[size]

    def after_fork(self) -> None:
        """In a forked child the reaper thread does not exist: start afresh, empty."""
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.free, self.cached, self.reaper = {}, 0, None


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _limit_from_environment() -> int:
    """The cap: BATCHNORM_OUTPUT_CACHE (0 / off, or a size) or DEFAULT_FRACTION of the RAM."""
    text = os.environ.get(ENV, "").strip()
    if text == "":
        return int(_physical_memory() * DEFAULT_FRACTION)
    if text.lower() in ("off", "no", "false"):
        return 0
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:I?B)?", text.upper())
    if match is None:
        raise expected(f"{ENV} to be 0, off, or a size such as 512M or 2G", repr(text))
    return int(match.group(1)) * _UNITS[match.group(2)]


_CACHE = _Cache(_limit_from_environment())
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_CACHE.after_fork)

NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def set_output_cache(max_bytes: int, idle_seconds: float | None = None) -> int:
    """Keep up to ``max_bytes`` of freed kernel outputs for reuse; 0 turns the cache off.

    Applies to the CPU kernels' outputs of at least 1 MiB (the forward's ``y``, the backward's
    ``dx``) of every layer in the process. On by default, capped at 1/8 of physical memory (or
    ``BATCHNORM_OUTPUT_CACHE``); a free block unused for ``idle_seconds`` (default 10) goes back
    to the operating system. Returns the previous limit.

    >>> import batchnorm
    >>> previous = batchnorm.set_output_cache(1 << 30)   # up to 1 GiB of free blocks
    >>> batchnorm.set_output_cache(previous) == 1 << 30  # back as it was
    True
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral) or max_bytes < 0:
        raise expected("max_bytes to be an integer >= 0", repr(max_bytes))
    if idle_seconds is not None and (isinstance(idle_seconds, bool)
                                     or not isinstance(idle_seconds, Real)
                                     or not idle_seconds > 0):
        raise expected("idle_seconds to be a number > 0 or None", repr(idle_seconds))
    with _CACHE.lock:
        previous, _CACHE.limit = _CACHE.limit, int(max_bytes)
        if idle_seconds is not None:
            _CACHE.idle = float(idle_seconds)
            _CACHE.wake.notify_all()  # the reaper re-reads its deadline
        if _CACHE.cached > _CACHE.limit:
            _CACHE.clear()
    return previous


def empty_output_cache() -> None:
    """Give every free cached block back (outputs still in use are not touched)."""
    _CACHE.clear()


def output_cache_info() -> dict[str, int | float]:
    """``{"limit", "cached", "hits", "misses", "released", "idle_seconds"}``: bytes allowed,
    bytes held free, reuse counts, blocks released after idling, and the idle time allowed."""
    with _CACHE.lock:
        return {"limit": _CACHE.limit, "cached": _CACHE.cached, "hits": _CACHE.hits,
                "misses": _CACHE.misses, "released": _CACHE.released,
                "idle_seconds": _CACHE.idle}


def _empty_like_cached(x: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised tensor with x's shape, strides and dtype from the cache, or None when
    the cache is off, x is small, or not float32/float64. x must be dense (contiguous or
    channels-last). Each new block gets the huge-page advice."""
    if _CACHE.limit == 0 or x.dtype not in NUMPY_DTYPE:
        return None
    nbytes = x.numel() * x.element_size()
    if nbytes < MIN_BYTES:
        return None
    size = -(-nbytes // _GRAIN) * _GRAIN
    block = _CACHE.take(size)
    if block is None:  # a new block: ``size`` bytes from an _ALIGN boundary, kept aligned
        raw = np.empty(size + _ALIGN, np.uint8)
        offset = -raw.ctypes.data % _ALIGN
        block = raw[offset:offset + size]
        _advise_huge_pages(raw.ctypes.data + offset, size)
    dtype = NUMPY_DTYPE[x.dtype]
    # x's strides on the NumPy side, so that the tensor is a base tensor, not a view: autograd
    # forbids modifying a custom Function's output in place when it is a view (nn.ReLU(inplace=
    # True) after the layer). NumPy's constructor costs a fraction of stride_tricks.as_strided;
    # its array refers to the block itself, and the tensor keeps this array alive: the block
    # goes back to the cache when the array dies, never before.
    itemsize = x.element_size()
    shaped = np.ndarray(x.shape, dtype, block, 0, [st * itemsize for st in x.stride()])
    weakref.finalize(shaped, _CACHE.give, block)
    return torch.from_numpy(shaped)


# ---------------------------------------------------------------------------------------------
# huge pages (see the module docstring)

_HUGE_PAGES_FROM = 32 << 20
_PAGE_2M = 1 << 21
_MADV_HUGEPAGE = 14  # Linux


def _libc_madvise():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask for transparent huge pages on the whole 2 MB pages of a block of 32 MB or more."""
    if _madvise is not None and nbytes >= _HUGE_PAGES_FROM:
        start = -(-address // _PAGE_2M) * _PAGE_2M  # whole 2 MB pages inside it
        end = (address + nbytes) // _PAGE_2M * _PAGE_2M
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a failure only loses the speed-up


def output_like(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(x) (x dense), from the output cache when it is on, else with huge pages
    asked for when it is large."""
    if x.numel() * x.element_size() < MIN_BYTES:  # small: neither cached nor huge pages
        return torch.empty_like(x)
    cached = _empty_like_cached(x)
    if cached is not None:
        return cached
    out = torch.empty_like(x)
    _advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out
