"""The ``batchnorm`` command: one module per subcommand, each with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

from ._errors import run_guarded

# Each module defines register(subparsers) -> None, adding its parser with set_defaults(run=...).
COMMANDS = ["demo", "experiment", "inspect", "fold", "strip_bias", "recalibrate", "diagnose",
            "export", "warmup", "qat_convert"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description=(
            "Batch normalization, exactly and fast. Model tools (inspect, fold, strip-bias, "
            "recalibrate, diagnose, export), a kernel warm-up, and a guided demo of what BN "
            "does, with experiments, on real data."
        ),
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_values_that_look_like_options(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return run_guarded(args.run, args)


# options whose value may start with "-" (argparse would take "--input-shape -1,3,8,8" as two
# options and say "expected one argument"); the value is then checked like any other
_TAKE_ANY_VALUE = ("--input-shape",)


def _values_that_look_like_options(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _TAKE_ANY_VALUE and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
