"""Plain text of the reports' rich renderables (``str(report)``), shared by every report."""
from __future__ import annotations

__all__ = ["render_text"]


def render_text(renderable, width: int = 120) -> str:
    """What ``rich`` prints for ``renderable``, as plain text (no colour, no terminal codes)."""
    from rich.console import Console

    console = Console(width=width, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(renderable)
    return cap.get()
