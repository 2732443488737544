"""BN folding for quantization-aware training (the math: :mod:`batchnorm.qat.modules`).

``modules.py``: the fake quantizer and the two modules a Conv -> BN pair becomes;
``tools.py``: :func:`qat_fold`, :func:`freeze_bn_stats`, :func:`unfreeze_bn_stats`,
:func:`qat_convert`.
"""
from __future__ import annotations

from .modules import FakeQuantize, QATBatchNorm, QATConvBn
from .tools import freeze_bn_stats, qat_convert, qat_fold, unfreeze_bn_stats

__all__ = ["FakeQuantize", "QATConvBn", "QATBatchNorm", "qat_fold", "freeze_bn_stats",
           "unfreeze_bn_stats", "qat_convert"]
