"""``batchnorm demo``: run the whole lesson on real data, print a summary, write a report."""
from __future__ import annotations

import argparse
import textwrap

from ._errors import CLIError, require_tour_extra


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a guided tour of batch normalization on real data, with a report",
        description=textwrap.fill(
            "A guided tour of Batch Normalization, every step run for real: train a small CNN "
            "with and without BN on scikit-learn's digits, work one channel through the "
            "formulas, count parameters, prove train/eval behaviour against "
            "torch.nn.BatchNorm2d, compare BN placements, strip the conv bias and fold BN. "
            "Prints a summary and writes DIR/index.html, PNG plots and DIR/results.json.", 79)
        + "\n\nExamples:\n  batchnorm demo\n  batchnorm demo --quick --out /tmp/tour --seed 3\n"
        "  batchnorm demo --data ~/mnist/   (a folder of MNIST IDX files, or an .npz with x, y)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="reports/demo", metavar="DIR",
                   help="report folder (default reports/demo)")
    p.add_argument("--quick", action="store_true",
                   help="short training runs (under 30 s; for tests and a first look)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="MNIST IDX files (a folder or the images file, .gz or not) or an .npz "
                   "with x and y (default: scikit-learn's bundled digits)")
    p.set_defaults(run=run)


def run(args) -> int:
    require_tour_extra()
    from pathlib import Path

    from ..tour.demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"expected --out to be a folder (got the file {out})", "pick another --out")
    results = run_demo(out, quick=args.quick, seed=args.seed, data=args.data)
    return 0 if results["s4_modes"]["proof"]["max_diff"] < 1e-5 else 1
