"""The fold as pure tensor math: BN in eval folded into the weight and bias of a layer.

The analogue of ``torch.nn.utils.fusion.fuse_conv_bn_weights``: tensors in, new tensors out, no
modules. BN in eval is ``y = x * s + t`` per channel (:func:`batchnorm.frozen.scale_shift`);
:func:`fold_weights` folds it into the layer before it (per output channel),
:func:`fold_weights_forward` into the layer after it (per input channel).
"""

from __future__ import annotations

import torch

from ..errors import expected
from ..frozen import scale_shift


def _exact_scale_shift(running_mean, running_var, eps, gamma, beta):
    """scale_shift in float64 on detached tensors: the fold's factor and bias, rounded once."""
    f64 = [None if t is None else t.detach().to(torch.float64)
           for t in (running_mean, running_var, gamma, beta)]
    return scale_shift(f64[0], f64[1], float(eps), f64[2], f64[3])


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an eval-mode BN into the weight and bias of the conv or linear layer before it.

    .. math::
        W' = W \cdot \frac{\gamma}{\sqrt{\mathrm{Var} + \epsilon}}, \qquad
        b' = (b - \mathrm{E}) \cdot \frac{\gamma}{\sqrt{\mathrm{Var} + \epsilon}} + \beta

    per output channel. The per-channel factor and the bias are computed in float64; the
    weight is multiplied by the factor once, in its own dtype (one rounding per element). The
    output channel is dim 0 of a conv or linear weight; for a transposed conv it is dim 1 within
    each of the ``groups`` blocks of dim 0 (output channel ``o = g * C_out/groups + j``).

    Args:
        weight: conv weight ``(C_out, C_in/groups, *k)``, linear weight ``(C_out, C_in)``, or
            transposed conv weight ``(C_in, C_out/groups, *k)``.
        bias: the layer's bias ``(C_out,)``, or None for none.
        running_mean, running_var: BN statistics ``(C_out,)``.
        eps: BN's eps.
        gamma, beta: BN's weight and bias, or None when ``affine=False``. Default: None
        transposed: ``weight`` belongs to a ConvTranspose. Default: False
        groups: groups of the transposed conv (ignored otherwise). Default: 1

    Returns:
        ``(weight', bias')``, new tensors; the inputs are not changed.

    >>> conv, bn = nn.Conv2d(3, 8, 3).eval(), nn.BatchNorm2d(8).eval()
    >>> w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
    ...                     bn.weight, bn.bias)
    """
    return _fold_weights(weight, bias, running_mean, running_var, eps, gamma, beta,
                         transposed=transposed, groups=groups, in_place=False)


def _fold_weights(weight, bias, running_mean, running_var, eps, gamma, beta, *, transposed,
                  groups, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_weights; with ``in_place`` a contiguous weight is scaled in place, not copied
    (fold() scales its private copy of the model: no second copy of every weight)."""
    c = running_mean.numel()
    if transposed:
        if weight.dim() < 2 or weight.shape[0] % groups or weight.shape[1] * groups != c:
            raise expected(
                f"a transposed conv weight with {c} output channels in {groups} groups",
                f"weight of shape {tuple(weight.shape)}",
            )
    elif weight.dim() < 2 or weight.shape[0] != c:
        raise expected(
            f"a weight with {c} output channels on dim 0", f"weight of shape {tuple(weight.shape)}"
        )
    _check_lengths(c, bias=bias, running_var=running_var, gamma=gamma, beta=beta)
    scale, shift = _exact_scale_shift(running_mean, running_var, eps, gamma, beta)
    b = bias.detach().to(torch.float64) if bias is not None else 0.0
    new_bias = b * scale + shift
    w = _writable(weight, in_place)
    factor = scale.to(w.dtype)
    spatial = (1,) * (w.dim() - 2)
    if transposed:
        # (C_in, C_out/groups, *k) -> (groups, C_in/groups, C_out/groups, *k), a view of w
        blocks = w.view(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        blocks.mul_(factor.reshape(groups, 1, w.shape[1], *spatial))
    else:
        w.mul_(factor.reshape(c, 1, *spatial))
    return w, new_bias.to(weight.dtype)


def fold_weights_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    groups: int = 1,
    repeat: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an eval-mode BN into the weight and bias of the conv or linear layer *after* it.

    BN in eval is ``y = x * s + t`` per input channel (``s = gamma / sqrt(Var + eps)``,
    ``t = beta - E * s``), so a layer ``W y + b`` reading it computes

    .. math::
        W' = W \cdot s \ \text{(per input channel)}, \qquad
        b' = b + \sum_{i, k} W_{o, i, k} \, t_i

    This is exact for a Linear and for a conv whose padding adds nothing (``padding=0``) or
    pads with the data (``reflect``, ``replicate``, ``circular``: the padded border of the
    affine image is the affine image of the padded border); with zero padding the border
    windows would see ``t`` where the original saw 0, so that case is not for this function.
    ``groups`` and dilation are taken; input channel ``g * C_in/groups + i`` of group ``g``
    meets weight column ``i`` of that group's outputs. ``repeat`` is for a Linear after a
    flatten: each of the BN's channels spans ``repeat`` consecutive input features. The factor
    and the bias are computed in float64; the weight is multiplied once, in its own dtype.

    Args:
        weight: conv weight ``(C_out, C_in/groups, *k)`` or linear weight ``(C_out, C * repeat)``.
        bias: the layer's bias ``(C_out,)``, or None for none.
        running_mean, running_var: BN statistics ``(C,)``, ``C`` the layer's input channels.
        eps: BN's eps.
        gamma, beta: BN's weight and bias, or None when ``affine=False``. Default: None
        groups: the conv's groups. Default: 1
        repeat: input features per BN channel (a Linear after a flatten). Default: 1

    Returns:
        ``(weight', bias')``, new tensors; the inputs are not changed.

    >>> bn, fc = nn.BatchNorm1d(8).eval(), nn.Linear(8, 4)
    >>> w, b = fold_weights_forward(fc.weight, fc.bias, bn.running_mean, bn.running_var,
    ...                             bn.eps, bn.weight, bn.bias)
    """
    return _fold_weights_forward(weight, bias, running_mean, running_var, eps, gamma, beta,
                                 groups=groups, repeat=repeat, in_place=False)


def _fold_weights_forward(weight, bias, running_mean, running_var, eps, gamma, beta, *, groups,
                          repeat, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    c = running_mean.numel()
    if weight.dim() < 2 or weight.shape[1] * groups != c * repeat or weight.shape[0] % groups:
        raise expected(
            f"a weight reading {c * repeat} input features in {groups} groups",
            f"weight of shape {tuple(weight.shape)}",
        )
    _check_lengths(c, running_var=running_var, gamma=gamma, beta=beta)
    if bias is not None and bias.numel() != weight.shape[0]:
        raise expected(f"bias with {weight.shape[0]} elements", f"{bias.numel()}")
    scale, shift = _exact_scale_shift(running_mean, running_var, eps, gamma, beta)
    out, per_group = weight.shape[0], weight.shape[1]
    # (C,) -> (C_out, C_in/groups): the factor each weight column of each output meets
    scale = scale.repeat_interleave(repeat).view(groups, 1, per_group)
    scale = scale.expand(groups, out // groups, per_group).reshape(out, per_group)
    shift = shift.repeat_interleave(repeat).view(groups, 1, per_group)
    shift = shift.expand(groups, out // groups, per_group).reshape(out, per_group)
    w64 = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64) if bias is not None else 0.0
    new_bias = b + (w64.flatten(2).sum(2) if w64.dim() > 2 else w64).mul(shift).sum(1)
    w = _writable(weight, in_place)
    w.mul_(scale.to(w.dtype).reshape(out, per_group, *(1,) * (w.dim() - 2)))
    return w, new_bias.to(weight.dtype)


def _check_lengths(c: int, **tensors) -> None:
    for what, t in tensors.items():
        if t is not None and t.numel() != c:
            raise expected(f"{what} with {c} elements", f"{t.numel()}")


def _writable(weight: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``weight`` detached, itself when it may be scaled in place, else a contiguous copy."""
    w = weight.detach()
    if not (in_place and w.is_contiguous()):
        w = w.clone(memory_format=torch.contiguous_format)
    return w

