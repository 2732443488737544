"""``batchnorm inspect MODEL``: the BN layer table and the findings."""

from __future__ import annotations

import argparse

from ._model import add_model_arguments, describe, example_input, load_model
from ._output import emit


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="list every BN layer and what is wrong with where it sits",
        description=describe(
            "List every BN-like layer (name, kind, channels, learnable parameters, buffers, eps, "
            "momentum, mode), the totals, and findings with a one-line fix each: order (Conv → BN"
            " → act vs Conv → act → BN, pre-activation, no conv producer), redundant biases, BN "
            "in train mode at inference, eps = 0, channel mismatches and, with --input-shape, BN "
            "that see one value per channel.",
            "batchnorm inspect model.pt",
            "batchnorm inspect model.pt --input-shape 1,3,224,224 --mode inference",
            "batchnorm inspect mypackage.models:resnet18 --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "--mode",
        choices=("auto", "inference", "training"),
        default="auto",
        help="which BN in train mode to flag: auto = those in train mode inside an eval-mode "
        "model; inference = all; training = none (default auto)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..inspection import inspect

    model = load_model(args.model)
    report = inspect(model, example_input(args), mode=args.mode)
    emit(args, {"model": args.model, **report.to_dict()}, report)
    return 0
