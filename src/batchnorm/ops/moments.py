"""Per-channel moments as torch tensors: the one type, and Chan's merge.

:class:`Moments` is ``(count, mean, m2)`` in that order everywhere (the reference's
:class:`batchnorm.reference.Moments`, as a named tuple): ``count`` values per channel, their
float64 ``mean`` and ``m2 = sum((x - mean)^2)``. ``count`` is a 0-d float64 tensor where a
compiled graph carries it, a Python number where a caller branches on it.

:func:`merge` is Chan's formula, k-way (Chan, Golub & LeVeque 1979): the statistics of ghost
batches, of a recalibration's batches and of SyncBatchNorm's ranks come from it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Moments", "empty", "merge", "merge_parts"]


class Moments(NamedTuple):
    """Per-channel partial statistics (see the module docstring)."""

    count: Tensor | float
    mean: Tensor
    m2: Tensor


def empty(like: Tensor) -> Moments:
    """The moments of no value for the channels of ``like`` (N, C, *): count 0, mean 0, M2 0."""
    zeros = like.new_zeros(like.shape[1], dtype=torch.float64)
    return Moments(0, zeros, zeros.clone())


def merge(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Merge W partials ``count (W,)``, ``mean (W, C)``, ``m2 (W, C)`` into one, in float64
    tensors (no Python number, so a compiled graph keeps it whole):

        n = sum_r n_r,  mean = sum_r n_r mean_r / n,  M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2

    Equal to folding :func:`batchnorm.reference.merge` over the partials; deviations are taken
    from the merged mean, never E[x^2] - E[x]^2. Empty partials are neutral; all empty gives
    ``(0, zeros, zeros)``."""
    count = count.to(torch.float64)
    n = count.sum()
    w = count[:, None]  # (W, 1)
    mean_all = (w * mean).sum(dim=0) / torch.where(n > 0, n, torch.ones_like(n))
    m2_all = m2.sum(dim=0) + (w * (mean - mean_all).square()).sum(dim=0)
    return Moments(n, mean_all, m2_all)


def merge_parts(parts: Sequence[Moments]) -> Moments:
    """The union of partials (tensor counts, 0-d), merged by :func:`merge`; one part as it is."""
    if len(parts) == 1:
        return Moments(*parts[0])
    counts, means, m2s = zip(*parts)
    return merge(torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counts]),
                 torch.stack(means), torch.stack(m2s))
