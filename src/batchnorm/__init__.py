"""batchnorm: batch normalization, exactly and fast.

The public names are listed in ``__all__``; nothing else is promised. Submodules are imported on
first use, so ``import batchnorm`` stays cheap and a NumPy-only user never loads the kernels.

Modules whose main function shares a public name carry another file name (``folding`` holds
``fold``, ``inspection`` holds ``inspect``...): a submodule named like the function would
replace it as the package attribute the first time someone imports the submodule.
"""
from __future__ import annotations

import importlib

from .errors import BatchNormError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "reference": None,  # the module itself
    "BatchNorm1d": "layers",
    "BatchNorm2d": "layers",
    "BatchNorm3d": "layers",
    "BatchNormAct1d": "layers",
    "BatchNormAct2d": "layers",
    "BatchNormAct3d": "layers",
    "FrozenBatchNorm1d": "frozen",
    "FrozenBatchNorm2d": "frozen",
    "FrozenBatchNorm3d": "frozen",
    "SyncBatchNorm": "sync",
    "SyncBatchNormAct": "sync",
    "convert": "conversion",
    "freeze": "conversion",
    "unfreeze": "conversion",
    "inspect": "inspection",
    "Report": "inspection",
    "strip_bias": "folding",
    "fold": "folding",
    "fold_weights": "folding",
    "fold_weights_forward": "folding",
    "fuse_frozen": "fusion",
    "recalibrate": "recalibration",
    "adapt": "adaptation",
    "diagnose": "diagnosis",
    "Diagnosis": "diagnosis",
    "export_onnx": "onnx_export",
    "qat_fold": "qat",
    "qat_convert": "qat",
    "freeze_bn_stats": "qat",
    "unfreeze_bn_stats": "qat",
    "FakeQuantize": "qat",
    "QATConvBn": "qat",
    "QATBatchNorm": "qat",
    "set_output_cache": "ops.memory",
    "empty_output_cache": "ops.memory",
    "output_cache_info": "ops.memory",
    "warmup": "ops.warmup",
    "set_backend": "ops.backends",
    "get_backend": "ops.backends",
}

__all__ = ["BatchNormError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
    module_name = _LAZY[name]
    if module_name is None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
