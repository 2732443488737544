"""The report writer: one self-contained folder (index.html, PNG plots beside it, results.json).

The HTML carries its own CSS and no script; images are linked by relative file names, so the
folder reads offline and can be moved or zipped whole. Plots use matplotlib's object API on the
Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_text_atomically

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:62rem;margin:2rem auto;
padding:0 1rem;color:#1d2330;line-height:1.5}
h1{font-size:1.9rem;margin-bottom:.2rem}h2{border-bottom:2px solid #d8dde6;padding-bottom:.2rem;
margin-top:2.6rem}h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d8dde6;padding:.25rem .55rem;text-align:right}
th{background:#f1f3f7}td.l,th.l{text-align:left}
.formula{font-family:'Cambria Math','STIX Two Math',serif;font-size:1.08rem;background:#f7f8fb;
padding:.6rem 1rem;border-left:3px solid #6b8cce;white-space:pre-line}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #e3e6ec}
figcaption{font-size:.88rem;color:#555}code{background:#f1f3f7;padding:0 .25rem}
.meta{color:#555;font-size:.9rem}nav ol{columns:2}
"""


def esc(text) -> str:
    return html.escape(str(text))


def fmt(value, digits: int = 4) -> str:
    """A number as shown everywhere in the tour (same rounding in the terminal and the HTML)."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
        return f"{value:.{max(digits - 2, 1)}e}"
    return f"{value:.{digits}f}"


def table(headers: list[str], rows: list[list], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text."""
    def cls(i):
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c if isinstance(c, Raw) else esc(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """HTML that :func:`table` must not escape (e.g. a verdict with a CSS class)."""


def verdict(ok: bool, yes: str = "yes", no: str = "no") -> Raw:
    cls, text = ("ok", yes) if ok else ("bad", no)
    return Raw(f'<span class="{cls}">{esc(text)}</span>')


def figure(name: str, caption: str) -> str:
    return (f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


@dataclass
class Section:
    """One section of a report: its HTML, the numbers it shows, its plots, its terminal lines."""

    key: str  # results.json key, e.g. "s1_purpose"
    title: str
    html: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)  # (label, value) for the terminal

    def p(self, text: str) -> None:
        self.html.append(f"<p>{text}</p>")

    def fig(self, name: str, caption: str) -> None:
        self.figures.append(name)
        self.html.append(figure(name, caption))


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.0):
    """A matplotlib Figure on the Agg canvas with ``ncols`` axes side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, format="png", metadata={"Software": None})
    return name


def claims_table(title: str, claims: dict[str, str], verdicts: dict[str, dict]):
    """The terminal table of an experiment's claims: each claim's text and whether this run
    shows it (``verdicts[key]["holds"]``)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("claim")
    table.add_column("this run")
    for key, v in verdicts.items():
        table.add_row(claims[key], "[green]shown[/]" if v["holds"] else "[red]not shown[/]")
    return table


def write_html(out: Path, title: str, intro: str, sections: list[Section], meta: str) -> Path:
    nav = "".join(f'<li><a href="#{s.key}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{s.key}"><h2>{esc(s.title)}</h2>{"".join(s.html)}</section>'
        for s in sections
    )
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}"
        f"</title><style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
        f"<p class=\"meta\">{meta}</p>{intro}<nav><ol>{nav}</ol></nav>{body}</body></html>"
    )
    return write_text_atomically(out / "index.html", page)


def write_json(out: Path, results: dict) -> Path:
    text = json.dumps(jsonable(results), indent=1, sort_keys=False, allow_nan=False)
    return write_text_atomically(out / "results.json", text + "\n")


def jsonable(value):
    """NumPy/torch scalars and arrays -> plain Python; non-finite floats -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors
        return jsonable(value.tolist())
    return value


def strip_timing(value):
    """A copy of a results dict without its ``timing`` entries (the only run-to-run variation)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k != "timing"}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value
