"""Where the CPU kernels' outputs come from: huge pages for large ones, and an opt-in cache.

Every batch-norm layer returns a fresh output, and its backward a fresh gradient
(:func:`output_like` makes both). Two policies apply, both advice only (contents, strides and
ownership are a plain tensor's):

**Huge pages.** Outputs of 32 MB or more come from a fresh mmap (glibc's largest mmap
threshold): every 4 KB page faults at its first write, and on the ResNet shapes those faults (and
the kernel zeroing each page) took as long as the kernel itself. Asking for transparent huge pages
on such an output (what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for its own allocations) makes
that 512x fewer faults. Measured here (2 threads, fwd+bwd, 30 calls each): medians 30% lower at
51-103 MB, means lower in 5 of 6 cases, but a heavier tail (p90 up to 2x the plain one: some
huge-page faults stall). Below 32 MB the blocks are reused heap memory that does not fault: no
gain there, only the stalls, hence the threshold.

**The output cache** (off by default). glibc hands large freed blocks back to the operating
system, so the next training step faults every page of them in again, and the kernel zeroes each
page: at batch 32 that costs about as much as the batch norm itself (for PyTorch's layers as for
ours). With the cache on, the memory of an output of ours that is no longer referenced anywhere
goes back to the cache instead, and the next output of the same size reuses it. It keeps memory
resident after the tensors that used it are gone (at most ``max_bytes`` of free blocks), which a
process that watches its RSS would not expect. Turn it on with :func:`set_output_cache`;
:func:`empty_output_cache` gives the free blocks back.

How a block comes back: the output tensor is a view of a NumPy array over the block
(``torch.from_numpy``), and a ``weakref.finalize`` on that array returns the block when the last
tensor, view or saved-for-backward reference to it dies. So a block is never handed out while
anything can still read or write it. One difference from a plain tensor: the storage of a cached
output cannot be resized (``Tensor.resize_`` to a larger size raises), as for any tensor made by
``torch.from_numpy``.
"""
from __future__ import annotations

import threading
import weakref
from numbers import Integral

import numpy as np
import torch

from ..errors import expected

__all__ = ["set_output_cache", "empty_output_cache", "output_cache_info", "output_like"]

# below this, glibc serves blocks from its heap without faulting them in again
MIN_BYTES = 1 << 20
_ALIGN = 4096  # block start; also keeps 64-byte alignment for vector loads
_GRAIN = 1 << 16  # sizes are rounded up to this, so near sizes share blocks


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # a finalizer may run inside take() (garbage collection)
        self.limit = 0
        self.free: dict[int, list[np.ndarray]] = {}
        self.cached = 0
        self.hits = 0
        self.misses = 0

    def take(self, size: int) -> np.ndarray | None:
        with self.lock:
            blocks = self.free.get(size)
            if blocks:
                self.cached -= size
                self.hits += 1
                return blocks.pop()
            self.misses += 1
            return None

    def give(self, block: np.ndarray) -> None:
        with self.lock:
            if self.cached + block.nbytes <= self.limit:
                self.free.setdefault(block.nbytes, []).append(block)
                self.cached += block.nbytes
            # else: dropped, and NumPy frees it

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.cached = 0


_CACHE = _Cache()

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def set_output_cache(max_bytes: int) -> int:
    """Keep up to ``max_bytes`` of freed kernel outputs for reuse; 0 turns the cache off.

    Applies to the CPU kernels' outputs of at least 1 MiB (the forward's ``y``, the backward's
    ``dx``) of every layer in the process. Returns the previous limit.

    >>> import batchnorm
    >>> previous = batchnorm.set_output_cache(1 << 30)   # up to 1 GiB of free blocks
    >>> batchnorm.set_output_cache(previous)             # back as it was
    1073741824
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral) or max_bytes < 0:
        raise expected("max_bytes to be an integer >= 0", repr(max_bytes))
    with _CACHE.lock:
        previous, _CACHE.limit = _CACHE.limit, int(max_bytes)
        if _CACHE.cached > _CACHE.limit:
            _CACHE.clear()
    return previous


def empty_output_cache() -> None:
    """Give every free cached block back (outputs still in use are not touched)."""
    _CACHE.clear()


def output_cache_info() -> dict[str, int]:
    """``{"limit", "cached", "hits", "misses"}``: bytes allowed, bytes held free, reuse counts."""
    with _CACHE.lock:
        return {"limit": _CACHE.limit, "cached": _CACHE.cached, "hits": _CACHE.hits,
                "misses": _CACHE.misses}


def _empty_like_cached(x: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised tensor with x's shape, strides and dtype from the cache, or None when
    the cache is off, x is small, or not float32/float64. x must be dense (contiguous or
    channels-last). Each new block gets the huge-page advice."""
    if _CACHE.limit == 0 or x.dtype not in _NUMPY_DTYPE:
        return None
    nbytes = x.numel() * x.element_size()
    if nbytes < MIN_BYTES:
        return None
    size = -(-nbytes // _GRAIN) * _GRAIN + _ALIGN
    block = _CACHE.take(size)
    if block is None:
        block = np.empty(size, np.uint8)
        _advise_huge_pages(block.ctypes.data, block.nbytes)
    offset = -block.ctypes.data % _ALIGN
    flat = block[offset:offset + nbytes].view(_NUMPY_DTYPE[x.dtype])
    weakref.finalize(flat, _CACHE.give, block)
    return torch.from_numpy(flat).as_strided(x.shape, x.stride())


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
    cached = _empty_like_cached(x)
    if cached is not None:
        return cached
    out = torch.empty_like(x)
    _advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out
