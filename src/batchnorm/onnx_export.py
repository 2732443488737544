"""``export_onnx``: fold BN, export to ONNX, and check the file with onnxruntime.

onnx and onnxruntime are an optional extra: ``pip install batchnorm[onnx]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BatchNormError, expected
from .probe import as_args, max_error, tensor_leaves, training_flags_kept

__all__ = ["export_onnx", "ExportResult"]


@dataclass
class ExportResult:
    """Where the file went, which exporter wrote it, and the max error onnxruntime showed."""

    path: str
    exporter: str  # "dynamo" or "torchscript"
    max_error: float
    rel_error: float
    folded: int
    frozen: int

    def to_dict(self) -> dict:
        return dict(vars(self))

    def __str__(self) -> str:
        return (
            f"wrote {self.path} ({self.exporter} exporter; {self.folded} BN folded, {self.frozen} "
            f"frozen); onnxruntime vs PyTorch max error {self.max_error:.2e} "
            f"(relative {self.rel_error:.2e})"
        )


def export_onnx(
    model: nn.Module, example_input, path, *, opset: int | None = None, verbose: bool = False
) -> ExportResult:
    r"""Fold BN (:func:`batchnorm.fold`), export to ONNX, and verify with onnxruntime.

    The exported graph has no node for the BN that fold; each BN that cannot fold is one
    inference-mode ``BatchNormalization`` node on its fixed statistics (a per-channel affine). The file is written atomically (a temporary file in the
    same folder, then renamed), and then run with onnxruntime on ``example_input``; the largest
    absolute difference from the original model in eval mode is returned.

    Uses PyTorch's ``torch.export``-based exporter, and the TorchScript-based one if that fails.

    Args:
        model: the model; not changed.
        example_input: a tensor or tuple of tensors (fixed shapes in the file).
        path: where to write the ``.onnx`` file.
        opset: ONNX opset version. Default: None (the exporter's default)
        verbose: let the exporter print its progress. Default: False

    Returns:
        :class:`ExportResult` with ``path``, ``max_error`` and ``rel_error``.

    Raises:
        BatchNormError: onnx or onnxruntime missing, or the export fails.

    >>> result = batchnorm.export_onnx(model, torch.randn(1, 3, 224, 224), "model.onnx")
    >>> print(result)
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as exc:
        raise BatchNormError(
            f"expected the onnx extra to be installed (got ImportError: {exc}); "
            "run: pip install 'batchnorm[onnx]'"
        ) from None
    from .folding import fold

    args = as_args(example_input)
    if args is None:
        raise expected("an example_input tensor", "None")
    path = os.fspath(path)
    folded, report = fold(model, args, report=True)
    with torch.no_grad():
        reference = _reference_output(model, args)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        exporter = _export(folded, args, tmp, opset, verbose)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        got = [torch.from_numpy(o) for o in session.run(None, feeds)]
        os.replace(tmp, path)
    except BatchNormError:
        raise
    except Exception as exc:
        raise BatchNormError(f"ONNX export or check failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    max_err, rel_error = max_error(got, reference)
    return ExportResult(
        path, exporter, max_err, rel_error, report.count("folded"), report.count("frozen")
    )


def _reference_output(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    """The original model's eval-mode output, with every training flag restored after."""
    with training_flags_kept(model):
        model.eval()
        return [t.detach() for t in tensor_leaves(model(*args))]


def _export(model: nn.Module, args: tuple, path: str, opset: int | None, verbose: bool) -> str:
    quiet = contextlib.nullcontext() if verbose else _quiet()
    errors = []
    for dynamo in (True, False):
        try:
            with quiet, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    args,
                    path,
                    dynamo=dynamo,
                    opset_version=opset,
                    verbose=verbose,
                    external_data=False,
                )
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # try the other exporter, report both if both fail
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {exc}")
    raise BatchNormError(
        "ONNX export failed (" + " | ".join(e.splitlines()[0] for e in errors) + ")"
    )


@contextlib.contextmanager
def _quiet():
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
