"""``batchnorm qat-convert MODEL -o OUT``: the deployed model of a saved QAT model."""

from __future__ import annotations

import argparse

from ._errors import CLIError
from ._model import (
    add_model_arguments,
    check_output,
    describe,
    example_input,
    load_model,
    require_python_module,
    save_model,
)
from ._output import emit, note


def register(sub) -> None:
    p = sub.add_parser(
        "qat-convert",
        help="write the deployed model of a quantization-aware model from batchnorm.qat_fold",
        description=describe(
            "MODEL is a model made by batchnorm.qat_fold (and trained). Write an eval-mode copy "
            "where each folded Conv/ConvTranspose/Linear + BN pair is a plain PyTorch layer "
            "holding the quantized folded weight and the folded bias, and each BN's place an "
            "Identity (or its activation): what the QAT model computes in eval, loadable "
            "without batchnorm. With --input-shape, the largest difference from the QAT model's "
            "eval output on a random input is printed. The output is written atomically, never "
            "over MODEL.",
            "batchnorm qat-convert qat.pt -o deployed.pt",
            "batchnorm qat-convert qat.pt -o deployed.pt --input-shape 1,3,32,32 --json",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write the deployed model"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..errors import BatchNormError
    from ..qat import QATConvBn, qat_convert

    target = check_output(args.output, [args.model])
    model = load_model(args.model)
    require_python_module(model, args.model)
    x = example_input(args)
    try:
        deployed = qat_convert(model)
    except BatchNormError as exc:
        raise CLIError(f"{exc} in {args.model!r}",
                       "make MODEL with batchnorm.qat_fold(model) and torch.save it") from None
    result = {"output": str(target),
              "converted": sum(isinstance(m, QATConvBn) for m in model.modules()),
              "max_error": None}
    if x is not None:
        from ..probe import failed_on

        try:
            with torch.no_grad():
                want, got = model.eval()(x), deployed(x)
        except Exception as exc:
            raise CLIError(str(failed_on((x,), exc, "--input-shape"))) from None
        result["max_error"] = float((want - got).abs().max()) if want.numel() else 0.0
    save_model(deployed, target)
    text = f"{result['converted']} conv/linear + BN pairs converted"
    if result["max_error"] is not None:
        text += f"; max difference from the QAT model in eval {result['max_error']:.2e}"
    emit(args, result, text)
    note(args, f"wrote {target}")
    return 0
