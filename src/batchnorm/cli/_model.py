"""Load MODEL for a command, parse --input-shape, and write outputs atomically.

MODEL is a file saved with ``torch.save(model)`` (a whole module: unpickling runs code, so
load only files you trust), a TorchScript file (``torch.jit.save``), or ``module:function``
naming a function that builds the model (``module`` is imported from the current folder or
``sys.path``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

from ._errors import CLIError

TRUST_NOTE = (
    "MODEL is a torch.save'd module file (loaded with weights_only=False: unpickling "
    "runs code, so only load files you trust), a TorchScript file, or module:function."
)


def describe(summary: str, *examples: str, loads_model: bool = True) -> str:
    """A command's help text: the summary and (for a command that takes MODEL) the trust note
    wrapped, then the examples."""
    wrap = lambda text: textwrap.fill(text, width=88)  # noqa: E731
    lines = "\n".join(f"  {e}" for e in examples)
    parts = [wrap(summary)] + ([wrap(TRUST_NOTE)] if loads_model else [])
    return "\n\n".join(parts + ["Examples:\n" + lines])


def add_model_arguments(parser, *, input_shape_required: bool = False) -> None:
    parser.add_argument("model", metavar="MODEL", help=TRUST_NOTE)
    parser.add_argument(
        "--input-shape",
        metavar="N,C,...",
        type=str,
        required=input_shape_required,
        help="shape of a random example input, e.g. 1,3,32,32"
        + ("" if input_shape_required else " (optional)"),
    )
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of tables"
    )


def load_model(spec: str):
    """The nn.Module that ``spec`` names; CLIError with one clear line otherwise."""
    import torch
    from torch import nn

    path = Path(spec)
    if not path.exists() and _looks_like_function(spec):
        return _call_builder(spec)
    if not path.exists():
        raise CLIError(
            f"expected an existing model file (got {spec!r}: no such file)",
            "check the path, or give module:function",
        )
    if path.is_dir():
        raise CLIError(f"expected a model file (got {spec!r}: a directory)")
    if os.getcwd() not in sys.path:  # classes of a pickled model often live next to it
        sys.path.insert(0, os.getcwd())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _is_torchscript(path):
                model = torch.jit.load(str(path), map_location="cpu")
            else:
                model = torch.load(str(path), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CLIError(
            f"expected the classes of the model in {spec!r} to be importable (got "
            f"{type(exc).__name__}: {exc})",
            "run from the folder of the code that defined the model, or set PYTHONPATH",
        ) from None
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CLIError(
            f"expected a model saved with torch.save(model) or TorchScript "
            f"(got {spec!r}: unreadable: {reason})"
        ) from None
    if isinstance(model, dict):
        raise CLIError(
            f"expected a whole model (got {spec!r}: a dict, e.g. a state_dict)",
            "save with torch.save(model), or give module:function that builds the model "
            "and loads the state_dict",
        )
    if not isinstance(model, nn.Module):
        raise CLIError(f"expected a model (nn.Module) in {spec!r} (got {type(model).__name__})")
    return model


def require_python_module(model, spec: str) -> None:
    """Rewriting commands need a Python module, not TorchScript."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise CLIError(
            f"expected a Python model to rewrite (got {spec!r}: TorchScript, which "
            "cannot be rewritten)",
            "save the model with torch.save(model), or give module:function",
        )


def _looks_like_function(spec: str) -> bool:
    module, sep, func = spec.rpartition(":")
    return bool(
        sep
        and module
        and func.isidentifier()
        and all(part.isidentifier() for part in module.split("."))
    )


def _call_builder(spec: str):
    from torch import nn

    module_name, _, func_name = spec.rpartition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CLIError(
            f"expected an importable module {module_name!r} (got {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CLIError(
            f"expected a function {func_name!r} in {module_name!r} (got "
            f"{'nothing' if func is None else type(func).__name__})"
        )
    try:
        model = func()
    except Exception as exc:
        raise CLIError(
            f"expected {spec} to build a model (got {type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"expected {spec} to return an nn.Module (got {type(model).__name__})")
    return model


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a code/ folder (and constants.pkl); torch.save files do not."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in re.split(r"[,x]", text.strip()))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise CLIError(f"expected --input-shape as positive integers like 1,3,32,32 (got {text!r})")
    return shape


def example_input(args):
    """A seeded random float32 tensor of --input-shape, or None; refused when it would not fit
    in half of this machine's memory (or its allocation fails)."""
    import math

    import torch

    shape = parse_shape(getattr(args, "input_shape", None))
    if shape is None:
        return None
    nbytes = 4 * math.prod(shape)
    limit = _memory_bytes() // 2
    too_big = CLIError(
        f"expected an --input-shape that fits in memory (got {args.input_shape}: "
        f"{_size(nbytes)} of float32, this machine has {_size(2 * limit)})",
        "give a smaller batch or spatial size",
    )
    if nbytes > limit:
        raise too_big
    try:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    except (RuntimeError, MemoryError):
        raise too_big from None


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: let the allocation decide


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def check_output(out: str, inputs: list[str], option: str = "-o") -> Path:
    """The output path given to ``option``; refuses to write over an input, onto a folder or
    into a missing folder, naming the option in the message."""
    target = Path(out)
    for spec in inputs:
        source = Path(spec)
        if source.exists() and (
            target.resolve() == source.resolve()
            or (target.exists() and os.path.samefile(target, source))
        ):
            raise CLIError(
                f"expected an output path different from the input (got {option} {out!r}, "
                "the input file)",
                "write to a new file",
            )
    if target.exists() and target.is_dir():
        raise CLIError(f"expected an output file (got {option} {out!r}: a directory)")
    if not target.resolve().parent.is_dir():
        raise CLIError(
            f"expected an existing folder for {option} (got {str(target.parent)!r}: no such "
            "folder)",
            f"create the folder first, or give {option} a path in an existing one",
        )
    return target


def save_model(model, target: Path) -> None:
    import torch

    from ..files import write_atomically

    write_atomically(target, lambda tmp: torch.save(model, tmp))


def rewrite_model(args, transform) -> int:
    """The body of the commands that write a rewritten copy of MODEL (fold, strip-bias):
    load, ``transform(model, example_input, report=True)``, save the model atomically, then
    print the report (or its JSON)."""
    from ._output import emit, note

    target = check_output(args.output, [args.model])
    model = load_model(args.model)
    require_python_module(model, args.model)
    new, report = transform(model, example_input(args), report=True)
    save_model(new, target)
    emit(args, {"output": str(target), **report.to_dict()}, report)
    note(args, f"wrote {target}")
    return 0
