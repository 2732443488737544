"""Element-wise activation helpers shared by the kernels: forward, derivative, inverse.

The activation is chosen by an integer code: the code :mod:`batchnorm.activations` gives it (a
test checks that the two agree). Every kernel is made per activation (the kernel modules'
factories take the code and close over it), so inside a kernel the code is a compile-time
constant, and each helper here resolves to that one activation's formula while numba types the
kernel: no other activation's code is typed, compiled or branched on, and a kernel's compile
time does not grow with the number of activations (it did: one training-backward kernel serving
all five took 26 s to compile; made per activation, 5.5 s, and less once these helpers stopped
typing the other four).

Values are computed in the input's precision: ``k`` is a tuple of typed constants (kernels build
it with :func:`unpack` from the array ``consts`` returns), since a bare literal such as ``0.0``
would be a float64 in numba and promote float32 arithmetic. A tuple, not an array: values in
registers that no store can alias, which keeps the loops vectorisable.

Conventions follow PyTorch: the derivative at 0 is the left one for relu / leaky_relu / elu
(``z > 0`` takes the positive branch), relu(NaN) is NaN; relu6 is ``hardtanh(z, 0, 6)`` (its
derivative 1 on the open interval (0, 6), 0 elsewhere and at NaN); hardswish is
``z * relu6(z + 3) / 6``, its derivative 0 up to -3, ``z / 3 + 1/2`` on (-3, 3), 1 from 3 on,
NaN at NaN (``hardswish_backward``'s vectorised loop).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba.extending import overload

from ..numerics import elu_inverse_floor

# the codes of batchnorm.activations.REGISTRY
IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH = 0, 1, 2, 3, 4, 5, 6
CODES = (IDENTITY, RELU, LEAKY_RELU, ELU, SILU, RELU6, HARDSWISH)

# indices into the constants array k
ZERO, ONE, SLOPE, ALPHA, FLOOR, THREE, SIX, HALF = 0, 1, 2, 3, 4, 5, 6, 7


def consts(dtype: np.dtype, negative_slope: float, alpha: float) -> np.ndarray:
    """Typed constants for the kernels: 0, 1, slope, alpha, ELU's floor for inverting, 3, 6,
    1/2."""
    floor = elu_inverse_floor(float(np.finfo(dtype).eps))
    return np.array([0.0, 1.0, negative_slope, alpha, floor, 3.0, 6.0, 0.5], dtype=dtype)


@njit(inline="always", cache=True)
def unpack(k):
    """The constants array as a tuple (see the module docstring)."""
    return (k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7])


# ---------------------------------------------------------------------------------------------
# each activation's formulas (plain functions: numba compiles the one a kernel's code selects)


def _relu6(z, k):
    # hardtanh(z, 0, 6) as PyTorch computes it: NaN compares false both ways and passes through
    if z < k[ZERO]:
        return k[ZERO]
    return k[SIX] if z > k[SIX] else z


_ACTIVATE = {
    IDENTITY: lambda z, act, k: z,
    RELU: lambda z, act, k: k[ZERO] if z < k[ZERO] else z,  # NaN stays NaN
    LEAKY_RELU: lambda z, act, k: z if z > k[ZERO] else z * k[SLOPE],
    ELU: lambda z, act, k: z if z > k[ZERO] else k[ALPHA] * math.expm1(z),
    SILU: lambda z, act, k: z / (k[ONE] + math.exp(-z)),
    RELU6: lambda z, act, k: _relu6_jit(z, k),
    HARDSWISH: lambda z, act, k: z * _relu6_jit(z + k[THREE], k) / k[SIX],
}


def _silu_derivative(z, act, k):
    s = k[ONE] / (k[ONE] + math.exp(-z))
    return s * (k[ONE] + z * (k[ONE] - s))


def _hardswish_derivative(z, act, k):
    if z <= -k[THREE]:
        return k[ZERO]
    if z >= k[THREE]:
        return k[ONE]
    return z / k[THREE] + k[HALF]  # NaN gives NaN


_DERIVATIVE = {
    IDENTITY: lambda z, act, k: k[ONE],
    RELU: lambda z, act, k: k[ONE] if z > k[ZERO] else k[ZERO],
    LEAKY_RELU: lambda z, act, k: k[ONE] if z > k[ZERO] else k[SLOPE],
    ELU: lambda z, act, k: k[ONE] if z > k[ZERO] else k[ALPHA] * math.exp(z),
    SILU: _silu_derivative,
    RELU6: lambda z, act, k: k[ONE] if z > k[ZERO] and z < k[SIX] else k[ZERO],
    HARDSWISH: _hardswish_derivative,
}


def _elu_inverse(z, act, k):  # z is the output y here (one signature for every helper)
    if z > k[ZERO]:
        return z
    u = z / k[ALPHA]
    return math.log1p(u if u > k[FLOOR] else k[FLOOR])


# the invertible activations (identity, leaky_relu, elu): act^-1(y), and act'(z) written with
# y; the argument is named z as in every helper (numba matches overloads by parameter names)
_INVERSE = {
    IDENTITY: lambda z, act, k: z,
    LEAKY_RELU: lambda z, act, k: z if z > k[ZERO] else z / k[SLOPE],
    ELU: _elu_inverse,
}

_DERIVATIVE_FROM_OUTPUT = {
    IDENTITY: lambda z, act, k: k[ONE],
    LEAKY_RELU: lambda z, act, k: k[ONE] if z > k[ZERO] else k[SLOPE],
    ELU: lambda z, act, k: k[ONE] if z > k[ZERO] else z + k[ALPHA],
}

_relu6_jit = njit(inline="always", cache=True)(_relu6)


# ---------------------------------------------------------------------------------------------
# the helpers the kernels call


def _per_code(table: dict, name: str, doc: str):
    """A helper that numba compiles to ``table[act]`` alone, ``act`` being a compile-time
    constant (a kernel's closure code); a code numba does not know at compile time is a typing
    error, not a run-time branch. Called from Python, it evaluates the same formula."""

    def helper(z, act, k):
        return table[act](z, act, k)

    @overload(helper, inline="always")
    def _select(z, act, k):
        return table.get(getattr(act, "literal_value", None))

    helper.__name__ = helper.__qualname__ = name
    helper.__doc__ = doc
    return helper


activate = _per_code(_ACTIVATE, "activate", "act(z).")
derivative = _per_code(_DERIVATIVE, "derivative", "act'(z) from the pre-activation z.")
inverse = _per_code(_INVERSE, "inverse",
                    "act^-1(y) for the invertible activations (identity, leaky_relu, elu).")
derivative_from_output = _per_code(
    _DERIVATIVE_FROM_OUTPUT, "derivative_from_output",
    "act'(z) written with the output y = act(z) (invertible activations).")
