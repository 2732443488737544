"""``inspect``: every BN layer of a model in one table, and what is wrong with where it sits.

The layer table answers the lesson's §3 (BN adds 2·C learnable parameters; the running
statistics are buffers); the findings answer §5 (Conv → BN → act is the order that works) and
§6 (a bias in front of BN is wasted; BN folds into the conv at inference).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .console import render_text
from .errors import expected
from .folding import plan_folds
from .graph import ModelGraph, Site, class_name, is_foldable_producer, out_channels, trace
from .probe import as_args, capture
from .protocol import activation_of, bn_kind, is_batchnorm, options_of

__all__ = ["inspect", "Report", "Finding", "LayerRow"]

# finding code -> severity; the order is the order findings are listed in
SEVERITY = {
    "channel-mismatch": "error",
    "act-before-bn": "warning",
    "redundant-bias": "warning",
    "train-mode": "warning",
    "eps-zero": "warning",
    "eps-underflow-fp16": "warning",
    "frozen-params-train-mode": "warning",
    "slow-momentum": "warning",
    "ddp-broadcast-buffers": "warning",
    "one-value-per-channel": "warning",
    "no-running-stats": "warning",
    "shared-output": "info",
    "unverified-pair": "info",
    "pre-activation": "info",
    "no-producer": "info",
    "cumulative-momentum": "info",
    "conv-bn-act": "ok",
    "fold-pieces": "ok",
    "fold-forward": "ok",
}
# an fp16 eps below the smallest subnormal half (2^-24 ~ 6e-8) rounds to 0 in running_var + eps
FP16_TINY = 2.0 ** -24
# slow-momentum: a momentum below SLOW_MOMENTUM whose initial running statistics still weigh
# more than LAG_WEIGHT after the batches seen (a fresh model at momentum 0.1 is not flagged)
SLOW_MOMENTUM = 0.01
LAG_WEIGHT = 0.05


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


def inspect(model: nn.Module, example_input=None, *, mode: str = "auto") -> Report:
    r"""Every BN-like layer of ``model``, totals, and findings about placement and state.

    Layers: PyTorch's BatchNorm*, SyncBatchNorm, ours, frozen BN and duck-typed BN
    (``num_features``, ``eps``, ``running_mean``, ``running_var``). Learnable parameters are
    :math:`2C` with ``affine=True`` and 0 otherwise; the running statistics are buffers.

    Findings (``Report.findings``, each with layer names and a one-line fix): ``conv-bn-act``
    (fine), ``act-before-bn`` (Conv → act → BN), ``pre-activation`` (BN → act → Conv: fine, but
    folds only as a frozen affine), ``fold-pieces`` (input is a channel concatenation of
    conv/linear outputs: ``fold`` splits the BN into them), ``fold-forward`` (input from
    elsewhere, output straight into a Linear or a conv that does not pad with zeros: ``fold``
    folds it forward), ``no-producer`` (input is not a conv/linear and no such consumer: the
    model's input, an add, a pooling...), ``shared-output`` (the conv output has other users, so
    BN cannot fold), ``unverified-pair`` (conv then BN in module order on a graph fx could not
    trace), ``no-running-stats`` (batch statistics in eval too: nothing folds),
    ``redundant-bias`` (a conv/linear bias feeding BN, with the parameters wasted),
    ``train-mode``, ``eps-zero``, ``eps-underflow-fp16`` (float16 buffers with 0 < eps < 2^-24),
    ``frozen-params-train-mode`` (parameters frozen, module in train mode: the statistics still
    move), ``slow-momentum`` (a momentum below 0.01 with which, after the batches seen, the
    initial running statistics still weigh over 5%), ``cumulative-momentum`` (momentum=None
    while training), ``ddp-broadcast-buffers`` (the model passed is a
    ``DistributedDataParallel`` with ``broadcast_buffers=True``), ``channel-mismatch`` and, with
    ``example_input``, ``one-value-per-channel`` (the batch size at which training breaks).

    A traced TorchScript module (``torch.jit.trace``) keeps the BN tensors but none of their
    attributes (``num_features``, ``eps``, ``momentum``): such layers cannot be listed, and
    ``Report.warning`` says how many there are. Scripted modules (``torch.jit.script``) keep
    them and are listed.

    BN in train mode at inference: with ``mode="auto"`` a BN is flagged when it is in train
    mode while the model itself is in eval mode (someone called ``.train()`` on a part);
    ``mode="inference"`` flags every BN in train mode; ``mode="training"`` flags none.

    The graph comes from ``torch.fx``; when tracing fails, module order stands in for it and
    ``Report.warning`` says the findings are approximate. The model is not changed (shapes
    come from a forward pass on an eval-mode copy).

    Args:
        model: any ``nn.Module``.
        example_input: tensor or tuple of tensors, to learn each BN's input shape. Default: None
        mode: ``"auto"``, ``"inference"`` or ``"training"``. Default: ``"auto"``

    >>> report = batchnorm.inspect(model, torch.randn(2, 3, 32, 32))
    >>> print(report); report.to_dict()["totals"]["bn_params"]
    """
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    if mode not in ("auto", "inference", "training"):
        raise expected('mode "auto", "inference" or "training"', repr(mode))
    graph = trace(model)
    seen = _seen_shapes(model, example_input) if example_input is not None else {}
    bn_names = {name for name, m in model.named_modules() if is_batchnorm(m)}
    shapes = {name: tuple(rec[0][0].shape) for name, rec in seen.items()
              if name in bn_names and rec[0]}
    # where fold would put each BN (fold takes no TorchScript, so neither does this)
    folds = {} if isinstance(model, torch.jit.ScriptModule) else {
        plan.name: plan for plan in plan_folds(model, graph, seen)}
    report = Report(approximate=graph.approximate, warning=_join(graph.warning,
                                                                 _traced_bn_warning(model)))
    found: dict[str, list[str]] = {code: [] for code in SEVERITY}
    extra: dict[str, list[str]] = {code: [] for code in SEVERITY}  # details for the message
    wasted = 0
    # DistributedDataParallel(broadcast_buffers=True) writes rank 0's buffers into every BN
    # in place before each forward: a model whose forward runs twice per step (a GAN's
    # discriminator on real then fake) then fails autograd's in-place check
    ddp_buffers = isinstance(model, nn.parallel.DistributedDataParallel) and getattr(
        model, "broadcast_buffers", False)

    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        sites = graph.calls(name)
        site = sites[0] if sites else None
        producer = site.producer if site is not None else None
        report.layers.append(_row(name, bn, producer))

        no_stats = getattr(bn, "running_mean", None) is None or getattr(
            bn, "running_var", None) is None
        if no_stats:  # batch statistics in eval too: nothing to fold, whatever sits before it
            found["no-running-stats"].append(name)
        if site is not None:
            placement = _placement(graph, site)
            direction = folds[name].direction if name in folds else None
            if direction in ("pieces", "next"):
                code = "fold-pieces" if direction == "pieces" else "fold-forward"
                found[code].append(name)
                extra[code].append(f"{name} → {folds[name].into}")
                if placement == "no-producer":  # it does fold, after all
                    placement = None
            if placement and not (no_stats and placement == "conv-bn-act"):
                found[placement].append(name)
            if (
                producer is not None
                and producer.module is not None
                and is_foldable_producer(producer.module)
            ):
                c = out_channels(producer.module)
                if c != bn.num_features:
                    found["channel-mismatch"].append(name)
                    extra["channel-mismatch"].append(
                        f"{producer.name} gives {c}, {name} expects {bn.num_features}"
                    )
                bias = getattr(producer.module, "bias", None)
                if bias is not None and graph.feeds_only(producer, site):
                    found["redundant-bias"].append(producer.name)
                    wasted += bias.numel()
        if bn.training and (mode == "inference" or (mode == "auto" and not model.training)):
            found["train-mode"].append(name)
        if bn.eps == 0:
            found["eps-zero"].append(name)
        running_var = getattr(bn, "running_var", None)
        if running_var is not None and running_var.dtype == torch.float16 \
                and 0 < bn.eps < FP16_TINY:
            found["eps-underflow-fp16"].append(name)
            extra["eps-underflow-fp16"].append(f"{name} eps={bn.eps:g}")
        params = [p for p in bn.parameters(recurse=False)]
        if bn.training and not no_stats and params and not any(p.requires_grad for p in params):
            found["frozen-params-train-mode"].append(name)
        _momentum_findings(name, bn, no_stats, found, extra)
        if ddp_buffers and not no_stats and bn_kind(bn) != "frozen":
            found["ddp-broadcast-buffers"].append(name)
        if name in shapes:
            shape = shapes[name]
            per_channel = math.prod(shape[2:])
            if len(shape) >= 2 and per_channel == 1:
                found["one-value-per-channel"].append(name)
                extra["one-value-per-channel"].append(
                    f"{name} input {tuple(shape)}"
                    + (": fails already at this batch size" if shape[0] == 1 else "")
                )

    report.findings = [
        _finding(code, found[code], extra[code], wasted) for code in SEVERITY if found[code]
    ]
    bn_params = sum(r.params for r in report.layers)
    model_params = sum(p.numel() for p in model.parameters())
    report.totals = {
        "bn_layers": len(report.layers),
        "bn_params": bn_params,
        "bn_buffers": sum(r.buffers for r in report.layers),
        "model_params": model_params,
        "bn_param_share": bn_params / model_params if model_params else 0.0,
        "foldable": len(found["conv-bn-act"]) + len(found["fold-pieces"])
        + len(found["fold-forward"]),
        "wasted_bias_params": wasted,
    }
    return report


def _join(*warnings: str | None) -> str | None:
    return "; ".join(w for w in warnings if w) or None


def _traced_bn_warning(model: nn.Module) -> str | None:
    """The warning for BN layers of a traced TorchScript module, which keep no attributes."""
    if not isinstance(model, torch.jit.ScriptModule):
        return None
    traced = [name for name, m in model.named_modules() if not is_batchnorm(m)
              and "BatchNorm" in class_name(m) and hasattr(m, "running_mean")]
    if not traced:
        return None
    return (f"{len(traced)} BN layers ({', '.join(traced[:3])}"
            f"{', ...' if len(traced) > 3 else ''}) "
            "come from torch.jit.trace, which keeps their tensors but not num_features, eps or "
            "momentum, so they are not listed; inspect the Python model, or a torch.jit.script "
            "one")


def _row(name: str, bn: nn.Module, producer: Site | None) -> LayerRow:
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


def _placement(graph: ModelGraph, site: Site) -> str:
    """Where the BN sits: conv-bn-act, shared-output, act-before-bn, pre-activation, no-producer."""
    producer = site.producer
    if (
        producer is not None
        and producer.module is not None
        and is_foldable_producer(producer.module)
    ):
        if graph.feeds_only(producer, site):
            return "conv-bn-act"
        # module order is not dataflow: a pair outside one nn.Sequential may well be exclusive
        return "unverified-pair" if graph.approximate else "shared-output"
    if producer is not None and producer.is_activation:
        before = producer.producer
        if before is not None and before.module is not None and is_foldable_producer(before.module):
            return "act-before-bn"
    if _reaches_conv(site):
        return "pre-activation"
    return "no-producer"


def _reaches_conv(site: Site) -> bool:
    """BN → activation → conv/linear: the BN-ReLU-Conv pre-activation pattern (a BN+act module
    feeding the conv directly counts; a plain BN feeding it directly does not)."""
    if activation_of(site.module) is not None:
        frontier = list(site.users)
    else:
        frontier = [u2 for u in site.users if u.is_activation for u2 in u.users]
    return any(u.module is not None and is_foldable_producer(u.module) for u in frontier)


def _momentum_findings(name, bn, no_stats, found, extra) -> None:
    """slow-momentum: a momentum below SLOW_MOMENTUM with which, after the batches seen, the
    initial running statistics still weigh more than LAG_WEIGHT ((1 - momentum)^batches);
    cumulative-momentum: momentum=None while training (each new batch weighs 1/batches: the
    statistics stop following the weights)."""
    if no_stats or bn_kind(bn) == "frozen" or not hasattr(bn, "momentum"):
        return
    momentum = bn.momentum
    nbt = getattr(bn, "num_batches_tracked", None)
    seen = 0 if nbt is None else int(nbt)
    if momentum is None:
        if bn.training:
            found["cumulative-momentum"].append(name)
        return
    if 0 < momentum < SLOW_MOMENTUM:
        left = (1.0 - momentum) ** seen
        if left > LAG_WEIGHT:
            found["slow-momentum"].append(name)
            extra["slow-momentum"].append(
                f"{name}: momentum {momentum:g} after {seen} batches, the initial values still "
                f"weigh {left:.0%}; about {math.ceil(math.log(LAG_WEIGHT) / math.log1p(-momentum))}"
                " batches are needed")


def _finding(code: str, layers: list[str], details: list[str], wasted: int) -> Finding:
    n = len(layers)
    text = {
        "conv-bn-act": (
            f"{n} BN follow a conv/linear directly (Conv → BN → act): the recommended "
            "order; they fold into the conv at inference",
            "",
        ),
        "act-before-bn": (
            f"{n} BN come after an activation (Conv → act → BN): BN normalises the "
            "rectified output and cannot fold into the conv",
            "reorder to Conv → BN → act",
        ),
        "pre-activation": (
            f"{n} BN feed a conv through an activation (BN → act → Conv, "
            "pre-activation): fine to train, but cannot fold backwards into a conv",
            "nothing to do; batchnorm.fold turns them into frozen per-channel affines",
        ),
        "no-producer": (
            f"{n} BN take their input from something other than a conv/linear "
            "(input, add, concatenation, pooling) and feed no Linear/conv they could fold into",
            "nothing to do; batchnorm.fold turns them into frozen per-channel affines",
        ),
        "fold-pieces": (
            f"{n} BN read a channel concatenation of conv/linear outputs "
            f"({'; '.join(details)}): fold splits each into the layers that produced its "
            "channels (channels from anything else stay a frozen affine)",
            "nothing to do; batchnorm.fold(model) splits them",
        ),
        "fold-forward": (
            f"{n} BN feed a Linear, or a conv that pads with nothing or with the data, "
            f"directly ({'; '.join(details)}): fold folds them forward into that layer",
            "nothing to do; batchnorm.fold(model) folds them (forward=False keeps them as "
            "frozen affines)",
        ),
        "shared-output": (
            f"{n} BN read a conv/linear output that other layers read too, so "
            "they cannot fold into it",
            "let only the BN read the conv output",
        ),
        "unverified-pair": (
            f"{n} BN follow a conv/linear in module order, but torch.fx could not trace the "
            "model, so whether the conv output goes to the BN alone is not known; fold folds "
            "only pairs adjacent in one nn.Sequential",
            "make the model traceable by torch.fx, or put each conv and its BN in one "
            "nn.Sequential",
        ),
        "no-running-stats": (
            f"{n} BN keep no running statistics (track_running_stats=False): they normalise "
            "with the batch's statistics in eval too, so outputs depend on the batch and fold "
            "keeps them",
            "build them with track_running_stats=True and run batchnorm.recalibrate",
        ),
        "redundant-bias": (
            f"{n} conv/linear biases feed BN, which subtracts them again: "
            f"{wasted} parameters wasted",
            "build these layers with bias=False, or run batchnorm.strip_bias(model)",
        ),
        "train-mode": (
            f"{n} BN are in train mode for inference: outputs depend on the batch and "
            "every call overwrites the running statistics",
            "call model.eval() before inference",
        ),
        "eps-zero": (
            f"{n} BN have eps = 0: a running_var of 0 (e.g. fp16 underflow) divides by "
            "zero and gives inf/NaN",
            "set eps to 1e-5 (e.g. FrozenBatchNorm2d(C, eps=1e-5))",
        ),
        "eps-underflow-fp16": (
            f"{n} float16 BN have 0 < eps < 6e-8 ({'; '.join(details)}): in half precision "
            "eps rounds to 0, so a running_var of 0 divides by zero",
            "set eps to at least 1e-5, or keep BN buffers in float32",
        ),
        "frozen-params-train-mode": (
            f"{n} BN have frozen parameters (requires_grad=False) but are in train mode: "
            "their running statistics still change with every batch (a common fine-tuning "
            "surprise)",
            "call .eval() on these BN after model.train(), or batchnorm.freeze(model)",
        ),
        "slow-momentum": (
            f"{n} BN update their running statistics so slowly that they still hold mostly "
            f"their initial values ({'; '.join(details)})",
            "use momentum 0.1, or run batchnorm.recalibrate(model, data) before evaluating",
        ),
        "cumulative-momentum": (
            f"{n} BN in train mode use momentum=None (a cumulative average): each new batch "
            "weighs 1/batches, so the running statistics stop following weights that change",
            "use a momentum such as 0.1 while training, and recalibrate afterwards if needed",
        ),
        "ddp-broadcast-buffers": (
            f"{n} BN sit under DistributedDataParallel(broadcast_buffers=True), which copies "
            "rank 0's buffers into them in place before every forward: a model whose forward "
            "runs twice per step (GAN-style) fails autograd's in-place check",
            "wrap with broadcast_buffers=False (SyncBatchNorm keeps the ranks' statistics "
            "equal), or run both inputs through one forward",
        ),
        "channel-mismatch": (
            f"{n} BN do not match their producer's channels ({'; '.join(details)})",
            "set num_features to the producer's output channels",
        ),
        "one-value-per-channel": (
            f"{n} BN see one value per channel per sample "
            f"({'; '.join(details)}): training breaks at batch size 1 "
            "(e.g. a last partial batch)",
            "use drop_last=True / batch size >= 2, or freeze this BN "
            "(or use LayerNorm/GroupNorm there)",
        ),
    }[code]
    return Finding(code, SEVERITY[code], layers, *text)


def _seen_shapes(model: nn.Module, example_input) -> dict[str, tuple]:
    """``((input,), output)`` of every BN and conv/linear on one eval-mode forward pass of a
    copy of ``model``, as meta tensors: the shapes, no data."""
    args = as_args(example_input)
    records, _ = capture(copy.deepcopy(model).eval(), args,
                         lambda m: is_batchnorm(m) or is_foldable_producer(m), _as_meta)
    return records


def _as_meta(inputs: tuple, output) -> tuple[tuple, object]:
    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    first = inputs[:1] if inputs and isinstance(inputs[0], torch.Tensor) else ()
    return (tuple(meta(t) for t in first),
            meta(output) if isinstance(output, torch.Tensor) else output)
