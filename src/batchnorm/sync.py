"""SyncBatchNorm over torch.distributed: batch statistics over the union of every rank's batch.

Works wherever ``torch.distributed`` works (gloo on CPU, NCCL on GPU); the transport is PyTorch's.
In training, with an initialised process group of more than one rank, each rank reduces its batch
to per-channel partials ``(count, mean, M2)`` with the reference's definitions (shifted two-pass,
float64), the ranks exchange them in ONE all-gather and merge them with Chan's formula, so every
rank normalises with the statistics of the whole batch::

    n    = sum_r n_r
    mean = sum_r n_r * mean_r / n
    M2   = sum_r M2_r + sum_r n_r * (mean_r - mean)^2          (Chan, Golub & LeVeque, k-way)
    var  = M2 / n  (normalises)            M2 / (n - 1)  (running_var)

The backward pass all-reduces ``(sum g, sum g * x_hat)`` in ONE collective and applies

    dx = gamma * invstd * (g - sum_g / n - x_hat * sum_gxhat / n)

with the global sums and n. ``dweight``/``dbias`` stay local: DistributedDataParallel averages
them like every other parameter gradient. Ranks may hold different batch sizes, including 0.

Fault handling. Every message carries a small header (layer key, call number, phase, channels)
that every rank checks: ranks that call sync layers a different number of times, or in a
different order, raise :class:`~batchnorm.BatchNormError` naming the layer instead of mixing
statistics of different layers. A rank that dies or never joins makes the collective fail after
the process group's timeout (``dist.init_process_group(..., timeout=datetime.timedelta(...))``;
gloo's default is 30 minutes); that failure is re-raised as a BatchNormError naming the layer.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BatchNormError, expected

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "local_moments", "merge_moments",
           "all_merge_moments"]

_FORWARD, _BACKWARD, _RECALIBRATE = 1.0, 2.0, 3.0
_PHASES = {_FORWARD: "forward", _BACKWARD: "backward", _RECALIBRATE: "recalibration"}
_HEADER = 4  # layer key, call number, phase, channels


# ---------------------------------------------------------------------------------------------
# The math: the reference's moments and merge, in torch float64


def local_moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Per-channel ``(count, mean, M2)`` of ``x`` (N, C, *) over every axis but 1, in float64.

    Same definition as :func:`batchnorm.reference.moments`: shift by one sample of each channel,
    then two passes (mean of the shifted values, sum of squared deviations). An empty batch gives
    count 0, mean 0, M2 0.
    """
    c = x.shape[1]
    flat = x.detach().transpose(0, 1).reshape(c, -1).to(torch.float64)  # (C, m)
    m = flat.shape[1]
    if m == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
        return 0.0, zeros, zeros.clone()
    shift = flat[:, :1]  # (C, 1): one sample per channel keeps the sums small
    d = flat - shift
    d_mean = d.mean(dim=1)
    m2 = (d - d_mean[:, None]).square_().sum(dim=1)
    return float(m), shift[:, 0] + d_mean, m2


def merge_moments(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Merge W partials ``count (W,)``, ``mean (W, C)``, ``m2 (W, C)`` into one (Chan, k-way).

    Equal to folding :func:`batchnorm.reference.merge` over the partials. Empty partials are
    neutral; all empty gives ``(0, zeros, zeros)``.
    """
    count = count.to(torch.float64)
    n = float(count.sum())
    if n == 0:
        return 0.0, torch.zeros_like(mean[0]), torch.zeros_like(m2[0])
    w = count[:, None]  # (W, 1)
    total_mean = (w * mean).sum(dim=0) / n
    # deviations from the merged mean, never E[x^2] - E[x]^2: no cancellation
    total_m2 = m2.sum(dim=0) + (w * (mean - total_mean).square()).sum(dim=0)
    return n, total_mean, total_m2


# ---------------------------------------------------------------------------------------------
# The collectives, with headers that catch ranks out of step


class _Link:
    """One sync layer's view of its process group: who it is, and how many calls it made."""

    def __init__(self, group, world: int, name: str, key: float):
        self.group = group
        self.world = world
        self.name = name
        self.key = key

    def _fail(self, phase: float, call: int, why: str) -> BatchNormError:
        return BatchNormError(
            f"{self.name}: expected every rank of the process group to make the same "
            f"SyncBatchNorm call ({_PHASES[phase]} call #{call} of this layer) (got {why})"
        )

    def _header(self, phase: float, call: int, channels: int, device) -> torch.Tensor:
        return torch.tensor([self.key, float(call), phase, float(channels)],
                            dtype=torch.float64, device=device)

    def gather(self, payload: torch.Tensor, phase: float, call: int, channels: int) -> torch.Tensor:
        """All-gather a float64 vector from every rank: (W, len) without the header, checked."""
        header = self._header(phase, call, channels, payload.device)
        sent = torch.cat([payload, header])
        # NaN marks what no rank wrote: a peer sending a shorter message leaves NaN headers
        received = torch.full((self.world * sent.numel(),), math.nan, dtype=torch.float64,
                              device=payload.device)
        try:
            _all_gather_single(received, sent, self.group)
        except RuntimeError as err:  # timeouts and dead peers (DistBackendError is one)
            raise self._fail(phase, call, f"a failed collective: {_first_line(err)}; a rank "
                             "died, stopped early or is stuck elsewhere; the process group's "
                             "timeout bounds the wait") from err
        rows = received.view(self.world, sent.numel())
        heads = rows[:, -_HEADER:]
        bad = ~(heads == header).all(dim=1)
        if bad.any():
            r = int(bad.nonzero()[0])
            raise self._fail(phase, call, f"rank {r} in {_describe(heads[r])}")
        return rows[:, :-_HEADER]

    def all_reduce(self, payload: torch.Tensor, phase: float, call: int, channels: int) -> torch.Tensor:
        """Sum a float64 vector over ranks, checked: the header and its square both sum to W times
        this rank's, which holds only if every rank sent the same header (sum of (h_r - h)^2 = 0)."""
        header = self._header(phase, call, channels, payload.device)
        sent = torch.cat([payload, header, header.square()])
        try:
            dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:
            raise self._fail(phase, call, f"a failed collective: {_first_line(err)}; a rank "
                             "died, stopped early or is stuck elsewhere; the process group's "
                             "timeout bounds the wait") from err
        got = sent[-2 * _HEADER:]
        want = torch.cat([header, header.square()]) * self.world
        if not torch.equal(got, want):
            raise self._fail(phase, call, "another rank in a different call: the summed "
                             "headers differ from this rank's")
        return sent[: -2 * _HEADER]


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp, group=group)
    else:  # torch < 2.10
        dist.all_gather_into_tensor(out, inp, group=group)


def _describe(head: torch.Tensor) -> str:
    key, call, phase, channels = head.tolist()
    if any(math.isnan(v) for v in (key, call, phase, channels)):
        return "a call of another size (a different layer or collective)"
    return (f"{_PHASES.get(phase, 'unknown')} call #{int(call)} of a layer with "
            f"{int(channels)} channels, key {int(key)}")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def _layer_key(name: str) -> float:
    return float(zlib.crc32(name.encode()) % (1 << 20))  # small: exact in float64, even squared


def _group_world(process_group) -> tuple[object, int]:
    """(group, world size) when a sync is possible, else (None, 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Autograd: normalise with global statistics; backward reduces (sum g, sum g*x_hat) globally


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, link, call):
        c = x.shape[1]
        count, mean, m2 = local_moments(x)
        payload = torch.cat([mean, m2, mean.new_tensor([count])])  # (2C + 1,)
        rows = link.gather(payload, _FORWARD, call, c)  # (W, 2C + 1)
        n, g_mean, g_m2 = merge_moments(rows[:, 2 * c], rows[:, :c], rows[:, c:2 * c])
        if n == 1:
            raise expected(f"{link.name}: more than 1 value per channel when training",
                           "1 value per channel over all ranks")
        var = g_m2 / n if n > 0 else torch.full_like(g_m2, math.nan)
        invstd = torch.rsqrt(var + eps)
        y = _normalize(x, g_mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, g_mean, invstd)
        ctx.n, ctx.link, ctx.call = n, link, call
        ctx.has_bias = bias is not None
        n_out = g_mean.new_tensor(n)
        ctx.mark_non_differentiable(g_mean, var, n_out)
        return y, g_mean, var, n_out

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gn):
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        view = (1, c) + (1,) * (x.dim() - 2)  # (1, C, 1, ...)
        gy = gy.contiguous()
        if x.numel() > 0:
            xmu = x - mean.to(x.dtype).view(view)
            sum_g = gy.sum(dim=dims, dtype=torch.float64)
            sum_gxhat = (gy * xmu).sum(dim=dims, dtype=torch.float64) * invstd
        else:
            sum_g = torch.zeros(c, dtype=torch.float64, device=x.device)
            sum_gxhat = torch.zeros_like(sum_g)
        # every rank joins, an empty one too, or its peers would wait forever
        total = ctx.link.all_reduce(torch.cat([sum_g, sum_gxhat]), _BACKWARD, ctx.call, c)
        dx = None
        if ctx.needs_input_grad[0]:
            if x.numel() > 0:
                gamma = torch.ones_like(invstd) if weight is None else weight.to(torch.float64)
                scale = (gamma * invstd).to(x.dtype).view(view)
                mean_g = (total[:c] / ctx.n).to(x.dtype).view(view)
                mean_gxhat = (total[c:] * invstd / ctx.n).to(x.dtype).view(view)
                # x_hat * mean(g x_hat) written as xmu * invstd * mean(g x_hat)
                dx = scale * (gy - mean_g - xmu * mean_gxhat)
            else:
                dx = torch.zeros_like(x)
        dweight = sum_gxhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_g.to(weight.dtype if weight is not None else x.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


def _normalize(x, mean, invstd, weight, bias) -> torch.Tensor:
    """y = (x - mean) * (gamma * invstd) + beta per channel, in x's dtype."""
    view = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # (1, C, 1, ...)
    scale = invstd if weight is None else invstd * weight.detach().to(torch.float64)
    y = (x - mean.to(x.dtype).view(view)) * scale.to(x.dtype).view(view)
    if bias is not None:
        y = y + bias.detach().to(x.dtype).view(view)
    return y


# ---------------------------------------------------------------------------------------------
# Modules


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over the union of every rank's batch.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with ``E[x]`` and the *biased* ``Var[x]`` taken per channel over the batches of all ranks of
    ``process_group`` together, in training with an initialised process group of more than one
    rank. ``running_var`` is updated with the *unbiased* variance over all ranks
    (``M2 / (n - 1)``, n the global count per channel), so every rank keeps identical running
    statistics. Without a process group, with one rank, or in eval it is plain batch norm.
    Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU (gloo) as well as GPU (NCCL), and ranks
    may hold batches of different sizes, including empty ones.

    Ranks must call every sync layer the same number of times in the same order (forward and
    backward); otherwise the layer raises :class:`~batchnorm.BatchNormError` naming itself, at
    once when the calls are visibly out of step, or after the process group's timeout when a
    rank stops or dies. Set that timeout with
    ``dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))``.

    Args:
        num_features: C from an expected input of size (N, C, *).
        eps: added to the variance for numerical stability. Default: 1e-5
        momentum: weight of the new batch in the running statistics, or None for a cumulative
            average. Default: 0.1
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True
        track_running_stats: keep running statistics (used in eval). Default: True
        process_group: the ranks to synchronise over; None means the whole world. Default: None

    Shape:
        - Input: (N, C, *), at least 2D. N may differ between ranks and be 0 on some.
        - Output: same shape as input.

    The state_dict is BatchNorm's: ``weight, bias, running_mean, running_var,
    num_batches_tracked``.

    >>> bn = SyncBatchNorm(8)
    >>> bn(torch.randn(4, 8, 5, 5)).shape     # no process group: plain batch norm
    torch.Size([4, 8, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.sync_name = None  # set by convert(); names the layer in errors
        self._sync_calls = 0

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise expected("at least 2D input", f"{x.dim()}D input")

    @property
    def _display_name(self) -> str:
        if self.sync_name:
            return f"{type(self).__name__} '{self.sync_name}'"
        return f"{type(self).__name__}({self.num_features})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, world = _group_world(self.process_group)
        if not (self.training and world > 1):
            return self._activate(super().forward(x))
        return self._activate(self._sync_forward(x, group, world))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _sync_forward(self, x: torch.Tensor, group, world: int) -> torch.Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise expected(f"{self.num_features} channels on dim 1", f"{x.shape[1]} channels")
        if not x.is_floating_point():
            raise expected("a floating-point input", f"dtype {x.dtype}")
        if self.weight is not None and x.dtype != self.weight.dtype:
            raise expected(f"input of dtype {self.weight.dtype}, the layer's", f"dtype {x.dtype}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise expected("eps > 0 in training", self.eps)
        name = self._display_name
        link = _Link(group, world, name, _layer_key(name))
        self._sync_calls += 1
        y, mean, var, n = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, link, self._sync_calls)
        if self.track_running_stats:
            self._update_running(mean, var, n_global=float(n))
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n_global: float) -> None:
        self.num_batches_tracked.add_(1)
        if n_global == 0:  # every rank empty: the statistics stay, as for an empty batch
            return
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n_global / (n_global - 1))
        rm, rv = self.running_mean, self.running_var
        rm.copy_(((1 - factor) * rm.to(torch.float64) + factor * mean).to(rm.dtype))
        rv.copy_(((1 - factor) * rv.to(torch.float64) + factor * unbiased).to(rv.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.sync_name is None else f", name={self.sync_name!r}")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm*d (PyTorch's or ours) in ``module`` by a SyncBatchNorm.

        Parameters, buffers, mode and ``requires_grad`` are kept; each layer is named after its
        path in the model so that errors say which layer failed.
        """
        return _convert_tree(module, cls, process_group, prefix="")


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm followed by an activation (placeholder until layers.BatchNormAct lands)."""


def _convert_tree(module: nn.Module, cls, process_group, prefix: str) -> nn.Module:
    raise NotImplementedError


def all_merge_moments(partials, process_group=None, name: str = "recalibrate"):
    raise NotImplementedError
