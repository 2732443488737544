"""``batchnorm fold MODEL -o OUT``: fold BN into the convs before it; freeze the rest."""

from __future__ import annotations

import argparse

from ._model import add_model_arguments, describe, rewrite_model


def register(sub) -> None:
    p = sub.add_parser(
        "fold",
        help="fold every BN into the conv/linear before it (inference model)",
        description=describe(
            "Write an eval-mode copy of MODEL where every BN whose input comes only from a "
            "Conv/ConvTranspose/Linear (subclasses too) is folded into its weights, and every "
            "other BN is a frozen per-channel affine. With --input-shape, the error each fold "
            "introduces is measured on a random input. The output is written atomically, never "
            "over MODEL.",
            "batchnorm fold model.pt -o model.folded.pt",
            "batchnorm fold model.pt -o model.folded.pt --input-shape 1,3,224,224 --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write the folded model"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..folding import fold

    return rewrite_model(args, fold)
