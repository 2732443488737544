"""What the model tools share when they run a model: example inputs, per-module capture, the
error when the model fails, the error measure, training flags put back afterwards, and the
guard against NaN/Inf batches (``nonfinite``)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import ops
from .errors import BatchNormError, expected

__all__ = ["as_args", "batch_arguments", "check_data_arguments", "capture", "failed_on",
           "max_error", "tensor_leaves", "training_flags_kept", "INPUT_KEYS", "NONFINITE",
           "NonFiniteBatch", "Skips", "nonfinite_guard"]

# the keys of a dict batch that hold the model's input
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")


def as_args(example_input) -> tuple | None:
    """``example_input`` (a tensor, or a tuple/list of tensors) as a tuple of positional
    arguments; None stays None."""
    if example_input is None:
        return None
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise expected(
        "example_input to be a tensor or a tuple of tensors", type(example_input).__name__
    )


def failed_on(args, exc: Exception, what: str = "example_input") -> BatchNormError:
    """The error a tool raises when the model fails on an input: "expected a model that runs on
    example_input of shape ... (got TypeError: ...)"; ``what`` names the input."""
    shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return expected(
        f"a model that runs on {what} of shape {shapes}", f"{type(exc).__name__}: {reason}"
    )


def capture(
    model: nn.Module,
    args: tuple,
    select: Callable[[nn.Module], bool],
    keep: Callable[[tuple, object], object] | None = None,
) -> tuple[dict[str, object], list]:
    """Run ``model(*args)`` once under no_grad and record, for every module ``select`` takes,
    ``keep(inputs, output)`` of its first call (default: detached copies of both).

    Returns ``(records by module name, the model output's leaves)``. A model that raises gives
    :func:`failed_on`'s error. Hooks are removed whatever happens.
    """
    keep = keep or _copies
    records: dict[str, object] = {}
    handles = []
    for name, m in model.named_modules():
        if select(m):

            def hook(mod, inputs, output, name=name):
                if name not in records:  # first call only
                    records[name] = keep(inputs, output)

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as exc:
        raise failed_on(args, exc) from exc
    finally:
        for h in handles:
            h.remove()
    return records, tree_leaves(out)


def _copies(inputs: tuple, output) -> tuple[tuple, object]:
    return (tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs),
            output.detach().clone())


def tensor_leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or any nesting of tuples, lists and dicts)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_error(got, want) -> tuple[float, float]:
    """(largest absolute difference, that divided by the largest absolute value of ``want``)
    over the paired tensors of two outputs, measured in float64."""
    got = tensor_leaves(got)
    want = tensor_leaves(want)
    err = scale = 0.0
    for g, w in zip(got, want):
        if g.numel():
            err = max(err, (g.double() - w.double()).abs().max().item())
            scale = max(scale, w.double().abs().max().item())
    return err, (err / scale if scale > 0 else err)


@contextlib.contextmanager
def training_flags_kept(model: nn.Module):
    """Within the block the model's modules may change mode; every training flag is put back
    as it was afterwards, whatever happens."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def batch_arguments(batch, input_fn, device) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a model on one batch of a data loader, on ``device``: the batch
    itself (a tensor), its first element (tuple/list), its input key (dict: one of
    ``INPUT_KEYS``), or what ``input_fn(batch)`` returns (a tuple: positional arguments, a dict:
    keyword arguments)."""
    if input_fn is not None:
        x = input_fn(batch)
        if isinstance(x, dict):
            return (), {k: _to(v, device) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return tuple(_to(v, device) for v in x), {}
        return (_to(x, device),), {}
    if isinstance(batch, torch.Tensor):
        return (_to(batch, device),), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (_to(batch[0], device),), {}
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if key in batch:
                return (_to(batch[key], device),), {}
        raise expected(f"a dict batch with one of the keys {INPUT_KEYS}, or an input_fn",
                       f"keys {sorted(map(str, batch))}")
    raise expected("batches that are tensors, tuples, lists or dicts (or an input_fn)",
                   type(batch).__name__)


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def check_data_arguments(model, data, batches, input_fn) -> None:
    """The arguments every tool that walks a model over data takes (recalibrate, diagnose,
    adapt): an ``nn.Module``, an iterable of batches, ``batches`` None or a positive int, and an
    optional callable ``input_fn``."""
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise expected("batches to be None or a positive integer", repr(batches))
    if input_fn is not None and not callable(input_fn):
        raise expected("input_fn to be callable", type(input_fn).__name__)
    if not hasattr(data, "__iter__"):
        raise expected("data to be an iterable of batches", type(data).__name__)


# ------------------------------------------------------------------------------------------------
# NaN/Inf batches

# what the tools do with a batch whose statistics are not finite at some BN layer (the layers'
# own rule: nonfinite="skip" there leaves the running statistics of such a batch untouched)
NONFINITE = ("raise", "skip")


class NonFiniteBatch(BatchNormError):
    """nonfinite="raise": a BN layer's input held NaN/Inf on a batch. ``reason`` is the message
    without the API's next step (the CLI gives its own)."""

    def __init__(self, layer: str, batch: int, bad: int, channels: int):
        self.layer, self.batch = layer, batch
        self.reason = (f"expected finite values in the input of every BN layer (got NaN/Inf "
                       f"in the input of {layer!r} on batch {batch} of data, in {bad} of "
                       f"{channels} channels)")
        super().__init__(self.reason[:-1] + '; nonfinite="skip" leaves such batches out)')


class Skips:
    """The batches (1-based) left out per layer under nonfinite="skip"; under "raise" the first
    one raises :class:`NonFiniteBatch`. ``batch`` is the batch being run, set by the tool."""

    def __init__(self, nonfinite: str):
        if nonfinite not in NONFINITE:
            raise expected(f"nonfinite in {NONFINITE}", repr(nonfinite))
        self.nonfinite = nonfinite
        self.batch = 0
        self.batches: dict[str, list[int]] = {}
        self.kept: dict[str, int] = {}  # calls with finite statistics, per layer

    def __call__(self, layer: str, bad: int, channels: int) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteBatch(layer, self.batch, bad, channels)
        seen = self.batches.setdefault(layer, [])
        if self.batch not in seen:  # a layer called twice per batch counts the batch once
            seen.append(self.batch)

    def of(self, batch: int) -> list[str]:
        """The layers that left out ``batch``."""
        return [name for name, batches in self.batches.items() if batch in batches]

    def none_left(self, layer: str) -> BatchNormError:
        """The error for a layer that left out every batch it saw."""
        total = len(self.batches[layer])
        return expected(f"at least one batch with finite values in the input of {layer!r}",
                        f"NaN/Inf in all {total} batches it saw; nonfinite='skip' left them "
                        "all out, so it has no statistics")

    def summary(self) -> str:
        """'first': batch 2; 'block.second': batches 2, 3"""
        return "; ".join(f"{name!r}: batch{'es' if len(b) > 1 else ''} "
                         + ", ".join(map(str, b)) for name, b in self.batches.items())

    def warn(self) -> None:
        """One RuntimeWarning naming what was left out (for the calls that return no report)."""
        if self.batches:
            warnings.warn("batchnorm: left out batches with NaN/Inf in a BN layer's input "
                          f"(nonfinite='skip'): {self.summary()}", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def nonfinite_guard(layers: dict[str, nn.Module], skips: Skips,
                    collect: dict[str, list] | None = None):
    """Within the block every BN of ``layers`` (name -> module) checks each input it gets: a
    batch whose float64 statistics (over the positions its ``mask`` counts) are not finite goes
    to ``skips`` (which raises or records it) and the layer's buffers are put back after that
    call, so it changes nothing; the others' float64 ``(count, mean, M2)`` are appended to
    ``collect[name]`` when given. Our layers' own ``nonfinite`` is set to "update" inside (the
    guard decides; no layer raises or warns) and restored after. The tool sets
    ``skips.batch`` before each batch."""
    handles, own = [], []
    pending: dict[int, dict] = {}
    for name, m in layers.items():
        into = None if collect is None else collect[name]

        def pre(mod, args, kwargs, name=name, into=into):
            x = args[0] if args else kwargs.get("input")
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            count, mean, m2 = ops.moments(x, mask)
            finite = torch.isfinite(mean) & torch.isfinite(m2)
            if bool(finite.all()):
                skips.kept[name] = skips.kept.get(name, 0) + 1
                if into is not None:
                    into.append((count, mean, m2))
                return
            skips(name, int((~finite).sum()), int(finite.numel()))
            pending[id(mod)] = {k: v.clone() for k, v in mod._buffers.items() if v is not None}

        def post(mod, args, output):
            saved = pending.pop(id(mod), None)
            if saved is not None:
                with torch.no_grad():
                    for k, v in saved.items():
                        mod._buffers[k].copy_(v)

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
        if isinstance(getattr(m, "nonfinite", None), str):
            own.append((m, m.nonfinite))
            m.nonfinite = "update"
    try:
        yield skips
    finally:
        for h in handles:
            h.remove()
        for m, value in own:
            m.nonfinite = value
