"""SyncBatchNorm over torch.distributed: batch statistics over the union of every rank's batch.

Works wherever ``torch.distributed`` works (gloo on CPU, NCCL on GPU); the transport is PyTorch's.
In training, with an initialised process group of more than one rank, each rank reduces its batch
to per-channel float64 partials ``(count, mean, M2)`` with the reference's definitions, the ranks
exchange them in ONE all-gather and merge them with Chan's formula, so every rank normalises with
the statistics of the whole batch. A rank whose batch the CPU kernels take (float32 / float64,
dense, or a CUDA batch the Triton kernels take) computes its partials, its normalisation and
its backward with the plain layer's kernels (:func:`batchnorm.ops.numba_cpu.moments_impl`, its
Triton twin, and the backward's two passes around the all-reduce); any other rank (CUDA without
triton, CPU half precision, odd strides) with PyTorch's ops on the
shifted batch (:func:`batchnorm.ops.torch_fallback.shifted_moments`). Both send the same
messages, so ranks may mix them::

    n    = sum_r n_r
    mean = sum_r n_r * mean_r / n
    M2   = sum_r M2_r + sum_r n_r * (mean_r - mean)^2          (Chan, Golub & LeVeque, k-way)
    var  = M2 / n  (normalises)            M2 / (n - 1)  (running_var)

The backward pass all-reduces ``(sum g, sum g * x_hat)`` in ONE collective and applies

    dx = gamma * invstd * (g - sum_g / n - x_hat * sum_gxhat / n)

with the global sums and n. ``dweight``/``dbias`` stay local: DistributedDataParallel averages
them like every other parameter gradient. Ranks may hold different batch sizes, including 0.

Ranks must call every sync layer the same number of times in the same order; the messages'
headers (:mod:`batchnorm.collectives`) turn any mismatch, a dead rank or a timeout into a
:class:`~batchnorm.BatchNormError` naming the layer. Never a silent wrong result.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import protocol
from .activations import REGISTRY
from .collectives import BACKWARD, FORWARD, Link, group_world, layer_key
from .errors import check_counted, check_eps, expected
from .layers import _OurBatchNorm, _OurBatchNormAct, _replaying, in_onnx_export
from .ops import check_mask, renorm_affine
from .ops.backends import kernels_for
from .ops.moments import Moments, merge
from .ops.torch_fallback import channel_view, masked_moments, shifted_moments, working

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "local_moments", "merge_moments", "name_layers",
           "local_only", "from_batchnorm"]


# ---------------------------------------------------------------------------------------------
# The math: the reference's moments and merge, in torch float64


def local_moments(x: torch.Tensor) -> Moments:
    """Per-channel ``(count, mean, M2)`` of ``x`` (N, C, *) over every axis but 1, in float64.

    The reference's definition (:func:`batchnorm.reference.moments`), as
    :func:`~batchnorm.ops.torch_fallback.shifted_moments` computes it for the fallback path too:
    shift by one sample of each channel, then two passes. An empty batch gives count 0, mean 0,
    M2 0.
    """
    n, _, _, mean, m2 = shifted_moments(working(x.detach()))
    return Moments(float(n), mean, m2)


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> Moments:
    """Merge W partials ``count (W,)``, ``mean (W, C)``, ``m2 (W, C)`` into one (Chan, k-way):
    :func:`batchnorm.ops.moments.merge`, the count as a Python float (the layer branches on
    it). Equal to folding :func:`batchnorm.reference.merge` over the partials. Empty partials
    are neutral; all empty gives ``(0, zeros, zeros)``.
    """
    n, total_mean, total_m2 = merge(count, mean, m2)
    return Moments(float(n), total_mean, total_m2)


def _gather_moments(link: Link, part: Moments, call: int) -> Moments:
    """Every rank's partial in one all-gather (``[mean, M2, count]`` rows of 2C + 1), merged."""
    count, mean, m2 = part
    c = mean.shape[0]
    payload = torch.cat([mean, m2, torch.as_tensor(count, dtype=torch.float64,
                                                   device=mean.device).reshape(1)])
    rows = link.gather(payload, FORWARD, call, c)  # (W, 2C + 1)
    return merge_moments(rows[:, 2 * c], rows[:, :c], rows[:, c:2 * c])


# ---------------------------------------------------------------------------------------------
# Autograd: normalise with global statistics; backward reduces (sum g, sum g*x_hat) globally


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalise with the statistics of all ranks; backward adds the statistics' gradient.

    On the kernels' path (see the module docstring) the plain layer's eval kernel normalises
    with the merged float64 statistics, and the backward is its two passes: this rank's sums,
    the all-reduce, dx from every rank's sums. Otherwise the element-wise work runs on the
    shifted batch ``d = x - shift`` (small values, so float32
    loses nothing at large offsets) with PyTorch's fused eval-mode kernels, the merged
    statistics being constants for them: forward ``F.batch_norm(d, mean - shift, var)``,
    backward ``native_batch_norm_backward`` (``gamma * invstd * g``, ``sum g * x_hat``, ``sum g``
    in one pass) plus the correction for the statistics,
    ``- gamma * invstd * (sum_g / n + x_hat * sum_gxhat / n)`` with global sums and n.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, link, call, mask=None, renorm=None):
        ctx.kernels = kernels = kernels_for(x, weight, bias)  # numba, Triton, or None
        shift = d = xw = None
        if mask is not None:  # statistics of the counted positions only
            moments = kernels.masked_moments_impl if kernels else masked_moments
            n_local, mean, m2 = moments(x.detach(), mask)
            if not ctx.kernels:
                xw = working(x.detach())
                shift = mean.to(xw.dtype)
                d = xw - shift.view(channel_view(xw))
        elif kernels:  # the plain layer's statistics kernel
            n_local, mean, m2 = kernels.moments_impl(x)
        else:
            xw = working(x.detach())
            n_local, shift, d, mean, m2 = shifted_moments(xw)
        n, g_mean, g_m2 = _gather_moments(link, Moments(float(n_local), mean, m2), call)
        if mask is not None:
            check_counted(int(n), f"{link.name}: the mask over all ranks")
        elif n == 1:
            raise expected(f"{link.name}: more than 1 value per channel when training",
                           "1 value per channel over all ranks")
        var = g_m2 / n if n > 0 else torch.full_like(g_m2, math.nan)
        ctx.n, ctx.eps, ctx.link, ctx.call = n, eps, link, call
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        # Batch Renorm: BN with weight * r and bias + weight * d (r, d from the global statistics)
        ctx.rd = None if renorm is None else renorm(g_mean, var)
        weight_eff, bias_eff = _effective(weight, bias, ctx.rd, x)
        n_out = g_mean.new_tensor(n)
        ctx.mark_non_differentiable(g_mean, var, n_out)
        if kernels:  # the plain layer's normalising kernel, with the global statistics
            y = kernels.eval_impl(x.detach(), weight_eff, bias_eff, g_mean, var, eps, "identity",
                                  0.01, 1.0)
            ctx.save_for_backward(x, weight_eff, bias_eff, g_mean, var, mask)
            return y, g_mean, var, n_out
        # the global mean in d's frame: small, so its rounding to d's dtype costs nothing
        mean_d = (g_mean - shift.to(torch.float64)).to(xw.dtype)
        var_w = var.to(xw.dtype)
        w = None if weight_eff is None else weight_eff.to(xw.dtype)
        b = None if bias_eff is None else bias_eff.to(xw.dtype)
        if x.numel() > 0:
            y = F.batch_norm(d, mean_d, var_w, w, b, training=False, eps=eps)
        else:
            y = torch.empty_like(xw)
        ctx.save_for_backward(d, weight_eff, mean_d, var_w, mask)
        return y.to(x.dtype), g_mean, var, n_out

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gn):
        if ctx.kernels:
            return _SyncBatchNormFunction._kernel_backward(ctx, gy)
        d, weight, mean_d, var_w, mask = ctx.saved_tensors
        c = d.shape[1]
        invstd = torch.rsqrt(var_w.to(torch.float64) + ctx.eps)
        gamma = torch.ones_like(invstd) if weight is None else weight.detach().to(torch.float64)
        if d.numel() > 0:
            g = working(gy).contiguous()
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
        total = ctx.link.all_reduce(torch.cat([sum_g, sum_gxhat]), BACKWARD, ctx.call, c)
        if ctx.needs_input_grad[0] and d.numel() > 0:
            view = channel_view(d)
            scale = gamma * invstd
            k1 = scale * invstd * total[c:] / ctx.n  # times (d - mean_d): x_hat * mean(g x_hat)
            k0 = scale * total[:c] / ctx.n - k1 * mean_d.to(torch.float64)  # and mean(g)
            correction = torch.addcmul(k0.to(d.dtype).view(view), d, k1.to(d.dtype).view(view))
            if mask is not None:  # only the counted positions move the statistics
                correction = correction * mask.unsqueeze(1).to(d.dtype)
            dx = dx - correction
        dx = dx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (dx, *_SyncBatchNormFunction._param_grads(ctx, weight, sum_g, sum_gxhat),
                None, None, None, None, None)

    @staticmethod
    def _param_grads(ctx, weight_eff, sum_g, sum_gxhat):
        """dweight, dbias from this rank's float64 sums: with Batch Renorm's r and d,
        ``dweight = r * sum(g x_hat) + d * sum(g)``."""
        dweight = dbias = None
        if weight_eff is not None and ctx.needs_input_grad[1]:
            if ctx.rd is not None:
                r, d = ctx.rd
                sum_gxhat = r * sum_gxhat + d * sum_g
            dweight = sum_gxhat.to(weight_eff.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_g.to(ctx.bias_dtype)
        return dweight, dbias

    @staticmethod
    def _kernel_backward(ctx, gy):
        """The plain layer's backward kernels around the one all-reduce: this rank's sums, then
        dx from every rank's."""
        x, weight, bias, mean, var, mask = ctx.saved_tensors
        c = x.shape[1]
        if x.numel() > 0:
            sum_g, sum_gxhat = ctx.kernels.backward_sums_impl(gy, x.detach(), weight, bias,
                                                              mean, var, ctx.eps)
        else:
            sum_g = torch.zeros(c, dtype=torch.float64, device=x.device)
            sum_gxhat = torch.zeros_like(sum_g)
        # every rank joins, an empty one too, or its peers would wait forever
        total = ctx.link.all_reduce(torch.cat([sum_g, sum_gxhat]), BACKWARD, ctx.call, c)
        dx = None
        if ctx.needs_input_grad[0]:
            if x.numel() == 0:
                dx = torch.zeros_like(x)
            else:
                dx = ctx.kernels.backward_dx_impl(gy, x.detach(), weight, bias, mean, var,
                                                  ctx.eps, total[:c].contiguous(),
                                                  total[c:].contiguous(), ctx.n, mask)
        return (dx, *_SyncBatchNormFunction._param_grads(ctx, weight, sum_g, sum_gxhat),
                None, None, None, None, None)


def _effective(weight, bias, rd, x):
    """Detached (weight, bias) the normalisation uses: as given, or Batch Renorm's
    ``weight * r`` and ``bias + weight * d``."""
    weight, bias = _detached(weight), _detached(bias)
    if rd is None:
        return weight, bias
    return renorm_affine(weight, bias, *rd, x.dtype)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# ---------------------------------------------------------------------------------------------
# Modules


class _SyncBase(_OurBatchNorm):
    """What SyncBatchNorm and SyncBatchNormAct share: the choice of path and the sync forward."""

    input_ranks = (2, 3, 4, 5)
    process_group = None
    sync_name: str | None = None  # the layer's path in its model (set by convert); names errors
    source_ranks: tuple[int, ...] | None = None  # ranks of the BN it replaced, for converting back
    _sync_calls = 0
    _local_only = False  # set by local_only() during recalibration

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``input`` per channel (then the activation, for SyncBatchNormAct); in
        training with ``track_running_stats``, update the running statistics and
        num_batches_tracked, identically on every rank.

        In training with a process group of more than one rank, the statistics are those of
        every rank's batch together (one all-gather forward, one all-reduce backward); otherwise,
        and always in evaluation, this is :meth:`batchnorm.BatchNorm2d.forward`.

        Args:
            input: ``(N, C, *)``, 2D to 5D, floating point, C = ``num_features``; N may differ
                between ranks and be 0 on some.
            mask: None, or a bool tensor of ``input``'s shape without C, True where a position
                counts: the statistics cover the counted positions of all ranks. Default: None

        Returns:
            A tensor of ``input``'s shape, dtype and memory format.

        Raises:
            BatchNormError: a bad input or option, one value per channel over all ranks, or
                ranks out of step (naming the layer), before any buffer changes.
        """
        if in_onnx_export():  # an ONNX file is one process: plain BN
            return self._onnx_forward(input, mask)
        group, world = group_world(self.process_group)
        if not (self.training and world > 1) or self._local_only:  # eval never syncs (PyTorch)
            return super().forward(input, mask)
        return self._sync_forward(input, group, world, mask)

    def _sync_forward(self, x: torch.Tensor, group, world: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        # the local checks; "more than one value per channel" is checked over all ranks, later
        update = self.track_running_stats and not _replaying()
        self._check_input(x, batch_stats=False, update=update)
        check_eps(self.eps, training=True)
        check_mask(mask, x)
        act, negative_slope, alpha, _ = self._act()
        self._sync_calls += 1
        link = Link(group, world, self._display_name, layer_key(self._display_name))
        if self.virtual_batch_size is not None:
            # ghost batches are cut from each rank's own batch and normalised locally; only the
            # running update needs every rank (see _update_from_moments)
            self._ghost_link = link
            try:
                return self._forward_pieces(x, mask, self._renorm_on(), True, update,
                                            (act, negative_slope, alpha))
            finally:
                self._ghost_link = None
        renorm = None
        if self._renorm_on():
            renorm = lambda mean, var: self._renorm_rd(mean, var, update)  # noqa: E731
        z, mean, var, n = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, link, self._sync_calls, mask, renorm)
        if update:
            self._update_running_stats(mean, var, int(n))  # n over all ranks: same on each
        return REGISTRY[act].apply(z, negative_slope, alpha)

    _ghost_link = None

    def _update_from_moments(self, count, mean, m2, dtype) -> None:
        """Ghost batches under sync: this rank's merged moments, merged with every rank's."""
        link = self._ghost_link
        if link is None:
            return super()._update_from_moments(count, mean, m2, dtype)
        n, g_mean, g_m2 = _gather_moments(link, Moments(count, mean, m2), self._sync_calls)
        self._update_running_stats(g_mean.to(dtype), (g_m2 / n).to(dtype), n)

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
        new = name_layers(protocol.swap(copy.deepcopy(module), converts, from_batchnorm))
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
        renorm, rmax, dmax, virtual_batch_size, eval_stats, eval_mix: the options of
            :class:`batchnorm.BatchNorm2d`, with its checks and defaults (keyword only); Batch
            Renorm's r and d come from the statistics of all ranks, ghost batches from each
            rank's own batch.

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
        **options,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, nonfinite=nonfinite, **options)
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
        act: one of :data:`batchnorm.activations.FUSED` ("identity", "relu", "leaky_relu",
            "elu", "silu", "relu6", "hardswish"). Default: "relu"
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
        **options,
    ) -> None:
        super().__init__(num_features, act, negative_slope, alpha, inplace, eps, momentum, affine,
                         track_running_stats, device, dtype, bias=bias, nonfinite=nonfinite,
                         **options)
        self.process_group = process_group


def converts(module: nn.Module) -> bool:
    """True for the BN that :func:`from_batchnorm` turns into a sync layer: PyTorch's
    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and ours (BatchNormAct too), exact classes."""
    return protocol.family_of(module) in ("torch", "ours", "ours_act")


def from_batchnorm(bn: nn.Module) -> nn.Module:
    """A SyncBatchNorm (SyncBatchNormAct for our BatchNormAct) holding ``bn``'s parameters and
    buffers (moved, not copied), remembering its input ranks for converting back."""
    if isinstance(bn, _OurBatchNormAct):
        new = SyncBatchNormAct(bn.num_features, **protocol.act_args(bn), **protocol.bn_args(bn),
                               nonfinite=bn.nonfinite, **protocol.options_of(bn))
    else:
        new = SyncBatchNorm(bn.num_features, **protocol.bn_args(bn),
                            nonfinite=getattr(bn, "nonfinite", "skip"),
                            **protocol.options_of(bn))
    key = protocol.rank_key(bn)
    new.source_ranks = None if key == "xd" else key
    protocol.move_state(bn, new)
    return new


def name_layers(model: nn.Module) -> nn.Module:
    """Name every sync layer of ``model`` after its path in it, for error messages; returns
    model."""
    for path, m in model.named_modules():
        if isinstance(m, _SyncBase):
            m.sync_name = path or type(m).__name__
    return model


# ---------------------------------------------------------------------------------------------
# Building sync layers from BN, and running them locally


@contextlib.contextmanager
def local_only(model: nn.Module):
    """Within the block, the sync layers of ``model`` normalise with their own rank's batch only.

    Distributed recalibration runs each rank's batches locally this way (ranks may hold
    different numbers of batches) and merges the statistics once at the end.
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
