"""Writing a file the way a user expects: all or nothing, with the permissions their umask gives.

Every file we write (the CLI's models, ONNX files, the tour's report) goes through
:func:`write_atomically`: the content goes to a temporary file in the target's folder, which is
renamed over the target only once it is complete, so a reader never sees half a file and a
failure leaves the target as it was. The temporary file is created private (``mkstemp``); before
the rename it gets the mode any new file would (``0o666`` less the umask: ``0644`` under the
usual ``022``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import expected

__all__ = ["write_atomically", "write_text_atomically"]


def write_atomically(target: str | os.PathLike, write: Callable[[str], object],
                     *, suffix: str = ".tmp") -> Path:
    """``write(tmp_path)``, then rename the temporary file over ``target``; returns the target.

    A folder that cannot be written raises BatchNormError naming ``target`` (not the temporary
    file); whatever ``write`` raises propagates, and the temporary file is removed.
    """
    target = Path(target)
    folder = target.resolve().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise expected(f"a folder this process can write {str(target)!r} into",
                       f"{exc.strerror or type(exc).__name__}: {str(folder)!r}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def write_text_atomically(target: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomically` of a UTF-8 text."""
    return write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    """The process's umask (read without changing it where Linux says it; else set and reset)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
