"""``fuse_frozen``: Conv/Linear → frozen BN computed as one layer on the fly, for fine-tuning.

When BN is frozen (detection, segmentation, small-batch transfer learning: ``FrozenBatchNorm``
or BN in eval mode), it is a fixed per-channel affine ``y = s * z + t`` of the conv output z.
PyTorch still runs it as a pass of its own and keeps z for its backward. Folding it into the
conv on each forward, ``conv(x, W * s) + (b - mean) * s + beta``, computes the same output in
one layer, keeps no z, and lets the gradient reach W and b (and BN's gamma and beta, when they
train) through the scaling, exactly as in the unfused model. Inductor's
``efficient_conv_bn_eval`` does this inside ``torch.compile``; this works in eager PyTorch.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .errors import expected
from .folding import foldable_producer
from .frozen import scale_shift
from .graph import trace
from .protocol import activation_of, bn_kind, is_batchnorm

__all__ = ["fuse_frozen", "FusedFrozen", "FoldedAway"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FoldedAway(nn.Module):
    """Where a BN fused into the layer before it sat: it keeps the BN's parameters and buffers
    under their names (so the state_dict is the unfused model's) and applies only the BN's
    activation, if it had one; the layer before it does the normalisation."""

    def __init__(self, bn: nn.Module, act: nn.Module | None):
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps
        self.fixed = bn_kind(bn) == "frozen"  # FrozenBatchNorm: fixed in any mode
        self.source = type(bn).__name__
        for name in ("weight", "bias"):
            value = getattr(bn, name, None)
            if isinstance(value, nn.Parameter) or value is None:
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in getattr(bn, "_buffers", {}):
                self.register_buffer(name, bn._buffers[name])
        self.act = act
        self.training = bn.training

    def forward(self, x):
        return x if self.act is None else self.act(x)

    def extra_repr(self) -> str:
        return f"{self.source}({self.num_features}) folded into the layer before it"


class FusedFrozen(nn.Module):
    """A Conv1d/2d/3d or Linear with the frozen BN after it folded into its weights on each
    forward. Its parameters are the layer's own (same names, same objects); the BN's live on
    in the :class:`FoldedAway` that took the BN's place."""

    def __init__(self, layer: nn.Module, folded: FoldedAway):
        super().__init__()
        self.weight = layer.weight
        self.register_parameter("bias", layer.bias)
        # not submodules: their tensors are registered here and in ``folded`` already
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_bn", folded)

    def forward(self, x):
        bn = self._bn
        if bn.training and not bn.fixed:
            raise expected(
                f"the {bn.source} fused into this {type(self._layer).__name__} in eval mode "
                "(fuse_frozen is only valid with fixed statistics)",
                "train mode: call .eval() on it after model.train(), or fuse a FrozenBatchNorm "
                "(batchnorm.freeze) instead")
        scale, shift = scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if self.bias is not None:
            shift = shift + self.bias * scale
        weight = self.weight * scale.reshape(-1, *(1,) * (self.weight.dim() - 1))
        if isinstance(self._layer, nn.Linear):
            return torch.nn.functional.linear(x, weight, shift)
        return self._layer._conv_forward(x, weight, shift)

    def extra_repr(self) -> str:
        return f"{self._layer!r} with its BN folded in on each forward"


def fuse_frozen(model: nn.Module) -> nn.Module:
    r"""A copy of ``model`` with every Conv/Linear → frozen BN pair computed as one layer.

    A pair fuses when the BN is frozen (``FrozenBatchNorm*``, or a BN in eval mode with running
    statistics; its affine parameters may train) and its input is a Conv1d/2d/3d or Linear
    called once whose output goes to the BN alone (the graph from ``torch.fx``, as
    :func:`batchnorm.fold` reads it). Each forward of the fused layer computes

    .. math::
        s = \frac{\gamma}{\sqrt{\mathrm{running\_var} + \epsilon}}, \qquad
        y = \mathrm{conv}(x, W s) + (b - \mathrm{running\_mean})\, s + \beta

    in the layer's dtype, so autograd sends the gradient to W, b, and gamma / beta when they
    require grad, exactly as through the unfused pair; the conv output is no longer kept for
    the BN's backward. A BN+act module keeps its activation.

    The model's state_dict keys stay the unfused model's: checkpoints load both ways. A fused
    pair whose BN is a plain BN refuses to run in train mode (its statistics would be the
    batch's); FrozenBatchNorm pairs run in any mode.

    Args:
        model: any ``nn.Module``; not changed.

    Returns:
        the fused copy (the copy unchanged, with a warning, when no pair qualifies).

    >>> model = batchnorm.freeze(resnet)         # FrozenBatchNorm everywhere
    >>> model = batchnorm.fuse_frozen(model)     # conv + BN as one layer each
    """
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    fused = copy.deepcopy(model)
    graph = trace(fused)
    pairs = []
    for name, bn in fused.named_modules():
        if not is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
            continue
        if bn_kind(bn) != "frozen" and bn.training:
            continue  # batch statistics: not a fixed affine
        if getattr(bn, "eval_stats", "running") != "running":
            continue
        producer, _ = foldable_producer(fused, graph, name, bn, {})
        if producer is not None and isinstance(fused.get_submodule(producer), _LAYERS):
            pairs.append((producer, name))
    if not pairs:
        warnings.warn(f"fuse_frozen: {type(model).__name__} has no Conv/Linear → frozen BN pair "
                      "(BN in eval mode or FrozenBatchNorm, its input a conv/linear used only "
                      "there); returned unchanged", stacklevel=2)
        return fused
    for producer, name in pairs:
        bn = fused.get_submodule(name)
        act = activation_of(bn)
        folded = FoldedAway(bn, act)
        layer = fused.get_submodule(producer)
        fused.set_submodule(name, folded)
        fused.set_submodule(producer, FusedFrozen(layer, folded))
    return fused
