"""Fold BN into the conv/linear before (or after) it, or strip the bias BN makes useless.

At inference BN is a fixed per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is the
output of a conv or linear layer (and nothing else reads it), the map folds into that layer:

    W' = W * s            (per output channel)
    b' = (b - running_mean) * s + beta

When ``x`` is a channel concatenation of such outputs, each slice of ``s, t`` folds into the
layer that produced it. When ``y`` goes straight into a Linear, or a conv that pads with
nothing or with the data itself, the map folds forward into that layer's input side:

    W' = W * s            (per input channel)
    b' = b + W t

The package, by job:

    weights.py   fold_weights / fold_weights_forward: those statements as pure tensor math
    plan.py      plan_folds, FoldPlan, foldable_producer, bias_producers: where each BN goes on
                 the model's graph (batchnorm.graph), through a cat or into the next layer
    apply.py     fold: carry the plans out on a copy, measure each fold's error
    strip.py     strip_bias: remove a bias that BN cancels
    report.py    FoldReport, LayerFold, StripReport
"""

from __future__ import annotations

# the helpers too (names starting "_"), under the names they had when this was one module:
# other tools reuse them
from .apply import (  # noqa: F401
    TRAIN_MODE_WARNING,
    _act,
    _affine_rank,
    _apply,
    _channels_left,
    _check_eval_stats,
    _fold_into,
    _set_weights,
    _split_affine,
    _stats_of,
    _torch_affine,
    _trains,
    _with_act,
    fold,
)
from .plan import (  # noqa: F401
    _CAT,
    _PASS_THROUGH,
    FoldPlan,
    _captured_module,
    _cat_parts,
    _cat_pieces,
    _check_model,
    _flatten_dim,
    _input_rank,
    _label,
    _next_layer,
    _pads,
    _Piece,
    _piece_label,
    _producer_problem,
    _seen_rank,
    _width,
    bias_producers,
    foldable_producer,
    plan_folds,
)
from .report import FoldReport, LayerFold, StripReport
from .strip import strip_bias
from .weights import (  # noqa: F401
    _check_lengths,
    _exact_scale_shift,
    _fold_weights,
    _fold_weights_forward,
    _writable,
    fold_weights,
    fold_weights_forward,
)

__all__ = ["fold_weights", "fold_weights_forward", "fold", "plan_folds", "FoldPlan", "strip_bias",
           "FoldReport", "LayerFold", "StripReport", "foldable_producer", "bias_producers",
           "TRAIN_MODE_WARNING"]
