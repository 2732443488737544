"""``batchnorm fold MODEL -o OUT``: fold BN into the convs around it; freeze the rest."""

from __future__ import annotations

import argparse
import re
import warnings

from ._model import add_model_arguments, describe, rewrite_model


def register(sub) -> None:
    p = sub.add_parser(
        "fold",
        help="fold every BN into the conv/linear before it (inference model)",
        description=describe(
            "Write an eval-mode copy of MODEL where every BN whose input comes only from a "
            "Conv/ConvTranspose/Linear (subclasses too) is folded into its weights, a BN after "
            "a channel concatenation of such layers is split into them, a BN left over that "
            "feeds a Linear (or a conv that does not pad with zeros) folds forward into it, "
            "and every other BN is a frozen per-channel affine (a split BN's channels from "
            "anything else stay one too: the report counts it as folded in part). A model in "
            "training mode is folded as model.eval() computes. With --input-shape, the error "
            "each fold introduces is measured on a random input. The output is written "
            "atomically, never over MODEL.",
            "batchnorm fold model.pt -o model.folded.pt",
            "batchnorm fold model.pt -o model.folded.pt --input-shape 1,3,224,224 --json",
            "batchnorm fold model.pt -o model.folded.pt --no-forward",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write the folded model"
    )
    p.add_argument(
        "--no-forward", action="store_true",
        help="do not fold a BN into the layer after it (it stays a frozen affine)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..folding import TRAIN_MODE_WARNING, fold

    def transform(model, example_input, report):
        # the report prints that warning as its own line: not twice
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(TRAIN_MODE_WARNING))
            return fold(model, example_input, forward=not args.no_forward, report=report)

    return rewrite_model(args, transform)
