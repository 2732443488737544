"""How the kernels are made, cached and announced: one compiled kernel per case, each with a disk
cache of its own, and one line on stderr when a process has to compile.

A kernel factory (``reduce_ncs(act, inplace, dtype)``) returns a numba kernel with the
activation code, the mode flags and the dtype fixed: the code and flags are closure constants,
so each kernel compiles only its own case (see ``_activation.py``), and only the cases a program
uses are ever compiled. Each kernel also gets a name of its own (``reduce_ncs_1_0_float32``)
and with it a cache index file of its own, holding one entry: numba's index is read, extended and
rewritten without a lock, so two processes saving different entries of one index at the same
time (torchrun ranks or test workers compiling on a cold cache) could leave an entry pointing at
the other's code. With one entry per index the only race left is two processes saving the same
kernel, which write the same thing.
"""
from __future__ import annotations

import functools
import sys
import time

import numpy as np
from numba import njit
from numba.core import event

__all__ = ["specialised", "compiling_notice"]


def specialised(**options):
    """Decorator for a kernel factory: ``factory(*case) -> python function``; the decorated
    factory returns that function jitted with ``options`` (``cache=True``), once per case."""

    def wrap(factory):
        @functools.cache
        def make(*case):
            kernel = factory(*case)
            name = "_".join([factory.__name__, *(_token(v) for v in case)])
            kernel.__name__ = kernel.__qualname__ = name
            return njit(cache=True, **options)(kernel)

        make.__name__ = make.__qualname__ = factory.__name__
        make.__doc__ = factory.__doc__
        make.__wrapped__ = factory
        return make

    return wrap


def _token(value) -> str:
    """A case value as a file-name part: bools as 0/1, dtypes by name."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, np.dtype):
        return value.name
    return str(value)


# ---------------------------------------------------------------------------------------------
# the cold-cache notice

NOTICE = ("batchnorm: compiling CPU kernels for this case (first use with an empty cache: "
          "a few seconds each, cached on disk after that; `batchnorm warmup` compiles them "
          "ahead)")


class _Notice(event.Listener):
    """Writes NOTICE once per process when numba starts compiling one of our kernels: numba
    fires "numba:compile" only after the disk cache missed, so a warm cache prints nothing."""

    def __init__(self):
        self.printed = False
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def on_start(self, ev):
        if not _ours(ev):
            return
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1
        if not self.printed:
            self.printed = True
            print(NOTICE, file=sys.stderr, flush=True)

    def on_end(self, ev):
        if not _ours(ev):
            return
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start


def _ours(ev) -> bool:
    dispatcher = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module.startswith(__package__ + ".")


compiling_notice = _Notice()
event.register("numba:compile", compiling_notice)
