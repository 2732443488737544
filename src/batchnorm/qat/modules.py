r"""BN folding for quantization-aware training: train the conv that ships, ``q(W * gamma / sigma)``.

At deployment BN folds into the conv before it (:mod:`batchnorm.folding`); with quantized weights
the integer conv holds ``q(W s)``, ``s = gamma / sigma_run``, ``sigma_run = sqrt(running_var +
eps)``, not ``q(W)`` followed by BN. Jacob et al. 2018 (arXiv:1712.05877) and Krishnamoorthi 2018
(arXiv:1806.08342, section 3.2) train through that fold. With ``x`` the conv's input, ``b`` its
bias and ``q`` the weight quantizer:

**Training, batch statistics** (what :class:`QATConvBn` computes; PyTorch's
``torch.ao.nn.intrinsic.qat.ConvBn2d`` does the same in its default path)::

    u     = conv(x, q(W s))                       one conv, the quantized folded weight
    z     = u / s + b                             the conv output in the units BN sees
    mu_B, var_B = mean and biased variance of z per channel; sigma_B = sqrt(var_B + eps)
    y     = gamma (z - mu_B) / sigma_B + beta
          = u * (sigma_run / sigma_B) + beta - gamma (mu_B - b) / sigma_B

The last line is the paper's form: the folded quantized conv, its output corrected by
``sigma_run / sigma_B`` and shifted by the batch-statistics bias (``gamma / (s sigma_B) =
sigma_run / sigma_B``). The statistics are those of the *quantized* conv's output (the paper's
figure takes them from a second, float conv ``conv(x, W)``; one conv is cheaper, and the running
statistics then describe the conv that ships). The running statistics are updated from
``mu_B`` and the unbiased ``var_B`` with the BN's momentum (``None``: cumulative average) and
``num_batches_tracked`` counts the step, PyTorch's rule for its BN and ours. Gradients flow
through ``q`` straight through, through ``s`` and through the batch statistics.

**Frozen statistics, and evaluation** (after :func:`freeze_bn_stats`, or ``freeze_after`` steps;
always in eval)::

    y = conv(x, q(W s)) + (beta + (b - running_mean) s)

exactly the deployed conv, which :func:`qat_convert` writes out as a plain PyTorch layer.
"""
from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_values_per_channel, expected

__all__ = ["FakeQuantize", "QATConvBn", "QATBatchNorm"]

# the PyTorch classes a converted layer is built from (a subclass converts to its base)
_TORCH_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# --------------------------------------------------------------------------- the quantizer


class FakeQuantize(nn.Module):
    r"""Symmetric per-output-channel fake quantization with a straight-through gradient.

    .. math::
        \Delta_o = \frac{\max_i |w_{o,i}|}{2^{b-1} - 1}, \qquad
        q(w)_{o,i} = \Delta_o \cdot \mathrm{clamp}\big(\mathrm{round}(w_{o,i} / \Delta_o),
        -(2^{b-1} - 1),\ 2^{b-1} - 1\big)

    per output channel ``o`` (dim 0; :class:`QATConvBn` hands it a transposed conv's weight in
    the layout of the equivalent conv, output channels first). The grid is symmetric (no zero
    point, ``-127..127`` at 8 bits); an all-zero channel stays zero. The output lies exactly on
    the grid; the gradient passes through unchanged (straight-through estimator, Bengio et al.
    2013). Stateless and deterministic (``round`` is half to even).

    Args:
        bits: bits per weight, 2 to 16. Default: 8

    Shape:
        - Input: ``(C_out, *)``, at least 1D.
        - Output: same shape.

    >>> q = batchnorm.FakeQuantize(bits=4)
    >>> w = q(torch.randn(8, 3, 3, 3))   # at most 15 values per output channel
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, Integral) or not 2 <= bits <= 16:
            raise expected("bits to be an integer from 2 to 16", repr(bits))
        self.bits = int(bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
            raise expected("a weight tensor of at least 1 dimension",
                           getattr(weight, "shape", type(weight).__name__))
        return _RoundStraightThrough.apply(weight, 2 ** (self.bits - 1) - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _RoundStraightThrough(torch.autograd.Function):
    """The grid point of each weight forward, the identity backward (exactly on the grid, which
    ``w + (q - w).detach()`` is not: that sum rounds)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, qmax: int) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
        step = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return torch.clamp(torch.round(w / step), -qmax, qmax) * step

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


# --------------------------------------------------------------------------- the modules


class QATBatchNorm(nn.Module):
    """What a BN folded by :func:`qat_fold` becomes: its tensors under its own state_dict keys
    (``weight, bias, running_mean, running_var, num_batches_tracked``), read and updated by the
    :class:`QATConvBn` before it, which does the normalising; forward applies only the BN's
    activation (a BatchNormAct's), else passes the input through."""

    _version = 2  # the state_dict of a BN that has num_batches_tracked

    def __init__(self, bn: nn.Module, activation: nn.Module | None = None) -> None:
        super().__init__()
        # the BN's own tensors, in its order (parameters, then buffers): the same keys
        for name, t in bn._parameters.items():
            self.register_parameter(name, t)
        for name, t in bn._buffers.items():
            self.register_buffer(name, t, persistent=name not in bn._non_persistent_buffers_set)
        self.eps = bn.eps
        self.momentum = getattr(bn, "momentum", 0.0)
        self.source = type(bn).__name__
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation is None else self.activation(x)

    def extra_repr(self) -> str:
        return f"{self.source}, eps={self.eps}, momentum={self.momentum}, folded into the conv"


class QATConvBn(nn.Module):
    """A Conv/ConvTranspose/Linear with the BN after it folded in, for quantization-aware
    training (the formulas are in this module's docstring). Holds the layer's ``weight`` and
    ``bias`` under the layer's keys; the BN's tensors stay in the :class:`QATBatchNorm` in the
    BN's place (a reference, not a child, so no key is doubled). Built by :func:`qat_fold`.

    Attributes: ``frozen`` (statistics frozen: the training forward is the deployed one),
    ``freeze_after`` (freeze after this many training steps, or None), ``steps`` (training
    forwards with batch statistics so far; pickled with the model, not in its state_dict),
    ``weight_quant`` (the quantizer).
    """

    def __init__(self, layer: nn.Module, bn: QATBatchNorm, weight_quant,
                 freeze_after: int | None, fixed: bool) -> None:
        super().__init__()
        base = next(c for c in type(layer).__mro__ if c in _TORCH_CLASSES)
        self.float_class = base
        self.transposed = issubclass(base, nn.modules.conv._ConvTransposeNd)
        if base is nn.Linear:
            self.config = dict(in_features=layer.in_features, out_features=layer.out_features)
        else:
            self.config = {k: getattr(layer, k) for k in (
                "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "padding_mode")}
            if self.transposed:
                self.config["output_padding"] = layer.output_padding
            self._padding = layer._reversed_padding_repeated_twice
        self.weight = layer.weight
        self.bias = layer.bias
        self.weight_quant = weight_quant
        object.__setattr__(self, "bn", bn)  # not a child: its keys stay the BN's
        self.fixed = fixed  # a frozen BN: no statistics to learn, always the deployed forward
        self.frozen = fixed or freeze_after == 0
        self.freeze_after = freeze_after
        self.steps = 0
        self.train(layer.training)

    # ---------------------------------------------------------------------------- the math

    def _scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s = gamma / sigma_run, 1 / sigma_run), per output channel."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps)
        return (inv if bn.weight is None else bn.weight * inv), inv

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """The weight with output channels on dim 0: ``(C_out, C_in/groups, *k)`` (a transposed
        conv's ``(C_in, C_out/groups, *k)`` rearranged to the equivalent conv's layout)."""
        if not self.transposed:
            return w
        g = self.config["groups"]
        # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k) -> (g, C_out/g, C_in/g, *k)
        blocks = w.view(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
        return blocks.reshape(-1, w.shape[0] // g, *w.shape[2:])

    def _unrows(self, q: torch.Tensor) -> torch.Tensor:
        """:meth:`rows` undone."""
        if not self.transposed:
            return q
        g = self.config["groups"]
        # (C_out, C_in/g, *k) -> (g, C_out/g, C_in/g, *k) -> (C_in, C_out/g, *k)
        blocks = q.view(g, q.shape[0] // g, *q.shape[1:]).transpose(1, 2)
        return blocks.reshape(self.weight.shape)

    def _quantized(self, scale: torch.Tensor) -> torch.Tensor:
        """``q(W * scale)`` per output channel, in the weight's own layout."""
        rows = self.rows(self.weight)
        return self._unrows(self.weight_quant(rows * scale.view(-1, *(1,) * (rows.dim() - 1))))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed layer's ``(q(W s), beta + (b - running_mean) s)``, differentiable in
        ``W, b, gamma, beta``."""
        bn = self.bn
        s, _ = self._scale()
        shift = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
        shift = shift * s
        if bn.bias is not None:
            shift = shift + bn.bias
        return self._quantized(s), shift

    def _layer(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's own computation with weight ``w`` and bias ``b`` (the call PyTorch's
        class makes, so a converted layer computes the same bits)."""
        c = self.config
        if self.float_class is nn.Linear:
            return F.linear(x, w, b)
        d = len(c["kernel_size"])
        if self.transposed:
            return _CONV_T[d](x, w, b, c["stride"], c["padding"], c["output_padding"],
                              c["groups"], c["dilation"])
        if c["padding_mode"] != "zeros":
            x = F.pad(x, self._padding, mode=c["padding_mode"])
            return _CONV[d](x, w, b, c["stride"], 0, c["dilation"], c["groups"])
        return _CONV[d](x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_class is nn.Linear and isinstance(x, torch.Tensor) and x.dim() != 2:
            raise expected("2D input to a Linear folded with the BN after it (BN channels are "
                           "its features)", f"{x.dim()}D input of shape {tuple(x.shape)}")
        if not self.training or self.frozen:
            return self._layer(x, *self.folded())
        y = self._train(x)
        self.steps += 1
        if self.freeze_after is not None and self.steps >= self.freeze_after:
            self.frozen = True
        return y

    def _train(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        s, inv = self._scale()
        # a channel with gamma = 0 would divide by zero; any nonzero scale gives it the same
        # output (beta) and finite statistics
        s = torch.where(s == 0, inv, s)
        u = self._layer(x, self._quantized(s), None)
        check_values_per_channel(tuple(u.shape), 1)
        channel = (1, -1) + (1,) * (u.dim() - 2)
        z = u / s.view(channel)
        if self.bias is not None:
            z = z + self.bias.view(channel)
        factor = bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if factor is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                            0.0 if factor is None else factor, bn.eps)

    def to_float(self) -> nn.Module:
        """The deployed layer: a plain PyTorch Conv/ConvTranspose/Linear (eval mode) holding
        ``q(W s)`` and the folded bias."""
        with torch.no_grad():
            w, b = self.folded()
            layer = self.float_class(**self.config, bias=True, device=w.device, dtype=w.dtype)
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return layer.eval()

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return (f"{self.float_class.__name__}({args}, bias={self.bias is not None}), "
                f"frozen={self.frozen}, freeze_after={self.freeze_after}")
