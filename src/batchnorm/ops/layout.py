"""Memory layouts the backends share: which dense layout a tensor has, and keeping it.

The kernels take two layouts: ``"ncs"``, contiguous ``(N, C, *)`` memory viewed as
``(N, C, S)``, and ``"mc"``, channels-last memory (``torch.channels_last`` /
``channels_last_3d``, ``(N, L, C)`` storage for 3D input, or any ``(N, C)``) viewed as ``(M, C)``.
Every output has the memory format of its input.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["layout", "dense", "same_format", "as_layout_of"]


def layout(t: Tensor) -> str | None:
    """"ncs" for (N, C, S) contiguous memory, "mc" for channels-last (M, C), None otherwise."""
    if t.is_contiguous():
        return "mc" if math.prod(t.shape[2:]) == 1 else "ncs"
    if t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return "mc"
    return None


def dense(x: Tensor) -> Tensor:
    """x itself if the kernels can view it, else a contiguous copy (ops called with odd strides)."""
    return x if layout(x) is not None else x.contiguous()


def as_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t (same shape as like) copied into like's strides if they differ (e.g. an expanded dy)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def same_format(y: Tensor, like: Tensor) -> Tensor:
    """y with the strides of ``like`` when ``like`` is dense (channels-last in, channels-last
    out)."""
    if y.stride() == like.stride() or not _is_dense(like):
        return y
    perm = sorted(range(like.dim()), key=lambda d: (-like.stride(d), -d))
    inverse = [perm.index(d) for d in range(like.dim())]
    return y.permute(perm).contiguous().permute(inverse)


def _is_dense(x: Tensor) -> bool:
    """True when x occupies exactly x.numel() elements of storage in some axis order."""
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -d))
    return x.permute(perm).is_contiguous()
