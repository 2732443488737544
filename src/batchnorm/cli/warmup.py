"""``batchnorm warmup``: compile the CPU kernels ahead, so no training step waits for numba."""

from __future__ import annotations

import argparse
import os

from ._errors import CLIError
from ._model import describe
from ._output import emit, note


def register(sub) -> None:
    # plain strings: building the parser must not import torch (the values are checked in run)
    p = sub.add_parser(
        "warmup",
        help="compile the CPU kernels ahead (for Docker images and CI; cached on disk)",
        description=describe(
            "Compile the fused CPU kernels for every dtype x layout x activation asked for, and "
            "cache them on disk, so that no training step stalls while numba compiles (without "
            "this, a first step compiles what it uses: 10-20 s). Cases already cached load in "
            "well under a second each. Kernels are compiled for this machine's CPU: an image "
            "warmed on one CPU model compiles again on another.",
            "batchnorm warmup",
            "batchnorm warmup --dtype all --jobs 2",
            "batchnorm warmup --dtype float32 --layout nchw --act relu identity",
            loads_model=False,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dtype", nargs="+", default=["float32"], metavar="DTYPE",
                   help="float32, float64 or all (default: float32)")
    p.add_argument("--layout", nargs="+", default=["all"], metavar="LAYOUT",
                   help="nchw (contiguous, any rank), nhwc (channels-last) or all (default: all)")
    p.add_argument("--act", nargs="+", default=["all"], metavar="ACT",
                   help="activations of BatchNormAct (identity relu leaky_relu elu silu relu6 "
                        "hardswish) or all (default: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help=f"processes compiling side by side (default 1; this machine has "
                        f"{os.cpu_count()} CPUs)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..activations import FUSED
    from ..ops.warmup import DTYPES, LAYOUTS, warmup

    if args.jobs < 1:
        raise CLIError(f"expected --jobs >= 1 (got {args.jobs})")
    picked = {name: list(known) if "all" in values else values
              for name, values, known in (("dtype", args.dtype, DTYPES),
                                          ("layout", args.layout, LAYOUTS),
                                          ("act", args.act, FUSED))}
    report = warmup(picked["dtype"], picked["layout"], picked["act"], jobs=args.jobs,
                    progress=not args.json)
    if args.json:
        emit(args, report.as_dict())
    else:
        note(args, f"{report.cases} cases ready in {report.seconds:.1f} s "
                   f"({report.compile_seconds:.1f} s compiling); kernels cached in "
                   f"{report.cache}")
    return 0
