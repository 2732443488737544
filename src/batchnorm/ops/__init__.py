"""Batch norm + activation as PyTorch functions: the front over the backends.

Two entry points, used by the layers in ``layers.py``:

- :func:`bn_act_train` normalises with the batch statistics (gradients flow through them) and
  returns them, so the caller can update its running buffers. It never touches buffers itself.
- :func:`bn_act_eval` normalises with given statistics (constants for autograd).

Both apply an optional affine transform and then an activation of the registry
(:data:`batchnorm.activations.FUSED`). Each checks its arguments, then :func:`_backend` chooses,
in this one place, the backend that runs:

==========================  ======================================================================
``triton_gpu.py``           CUDA, float32 / float16 / bfloat16 / float64 (parameters in that dtype
                            or float32), contiguous or channels-last, when ``triton`` imports: the
                            Triton kernels of ``triton_kernels.py``, run as the same custom ops
``numba_cpu.py``            CPU, float32 or float64 (parameters alike), ``(N, C, *)`` contiguous or
                            channels-last: the fused numba kernels of :mod:`batchnorm.kernels`,
                            run as the custom ops of ``custom_ops.py`` (one op each for autograd,
                            ``torch.compile`` and ``torch.export``; plain eager calls skip the
                            dispatcher, same bits)
``torch_fallback.py``       everything else: other devices, CUDA without ``triton``, CPU bfloat16 /
                            float16 (statistics in float32, as PyTorch), non-contiguous strides:
                            ``F.batch_norm`` then the activation, the InPlace-ABN mode in PyTorch
                            ops
==========================  ======================================================================

``backends.py`` holds that choice. So a CUDA bfloat16 tensor runs the Triton kernels, a CPU one
``torch_fallback.py``. ``layout.py`` says which memory layouts the
kernels view; ``memory.py`` where their outputs come from (huge pages, the bounded output cache).
The output always has the memory format of the input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..activations import FUSED, INVERTIBLE
from ..errors import _activations, check_act, check_eps, check_mask_shape, expected
from . import custom_ops, numba_cpu, torch_fallback, triton_gpu
from .backends import kernels_for
from .moments import Moments

_activations()  # the checks' registry filled now: filled inside a compiled forward, it is a guard
# that fails on the next call (one recompile)

__all__ = ["ACTIVATIONS", "INVERTIBLE", "bn_act_train", "bn_act_eval", "moments", "bn_act_stats",
           "bn_act_mixed", "renorm_factors", "renorm_affine", "check_mask"]

ACTIVATIONS = FUSED  # the act names the ops take


def _backend(x: Tensor, *per_channel: Tensor | None, fused: bool = False) -> str:
    """The backend for these tensors: "triton" (the GPU kernels), "numba" (the fused CPU
    kernels) or "torch" (the fallback); ``fused``: the call needs what only our kernels do in
    one pass (see :func:`.backends.kernels_for`)."""
    kernels = kernels_for(x, *per_channel, fused=fused)
    return {triton_gpu: "triton", numba_cpu: "numba", None: "torch"}[kernels]


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics are returned in: x's, float32 for float16 / bfloat16 (PyTorch's)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def bn_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Batch-normalise ``x`` with its own statistics, apply the affine map, then the activation.

    .. math::
        \mu_c = \frac{1}{m}\sum x_c, \quad \sigma^2_c = \frac{1}{m}\sum (x_c - \mu_c)^2, \quad
        y = \mathrm{act}\Big(\gamma_c \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c\Big)

    over every axis but the channel axis 1 (m values per channel). The variance is the *biased*
    one, the one used to normalise; the caller turns it into the unbiased ``var * m / (m - 1)``
    for its running buffer. Running statistics are never read or written here.

    Autograd: gradients to ``x``, ``weight`` and ``bias`` flow through the batch statistics (the
    training formula). ``mean`` and ``var`` are returned detached. On the kernel path the
    backward is itself an op without a derivative: first-order gradients only (a backward with
    ``create_graph=True`` works, differentiating its gradients again raises RuntimeError).

    Paths: on CPU with float32/float64 input that is contiguous or channels-last, the fused numba
    kernels run (one pass for the statistics, one for normalise + affine + activation; backward
    one reduction pass and one pass writing ``dx``). On CUDA with ``triton`` installed, the
    Triton kernels do the same in float32 / float16 / bfloat16 / float64 (statistics in float32
    tiles merged in float64). Other devices, CPU half precision and odd strides take PyTorch's
    own path (``F.batch_norm`` then the activation).

    Args:
        x: input of shape ``(N, C, *)``, rank 2 to 5, floating point.
        weight: gamma, shape ``(C,)``, or None (no scaling).
        bias: beta, shape ``(C,)``, or None (no shift).
        eps: added to the variance before the square root; must be > 0.
        act: one of ``ACTIVATIONS`` (:data:`batchnorm.activations.FUSED`): "identity", "relu",
            "leaky_relu", "elu", "silu", "relu6", "hardswish". Default: "identity"
        negative_slope: slope of "leaky_relu" for negative inputs. Default: 0.01
        alpha: the "elu" scale, ``alpha * (exp(z) - 1)`` for z <= 0. Default: 1.0
        inplace: save only the output ``y`` for backward and recover the normalised input from it,
            ``x_hat = (act^-1(y) - beta) / gamma`` (the InPlace-ABN method), instead of saving
            ``x``. Needs an invertible activation (``INVERTIBLE``: identity, leaky_relu with
            ``negative_slope > 0``, elu with ``alpha > 0``). ``x`` itself is not overwritten: the
            memory saved is the input the backward no longer keeps alive. Where
            ``|gamma| < eps`` the division uses ``sign(gamma) * eps`` instead, so the recovered
            ``x_hat`` (and ``dweight``) are inexact for such near-zero scales; an ELU output that
            saturated at ``-alpha`` in the input's precision recovers a clamped pre-activation.
            Default: False

    Returns:
        ``(y, mean, var)``: ``y`` of the shape, dtype and memory format of ``x``; ``mean`` and the
        biased ``var`` of shape ``(C,)`` in the dtype of ``x`` (float32 for float16 / bfloat16
        input: computed in float32, as PyTorch's own batch norm does), detached. For an empty batch
        (``N * prod(spatial) == 0``) ``y`` is empty, ``mean`` is 0 and ``var`` is NaN (the
        variance of nothing is undefined; :func:`batchnorm.reference.variance` says the same).

    Raises:
        BatchNormError: bad rank, dtype, parameter shape, eps, activation, or ``inplace`` with an
            activation that cannot be inverted.

    Shape:
        - x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``
        - y: same as x; mean, var: ``(C,)``

    >>> x = torch.randn(8, 3, 4, 4)
    >>> y, mean, var = bn_act_train(x, torch.ones(3), torch.zeros(3), 1e-5, act="relu")
    >>> y.shape, mean.shape, bool((y >= 0).all())
    (torch.Size([8, 3, 4, 4]), torch.Size([3]), True)
    """
    eps, negative_slope, alpha = _checked(x, weight, bias, eps, True, act, negative_slope, alpha,
                                          inplace=inplace)
    args = (x, weight, bias, eps, act, negative_slope, alpha, inplace)
    if _backend(x, weight, bias, fused=inplace) != "torch":
        y, mean, var = custom_ops.train(*args)
        # the op returns float64 statistics; the contract is the input's dtype, detached
        return y, mean.detach().to(_stat_dtype(x)), var.detach().to(_stat_dtype(x))
    return torch_fallback.train(*args)


def bn_act_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Tensor:
    r"""Normalise ``x`` with given statistics, apply the affine map, then the activation.

    .. math::
        y = \mathrm{act}\Big(\gamma_c \frac{x - \mathrm{mean}_c}{\sqrt{\mathrm{var}_c + \epsilon}}
        + \beta_c\Big)

    ``running_mean`` / ``running_var`` are constants for autograd (no gradient flows into them);
    gradients flow to ``x``, ``weight`` and ``bias``: ``dx = act'(z) * dy * gamma / sigma``.

    Paths: on CPU with float32/float64 input that is contiguous or channels-last, one fused
    numba pass (per-channel scale and shift precomputed); on CUDA with ``triton``, one Triton
    pass; other devices, dtypes and strides take PyTorch's own path (``F.batch_norm`` then the
    activation).

    Args:
        x: input of shape ``(N, C, *)``, rank 2 to 5, floating point.
        weight: gamma, shape ``(C,)``, or None.
        bias: beta, shape ``(C,)``, or None.
        running_mean: the mean to subtract, shape ``(C,)``.
        running_var: the variance to divide by (after adding eps), shape ``(C,)``.
        eps: added to the variance; must be >= 0.
        act: one of ``ACTIVATIONS``. Default: "identity"
        negative_slope: slope of "leaky_relu" for negative inputs. Default: 0.01
        alpha: the "elu" scale. Default: 1.0

    Returns:
        ``y`` with the shape, dtype and memory format of ``x``.

    Shape:
        - x, y: ``(N, C, *)``; weight, bias, running_mean, running_var: ``(C,)``

    >>> x = torch.randn(2, 3, 4)
    >>> y = bn_act_eval(x, None, None, torch.zeros(3), torch.ones(3), 0.0)
    >>> torch.equal(y, x)
    True
    """
    eps, negative_slope, alpha = _checked(x, weight, bias, eps, False, act, negative_slope, alpha,
                                          running=(running_mean, running_var))
    if _backend(x, weight, bias, running_mean, running_var) != "torch":
        return custom_ops.eval_(x, weight, bias, running_mean.detach(), running_var.detach(), eps,
                                act, negative_slope, alpha)
    return torch_fallback.eval_(x, weight, bias, running_mean, running_var, eps, act,
                                negative_slope, alpha)


# ---------------------------------------------------------------------------------------------
# the pieces of the layers' options for hard training conditions


def moments(x: Tensor, mask: Tensor | None = None) -> Moments:
    """Per-channel float64 ``(count, mean, M2)`` of ``x`` (N, C, *), over the positions where
    ``mask`` (N, *) is True if one is given; count is a 0-d float64 tensor. The reference's
    definition (:func:`batchnorm.reference.moments`): the kernels' statistics on their path, the
    shifted two-pass float64 sums otherwise. Never differentiable."""
    _check_input(x)
    check_mask(mask, x)
    if _backend(x, fused=mask is not None) != "torch":
        return custom_ops.moments(x, mask)
    if mask is None:
        n, _, _, mean, m2 = torch_fallback.shifted_moments(torch_fallback.working(x.detach()))
    else:
        n, mean, m2 = torch_fallback.masked_moments(x.detach(), mask)
    return Moments(mean.new_tensor(float(n)), mean, m2)


def bn_act_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    eps: float,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Normalise ``x`` with its own batch statistics, given: ``mean`` / biased ``var``
    (float64, from :func:`moments` of the same ``x`` and ``mask``, ``count`` values per channel),
    then the affine map and the activation.

    The forward is :func:`bn_act_eval`'s; the gradient is the training one, as if the statistics
    were computed inside (with a mask, over the counted positions: ``dx = k1 g + m (k0 + k2
    (x - mean))``, see :func:`batchnorm.reference.backward`). Every position is normalised.
    Splitting statistics and normalisation lets a layer change them in between (Batch Renorm's
    r and d go into ``weight`` / ``bias``) or cut the batch (Ghost BN). On PyTorch's path the
    statistics are recomputed in differentiable ops, centred by ``mean``.
    """
    eps, negative_slope, alpha = _checked(x, weight, bias, eps, True, act, negative_slope, alpha,
                                          mask=mask)
    if _backend(x, weight, bias, fused=mask is not None) != "torch":
        return custom_ops.stats(x, weight, bias, mean.detach(), var.detach(), mask,
                                count.detach(), eps, act, negative_slope, alpha)
    return torch_fallback.train_stats(x, weight, bias, mean.detach(), eps, act, negative_slope,
                                      alpha, mask)


def bn_act_mixed(x, weight, bias, running_mean, running_var, eps, act="identity",
                 negative_slope=0.01, alpha=1.0, mix=0.5, mask=None) -> Tensor:
    """Test-time mixed statistics: normalise with ``mix * batch + (1 - mix) * running`` mean and
    variance (the batch variance biased, over the counted positions), gradients through the
    batch part; PyTorch's ops on every device (no kernel: a test-time option). ``mix``: a
    number, or a 0-d tensor (a layer's, which a compiled graph takes as an input)."""
    eps, negative_slope, alpha = _checked(x, weight, bias, eps, False, act, negative_slope, alpha,
                                          running=(running_mean, running_var), mask=mask)
    return torch_fallback.mixed(x, weight, bias, running_mean, running_var, eps, act,
                                negative_slope, alpha,
                                mix if isinstance(mix, Tensor) else float(mix), mask)


renorm_factors = custom_ops.renorm_factors


def renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Batch Renorm as plain BN's affine: ``weight * (x_hat * r + d) + bias`` is BN with
    ``weight * r`` and ``bias + weight * d`` (r, d constants, in the parameters' dtype, or
    ``dtype`` without parameters; the gradient reaches weight through both)."""
    pdtype = dtype if weight is None else weight.dtype
    r, d = r.to(pdtype), d.to(pdtype)
    shift = d if weight is None else weight * d
    return (r if weight is None else weight * r), (shift if bias is None else bias + shift)


def check_mask(mask: object, x: Tensor) -> None:
    """None, or a bool tensor of x's shape without the channel dim, on x's device."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise expected("mask to be a torch.Tensor or None", type(mask).__name__)
    check_mask_shape(mask.shape, (x.shape[0], *x.shape[2:]), mask.dtype == torch.bool,
                     mask.dtype)
    if mask.device != x.device:
        raise expected(f"mask on {x.device}, the input's device", f"device {mask.device}")


# ---------------------------------------------------------------------------------------------
# argument checks of the entry points


def _checked(x: object, weight: object, bias: object, eps: object, training: bool, act: object,
             negative_slope: object, alpha: object, *, running: tuple = (),
             mask: object = None, inplace: bool = False) -> tuple[float, float, float]:
    """Every entry point's checks, in one order: eps, x, weight and bias (each may be None), the
    running statistics (required when given), the mask, the activation. Returns ``(eps,
    negative_slope, alpha)`` as floats."""
    eps = check_eps(eps, training=training)
    c = _check_input(x)
    _check_param("weight", weight, x, c)
    _check_param("bias", bias, x, c)
    for name, value in zip(("running_mean", "running_var"), running):
        _check_param(name, value, x, c, required=True)
    check_mask(mask, x)
    return (eps, *check_act(act, negative_slope, alpha, inplace))


def _check_input(x: object) -> int:
    if not isinstance(x, Tensor):
        raise expected("x to be a torch.Tensor", type(x).__name__)
    if not 2 <= x.dim() <= 5:
        raise expected("2D to 5D input (N, C, *)", f"{x.dim()}D input")
    if not x.is_floating_point():
        raise expected("floating-point input", f"dtype {x.dtype}")
    return x.shape[1]


def _check_param(name: str, value: object, x: Tensor, c: int, required: bool = False) -> None:
    if value is None:
        if required:
            raise expected(f"{name} to be a tensor", "None")
        return
    if not isinstance(value, Tensor):
        raise expected(f"{name} to be a torch.Tensor or None", type(value).__name__)
    if value.shape != (c,):
        raise expected(f"{name} of shape ({c},) for {c} channels", f"shape {tuple(value.shape)}")
    if value.device != x.device:
        raise expected(f"{name} on {x.device}, the input's device", f"device {value.device}")
