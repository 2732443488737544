"""``export_onnx``: fold BN, export to ONNX, and check the file with onnxruntime.

onnx and onnxruntime are an optional extra: ``pip install batchnorm[onnx]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import BatchNormError, expected
from .files import write_atomically
from .probe import as_args, max_error, tensor_leaves, training_flags_kept

__all__ = ["export_onnx", "ExportResult"]

# the oldest opset both exporters write and onnxruntime guarantees to run (it runs older files on
# legacy support, if at all, after four warnings)
MIN_OPSET = 7


@dataclass
class ExportResult:
    """Where the file went, which exporter wrote it, and the max error onnxruntime showed."""

    path: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int  # the ONNX opset of the file written
    max_error: float
    rel_error: float
    folded: int  # BN folded whole into a neighbouring layer
    frozen: int  # BN kept as a fixed per-channel affine
    partial: int = 0  # BN folded in pieces, some channels kept as a fixed affine


    def to_dict(self) -> dict:
        return dict(vars(self))

    def __str__(self) -> str:
        return (
            f"wrote {self.path} ({self.exporter} exporter, opset {self.opset}; {self.folded} BN "
            f"folded, " + (f"{self.partial} folded in part, " if self.partial else "")
            + f"{self.frozen} frozen); onnxruntime vs PyTorch max error {self.max_error:.2e} "
            f"(relative {self.rel_error:.2e})"
        )


def export_onnx(
    model: nn.Module, example_input, path, *, opset: int | None = None,
    dynamic_batch: bool = False, verbose: bool = False
) -> ExportResult:
    r"""Fold BN (:func:`batchnorm.fold`), export to ONNX, and verify with onnxruntime.

    The exported graph has no node for the BN that fold; each BN that cannot fold is one
    inference-mode ``BatchNormalization`` node on its fixed statistics (a per-channel affine).
    The file is written atomically (a temporary file in the same folder, then renamed), after
    onnxruntime ran it on ``example_input``; the largest absolute difference from the original
    model in eval mode is returned. With ``dynamic_batch`` dim 0 of every input is free in the
    file, and onnxruntime also runs it at a second batch size (checked the same way); this works
    on a ``torch.fx.GraphModule`` too.

    Uses PyTorch's ``torch.export``-based exporter, and the TorchScript-based one if that fails
    or cannot write the opset asked for. The file is written with the permissions any new file
    gets (the umask's).

    Args:
        model: the model; not changed.
        example_input: a tensor or tuple of tensors (their shapes are fixed in the file, but for
            dim 0 with ``dynamic_batch``).
        path: where to write the ``.onnx`` file.
        opset: ONNX opset version of the file; one below 7 (onnxruntime's oldest) or one
            neither exporter writes raises BatchNormError, the former before anything runs.
            Default: None (the exporter's default)
        dynamic_batch: leave the batch size (dim 0 of each input) free. Default: False
        verbose: let the exporter print its progress. Default: False

    Returns:
        :class:`ExportResult` with ``path``, ``exporter``, ``opset``, ``max_error`` and
        ``rel_error``.

    Raises:
        BatchNormError: onnx or onnxruntime missing, a bad opset, or the export fails.

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
    from .folding import TRAIN_MODE_WARNING, fold

    args = as_args(example_input)
    if args is None:
        raise expected("an example_input tensor", "None")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise expected("opset to be a positive integer or None", repr(opset))
    if opset is not None and opset < MIN_OPSET:  # before anything runs: no exporter, no warnings
        raise expected(f"an opset the ONNX exporters write and onnxruntime supports, "
                       f"{MIN_OPSET} or higher", f"opset {opset}")
    path = os.fspath(path)
    with warnings.catch_warnings():  # the file is the eval model's, as documented
        warnings.filterwarnings("ignore", message=re.escape(TRAIN_MODE_WARNING))
        folded, report = fold(model, args, report=True)
    checks = [args]
    if dynamic_batch:  # a second batch size, one that no exporter specialises on (0 or 1)
        n = args[0].shape[0] if args[0].dim() else 1
        generator = torch.Generator().manual_seed(0)
        checks.append(tuple(torch.randn((n + 2, *a.shape[1:]), generator=generator,
                                        dtype=a.dtype) for a in args))
    with torch.no_grad():
        references = [_reference_output(model, batch) for batch in checks]

    done = {}

    def export_and_check(tmp: str) -> None:
        done["exporter"], done["opset"] = _export(folded, checks[-1], tmp, opset, verbose,
                                                  dynamic_batch)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        done["got"] = []
        for batch in checks:
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), batch)}
            done["got"].append([torch.from_numpy(o) for o in session.run(None, feeds)])

    try:
        write_atomically(path, export_and_check, suffix=".onnx")
    except BatchNormError:
        raise
    except Exception as exc:
        raise BatchNormError(f"ONNX export or check failed: {type(exc).__name__}: {exc}") from exc
    exporter = done["exporter"]
    errors = [max_error(got, want) for got, want in zip(done["got"], references)]
    max_err, rel_error = max(e[0] for e in errors), max(e[1] for e in errors)
    return ExportResult(path, exporter, done["opset"], max_err, rel_error,
                        report.count("folded"), report.count("frozen"), report.count("partial"))


def _reference_output(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    """The original model's eval-mode output, with every training flag restored after."""
    with training_flags_kept(model):
        model.eval()
        return [t.detach() for t in tensor_leaves(model(*args))]


def _export(model: nn.Module, args: tuple, path: str, opset: int | None, verbose: bool,
            dynamic_batch: bool = False) -> tuple[str, int]:
    """Write ``path`` with the dynamo exporter, else the TorchScript one: ``(exporter, opset)``.

    An exporter that fails, or writes another opset than the one asked for (the dynamo exporter
    writes 18 and up whatever it is asked), hands over to the next; when none can, the error
    says what each did.
    """
    errors = []
    for dynamo in (True, False):
        name = "dynamo" if dynamo else "torchscript"
        try:
            # a fresh context each attempt: one context manager cannot be entered twice
            with (contextlib.nullcontext() if verbose else _quiet()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model if dynamo else _hide_fx_graph(model),
                    args,
                    path,
                    dynamo=dynamo,
                    opset_version=opset,
                    verbose=verbose,
                    external_data=False,
                    **_dynamic_batch_args(args, dynamic_batch),
                )
        except Exception as exc:  # try the other exporter, report both if both fail
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        written = _opset_of(path)
        if opset is None or written == opset:
            return name, written
        errors.append(f"{name}: wrote opset {written}, not {opset}")
    if opset is not None:
        raise expected(f"an opset the ONNX exporters write (--opset {opset})",
                       " | ".join(e.splitlines()[0] for e in errors))
    raise BatchNormError(
        "ONNX export failed (" + " | ".join(e.splitlines()[0] for e in errors) + ")"
    )


class _Forward(nn.Module):
    """Calls the module it wraps; the wrapper has no ``graph`` attribute."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.training = module.training

    def forward(self, *args):
        return self.module(*args)


def _hide_fx_graph(model: nn.Module) -> nn.Module:
    """``model``, or a wrapper when it is an fx GraphModule: given ``dynamic_axes``, the
    TorchScript exporter reads ``model.graph`` as a TorchScript graph (``.outputs()``), and an fx
    Graph has none."""
    return _Forward(model) if isinstance(model, fx.GraphModule) else model


def _dynamic_batch_args(args: tuple, dynamic_batch: bool) -> dict:
    """The exporters' arguments that free dim 0 of every input (both read dynamic_axes)."""
    if not dynamic_batch:
        return {}
    names = [f"input_{i}" for i in range(len(args))]
    return {"input_names": names, "dynamic_axes": {name: {0: "batch"} for name in names}}


def _opset_of(path: str) -> int:
    """The default-domain opset of an ONNX file."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet():
    """Silence the exporters: torch.onnx's logger, Python's stdout/stderr, and the file
    descriptors 1 and 2 that the TorchScript exporter's C++ side prints to."""
    import logging
    import sys

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        logger.setLevel(level)
