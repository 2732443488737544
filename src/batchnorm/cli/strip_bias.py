"""``batchnorm strip-bias MODEL -o OUT``: drop the conv/linear biases that BN cancels."""

from __future__ import annotations

import argparse

from ._model import add_model_arguments, describe, rewrite_model


def register(sub) -> None:
    p = sub.add_parser(
        "strip-bias",
        help="remove conv/linear biases that feed BN (outputs unchanged)",
        description=describe(
            "Write a copy of MODEL without the conv/linear biases whose output goes only to a BN"
            " (directly, or as a piece of a channel concatenation): BN subtracts the mean, so"
            " the bias does nothing in training, and in eval its effect moves into the BN's"
            " running_mean. Outputs stay the same in train and eval mode.",
            "batchnorm strip-bias model.pt -o model.lean.pt",
            "batchnorm strip-bias mymodels:build -o lean.pt --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write the new model"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..folding import strip_bias

    return rewrite_model(args, strip_bias)
