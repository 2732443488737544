"""The rules ``inspect`` runs on every BN layer, one function each, and what each finding says.

A rule reads one BN (:class:`Layer`) in its model (:class:`Model`) and yields a :class:`Hit`
for each layer a finding names. Where the BN goes when folded is the planner's answer
(``batchnorm.folding.plan_folds``), so inspect and fold agree; the graph's shape around the BN
only explains why a BN does not fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..folding import FoldPlan, bias_producers
from ..graph import ModelGraph, Site, is_foldable_producer, out_channels
from ..protocol import activation_of, bn_kind
from .report import Finding

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
class Model:
    """What every rule may read about the model inspected."""

    module: nn.Module
    graph: ModelGraph
    seen: dict  # ((input,), output) of its BN and conv/linear modules on example_input, as meta
    mode: str  # "auto", "inference" or "training"
    modules: dict  # name -> module (get_submodule fails on TorchScript)


@dataclass
class Layer:
    """One BN layer as the rules see it."""

    name: str
    bn: nn.Module
    site: Site | None  # its first call in the graph
    plan: FoldPlan | None  # where fold puts it (None for TorchScript, which fold does not take)
    shape: tuple | None  # its input shape on example_input
    no_stats: bool  # no running statistics: batch statistics in eval too, nothing folds


@dataclass
class Hit:
    """One layer a finding names; ``detail`` goes into its message, ``params`` into its count."""

    code: str
    layer: str
    detail: str | None = None
    params: int = 0


Rule = Callable[[Model, Layer], Iterator[Hit]]


def no_running_stats(model: Model, layer: Layer) -> Iterator[Hit]:
    if layer.no_stats:
        yield Hit("no-running-stats", layer.name)


def fold_elsewhere(model: Model, layer: Layer) -> Iterator[Hit]:
    """fold-pieces / fold-forward: the planner splits the BN over a cat or folds it forward."""
    plan = layer.plan
    if layer.site is None or plan is None or plan.direction not in ("pieces", "next"):
        return
    detail = f"{plan.name} → {plan.into}"
    stay = [f"{p.start}:{p.stop} ({p.label})" for p in plan.pieces if p.into is None]
    if stay:
        detail += (f", its channels {', '.join(stay)} cannot fold backwards and stay a frozen "
                   "per-channel affine")
    yield Hit("fold-pieces" if plan.direction == "pieces" else "fold-forward", plan.name, detail)


def placement(model: Model, layer: Layer) -> Iterator[Hit]:
    """conv-bn-act, act-before-bn, pre-activation, no-producer, shared-output or
    unverified-pair: where the BN sits, as far as it agrees with what fold does with it."""
    if layer.site is None:
        return
    where = _placement(model.graph, layer.site)
    if layer.plan is not None:
        where = _as_planned(where, layer.plan)
    if where and not (layer.no_stats and where == "conv-bn-act"):
        yield Hit(where, layer.name)


def channel_mismatch(model: Model, layer: Layer) -> Iterator[Hit]:
    producer = layer.site.producer if layer.site is not None else None
    if producer is None or producer.module is None or not is_foldable_producer(producer.module):
        return
    c = out_channels(producer.module)
    if c != layer.bn.num_features:
        yield Hit("channel-mismatch", layer.name,
                  f"{producer.name} gives {c}, {layer.name} expects {layer.bn.num_features}")


def redundant_bias(model: Model, layer: Layer) -> Iterator[Hit]:
    """The biases BN cancels: those strip_bias removes (the producer's, or a cat's pieces')."""
    if layer.site is None:
        return
    for name, _ in bias_producers(model.module, model.graph, layer.name, layer.bn, model.seen):
        bias = getattr(model.modules[name], "bias", None)
        if bias is not None:
            yield Hit("redundant-bias", name, params=bias.numel())


def train_mode(model: Model, layer: Layer) -> Iterator[Hit]:
    """A BN in train mode at inference: in ``auto`` mode, one inside a model in eval mode."""
    mode = model.mode
    if layer.bn.training and (mode == "inference" or (mode == "auto"
                                                       and not model.module.training)):
        yield Hit("train-mode", layer.name)


def eps_zero(model: Model, layer: Layer) -> Iterator[Hit]:
    if layer.bn.eps == 0:
        yield Hit("eps-zero", layer.name)


def eps_underflow_fp16(model: Model, layer: Layer) -> Iterator[Hit]:
    bn = layer.bn
    running_var = getattr(bn, "running_var", None)
    if running_var is not None and running_var.dtype == torch.float16 \
            and 0 < bn.eps < FP16_TINY:
        yield Hit("eps-underflow-fp16", layer.name, f"{layer.name} eps={bn.eps:g}")


def frozen_params_train_mode(model: Model, layer: Layer) -> Iterator[Hit]:
    params = list(layer.bn.parameters(recurse=False))
    if layer.bn.training and not layer.no_stats and params \
            and not any(p.requires_grad for p in params):
        yield Hit("frozen-params-train-mode", layer.name)


def slow_momentum(model: Model, layer: Layer) -> Iterator[Hit]:
    """A momentum below SLOW_MOMENTUM with which, after the batches seen, the initial running
    statistics still weigh more than LAG_WEIGHT ((1 - momentum)^batches)."""
    bn = layer.bn
    if not _moves(layer) or bn.momentum is None or not 0 < bn.momentum < SLOW_MOMENTUM:
        return
    momentum = bn.momentum
    nbt = getattr(bn, "num_batches_tracked", None)
    batches = 0 if nbt is None else int(nbt)
    left = (1.0 - momentum) ** batches
    if left > LAG_WEIGHT:
        needed = math.ceil(math.log(LAG_WEIGHT) / math.log1p(-momentum))
        yield Hit("slow-momentum", layer.name,
                  f"{layer.name}: momentum {momentum:g} after {batches} batches, the initial "
                  f"values still weigh {left:.0%}; about {needed} batches are needed")


def cumulative_momentum(model: Model, layer: Layer) -> Iterator[Hit]:
    """momentum=None while training: each new batch weighs 1/batches, so the statistics stop
    following the weights."""
    if _moves(layer) and layer.bn.momentum is None and layer.bn.training:
        yield Hit("cumulative-momentum", layer.name)


def ddp_broadcast_buffers(model: Model, layer: Layer) -> Iterator[Hit]:
    """DistributedDataParallel(broadcast_buffers=True) writes rank 0's buffers into every BN in
    place before each forward: a model whose forward runs twice per step (a GAN's
    discriminator on real then fake) then fails autograd's in-place check."""
    ddp = isinstance(model.module, nn.parallel.DistributedDataParallel) and getattr(
        model.module, "broadcast_buffers", False)
    if ddp and not layer.no_stats and bn_kind(layer.bn) != "frozen":
        yield Hit("ddp-broadcast-buffers", layer.name)


def one_value_per_channel(model: Model, layer: Layer) -> Iterator[Hit]:
    """An input with one value per channel per sample: training fails at batch size 1."""
    shape = layer.shape
    if shape is not None and len(shape) >= 2 and math.prod(shape[2:]) == 1:
        yield Hit("one-value-per-channel", layer.name,
                  f"{layer.name} input {tuple(shape)}"
                  + (": fails already at this batch size" if shape[0] == 1 else ""))


RULES: list[Rule] = [
    no_running_stats, fold_elsewhere, placement, channel_mismatch, redundant_bias, train_mode,
    eps_zero, eps_underflow_fp16, frozen_params_train_mode, slow_momentum, cumulative_momentum,
    ddp_broadcast_buffers, one_value_per_channel,
]


def _moves(layer: Layer) -> bool:
    """Whether the BN's running statistics follow a momentum (not frozen, not absent)."""
    return not layer.no_stats and bn_kind(layer.bn) != "frozen" and hasattr(layer.bn, "momentum")


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


def _as_planned(placement: str, plan: FoldPlan) -> str | None:
    """The placement finding, where it agrees with what fold will do with the BN (the planner
    decides): conv-bn-act only for a BN that folds into the layer before it; pre-activation and
    no-producer ("cannot fold backwards", "frozen affine") not for one that folds elsewhere."""
    if plan.direction == "previous":
        return "conv-bn-act"
    if placement == "conv-bn-act":
        return None
    if plan.direction in ("pieces", "next") and placement in ("pre-activation", "no-producer"):
        return None
    return placement


def _reaches_conv(site: Site) -> bool:
    """BN → activation → conv/linear: the BN-ReLU-Conv pre-activation pattern (a BN+act module
    feeding the conv directly counts; a plain BN feeding it directly does not)."""
    if activation_of(site.module) is not None:
        frontier = list(site.users)
    else:
        frontier = [u2 for u in site.users if u.is_activation for u2 in u.users]
    return any(u.module is not None and is_foldable_producer(u.module) for u in frontier)


def findings(hits: list[Hit]) -> list[Finding]:
    """One :class:`Finding` per code hit, in SEVERITY order, naming the layers in hit order."""
    out = []
    for code, severity in SEVERITY.items():
        mine = [h for h in hits if h.code == code]
        if not mine:
            continue
        message, fix = MESSAGES[code]
        text = message.format(n=len(mine), details="; ".join(h.detail for h in mine if h.detail),
                              params=sum(h.params for h in mine))
        out.append(Finding(code, severity, [h.layer for h in mine], text, fix))
    return out


# code -> (message, fix); the message takes {n} layers, their {details} and the {params} count
MESSAGES = {
    "conv-bn-act": (
        "{n} BN follow a conv/linear directly (Conv → BN → act): the recommended "
        "order; they fold into the conv at inference",
        "",
    ),
    "act-before-bn": (
        "{n} BN come after an activation (Conv → act → BN): BN normalises the "
        "rectified output and cannot fold into the conv",
        "reorder to Conv → BN → act",
    ),
    "pre-activation": (
        "{n} BN feed a conv through an activation (BN → act → Conv, "
        "pre-activation): fine to train, but cannot fold backwards into a conv",
        "nothing to do; batchnorm.fold turns them into frozen per-channel affines",
    ),
    "no-producer": (
        "{n} BN take their input from something other than a conv/linear "
        "(input, add, concatenation, pooling) and feed no Linear/conv they could fold into",
        "nothing to do; batchnorm.fold turns them into frozen per-channel affines",
    ),
    "fold-pieces": (
        "{n} BN read a channel concatenation of conv/linear outputs "
        "({details}): fold splits each into the layers that produced its channels",
        "nothing to do; batchnorm.fold(model) splits them",
    ),
    "fold-forward": (
        "{n} BN feed a Linear, or a conv that pads with nothing or with the data, "
        "directly ({details}): fold folds them forward into that layer",
        "nothing to do; batchnorm.fold(model) folds them (forward=False keeps them as "
        "frozen affines)",
    ),
    "shared-output": (
        "{n} BN read a conv/linear output that other layers read too, so "
        "they cannot fold into it",
        "let only the BN read the conv output",
    ),
    "unverified-pair": (
        "{n} BN follow a conv/linear in module order, but torch.fx could not trace the "
        "model, so whether the conv output goes to the BN alone is not known; fold folds "
        "only pairs adjacent in one nn.Sequential",
        "make the model traceable by torch.fx, or put each conv and its BN in one "
        "nn.Sequential",
    ),
    "no-running-stats": (
        "{n} BN keep no running statistics (track_running_stats=False): they normalise "
        "with the batch's statistics in eval too, so outputs depend on the batch and fold "
        "keeps them",
        "build them with track_running_stats=True and run batchnorm.recalibrate",
    ),
    "redundant-bias": (
        "{n} conv/linear biases feed BN, which subtracts them again: "
        "{params} parameters wasted",
        "build these layers with bias=False, or run batchnorm.strip_bias(model)",
    ),
    "train-mode": (
        "{n} BN are in train mode for inference: outputs depend on the batch and "
        "every call overwrites the running statistics",
        "call model.eval() before inference",
    ),
    "eps-zero": (
        "{n} BN have eps = 0: a running_var of 0 (e.g. fp16 underflow) divides by "
        "zero and gives inf/NaN",
        "set eps to 1e-5 (e.g. FrozenBatchNorm2d(C, eps=1e-5))",
    ),
    "eps-underflow-fp16": (
        "{n} float16 BN have 0 < eps < 6e-8 ({details}): in half precision "
        "eps rounds to 0, so a running_var of 0 divides by zero",
        "set eps to at least 1e-5, or keep BN buffers in float32",
    ),
    "frozen-params-train-mode": (
        "{n} BN have frozen parameters (requires_grad=False) but are in train mode: "
        "their running statistics still change with every batch (a common fine-tuning "
        "surprise)",
        "call .eval() on these BN after model.train(), or batchnorm.freeze(model)",
    ),
    "slow-momentum": (
        "{n} BN update their running statistics so slowly that they still hold mostly "
        "their initial values ({details})",
        "use momentum 0.1, or run batchnorm.recalibrate(model, data) before evaluating",
    ),
    "cumulative-momentum": (
        "{n} BN in train mode use momentum=None (a cumulative average): each new batch "
        "weighs 1/batches, so the running statistics stop following weights that change",
        "use a momentum such as 0.1 while training, and recalibrate afterwards if needed",
    ),
    "ddp-broadcast-buffers": (
        "{n} BN sit under DistributedDataParallel(broadcast_buffers=True), which copies "
        "rank 0's buffers into them in place before every forward: a model whose forward "
        "runs twice per step (GAN-style) fails autograd's in-place check",
        "wrap with broadcast_buffers=False (SyncBatchNorm keeps the ranks' statistics "
        "equal), or run both inputs through one forward",
    ),
    "channel-mismatch": (
        "{n} BN do not match their producer's channels ({details})",
        "set num_features to the producer's output channels",
    ),
    "one-value-per-channel": (
        "{n} BN see one value per channel per sample "
        "({details}): training breaks at batch size 1 "
        "(e.g. a last partial batch)",
        "use drop_last=True / batch size >= 2, or freeze this BN "
        "(or use LayerNorm/GroupNorm there)",
    ),
}
