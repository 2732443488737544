"""What ``fold`` and ``strip_bias`` report: per layer, printable (rich) and JSON-ready."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..console import render_text


@dataclass
class LayerFold:
    """What ``fold`` did with one BN layer.

    ``action`` is ``"folded"`` (into ``into``: nothing of the BN is left), ``"partial"`` (folded
    in pieces, with ``kept_channels`` channels left: a frozen per-channel affine stays in the
    BN's place), ``"frozen"`` (now a fixed per-channel affine) or ``"kept"``. A folded BN has a
    ``direction``: ``"previous"`` (into the conv/linear before it), ``"next"`` (into the
    Linear/conv after it) or ``"pieces"`` (split over the layers a channel concatenation joins:
    ``into`` lists them, comma-separated; channels from anything else cannot fold backwards and
    stay a frozen affine, which ``reason`` names: the action is then ``"partial"``). Errors are
    measured on
    ``example_input`` (None without one): ``max_error`` is the largest absolute difference of
    the rewritten layers' output, fed the original layers' inputs, ``rel_error`` that divided
    by the largest absolute output.
    """

    name: str
    action: str
    into: str | None = None
    reason: str = ""
    max_error: float | None = None
    rel_error: float | None = None
    direction: str | None = None
    kept_channels: int = 0


@dataclass
class FoldReport:
    """Per-layer record of a ``fold`` call, plus the whole model's error on the example input.

    ``count(action)`` counts the BN layers that met each action; every BN counts once."""

    layers: list[LayerFold] = field(default_factory=list)
    max_error: float | None = None
    rel_error: float | None = None
    warning: str | None = None

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    def to_dict(self) -> dict:
        return {
            "folded": self.count("folded"),
            "partial": self.count("partial"),
            "frozen": self.count("frozen"),
            "kept": self.count("kept"),
            "max_error": self.max_error,
            "rel_error": self.rel_error,
            "warning": self.warning,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="fold: what happened to each BN", title_justify="left")
        for col in ("layer", "action", "into", "max error", "why"):
            table.add_column(col, overflow="fold")
        for r in self.layers:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            into = r.into or "-"
            if r.direction in ("next", "pieces"):
                into = f"{r.direction}: {into}"
            table.add_row(r.name, r.action, into, err, r.reason)
        summary = f"{self.count('folded')} folded, "
        if self.count("partial"):
            left = sum(r.kept_channels for r in self.layers if r.action == "partial")
            summary += (f"{self.count('partial')} folded in part ({left} channels kept as a "
                        "frozen per-channel affine), ")
        summary += f"{self.count('frozen')} frozen, {self.count('kept')} kept"
        if self.max_error is not None:
            summary += (
                f"; model output max error {self.max_error:.2e} (relative {self.rel_error:.2e})"
            )
        parts = [table, summary]
        if self.warning:
            parts.append(f"[yellow]warning:[/] {self.warning}")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)


@dataclass
class StripReport:
    """What ``strip_bias`` removed: ``(producer, bn, parameters)`` per layer, and the total."""

    layers: list[tuple[str, str, int]] = field(default_factory=list)
    warning: str | None = None

    @property
    def parameters_saved(self) -> int:
        return sum(n for _, _, n in self.layers)

    def to_dict(self) -> dict:
        return {
            "parameters_saved": self.parameters_saved,
            "warning": self.warning,
            "layers": [{"layer": p, "bn": b, "parameters": n} for p, b, n in self.layers],
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="strip-bias: biases moved into BN running_mean", title_justify="left")
        for col in ("layer", "feeds BN", "parameters saved"):
            table.add_column(col)
        for p, b, n in self.layers:
            table.add_row(p, b, str(n))
        parts = [table, f"{self.parameters_saved} parameters saved"]
        if self.warning:
            parts.append(f"[yellow]warning:[/] {self.warning}")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self)

