"""Turn user mistakes into one clear line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from ..errors import BatchNormError


class CLIError(BatchNormError):
    """A user mistake on the command line; ``hint`` is the next step to suggest."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def run_guarded(func: Callable, args) -> int:
    try:
        status = func(args)
    except (BatchNormError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        hint = getattr(exc, "hint", None)
        message = f"batchnorm: error: {exc}"
        if hint:
            message += f" ({hint})"
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchnorm: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def require_tour_extra() -> None:
    """The tour's plots and data need the [tour] extra (matplotlib, scikit-learn)."""
    import importlib.util

    missing = [name for module, name in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise CLIError(f"expected the tour extra to be installed (got no {', '.join(missing)})",
                       "pip install 'batchnorm[tour]'")
