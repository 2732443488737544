"""``batchnorm experiment``: reruns of published BN experiments (the paper's Figure 1) and the
data-shift experiment (diagnose, AdaBN, TENT)."""
from __future__ import annotations

import argparse
import textwrap

from ._errors import CLIError, require_tour_extra

EXPERIMENTS = ("figure1", "shift", "qat")


def register(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="rerun a published BN experiment and write a report",
        description=textwrap.fill(
            "Rerun a published Batch Normalization experiment, print whether this run shows the "
            "paper's claims, and write DIR/index.html, PNG plots and DIR/results.json.", 79)
        + "\n\n" + textwrap.fill(
            "figure1: Ioffe & Szegedy 2015, Figure 1 (a)-(c): 3 fully-connected hidden layers of "
            "100 sigmoid units with and without BN; test accuracy against steps, and one sigmoid "
            "input's 15/50/85th percentiles over training.", 79)
        + "\n\n" + textwrap.fill(
            "shift: the tour's digits CNN tested on shifted digits (contrast, brightness, "
            "inversion): accuracy as is, what `batchnorm diagnose` reports, and accuracy after "
            "AdaBN and after TENT.", 79)
        + "\n\n" + textwrap.fill(
            "qat: the digits CNN with 8- and 4-bit conv weights: float, post-training fold + "
            "quantize, QAT with BN separate (folded afterwards), QAT with simulated BN folding "
            "(batchnorm.qat_fold); deployed accuracy of each.", 79)
        + "\n\nExamples:\n  batchnorm experiment figure1\n  batchnorm experiment shift\n"
        "  batchnorm experiment qat\n"
        "  batchnorm experiment figure1 --steps 20000 --data ~/mnist/ --out reports/fig1-mnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of each network (figure1: default 5000, the paper ran "
                        "50000; shift and qat: default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="MNIST IDX files (a folder or the images file, .gz or not) or an .npz "
                   "with x and y (default: scikit-learn's bundled digits)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default reports/NAME)")
    p.set_defaults(run=run)


def run(args) -> int:
    require_tour_extra()
    from pathlib import Path

    from ..tour.figure1 import run_figure1
    from ..tour.qat import run_qat
    from ..tour.shift import run_shift

    if args.steps is not None and args.steps < 10:
        raise CLIError(f"expected --steps >= 10 (got {args.steps})", "try --steps 5000")
    out = Path(args.out or f"reports/{args.name}")
    if out.exists() and not out.is_dir():
        raise CLIError(f"expected --out to be a folder (got the file {out})", "pick another --out")
    runner = {"figure1": run_figure1, "shift": run_shift, "qat": run_qat}[args.name]
    runner(out, steps=args.steps, seed=args.seed, data=args.data)
    return 0
