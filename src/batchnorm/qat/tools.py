"""The QAT tools: :func:`qat_fold` (a model's Conv/Linear -> BN pairs made one
:class:`~batchnorm.qat.modules.QATConvBn` each), :func:`freeze_bn_stats` /
:func:`unfreeze_bn_stats`, and :func:`qat_convert` (the deployed PyTorch model)."""
from __future__ import annotations

import copy
from numbers import Integral

import torch
from torch import nn

from ..errors import expected
from ..folding import foldable_producer
from ..graph import is_foldable_producer, trace
from ..probe import as_args, capture, training_flags_kept
from ..protocol import UNKNOWN_ACTIVATION, activation_of, bn_kind, is_batchnorm, options_of
from .modules import FakeQuantize, QATBatchNorm, QATConvBn

__all__ = ["qat_fold", "freeze_bn_stats", "unfreeze_bn_stats", "qat_convert"]


def qat_fold(model: nn.Module, example_input=None, weight_quant=None, *, bits: int | None = None,
             freeze_after: int | None = None) -> nn.Module:
    r"""A copy of ``model`` for quantization-aware training with BN folded into the conv before it.

    Every Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear whose output goes only to a BN (the pair
    rule of :func:`batchnorm.fold`: subclasses included, both called once, channel counts
    equal) becomes a :class:`QATConvBn`, and its BN a :class:`QATBatchNorm` (a BatchNormAct
    keeps its activation there). In training the pair computes the conv with
    ``weight_quant(W * gamma / sigma_run)``, corrects its output with the batch statistics and
    updates the BN's running statistics (its momentum and eps, ``momentum=None`` cumulative,
    unbiased variance, ``num_batches_tracked``: PyTorch's rule, for PyTorch's BN and ours); in
    eval, and once frozen (:func:`freeze_bn_stats`), it computes exactly the folded, quantized
    conv that :func:`qat_convert` writes out. The equations are in :mod:`batchnorm.qat`. A pair
    with a frozen BN (FrozenBatchNorm2d) is always frozen. Other layers are left as they are:
    a conv not followed by BN is not quantized, a BN not after a conv trains as before.

    The state_dict keys are the model's (the conv's ``weight``/``bias`` under its name, the
    BN's tensors under the BN's), so a float checkpoint loads into the copy and back; the
    parameters are the copy's own, so build the optimizer after this call. ``weight_quant``,
    when an ``nn.Module``, is a child of every :class:`QATConvBn` (shared), its own state
    under ``<conv>.weight_quant``; the default holds none.

    Args:
        model: any ``nn.Module``; it is not changed.
        example_input: a tensor (or tuple) to learn shapes on (a Linear whose output is not 2D
            is not paired), run once in eval mode. Default: None
        weight_quant: a callable taking the folded weight, output channels on dim 0
            (``(C_out, C_in/groups, *k)`` or ``(C_out, C_in)``, a transposed conv's weight
            rearranged to that and back) and returning a tensor of that shape: a fake quantizer
            with a straight-through gradient. Default: ``FakeQuantize(bits)``
        bits: bits of the default quantizer (keyword only; not with ``weight_quant``).
            Default: 8
        freeze_after: freeze the statistics after this many training steps (keyword only;
            0: frozen from the start). Default: None (never by itself)

    Returns:
        the copy, in the training mode of ``model``.

    >>> qat = batchnorm.qat_fold(model, bits=4, freeze_after=1000)
    >>> opt = torch.optim.SGD(qat.parameters(), lr=1e-3)   # train as usual
    >>> deployed = batchnorm.qat_convert(qat)
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise expected("a Python nn.Module", type(model).__name__)
    if weight_quant is None:
        weight_quant = FakeQuantize(8 if bits is None else bits)
    elif bits is not None:
        raise expected("either weight_quant or bits", "both")
    elif not callable(weight_quant):
        raise expected("weight_quant to be callable (a fake quantizer) or None",
                       type(weight_quant).__name__)
    if freeze_after is not None and (isinstance(freeze_after, bool) or not isinstance(
            freeze_after, Integral) or freeze_after < 0):
        raise expected("freeze_after to be None or an integer >= 0", repr(freeze_after))
    args = as_args(example_input)
    qat = copy.deepcopy(model)
    pairs = _pairs(qat, args)
    slots = {}
    for into, name, kind, act in pairs:  # every check before the first swap
        slots[name] = QATBatchNorm(qat.get_submodule(name), act)
        _check_quantizer(weight_quant, qat.get_submodule(into), slots[name], into)
    for into, name, kind, _ in pairs:
        layer = qat.get_submodule(into)
        qat.set_submodule(into, QATConvBn(layer, slots[name], weight_quant,
                                          None if freeze_after is None else int(freeze_after),
                                          fixed=kind == "frozen"))
        qat.set_submodule(name, slots[name])
    return qat


def _pairs(model: nn.Module, args) -> list[tuple[str, str, str, nn.Module | None]]:
    """(layer name, BN name, BN kind, activation) for every pair; BatchNormError for a pair the
    simulated fold cannot take, or when there is none."""
    graph = trace(model)
    captured = {}
    if args is not None:
        with training_flags_kept(model):
            model.eval()
            captured, _ = capture(model, args, lambda m: is_batchnorm(m) or is_foldable_producer(m))
    pairs, why_not = [], []
    for name, bn in model.named_modules():
        if not is_batchnorm(bn):
            continue
        into, why = foldable_producer(model, graph, name, bn, captured)
        if into is None:
            why_not.append(f"{name}: {why}")
            continue
        kind, act = bn_kind(bn), activation_of(bn)
        problem = None
        if kind not in ("batchnorm", "frozen"):
            problem = (f"a {type(bn).__name__}, whose statistics qat_fold does not simulate "
                       "(SyncBatchNorm: convert it to BatchNorm first)")
        elif getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            problem = "no running statistics (track_running_stats=False): nothing to fold"
        elif options_of(bn):
            problem = f"options {options_of(bn)}, which the fold cannot simulate"
        elif act is UNKNOWN_ACTIVATION:
            problem = f"an unknown activation {getattr(bn, 'act', None)!r}"
        elif isinstance(model.get_submodule(into), torch.jit.ScriptModule):
            problem = f"{into} is TorchScript, which cannot be rewritten"
        if problem:
            raise expected(f"a BN that {into} can be folded with for training",
                           f"{name}: {problem}")
        pairs.append((into, name, kind, act))
    if not pairs:
        shown = "; ".join(why_not[:3]) + ("; ..." if len(why_not) > 3 else "")
        raise expected("a model with a Conv/ConvTranspose/Linear feeding a BN",
                       f"no such pair: {shown or 'no BN layers'}")
    return pairs


def _check_quantizer(weight_quant, layer: nn.Module, bn: QATBatchNorm, name: str) -> None:
    """The quantizer returns a floating tensor of the weight's shape (tried once, no grad)."""
    rows = QATConvBn(layer, bn, weight_quant, None, False).rows(layer.weight.detach())
    try:
        with torch.no_grad():
            out = weight_quant(rows.clone())
    except Exception as exc:
        raise expected(f"weight_quant to take the weight of {name} {tuple(rows.shape)}",
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                       ) from exc
    if not (isinstance(out, torch.Tensor) and out.shape == rows.shape
            and out.is_floating_point()):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise expected(f"weight_quant to return a floating tensor of shape {tuple(rows.shape)} "
                       f"for {name}", got)


def _qat_layers(model: nn.Module, what: str) -> list[QATConvBn]:
    if not isinstance(model, nn.Module):
        raise expected("an nn.Module", type(model).__name__)
    found = [m for m in model.modules() if isinstance(m, QATConvBn)]
    if not found:
        raise expected(f"a model from batchnorm.qat_fold to {what}", "no QATConvBn layer")
    return found


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """From now on every :class:`QATConvBn` of ``model`` uses the running statistics and no
    longer updates them: the training forward is the deployed computation (Krishnamoorthi
    2018: freeze after some steps). In place; returns ``model``.

    >>> batchnorm.freeze_bn_stats(qat)
    """
    for m in _qat_layers(model, "freeze"):
        m.frozen = True
    return model


def unfreeze_bn_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn_stats`: training uses batch statistics and updates the running
    ones again (a pair with a frozen BN class stays frozen). In place; returns ``model``."""
    for m in _qat_layers(model, "unfreeze"):
        m.frozen = m.fixed
    return model


def qat_convert(model: nn.Module) -> nn.Module:
    """The deployed model of a :func:`qat_fold` model: an eval-mode copy where each pair is a
    plain PyTorch Conv/ConvTranspose/Linear (the base class of the original layer, same
    hyperparameters) holding the quantized folded weight ``q(W s)`` and the folded bias, and
    the BN's place holds ``nn.Identity`` (or the BatchNormAct's activation). Its output equals
    the QAT model's eval output (the same weights, the same calls); the rest of the model is
    copied as it is (a BN that was not paired stays: :func:`batchnorm.fold` folds it). Built of
    PyTorch modules where the input was, it loads without this package.

    >>> deployed = batchnorm.qat_convert(qat)
    >>> batchnorm.export_onnx(deployed, torch.randn(1, 3, 32, 32), "model.onnx")
    """
    _qat_layers(model, "convert")
    deployed = copy.deepcopy(model).eval()
    for name, m in list(deployed.named_modules()):
        if isinstance(m, QATConvBn):
            deployed.set_submodule(name, m.to_float())
        elif isinstance(m, QATBatchNorm):
            deployed.set_submodule(name, m.activation if m.activation is not None
                                   else nn.Identity())
    return deployed
