"""Where each BN goes under ``fold``: the layer before it, the pieces of a channel cat, the layer
after it, or nowhere (a frozen affine). ``inspect``, ``strip_bias`` and ``fuse_frozen`` ask the
same questions here, so the tools agree on what folds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from ..errors import expected
from ..graph import ModelGraph, is_foldable_producer, out_channels
from ..protocol import UNKNOWN_ACTIVATION, activation_of, bn_kind, is_batchnorm, rank_key


@dataclass
class _Piece:
    """Channels ``start:stop`` of a BN's input, from the layer ``into`` (None: they stay a
    frozen affine); ``label`` says what produced them."""

    start: int
    stop: int
    into: str | None
    label: str


@dataclass
class FoldPlan:
    """Where one BN goes (``fold`` carries it out; ``inspect`` reports it)."""

    name: str
    bn: nn.Module
    action: str
    into: str | None = None
    reason: str = ""
    act: nn.Module | None = None
    rank: object = None  # the rank key of the affine a frozen (or split) BN becomes
    direction: str | None = None  # "previous", "pieces" or "next" for a folded BN
    pieces: list[_Piece] = field(default_factory=list)
    chain: list = field(default_factory=list)  # pass-through calls between BN and next layer
    repeat: int = 1  # input features of the next layer per BN channel


def plan_folds(model: nn.Module, graph: ModelGraph, captured: dict | None = None, *,
               forward: bool = True) -> list[FoldPlan]:
    """Where each BN of ``model`` would go under :func:`fold`, in module order; ``captured``
    holds the first ``(inputs, output)`` of its conv/linear/BN modules where known."""
    captured = captured or {}
    plans = []
    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        act = activation_of(bn)
        if act is UNKNOWN_ACTIVATION:
            plans.append(
                FoldPlan(name, bn, "kept",
                         reason=f"unknown activation {getattr(bn, 'act', None)!r}")
            )
            continue
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            plans.append(
                FoldPlan(name, bn, "kept",
                         reason="no running statistics: eval uses batch statistics")
            )
            continue
        rank = rank_key(bn, _seen_rank(captured.get(name)))
        producer, why_not = foldable_producer(model, graph, name, bn, captured)
        if producer is not None:
            kind = type(model.get_submodule(producer)).__name__
            plans.append(FoldPlan(name, bn, "folded", producer, f"{kind} → BN", act,
                                  direction="previous"))
            continue
        pieces, why_not_cat = _cat_pieces(model, graph, name, bn, captured)
        if pieces is not None:
            into = [p.into for p in pieces if p.into is not None]
            stay = [f"{p.start}:{p.stop} ({p.label})" for p in pieces if p.into is None]
            reason = f"cat → BN, {len(into)} of {len(pieces)} pieces folded"
            if stay:
                reason += f"; channels {', '.join(stay)} stay a frozen affine"
            plans.append(FoldPlan(name, bn, "folded", ", ".join(into), reason, act, rank,
                                  direction="pieces", pieces=pieces))
            continue
        why_not = why_not_cat or why_not
        if forward:
            nxt, why_not_next = _next_layer(model, graph, name, bn, act, captured)
            if nxt is not None:
                plans.append(nxt)
                continue
            why_not = f"{why_not}; {why_not_next}"
        if bn_kind(bn) == "frozen" and act is None:
            plans.append(FoldPlan(name, bn, "kept", reason=f"already frozen; {why_not}"))
            continue
        plans.append(FoldPlan(name, bn, "frozen", reason=why_not, act=act, rank=rank))
    return plans


def foldable_producer(model, graph: ModelGraph, name: str, bn: nn.Module, captured: dict):
    """(producer module name, None) when ``bn`` folds into it, else (None, reason)."""
    sites = graph.calls(name)
    if not sites:
        return None, "never called in the traced graph"
    if len(sites) > 1:
        return None, f"called {len(sites)} times"
    site = sites[0]
    prod = site.producer
    if prod is None or prod.op != "module" or not is_foldable_producer(prod.module):
        return None, f"input comes from {_label(prod)}, not a conv/linear"
    if not graph.feeds_only(prod, site):
        why = (
            "not adjacent in an nn.Sequential (graph approximate)"
            if graph.approximate
            else "its output has other users"
        )
        return None, f"{prod.name}: {why}"
    if out_channels(prod.module) != bn.num_features:
        return (
            None,
            f"{prod.name} has {out_channels(prod.module)} output channels, BN {bn.num_features}",
        )
    why = _producer_problem(graph, prod, captured)
    return (None, why) if why else (prod.name, None)


def bias_producers(model, graph: ModelGraph, name: str, bn: nn.Module,
                   captured: dict) -> list[tuple[str, slice]]:
    """The conv/linear layers whose bias ``bn`` cancels, each with the BN channels it gives:
    the layer ``bn`` folds into, or the pieces of a channel cat that fold. A per-channel
    constant there moves the batch mean by itself and is subtracted again."""
    producer, _ = foldable_producer(model, graph, name, bn, captured)
    if producer is not None:
        return [(producer, slice(None))]
    pieces, _ = _cat_pieces(model, graph, name, bn, captured)
    return [(p.into, slice(p.start, p.stop)) for p in pieces or () if p.into is not None]


def _producer_problem(graph: ModelGraph, prod, captured: dict) -> str | None:
    """Why the conv/linear at ``prod`` cannot take a fold of its outputs, or None."""
    if not graph.called_once(prod):
        return f"{prod.name} is called more than once"
    if isinstance(prod.module, nn.Linear) and prod.name in captured:
        out = captured[prod.name][1]
        if isinstance(out, torch.Tensor) and out.dim() != 2:
            return f"{prod.name} output is {out.dim()}D: BN channels are not its features"
    if not prod.module.weight.is_floating_point():
        return f"{prod.name} weight is not floating point"
    return None


def _label(site) -> str:
    """What a site is, for a reason: "the input", a module class, a function name."""
    if site is None or site.op == "input":
        return "the input"
    return type(site.module).__name__ if site.module is not None else site.label


def _seen_rank(seen) -> int | None:
    """The rank of the first input a captured module saw, if it was a tensor."""
    if seen is not None and isinstance(seen[0][0], torch.Tensor):
        return seen[0][0].dim()
    return None


def _captured_module(m: nn.Module) -> bool:
    return is_batchnorm(m) or is_foldable_producer(m)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    if isinstance(model, torch.jit.ScriptModule):
        raise expected(
            "a Python nn.Module to rewrite", "a TorchScript module, which cannot be rewritten"
        )


# --------------------------------------------------------------------------- through torch.cat

_CAT = {"cat", "concat", "concatenate"}


def _cat_pieces(model, graph: ModelGraph, name: str, bn: nn.Module, captured: dict):
    """(the BN's channels split by producer, None) when its input is a channel cat of which at
    least one piece folds, else (None, reason or None when the input is not a cat)."""
    sites = graph.calls(name)
    if len(sites) != 1 or graph.approximate:
        return None, None
    site = sites[0]
    cat = site.producer
    if cat is None or cat.op != "function" or cat.label not in _CAT:
        return None, None
    if not graph.feeds_only(cat, site):
        return None, "the cat's output has other users"
    rank = _input_rank(graph, site, bn, captured)
    parts = _cat_parts(graph, cat, rank)
    if isinstance(parts, str):
        return None, parts
    count = Counter(id(p) for p in parts)
    widths, reasons = [], {}
    for part in parts:
        width = _width(part, rank)
        widths.append(width)
        if width is None:
            continue
        if count[id(part)] > 1:
            reasons[id(part)] = "appears twice"
        elif not (part.op == "module" and is_foldable_producer(part.module)):
            reasons[id(part)] = "not a conv/linear"
        elif len(part.users) != 1:
            reasons[id(part)] = "output has other users"
        else:
            reasons[id(part)] = _producer_problem(graph, part, captured)
    unknown = [i for i, w in enumerate(widths) if w is None]
    if unknown and unknown != list(range(unknown[0], unknown[-1] + 1)):
        return None, "the widths of several cat pieces are not known"
    rest = bn.num_features - sum(w for w in widths if w is not None)
    if unknown:
        if rest < len(unknown):
            return None, f"the cat's pieces give more than the BN's {bn.num_features} channels"
    elif rest:
        return None, (f"the cat's pieces give {bn.num_features - rest} channels, BN "
                      f"{bn.num_features}")
    pieces, start = [], 0
    for i, part in enumerate(parts):
        if widths[i] is None:
            if i == unknown[0]:
                labels = ", ".join(dict.fromkeys(_piece_label(parts[j]) for j in unknown))
                pieces.append(_Piece(start, start + rest, None, labels))
                start += rest
            continue
        foldable = reasons[id(part)] is None
        pieces.append(_Piece(start, start + widths[i], part.name if foldable else None,
                             _piece_label(part)))
        start += widths[i]
    if not any(p.into for p in pieces):
        return None, "input comes from cat, and no piece is a conv/linear used only there"
    return pieces, None


def _piece_label(site) -> str:
    return site.name if site.op == "module" else _label(site)


def _cat_parts(graph: ModelGraph, cat, rank: int | None):
    """The sites a channel cat joins, nested channel cats (used only there) opened; a reason
    string when ``cat`` does not join along the channel axis."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return "input comes from a cat whose pieces are not a plain list"
    if not (dim == 1 or (rank is not None and dim == 1 - rank)):
        where = f"dim {dim}" if rank is not None or dim >= 0 else f"dim {dim} of unknown rank"
        return f"input comes from a cat along {where}, not the channel axis"
    parts = []
    for t in tensors:
        if t.op == "function" and t.label in _CAT and len(t.users) == 1:
            inner = _cat_parts(graph, t, rank)
            if not isinstance(inner, str):
                parts.extend(inner)
                continue
        parts.append(t)
    return parts


def _width(site, rank: int | None) -> int | None:
    """Channels a cat piece gives, where its module says (a Linear only on 2D data)."""
    if site.op != "module" or not is_foldable_producer(site.module):
        return None
    if isinstance(site.module, nn.Linear) and rank != 2:
        return None
    return out_channels(site.module)


def _input_rank(graph: ModelGraph, site, bn: nn.Module, captured: dict) -> int | None:
    """The rank of the BN's input: seen on example_input, a flatten's 2D output, or the BN's
    own class (BatchNorm2d: 4)."""
    seen = _seen_rank(captured.get(site.name))
    if seen is not None:
        return seen
    if _flatten_dim(site.producer) == 1:
        return 2
    key = rank_key(bn)
    return key[0] if isinstance(key, tuple) and len(key) == 1 else None


def _flatten_dim(site) -> int | None:
    """start_dim of a flatten to the end (nn.Flatten, torch.flatten, Tensor.flatten), else None."""
    if site is None:
        return None
    if site.op == "module":
        m = site.module
        if type(m) is nn.Flatten and m.end_dim == -1:
            return m.start_dim
        return None
    if site.op == "function" and site.label == "flatten":
        start = site.args[1] if len(site.args) > 1 else site.kwargs.get("start_dim", 0)
        end = site.args[2] if len(site.args) > 2 else site.kwargs.get("end_dim", -1)
        return start if end == -1 and isinstance(start, int) else None
    return None


# --------------------------------------------------------------------------- into the next layer

_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)


def _next_layer(model, graph: ModelGraph, name: str, bn: nn.Module, act, captured: dict):
    """(the plan folding ``bn`` into the layer after it, None), else (None, reason)."""
    if act is not None:
        return None, "an activation follows inside the BN"
    sites = graph.calls(name)
    if len(sites) != 1:
        return None, "not called once"
    site = sites[0]
    chain, repeat_from = [], None
    here = site
    while True:
        users = here.users
        if len(users) != 1 or not graph.feeds_only(here, users[0]):
            return None, f"output goes to {len(users)} users" if len(users) != 1 \
                else "output is not the next layer's input"
        nxt = users[0]
        if nxt.op == "module" and isinstance(nxt.module, _PASS_THROUGH):
            chain.append(nxt.module)
        elif _flatten_dim(nxt) == 1 and repeat_from is None:
            chain.append(nn.Flatten())
            repeat_from = len(chain)
        else:
            break
        here = nxt
    layer = nxt.module if nxt.op == "module" else None
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(
            layer, _ConvTransposeNd):
        return None, f"output goes to {_label(nxt)}, not a Linear/conv"
    if not graph.called_once(nxt):
        return None, f"{nxt.name} is called more than once"
    if not layer.weight.is_floating_point():
        return None, f"{nxt.name} weight is not floating point"
    c = bn.num_features
    if isinstance(layer, nn.Linear):
        if repeat_from is None:
            rank = _input_rank(graph, site, bn, captured)
            if rank != 2:
                why = ("its input is not known to be 2D (pass example_input)" if rank is None
                       else f"its input is {rank}D: BN channels are not the Linear's features")
                return None, f"{nxt.name} (Linear) follows, but {why}"
        if layer.in_features % c:
            return None, f"{nxt.name} reads {layer.in_features} features, not a multiple of {c}"
        repeat = layer.in_features // c
        if repeat_from is None and repeat != 1:
            return None, f"{nxt.name} reads {layer.in_features} features, BN gives {c}"
    else:
        if repeat_from is not None:
            return None, f"{nxt.name} reads a flattened input"
        if layer.in_channels != c:
            return None, f"{nxt.name} reads {layer.in_channels} channels, BN gives {c}"
        if layer.padding_mode == "zeros" and _pads(layer):
            return None, (f"{nxt.name} pads with zeros, which the fold would change at the "
                          "borders")
        repeat = 1
    kind = type(layer).__name__
    return FoldPlan(name, bn, "folded", nxt.name, f"BN → {kind}", direction="next",
                    chain=chain, repeat=repeat), None


def _pads(conv) -> bool:
    """Whether the conv adds any padding (zeros or not)."""
    if isinstance(conv.padding, str):  # "valid" or "same"
        return conv.padding == "same" and any(
            d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    return any(conv.padding)

