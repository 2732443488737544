"""What :func:`batchnorm.inspect` returns: the BN layer table, the findings, the totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..console import render_text
from ..graph import Site, class_name
from ..protocol import bn_kind, options_of


@dataclass
class LayerRow:
    """One BN-like layer: what it is and what it holds."""

    name: str
    cls: str
    kind: str  # batchnorm | sync | frozen | duck
    channels: int
    params: int  # learnable: 2·C with affine=True, 0 otherwise (frozen: 0)
    buffers: int  # elements in buffers (running stats, num_batches_tracked, frozen affine)
    eps: float
    momentum: float | None
    mode: str  # train | eval
    producer: str  # the module or op its input comes from
    options: str = ""  # the hard-training options set (renorm, ghost batches, eval statistics)


@dataclass
class Finding:
    """A statement about some layers, with a one-line fix (empty for the ``ok`` findings)."""

    code: str
    severity: str
    layers: list[str]
    message: str
    fix: str = ""


@dataclass
class Report:
    """What :func:`inspect` found. ``print(report)`` shows tables; ``to_dict()`` is JSON-ready."""

    layers: list[LayerRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    approximate: bool = False
    warning: str | None = None

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def finding(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "totals": dict(self.totals),
            "findings": [asdict(f) for f in self.findings],
            "approximate": self.approximate,
            "warning": self.warning,
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title="BN layers", title_justify="left")
        for col, just in (
            ("layer", "left"),
            ("kind", "left"),
            ("C", "right"),
            ("params", "right"),
            ("buffers", "right"),
            ("eps", "right"),
            ("momentum", "right"),
            ("mode", "left"),
            ("input from", "left"),
            ("options", "left"),
        ):
            table.add_column(col, justify=just, overflow="fold")
        for r in self.layers:
            momentum = (
                "-" if r.kind == "frozen" else ("None" if r.momentum is None else f"{r.momentum:g}")
            )
            table.add_row(
                r.name,
                r.cls,
                str(r.channels),
                str(r.params),
                str(r.buffers),
                f"{r.eps:g}",
                momentum,
                r.mode,
                r.producer,
                r.options or "-",
            )
        t = self.totals
        summary = (
            f"{t.get('bn_layers', 0)} BN layers, {t.get('bn_params', 0)} learnable parameters "
            f"({t.get('bn_param_share', 0.0):.2%} of the model's {t.get('model_params', 0)}), "
            f"{t.get('bn_buffers', 0)} buffer elements"
        )
        findings = Table(title="findings", title_justify="left")
        for col in ("severity", "finding", "layers", "fix"):
            findings.add_column(col, overflow="fold")
        colour = {"error": "red", "warning": "yellow", "info": "cyan", "ok": "green"}
        for f in self.findings:
            names = ", ".join(f.layers)  # every name: a table is no place to hide one
            findings.add_row(f"[{colour[f.severity]}]{f.severity}[/]", f.message, names, f.fix)
        parts = [table, summary, findings]
        if self.warning:
            parts.append(f"[yellow]warning:[/] {self.warning}")
        return Group(*parts)

    def __str__(self) -> str:
        return render_text(self, width=140)


def _row(name: str, bn: nn.Module, producer: Site | None) -> LayerRow:
    """The table row of one BN; ``producer`` is the site its input comes from."""
    params = sum(p.numel() for p in bn.parameters(recurse=False) if p.requires_grad)
    buffers = sum(b.numel() for b in bn.buffers(recurse=False))
    if producer is None:
        source = "-"
    elif producer.op == "module":
        source = f"{producer.name} ({class_name(producer.module)})"
    elif producer.op == "input":
        source = "input"
    else:
        source = producer.label
    return LayerRow(
        name,
        class_name(bn),
        bn_kind(bn),
        int(bn.num_features),
        params,
        buffers,
        float(bn.eps),
        getattr(bn, "momentum", None),
        "train" if bn.training else "eval",
        source,
        ", ".join(f"{k}={v!r}" for k, v in options_of(bn).items()),
    )

