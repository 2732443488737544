"""batchnorm.reference against PyTorch (the case table), finite differences and properties."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchnorm import BatchNormError, reference
from tests.cases import CASES, STEPS, Case, Step, assert_steps_close, torch_trajectory


def reference_trajectory(case: Case) -> list[Step]:
    params, steps = case.data()
    w, b, rm, rv = params["weight"], params["bias"], params["running_mean"], params["running_var"]
    nbt = 0
    out = []
    for training, (x, dy) in zip(STEPS, steps):
        y, state = reference.forward(x, w, b, rm, rv, training=training, momentum=case.momentum,
                                     eps=case.eps, axis=case.axis, num_batches_tracked=nbt)
        dx, dw, db = reference.backward(dy, state)
        rm, rv, nbt = state.running_mean, state.running_var, state.num_batches_tracked
        out.append(Step(y, dx, dw, db, rm, rv, nbt if case.track else None))
    return out


def test_case_table_is_large_enough():
    assert len(CASES) >= 500
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch(case):
    worst = assert_steps_close(case, reference_trajectory(case), torch_trajectory(case))
    if os.environ.get("BATCHNORM_REPORT_ERRORS"):  # collected for the issue note
        with open(os.environ["BATCHNORM_REPORT_ERRORS"], "a") as f:
            f.write(json.dumps({"id": case.id, "dtype": case.dtype, "err": worst}) + "\n")


# ----------------------------------------------------------------------------------------------
# Gradients by central finite differences (float64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("track", [True, False])
def test_gradients_finite_differences(training, affine, axis, track):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2, 4)) if axis == 1 else rng.normal(size=(3, 4, 2))
    w = rng.normal(1, 0.3, 2) if affine else None
    b = rng.normal(0, 0.3, 2) if affine else None
    rm = rng.normal(size=2) if track else None
    rv = rng.uniform(0.5, 2, 2) if track else None
    dy = rng.normal(size=x.shape)

    def loss(x_, w_=w, b_=b):
        y, _ = reference.forward(x_, w_, b_, rm, rv, training=training, axis=axis)
        return float((y * dy).sum())

    _, state = reference.forward(x, w, b, rm, rv, training=training, axis=axis)
    dx, dw, db = reference.backward(dy, state)

    def numeric(f, a):
        g = np.zeros_like(a)
        h = 1e-6
        for i in np.ndindex(a.shape):
            ap, am = a.copy(), a.copy()
            ap[i] += h
            am[i] -= h
            g[i] = (f(ap) - f(am)) / (2 * h)
        return g

    np.testing.assert_allclose(dx, numeric(loss, x), rtol=1e-6, atol=1e-7)
    if affine:
        np.testing.assert_allclose(dw, numeric(lambda w_: loss(x, w_, b), w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(db, numeric(lambda b_: loss(x, w, b_), b), rtol=1e-6, atol=1e-7)
    else:
        assert dw is None and db is None


# ----------------------------------------------------------------------------------------------
# Properties

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=5, min_side=2, max_side=4),
                  elements=finite),
       st.integers(-5, 4))
def test_normalised_output_has_zero_mean_unit_variance(x, axis):
    axis = axis % x.ndim
    stats = reference.moments(x, axis)
    spread = np.sqrt(stats.var())
    if (spread < 1e-3).any():  # eps dominates a near-constant channel
        return
    y, _ = reference.forward(x, None, None, None, None, training=True, axis=axis, eps=1e-12)
    others = tuple(i for i in range(x.ndim) if i != axis)
    np.testing.assert_allclose(y.mean(axis=others), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=others), 1.0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(hnp.arrays(np.float64, (5, 2, 3), elements=st.floats(-10, 10, width=64)),
                min_size=1, max_size=6),
       st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_running_statistics_closed_form(batches, momentum):
    """After k steps: running = (1-m)^k r0 + sum_i m (1-m)^(k-i) stat_i; None: plain average."""
    r0m, r0v = np.array([0.3, -0.2]), np.array([1.5, 0.7])
    rm, rv, nbt = r0m, r0v, 0
    for x in batches:
        _, state = reference.forward(x, None, None, rm, rv, training=True, momentum=momentum,
                                     num_batches_tracked=nbt)
        rm, rv, nbt = state.running_mean, state.running_var, state.num_batches_tracked
    k = len(batches)
    means = np.array([x.mean(axis=(0, 2)) for x in batches])
    vars_ = np.array([x.var(axis=(0, 2), ddof=1) for x in batches])
    if momentum is None:
        want_m, want_v = means.mean(axis=0), vars_.mean(axis=0)
    else:
        weights = np.array([momentum * (1 - momentum) ** (k - 1 - i) for i in range(k)])
        want_m = (1 - momentum) ** k * r0m + weights @ means
        want_v = (1 - momentum) ** k * r0v + weights @ vars_
    assert nbt == k
    np.testing.assert_allclose(rm, want_m, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, want_v, rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4)),
                  elements=st.floats(-1e6, 1e6, width=64)),
       st.lists(st.integers(0, 12), max_size=4))
def test_merge_of_any_split_equals_whole(x, cuts):
    """Split the batch anywhere (empty pieces too); merging the pieces gives the whole."""
    cuts = sorted(min(c, x.shape[0]) for c in cuts)
    pieces = np.split(x, cuts, axis=0)
    merged = reference.moments(pieces[0])
    for piece in pieces[1:]:
        merged = reference.merge(merged, reference.moments(piece))
    whole = reference.moments(x)
    np.testing.assert_array_equal(merged.count, whole.count)
    scale = np.abs(x).max() + 1.0
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-9 * scale**2)
    np.testing.assert_allclose(whole.mean, x.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12 * scale)


def test_merge_with_empty_is_neutral():
    a = reference.moments(np.arange(12.0).reshape(2, 3, 2))
    empty = reference.moments(np.zeros((0, 3, 2)))
    for m in (reference.merge(a, empty), reference.merge(empty, a)):
        np.testing.assert_array_equal(m.mean, a.mean)
        np.testing.assert_array_equal(m.m2, a.m2)
        np.testing.assert_array_equal(m.count, a.count)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32,
                  st.tuples(st.integers(2, 4), st.integers(1, 3), st.integers(1, 3),
                            st.integers(1, 3)),
                  elements=st.floats(-100, 100, width=32)))
def test_axis_equivalence(x):
    """Channels last with axis=-1 equals channels first with axis=1, transposed."""
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y1, s1 = reference.forward(x, None, None, rm, rv, training=True)
    y2, s2 = reference.forward(np.moveaxis(x, 1, -1), None, None, rm, rv, training=True, axis=-1)
    np.testing.assert_array_equal(np.moveaxis(y2, -1, 1), y1)
    np.testing.assert_array_equal(s1.running_var, s2.running_var)


# ----------------------------------------------------------------------------------------------
# Numerics: large offset


def test_large_offset_is_stable():
    """float32 x = 1e4 + 1e-2 N(0,1): within 1e-4 of the float64 answer (PyTorch CPU: ~3e-2)."""
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((64, 8, 32, 32))).astype(np.float32)
    y, state = reference.forward(x, None, None, None, None, training=True)
    x64 = x.astype(np.float64)  # the same data, exactly
    exact = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(
        x64.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    assert np.abs(y - exact).max() < 1e-4
    np.testing.assert_allclose(state.var, x64.var(axis=(0, 2, 3)), rtol=1e-9)
    assert y.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Bad input: the right error, raised before anything changes


def _args(**over):
    rng = np.random.default_rng(1)
    args = dict(
        x=rng.normal(size=(4, 3, 2)).astype(np.float32),
        weight=np.ones(3, np.float32), bias=np.zeros(3, np.float32),
        running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
        training=True, momentum=0.1, eps=1e-5, axis=1, num_batches_tracked=0,
    )
    args.update(over)
    return args


BAD = {
    "one value per channel": dict(x=np.ones((1, 3, 1), np.float32)),
    "one value per channel 2d": dict(x=np.ones((1, 3), np.float32)),
    "channel count": dict(weight=np.ones(4, np.float32)),
    "running_mean channels": dict(running_mean=np.zeros(2, np.float32)),
    "rank 1": dict(x=np.ones(3, np.float32)),
    "rank 6": dict(x=np.ones((2, 3, 1, 1, 1, 2), np.float32)),
    "eps zero training": dict(eps=0.0),
    "eps negative eval": dict(eps=-1e-5, training=False),
    "eps nan": dict(eps=float("nan")),
    "eps inf": dict(eps=float("inf")),
    "momentum > 1": dict(momentum=1.5),
    "momentum < 0": dict(momentum=-0.1),
    "momentum nan": dict(momentum=float("nan")),
    "int dtype": dict(x=np.ones((4, 3, 2), np.int64)),
    "bool dtype": dict(x=np.ones((4, 3, 2), bool)),
    "complex dtype": dict(x=np.ones((4, 3, 2), np.complex64)),
    "mixed dtype x64": dict(x=np.ones((4, 3, 2), np.float64)),
    "mixed dtype weight": dict(weight=np.ones(3, np.float64)),
    "nan running_mean": dict(running_mean=np.array([0, np.nan, 0], np.float32)),
    "nan running_var": dict(running_var=np.array([1, 1, np.nan], np.float32)),
    "negative running_var": dict(running_var=np.array([1, -1, 1], np.float32)),
    "half tracking": dict(running_var=None),
    "axis out of range": dict(axis=3),
    "negative nbt": dict(num_batches_tracked=-1),
    "not an array": dict(x=[[1.0, 2.0, 3.0]] * 4),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_and_changes_nothing(name):
    args = _args(**BAD[name])
    arrays = {k: v for k, v in args.items() if isinstance(v, np.ndarray)}
    copies = {k: v.copy() for k, v in arrays.items()}
    positional = [args.pop(k) for k in ("x", "weight", "bias", "running_mean", "running_var")]
    with pytest.raises(BatchNormError, match=r"^expected .+ \(got .+\)$"):
        reference.forward(*positional, **args)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, copies[k])


def test_bad_input_leaves_callers_arrays_untouched():
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(BatchNormError):
        reference.forward(np.ones((1, 3), np.float32), None, None, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_is_a_value_error():
    assert issubclass(BatchNormError, ValueError)


def test_inputs_are_never_mutated():
    args = _args()
    copies = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    y, state = reference.forward(args.pop("x"), args.pop("weight"), args.pop("bias"),
                                 args["running_mean"], args["running_var"],
                                 **{k: v for k, v in args.items()
                                    if k not in ("running_mean", "running_var")})
    reference.backward(np.ones_like(y), state)
    np.testing.assert_array_equal(args["running_mean"], copies["running_mean"])
    np.testing.assert_array_equal(args["running_var"], copies["running_var"])
    assert state.running_mean is not args["running_mean"]


def test_eval_allows_eps_zero_and_one_value():
    y, _ = reference.forward(np.ones((1, 3), np.float32), None, None, np.zeros(3, np.float32),
                             np.ones(3, np.float32), training=False, eps=0.0)
    np.testing.assert_array_equal(y, 1.0)


def test_backward_checks_dy():
    y, state = reference.forward(**_args())
    with pytest.raises(BatchNormError, match="expected dy of shape"):
        reference.backward(np.ones((4, 3, 3), np.float32), state)
    with pytest.raises(BatchNormError, match="expected dy of dtype"):
        reference.backward(np.ones(y.shape, np.float64), state)


# ----------------------------------------------------------------------------------------------
# Empty batch (N = 0): as PyTorch


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_matches_torch(momentum):
    import torch

    x = np.zeros((0, 3, 4, 4), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    y, state = reference.forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), rm, rv,
                                 training=True, momentum=momentum, num_batches_tracked=4)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.num_batches_tracked.fill_(4)
    yt = bn(torch.from_numpy(x))
    assert y.shape == tuple(yt.shape) == (0, 3, 4, 4)
    np.testing.assert_array_equal(state.running_mean, bn.running_mean.numpy())
    np.testing.assert_array_equal(state.running_var, bn.running_var.numpy())
    assert state.num_batches_tracked == int(bn.num_batches_tracked) == 5
    dx, dw, db = reference.backward(np.zeros_like(x), state)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
