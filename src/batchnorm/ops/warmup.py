"""Compile the CPU kernels ahead of use (``batchnorm warmup``), so no training step waits for them.

A case is one (dtype, layout, activation): :meth:`Case.run` calls the ops a layer calls (training
forward and backward, eval forward and backward, the inplace mode for the invertible
activations, and masked BN's statistics and backward) on tiny tensors, with short and long
planes (the float32 kernels sum long planes in blocks) and once with a NaN (the float64
statistics such a batch takes), which compiles and caches on disk exactly the kernels a real
step of that case uses.
Kernels are cached one per file (:mod:`batchnorm.kernels._compile`), so ``jobs`` processes can
compile different cases side by side.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from ..activations import FUSED, INVERTIBLE
from ..errors import expected
from ..kernels import cache_directory, compiling_notice
from ..progress import progress_bar
from . import numba_cpu

__all__ = ["DTYPES", "LAYOUTS", "Case", "WarmupReport", "cases", "warmup"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (N, C, H, W): short planes with many channels (a task per channel), 256-value planes (plane
# partials in float64), 4096-value ones (at least kernels.BLOCKED_PLANE_FROM)
_SHAPES = ((2, 16, 2, 2), (1, 3, 16, 16), (1, 3, 64, 64))


@dataclass(frozen=True)
class Case:
    dtype: str
    layout: str
    act: str

    def run(self) -> float:
        """Run this case's ops once; return the seconds numba spent compiling for it."""
        from . import bn_act_eval, bn_act_stats, bn_act_train, moments

        before = compiling_notice.seconds
        dtype, memory_format = DTYPES[self.dtype], LAYOUTS[self.layout]
        modes = (False, True) if self.act in INVERTIBLE else (False,)
        for shape in _SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g, dtype=dtype).contiguous(
                memory_format=memory_format)
            w = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
            b = torch.randn(shape[1], generator=g, dtype=dtype)
            dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(
                memory_format=memory_format)
            leaves = [t.requires_grad_() for t in (x.clone(), w.clone(), b.clone())]
            for inplace in modes:
                y, mean, var = bn_act_train(*leaves, 1e-5, self.act, inplace=inplace)
                torch.autograd.grad(y, leaves, dy)
            y = bn_act_eval(*leaves, mean, var, 1e-5, self.act)
            torch.autograd.grad(y, leaves, dy)
            mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.7
            mask.view(-1)[:2] = True  # masked BN: its statistics and dx kernels
            count, mean, m2 = moments(x, mask)
            y = bn_act_stats(*leaves, mean, m2 / count, count, 1e-5, self.act, mask=mask)
            torch.autograd.grad(y, leaves, dy)
            bad = x.clone()
            bad[0, 0, 0, 0] = float("nan")  # the float64 statistics a non-finite batch takes
            with torch.no_grad():
                bn_act_train(bad, w, b, 1e-5, self.act)
                # a layer's training step: the same kernels, and the running update's
                rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
                for data in (x, bad):  # (its kernels take the tensors by address)
                    numba_cpu.train_step(data, w, b, rm, rv, 1e-5, 0.1, True, self.act, 0.01,
                                         1.0, False)
                # a layer's eval forward: its kernel taking the tensors by address
                numba_cpu.eval_impl(x, w, b, rm, rv, 1e-5, self.act, 0.01, 1.0)
        return compiling_notice.seconds - before


def cases(dtypes=("float32",), layouts=tuple(LAYOUTS), acts=FUSED) -> list[Case]:
    """Every (dtype, layout, act) case of the arguments, checked."""
    for name, given, known in (("dtype", dtypes, DTYPES), ("layout", layouts, LAYOUTS),
                               ("act", acts, FUSED)):
        for value in given:
            if value not in known:
                raise expected(f"{name} one of {', '.join(known)}", repr(value))
    return [Case(d, lay, a) for d in dtypes for lay in layouts for a in acts]


@dataclass(frozen=True)
class WarmupReport:
    cases: int
    compile_seconds: float  # summed over the processes
    seconds: float  # wall clock
    cache: str  # where numba keeps the kernels

    def as_dict(self) -> dict:
        return {"cases": self.cases, "compile_seconds": round(self.compile_seconds, 2),
                "seconds": round(self.seconds, 2), "cache": self.cache}


def _run_case(case: Case) -> float:
    compiling_notice.printed = True  # a warmup says what it does; no cold-cache notice
    return case.run()


def warmup(dtypes=("float32",), layouts=tuple(LAYOUTS), acts=FUSED, jobs: int = 1,
           progress: bool = True) -> WarmupReport:
    """Compile (or load from the disk cache) the kernels of every case; see the module docstring.

    Args:
        dtypes: among "float32", "float64". Default: ("float32",)
        layouts: among "nchw" (contiguous, any rank) and "nhwc" (channels-last). Default: both
        acts: activations of :data:`batchnorm.activations.FUSED`. Default: all
        jobs: processes compiling side by side (1: this process). Default: 1
        progress: a progress bar on stderr (when it is a terminal). Default: True
    """
    todo = cases(dtypes, layouts, acts)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise expected("jobs to be an int >= 1", repr(jobs))
    start = time.perf_counter()
    compiled = 0.0
    with progress_bar(progress, len(todo), "compiling BN kernels") as advance:
        if jobs == 1:
            for case in todo:
                compiled += _run_case(case)
                advance()
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                for done in as_completed([pool.submit(_run_case, case) for case in todo]):
                    compiled += done.result()
                    advance()
    return WarmupReport(len(todo), compiled, time.perf_counter() - start, cache_directory())
