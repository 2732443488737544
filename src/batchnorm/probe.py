"""What the model tools share when they run a model: example inputs, per-module capture, the
error when the model fails, the error measure, and training flags put back afterwards."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import BatchNormError, expected

__all__ = ["as_args", "batch_arguments", "check_data_arguments", "capture", "failed_on",
           "max_error", "tensor_leaves", "training_flags_kept", "INPUT_KEYS"]

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
