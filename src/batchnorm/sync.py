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
One case stays gloo's: a peer whose message is *longer* than this rank's (a layer with more
channels) makes gloo abort this process ("Received data size doesn't match expected size");
the peer, which sees a short message or the closed connection, raises the BatchNormError.
Never a silent wrong result.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import BatchNormError, check_eps, expected
from .layers import _OurBatchNorm, _OurBatchNormAct

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "local_moments", "merge_moments", "name_layers",
           "local_only", "merge_running_stats"]

_FORWARD, _BACKWARD, _RECALIBRATE = 1.0, 2.0, 3.0
_PHASES = {_FORWARD: "forward", _BACKWARD: "backward", _RECALIBRATE: "recalibration"}
_HEADER = 4  # layer key, call number, phase, channels


# ---------------------------------------------------------------------------------------------
# The math: the reference's moments and merge, in torch float64


def local_moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Per-channel ``(count, mean, M2)`` of ``x`` (N, C, *) over every axis but 1, in float64.

    The reference's definition (:func:`batchnorm.reference.moments`): shift by one sample of each
    channel, then two passes, the mean of the shifted values and the sum of squared deviations
    from it. Sums accumulate in float64 while the element-wise work stays in the input's dtype
    (no float64 copy of the batch); the float32 rounding of the pass-two centre is corrected
    exactly (``sum (d - a)^2 = M2 + n (mean_d - a)^2``). An empty batch gives count 0, mean 0,
    M2 0.
    """
    n, _, _, mean, m2 = _local_partial(_working(x.detach()))
    return float(n), mean, m2


def _local_partial(x: torch.Tensor):
    """(n, shift, d, mean, M2): local_moments plus the shifted batch d that forward normalises."""
    n, shift, d = _shifted(x)
    d_mean, m2 = _shifted_moments(n, d)
    return n, shift, d, shift.to(torch.float64) + d_mean, m2


def _shifted(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, shift, d = x - shift): shift is one sample of each channel, so d is small and centred
    near 0 however large the offset of x; the normalisation works on d too."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    if n == 0:
        return 0, torch.zeros(c, dtype=x.dtype, device=x.device), x
    shift = x[0].reshape(c, -1)[:, 0]  # (C,)
    return n, shift, x - shift.view(_view(x))


def _shifted_moments(n: int, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of d, M2 of d) per channel in float64: two passes, d left unchanged."""
    c = d.shape[1]
    if n == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=d.device)
        return zeros, zeros.clone()
    dims = _reduce_dims(d)
    d_mean = d.sum(dim=dims, dtype=torch.float64) / n
    centre = d_mean.to(d.dtype)
    e = (d - centre.view(_view(d))).square_()
    m2 = e.sum(dim=dims, dtype=torch.float64) - n * (d_mean - centre.to(torch.float64)).square()
    return d_mean, m2.clamp_(min=0.0)


def _working(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 are worked on in float32 (as F.batch_norm accumulates them)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _view(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)  # broadcasts a (C,) vector over (N, C, *)


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
        # gloo moves CPU tensors; with CUDA tensors on gloo the small messages go through the host
        self.host = dist.get_backend(group) == "gloo"

    def _device(self, payload: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.host else payload.device

    def _failed(self, phase: float, call: int, err: RuntimeError) -> BatchNormError:
        return self._fail(phase, call, f"a failed collective: {_first_line(err)}; a rank died, "
                          "stopped early or waits elsewhere; the process group's timeout bounds "
                          "the wait: dist.init_process_group(..., timeout=timedelta(seconds=...))")

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
        dev, home = self._device(payload), payload.device
        header = self._header(phase, call, channels, dev)
        sent = torch.cat([payload.to(dev), header])
        # NaN marks what no rank wrote: a peer sending a shorter message leaves NaN headers
        received = torch.full((self.world * sent.numel(),), math.nan, dtype=torch.float64,
                              device=dev)
        try:
            _all_gather_single(received, sent, self.group)
        except RuntimeError as err:  # timeouts and dead peers (DistBackendError is one)
            raise self._failed(phase, call, err) from err
        rows = received.view(self.world, sent.numel())
        heads = rows[:, -_HEADER:]
        bad = ~(heads == header).all(dim=1)
        if bad.any():
            r = int(bad.nonzero()[0])
            raise self._fail(phase, call, f"rank {r} in {_describe(heads[r])}")
        return rows[:, :-_HEADER].to(home)

    def all_reduce(self, payload: torch.Tensor, phase: float, call: int, channels: int) -> torch.Tensor:
        """Sum a float64 vector over ranks, checked: the header and its square both sum to W times
        this rank's, which holds only if every rank sent the same header (sum of (h_r - h)^2 = 0)."""
        dev, home = self._device(payload), payload.device
        header = self._header(phase, call, channels, dev)
        sent = torch.cat([payload.to(dev), header, header.square()])
        try:
            dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:
            raise self._failed(phase, call, err) from err
        got = sent[-2 * _HEADER:]
        want = torch.cat([header, header.square()]) * self.world
        if not torch.equal(got, want):
            raise self._fail(phase, call, "another rank in a different call: the summed "
                             "headers differ from this rank's")
        return sent[: -2 * _HEADER].to(home)


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp, group=group)
    else:  # torch < 2.10
        dist.all_gather_into_tensor(out, inp, group=group)


def _describe(head: torch.Tensor) -> str:
    key, call, phase, channels = head.tolist()
    plausible = phase in _PHASES and all(
        math.isfinite(v) and v == int(v) and v >= 0 for v in (key, call, channels)) and channels > 0
    if not plausible:  # a message of another length landed here: the header is not a header
        return "a call of another size (a layer with other channels, or another collective)"
    return (f"{_PHASES[phase]} call #{int(call)} of a layer with {int(channels)} channels "
            f"(layer key {int(key)})")


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
    """Normalise with the statistics of all ranks; backward adds the statistics' gradient.

    The element-wise work runs on the shifted batch ``d = x - shift`` (small values, so float32
    loses nothing at large offsets) with PyTorch's fused eval-mode kernels, the merged
    statistics being constants for them: forward ``F.batch_norm(d, mean - shift, var)``,
    backward ``native_batch_norm_backward`` (``gamma * invstd * g``, ``sum g * x_hat``, ``sum g``
    in one pass) plus the correction for the statistics,
    ``- gamma * invstd * (sum_g / n + x_hat * sum_gxhat / n)`` with global sums and n.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, link, call):
        c = x.shape[1]
        xw = _working(x.detach())
        n_local, shift, d, mean, m2 = _local_partial(xw)
        payload = torch.cat([mean, m2, mean.new_tensor([float(n_local)])])  # (2C + 1,)
        rows = link.gather(payload, _FORWARD, call, c)  # (W, 2C + 1)
        n, g_mean, g_m2 = merge_moments(rows[:, 2 * c], rows[:, :c], rows[:, c:2 * c])
        if n == 1:
            raise expected(f"{link.name}: more than 1 value per channel when training",
                           "1 value per channel over all ranks")
        var = g_m2 / n if n > 0 else torch.full_like(g_m2, math.nan)
        # the global mean in d's frame: small, so its rounding to d's dtype costs nothing
        mean_d = (g_mean - shift.to(torch.float64)).to(xw.dtype)
        var_w = var.to(xw.dtype)
        w = None if weight is None else weight.detach().to(xw.dtype)
        b = None if bias is None else bias.detach().to(xw.dtype)
        if n_local > 0:
            y = F.batch_norm(d, mean_d, var_w, w, b, training=False, eps=eps)
        else:
            y = torch.empty_like(xw)
        ctx.save_for_backward(d, weight, mean_d, var_w)
        ctx.n, ctx.eps, ctx.link, ctx.call = n, eps, link, call
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        n_out = g_mean.new_tensor(n)
        ctx.mark_non_differentiable(g_mean, var, n_out)
        return y.to(x.dtype), g_mean, var, n_out

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gn):
        d, weight, mean_d, var_w = ctx.saved_tensors
        c = d.shape[1]
        invstd = torch.rsqrt(var_w.to(torch.float64) + ctx.eps)
        gamma = torch.ones_like(invstd) if weight is None else weight.detach().to(torch.float64)
        if d.numel() > 0:
            g = _working(gy).contiguous()
            # eval-mode backward on d: statistics as constants; one fused pass
            dx, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                g, d, gamma.to(d.dtype), mean_d, var_w, None, None, False, ctx.eps,
                [True, True, True])
            sum_g, sum_gxhat = sum_g.to(torch.float64), sum_gxhat.to(torch.float64)
        else:
            dx = torch.zeros_like(d)
            sum_g = torch.zeros(c, dtype=torch.float64, device=d.device)
            sum_gxhat = torch.zeros_like(sum_g)
        # every rank joins, an empty one too, or its peers would wait forever
        total = ctx.link.all_reduce(torch.cat([sum_g, sum_gxhat]), _BACKWARD, ctx.call, c)
        if ctx.needs_input_grad[0] and d.numel() > 0:
            view = _view(d)
            scale = gamma * invstd
            k1 = scale * invstd * total[c:] / ctx.n  # times (d - mean_d): x_hat * mean(g x_hat)
            k0 = scale * total[:c] / ctx.n - k1 * mean_d.to(torch.float64)  # and mean(g)
            dx = torch.addcmul(dx, d, k1.to(d.dtype).view(view), value=-1.0)
            dx = dx.sub_(k0.to(d.dtype).view(view))
        dx = dx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dweight = sum_gxhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_g.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] \
            else None
        return dx, dweight, dbias, None, None, None


# ---------------------------------------------------------------------------------------------
# Modules


class _SyncBase(_OurBatchNorm):
    """What SyncBatchNorm and SyncBatchNormAct share: the choice of path and the sync forward."""

    _ranks = (2, 3, 4, 5)
    process_group = None
    sync_name: str | None = None  # the layer's path in its model (set by convert); names errors
    source_ranks: tuple[int, ...] | None = None  # ranks of the BN it replaced, for converting back
    _sync_calls = 0
    _local_only = False  # set by local_only() during recalibration

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group, world = _group_world(self.process_group)
        if not (self.training and world > 1) or self._local_only:  # eval never syncs (PyTorch)
            return super().forward(input)
        return self._sync_forward(input, group, world)

    def _sync_forward(self, x: torch.Tensor, group, world: int) -> torch.Tensor:
        # the local checks; "more than one value per channel" is checked over all ranks, later
        self._check_input(x, batch_stats=False, update=self.track_running_stats)
        check_eps(self.eps, training=True)
        act, negative_slope, alpha, _ = self._act()
        self._sync_calls += 1
        link = _Link(group, world, self._display_name, _layer_key(self._display_name))
        z, mean, var, n = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, link, self._sync_calls)
        if self.track_running_stats:
            self._update_running_stats(mean, var, int(n))  # n over all ranks: same on each
        return ops._activate(z, act, negative_slope, alpha)

    @property
    def _display_name(self) -> str:
        if self.sync_name:
            return f"{type(self).__name__} '{self.sync_name}'"
        return f"{type(self).__name__}({self.num_features})"

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """A copy of ``module`` with every BatchNorm*d (PyTorch's or ours) as SyncBatchNorm(Act).

        ``batchnorm.convert(module, to="sync")`` with a process group set on every sync layer.
        Unlike PyTorch's method of the same name, the input module is left untouched.
        """
        from .conversion import convert  # conversion imports this module

        new = convert(module, to="sync")
        for m in new.modules():
            if isinstance(m, _SyncBase):
                m.process_group = process_group
        return new

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.sync_name is None else f"{text}, name={self.sync_name!r}"


class SyncBatchNorm(_SyncBase):
    r"""Batch normalization with statistics over the union of every rank's batch.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training with an initialised ``torch.distributed`` process group of more than one rank,
    ``E[x]`` and the *biased* ``Var[x]`` are per channel over the batches of all ranks of
    ``process_group`` together, exactly as one process would compute them on the concatenated
    batch. ``running_var`` is updated with the *unbiased* variance ``M2 / (n - 1)``, n the
    number of values per channel over all ranks, so every rank keeps identical running
    statistics. Without a process group, with one rank, or in eval it is
    :class:`batchnorm.BatchNorm2d` (any rank 2..5). Unlike ``torch.nn.SyncBatchNorm`` it runs on
    CPU (gloo) as well as GPU (NCCL), and ranks may hold different batch sizes, including 0.

    Per step each rank sends one all-gather of ``2C + 5`` float64 values forward (mean, M2, count
    and a check header) and one all-reduce of ``2C + 8`` backward. ``weight``/``bias``
    gradients stay local; ``DistributedDataParallel`` averages them.

    Ranks must call every sync layer the same number of times in the same order. If they do
    not, the layer raises :class:`~batchnorm.BatchNormError` naming itself: at once when the
    calls are out of step, or when the process group's timeout expires if a rank stopped or
    died. Set that timeout with
    ``dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))`` (gloo's default
    is 30 minutes).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability. Default: 1e-5
        momentum: factor of the running-statistics update, or None for a cumulative average.
            Default: 0.1
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: True
        track_running_stats: keep running statistics and use them in eval. Default: True
        process_group: the ranks to synchronise over; None means the default (world) group.
            Default: None
        device, dtype: of the parameters and buffers. Default: None
        bias: with ``affine``, whether to learn beta too (keyword only). Default: True
        nonfinite: what NaN/Inf batch statistics do to the running ones, as in
            :class:`batchnorm.BatchNorm2d` (keyword only). Default: "skip"

    Shape:
        - Input: :math:`(N, C, *)`, 2D to 5D; N may differ between ranks and be 0 on some.
        - Output: same as input

    The state_dict is BatchNorm's (``weight, bias, running_mean, running_var,
    num_batches_tracked``); ``batchnorm.convert(model, to="sync")`` converts a model and
    ``to="batchnorm"`` / ``to="torch"`` converts it back.

    Examples::

        >>> # torchrun --nproc_per_node=2 train.py, with in train.py:
        >>> dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        >>> model = batchnorm.convert(model, to="sync")
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, nonfinite=nonfinite)
        self.process_group = process_group


class SyncBatchNormAct(_OurBatchNormAct, _SyncBase):
    r"""SyncBatchNorm followed by an activation: ``act(SyncBatchNorm(x))``.

    The statistics, gradients, running buffers and faults are :class:`SyncBatchNorm`'s; the
    activation is :class:`batchnorm.BatchNormAct2d`'s (same arguments, same state_dict, so a
    checkpoint of BN + activation loads). Without a process group, with one rank, or in eval it
    runs BatchNormAct's fused kernel. In a synchronised step the activation is applied after
    the normalisation (not fused), and ``inplace=True`` saves no memory.

    Args:
        num_features: C, the number of channels.
        act: "relu", "leaky_relu", "elu", "silu" or "identity". Default: "relu"
        negative_slope: slope of leaky_relu for negative inputs. Default: 0.01
        alpha: the ELU scale. Default: 1.0
        inplace: as in BatchNormAct2d (memory saving only when not synchronising).
            Default: False
        eps, momentum, affine, track_running_stats, process_group, device, dtype, bias,
            nonfinite: as in :class:`SyncBatchNorm`.

    Shape:
        - Input: :math:`(N, C, *)`, 2D to 5D
        - Output: same as input

    Examples::

        >>> m = batchnorm.SyncBatchNormAct(16, act="leaky_relu", negative_slope=0.1)
        >>> y = m(torch.randn(8, 16, 5, 5))
    """

    def __init__(
        self,
        num_features: int,
        act: str = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        inplace: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(num_features, act, negative_slope, alpha, inplace, eps, momentum, affine,
                         track_running_stats, device, dtype, bias=bias, nonfinite=nonfinite)
        self.process_group = process_group


def name_layers(model: nn.Module) -> nn.Module:
    """Name every sync layer of ``model`` after its path in it, for error messages; returns model."""
    for path, m in model.named_modules():
        if isinstance(m, _SyncBase):
            m.sync_name = path or type(m).__name__
    return model


# ---------------------------------------------------------------------------------------------
# Distributed recalibration: what batchnorm.recalibrate calls with a process group


@contextlib.contextmanager
def local_only(model: nn.Module):
    """Within the block, the sync layers of ``model`` normalise with their own rank's batch only.

    Recalibration runs each rank's batches locally (ranks may hold different numbers of
    batches) and merges the statistics once at the end with :func:`merge_running_stats`.
    """
    layers = [m for m in model.modules() if isinstance(m, _SyncBase)]
    before = [m._local_only for m in layers]
    try:
        for m in layers:
            m._local_only = True
        yield
    finally:
        for m, flag in zip(layers, before):
            m._local_only = flag


@torch.no_grad()
def merge_running_stats(layers: list[nn.Module], process_group) -> None:
    """Average each layer's running statistics over ranks, weighted by ``num_batches_tracked``.

    After a recalibration pass with ``momentum=None``, rank r's ``running_mean`` is the average of
    its B_r per-batch means (likewise ``running_var``). The average over every rank's batches is

        running = sum_r B_r * running_r / sum_r B_r,      num_batches_tracked = sum_r B_r

    which is what one process recalibrating on all the batches computes. All layers travel in
    ONE all-reduce, with a check header, so every rank ends with identical statistics. Layers
    that no rank saw a batch for keep their values. Raises BatchNormError when the ranks hold
    different layers, or when no rank saw any batch.
    """
    group, world = _group_world(process_group)
    if world == 1:
        return
    if not layers:
        dev = torch.device("cpu")
    else:
        dev = layers[0].running_mean.device
    parts = []
    for m in layers:
        b = _batches_seen(m)
        parts += [m.running_mean.to(torch.float64) * b, m.running_var.to(torch.float64) * b,
                  torch.tensor([b], dtype=torch.float64, device=dev)]
    payload = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=dev)
    link = _Link(group, world, "recalibrate", _layer_key("recalibrate"))
    channels = sum(m.num_features for m in layers)
    total = link.all_reduce(payload, _RECALIBRATE, len(layers), channels)
    i, seen = 0, 0.0
    for m in layers:
        c = m.num_features
        mean_sum, var_sum, b = total[i:i + c], total[i + c:i + 2 * c], float(total[i + 2 * c])
        i += 2 * c + 1
        seen = max(seen, b)
        if b > 0:
            m.running_mean.copy_(mean_sum / b)
            m.running_var.copy_(var_sum / b)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(int(b))
    if layers and seen == 0:
        raise expected("at least one batch on some rank", "no batches on any rank")


def _batches_seen(m: nn.Module) -> float:
    nbt = getattr(m, "num_batches_tracked", None)
    return 0.0 if nbt is None else float(nbt)
