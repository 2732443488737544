"""Element-wise activation helpers shared by the kernels: forward, derivative, inverse.

The activation is chosen by an integer code (one compiled kernel serves all five): the code
:mod:`batchnorm.activations` gives it (a test checks that the two agree). It is evaluated
in the input's precision: ``k`` is a tuple of typed constants (kernels build it with
:func:`unpack` from the array ``consts`` returns), since a bare literal such as ``0.0`` would be a
float64 in numba and promote float32 arithmetic. A tuple, not an array: values in registers
that no store can alias, which keeps the loops vectorisable.

Conventions follow PyTorch: the derivative at 0 is the left one for relu / leaky_relu / elu
(``z > 0`` takes the positive branch), relu(NaN) is NaN.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# the codes of batchnorm.activations.REGISTRY
IDENTITY, RELU, LEAKY_RELU, ELU, SILU = 0, 1, 2, 3, 4
CODES = (IDENTITY, RELU, LEAKY_RELU, ELU, SILU)

# indices into the constants array k
ZERO, ONE, SLOPE, ALPHA, FLOOR = 0, 1, 2, 3, 4


def consts(dtype: np.dtype, negative_slope: float, alpha: float) -> np.ndarray:
    """Typed constants for the kernels: 0, 1, slope, alpha, and ELU's floor for inverting."""
    # ELU saturates at -alpha: y / alpha is clamped to -1 + eps so log1p stays finite
    floor = -1.0 + float(np.finfo(dtype).eps)
    return np.array([0.0, 1.0, negative_slope, alpha, floor], dtype=dtype)


@njit(inline="always", cache=True)
def unpack(k):
    """The constants array as a tuple (see the module docstring)."""
    return (k[0], k[1], k[2], k[3], k[4])


@njit(inline="always", cache=True)
def activate(z, act, k):
    """act(z)."""
    if act == RELU:
        return k[ZERO] if z < k[ZERO] else z  # NaN stays NaN
    if act == LEAKY_RELU:
        return z if z > k[ZERO] else z * k[SLOPE]
    if act == ELU:
        return z if z > k[ZERO] else k[ALPHA] * math.expm1(z)
    if act == SILU:
        return z / (k[ONE] + math.exp(-z))
    return z


@njit(inline="always", cache=True)
def derivative(z, act, k):
    """act'(z) from the pre-activation z."""
    if act == RELU:
        return k[ONE] if z > k[ZERO] else k[ZERO]
    if act == LEAKY_RELU:
        return k[ONE] if z > k[ZERO] else k[SLOPE]
    if act == ELU:
        return k[ONE] if z > k[ZERO] else k[ALPHA] * math.exp(z)
    if act == SILU:
        s = k[ONE] / (k[ONE] + math.exp(-z))
        return s * (k[ONE] + z * (k[ONE] - s))
    return k[ONE]


@njit(inline="always", cache=True)
def inverse(y, act, k):
    """act^-1(y) for the invertible activations (identity, leaky_relu, elu)."""
    if act == LEAKY_RELU:
        return y if y > k[ZERO] else y / k[SLOPE]
    if act == ELU:
        if y > k[ZERO]:
            return y
        u = y / k[ALPHA]
        return math.log1p(u if u > k[FLOOR] else k[FLOOR])
    return y


@njit(inline="always", cache=True)
def derivative_from_output(y, act, k):
    """act'(z) written with the output y = act(z) (invertible activations)."""
    if act == LEAKY_RELU:
        return k[ONE] if y > k[ZERO] else k[SLOPE]
    if act == ELU:
        return k[ONE] if y > k[ZERO] else y + k[ALPHA]
    return k[ONE]
