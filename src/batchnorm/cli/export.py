"""``batchnorm export MODEL -o OUT.onnx``: fold BN, export ONNX, verify with onnxruntime."""

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
)
from ._output import emit


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="fold BN and export to ONNX, checked with onnxruntime",
        description=describe(
            "Fold BN (as `batchnorm fold`), export the model to ONNX for the shape given by "
            "--input-shape, run the file with onnxruntime on a random input and print the largest"
            " difference from PyTorch. Needs the onnx extra: pip install 'batchnorm[onnx]'.",
            "batchnorm export model.pt -o model.onnx --input-shape 1,3,224,224",
            "batchnorm export mymodels:build -o m.onnx --input-shape 8,3,32,32 --opset 18 --json",
            "batchnorm export model.pt -o model.onnx --input-shape 1,3,224,224 --dynamic-batch",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p, input_shape_required=True)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT.onnx", help="where to write the .onnx file"
    )
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)"
    )
    p.add_argument(
        "--dynamic-batch", action="store_true",
        help="leave the batch size free in the file (checked at two batch sizes)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..onnx_export import MIN_OPSET, export_onnx

    if args.opset is not None and args.opset < MIN_OPSET:  # before the model loads or runs
        raise CLIError(f"expected --opset {MIN_OPSET} or higher, the oldest onnxruntime supports "
                       f"(got --opset {args.opset})", "drop --opset for the exporter's default")
    target = check_output(args.output, [args.model])
    if target.suffix.lower() != ".onnx":
        raise CLIError(f"expected an output file ending in .onnx (got {args.output!r})")
    model = load_model(args.model)
    require_python_module(model, args.model)
    result = export_onnx(model, example_input(args), target, opset=args.opset,
                         dynamic_batch=args.dynamic_batch)
    emit(args, result.to_dict(), str(result))
    return 0
