"""Print a result as a human table (rich) or as JSON (--json)."""

from __future__ import annotations

import json
import math
import sys


def emit(args, data: dict, renderable=None) -> None:
    """JSON on stdout with --json; otherwise the rich renderable (or the dict as lines)."""
    if getattr(args, "json", False):
        json.dump(_plain(data), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = _console()
    if renderable is not None:
        console.print(renderable)
    else:
        for key, value in data.items():
            console.print(f"{key}: {value}")


def note(args, message: str) -> None:
    """A line for humans; silent under --json so stdout stays valid JSON."""
    if not getattr(args, "json", False):
        _console().print(message)


def _console():
    """A rich console for stdout: the terminal's width; piped, ``$COLUMNS`` or else 200."""
    import os

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    # piped or redirected: wide enough that layer names are not folded into pieces, unless the
    # user says how wide (rich reads COLUMNS itself, but only when no width is given)
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else 200)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
