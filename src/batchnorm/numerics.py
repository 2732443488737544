"""Numerical limits the torch, NumPy/numba and Triton paths share (imports nothing, so the
torch-free kernels can use it too)."""
from __future__ import annotations

__all__ = ["elu_inverse_floor"]


def elu_inverse_floor(eps: float) -> float:
    """The least ``y / alpha`` ELU's inverse takes: ``-1 + eps``, ``eps`` the compute dtype's
    machine epsilon. ELU saturates at ``-alpha``, where ``log1p(y / alpha)`` is ``-inf``; clamped
    here the recovered pre-activation is about ``log(eps)``: finite, as close as the dtype tells."""
    return -1.0 + eps
