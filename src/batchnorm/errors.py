"""BatchNormError and the argument checks shared by every entry point.

Every check raises before anything is computed, so a failed call changes no state.
Messages follow one form: "expected X (got Y)".
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

__all__ = ["BatchNormError"]


class BatchNormError(ValueError):
    """Bad input to a batch-norm computation: says what was expected and what came."""


def expected(what: str, got: object) -> BatchNormError:
    """Build the project's one error form: ``expected WHAT (got GOT)``."""
    return BatchNormError(f"expected {what} (got {got})")


def check_eps(eps: object, *, training: bool) -> float:
    """eps must be a finite real, > 0 in training and >= 0 in eval (PyTorch's rule). Compared,
    not passed to math.isfinite: dynamo makes a float attribute that differs between compiled
    modules a symbolic float, which it can compare (a guard) but not hand to math."""
    if type(eps) is float and (0.0 < eps if training else 0.0 <= eps) and eps < math.inf:
        return eps  # the common case, without the ABC checks (a layer calls this every step)
    if isinstance(eps, bool) or not isinstance(eps, Real) or not -math.inf < eps < math.inf:
        raise expected("eps to be a finite number", repr(eps))
    eps = float(eps)
    if training and eps <= 0:
        raise expected("eps > 0 in training", eps)
    if eps < 0:
        raise expected("eps >= 0", eps)
    return eps


def check_num_features(num_features: object) -> int:
    """num_features (C) is a positive integer."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise expected("num_features to be a positive integer", repr(num_features))
    return num_features


def check_act(act: object, negative_slope: object, alpha: object, inplace: bool):
    """The activation arguments of the ops and of BatchNormAct: ``(negative_slope, alpha)``
    as floats, or BatchNormError. ``act`` names a fused activation of the registry
    (:data:`batchnorm.activations.FUSED`); ``inplace`` needs an invertible one whose
    parameters allow the inverse."""
    registry = _activations()
    if act not in registry.FUSED:
        raise expected(f"act in {registry.FUSED}", repr(act))
    for name, value in (("negative_slope", negative_slope), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise expected(f"{name} to be a finite number", repr(value))
    if inplace:
        if act not in registry.INVERTIBLE:
            # the default act of BatchNormAct is relu: say what to pass instead
            choices = " or ".join(f"act={name!r}" for name in registry.INVERTIBLE
                                  if name != "identity")
            raise expected(f"an invertible act with inplace=True: {choices} (or 'identity')",
                           f"act={act!r}, which cannot be recovered from its output")
        values = {"negative_slope": negative_slope, "alpha": alpha}
        for name in registry.REGISTRY[act].positive:
            if values[name] <= 0:
                raise expected(f"{name} > 0 with inplace=True", values[name])
    return float(negative_slope), float(alpha)


_ACTIVATIONS = None


def _activations():
    """batchnorm.activations, imported on first use: it imports torch, which a NumPy-only user
    of the reference never needs; kept after, since an import statement in the function would cost
    host time on every layer forward."""
    global _ACTIVATIONS
    if _ACTIVATIONS is None:
        from . import activations

        _ACTIVATIONS = activations
    return _ACTIVATIONS


def check_momentum(momentum: object) -> float | None:
    """momentum is None (cumulative average) or a real number in [0, 1]."""
    if momentum is None:
        return None
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the common case, no ABC checks
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise expected("momentum to be None or a number in [0, 1]", repr(momentum))
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:  # also rejects NaN
        raise expected("momentum in [0, 1] or None", momentum)
    return momentum


def check_num_batches_tracked(value: object) -> int:
    """num_batches_tracked is a non-negative integer."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        try:
            as_int = int(value)  # a 0-d integer array or tensor
        except (TypeError, ValueError):
            raise expected("num_batches_tracked to be an integer", repr(value)) from None
        if as_int != value:
            raise expected("num_batches_tracked to be an integer", repr(value))
        value = as_int
    if value < 0:
        raise expected("num_batches_tracked >= 0", int(value))
    return int(value)


def check_values_per_channel(shape: tuple[int, ...], axis: int) -> None:
    """Training needs more than one value per channel (PyTorch: N * prod(spatial) != 1)."""
    if math.prod(s for i, s in enumerate(shape) if i != axis) == 1:
        raise expected(
            "more than 1 value per channel when training",
            f"input of shape {tuple(shape)}: 1 value per channel",
        )


# ---------------------------------------------------------------------------------------------
# the options of the hard training conditions (Batch Renorm, Ghost BN, masks, test-time stats)

EVAL_STATS = ("running", "batch", "mix")


def check_renorm(renorm: object, rmax: object, dmax: object) -> tuple[bool, float, float]:
    """Batch Renorm's switch and clips: ``rmax >= 1`` and ``dmax >= 0``, finite reals."""
    if not isinstance(renorm, (bool, np.bool_)):
        raise expected("renorm to be True or False", repr(renorm))
    for name, value, least in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise expected(f"{name} to be a finite number", repr(value))
        if value < least:
            raise expected(f"{name} >= {least:g}", value)
    return bool(renorm), float(rmax), float(dmax)


def check_virtual_batch_size(value: object) -> int | None:
    """Ghost BN's piece size: None (off) or a positive integer."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise expected("virtual_batch_size to be None or a positive integer", repr(value))
    return int(value)


def check_eval_stats(eval_stats: object, eval_mix: object) -> tuple[str, float]:
    """Test-time statistics: ``eval_stats`` in :data:`EVAL_STATS`, ``eval_mix`` in [0, 1]."""
    if eval_stats not in EVAL_STATS:
        raise expected(f"eval_stats in {EVAL_STATS}", repr(eval_stats))
    if isinstance(eval_mix, bool) or not isinstance(eval_mix, Real):
        raise expected("eval_mix to be a number in [0, 1]", repr(eval_mix))
    eval_mix = float(eval_mix)
    if not 0.0 <= eval_mix <= 1.0:  # also rejects NaN
        raise expected("eval_mix in [0, 1]", eval_mix)
    return eval_stats, eval_mix


def check_mask_shape(shape: tuple[int, ...], want: tuple[int, ...], is_bool: bool,
                     dtype: object) -> None:
    """A mask is boolean, with the input's shape less the channel axis (True = counted)."""
    if not is_bool:
        raise expected("a boolean mask (True = counted)", f"dtype {dtype}")
    if tuple(shape) != tuple(want):
        raise expected(f"mask of shape {tuple(want)} (the input's shape without the channel axis)",
                       f"shape {tuple(shape)}")


def check_counted(count: int, where: str = "the mask") -> None:
    """Masked (or ghost) statistics need at least 2 counted values per channel."""
    if count < 2:
        raise expected(f"{where} to count at least 2 values per channel", f"{count} counted")


def check_pieces(n: int, values_per_sample: int, virtual_batch_size: int) -> None:
    """Ghost BN: every piece (the last may be smaller) needs more than one value per channel."""
    last = n % virtual_batch_size or virtual_batch_size
    if n > 0 and min(last, virtual_batch_size) * values_per_sample < 2:
        raise expected(
            "ghost batches of more than 1 value per channel",
            f"a piece of {last} sample(s) with {values_per_sample} value(s) each "
            f"(batch of {n}, virtual_batch_size={virtual_batch_size})")
