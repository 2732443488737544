"""A progress bar for long work: rich, on stderr, only when stderr is a terminal (a bar in a log
file or a pipe is noise)."""
from __future__ import annotations

__all__ = ["progress_bar"]


class progress_bar:
    """``with progress_bar(enabled, total, label) as advance: ... advance()``: ``advance`` moves
    the bar one step; a no-op when disabled or stderr is not a terminal."""

    def __init__(self, enabled: bool, total: int | None, label: str):
        self.enabled, self.total, self.label, self.bar = enabled, total, label, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        if not console.is_terminal:
            return lambda: None
        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True, console=console)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
