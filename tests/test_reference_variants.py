"""The reference's options for hard training conditions against independent statements of them.

Each formula is written here again from its paper (Batch Renorm: Ioffe 2017, Algorithm 1; Ghost
BN: Hoffer et al. 2017), or as a plain BN on data arranged differently (ghost pieces one by one,
masked values gathered into a dense array), and the gradients by central finite differences of
the reference's own forward in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

from batchnorm import reference
from batchnorm.errors import BatchNormError

EPS = 1e-3


def _data(shape=(6, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(0.5, 2.0, shape)
    return x, rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c), rng.normal(0, 1, c), \
        rng.uniform(0.5, 2.0, c)


def _fd_grads(f, x, w, b, dy, h=1e-6):
    """Central differences of sum(f(x, w, b) * dy) for x, w and b."""
    out = []
    for arr in (x, w, b):
        grad = np.zeros_like(arr)
        it = np.nditer(arr, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            old = arr[i]
            arr[i] = old + h
            plus = (f(x, w, b) * dy).sum()
            arr[i] = old - h
            minus = (f(x, w, b) * dy).sum()
            arr[i] = old
            grad[i] = (plus - minus) / (2 * h)
        out.append(grad)
    return out


def _check_grads(kwargs, shape=(6, 3, 5), seed=0, training=True):
    x, w, b, rm, rv = _data(shape, seed)
    dy = np.random.default_rng(seed + 1).normal(size=shape)

    def f(x, w, b):
        return reference.forward(x, w, b, rm, rv, training=training, eps=EPS, **kwargs)[0]

    _, state = reference.forward(x, w, b, rm, rv, training=training, eps=EPS, **kwargs)
    dx, dw, db = reference.backward(dy, state)
    fdx, fdw, fdb = _fd_grads(f, x, w, b, dy)
    np.testing.assert_allclose(dx, fdx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, fdw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, fdb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Batch Renorm


def _renorm_paper(x, w, b, rm, rv, rmax, dmax, momentum=0.1):
    """Ioffe 2017, Algorithm 1, over axis 1 of (N, C, L), written out per channel."""
    y = np.empty_like(x)
    new_rm, new_rv = rm.copy(), rv.copy()
    for c in range(x.shape[1]):
        v = x[:, c].ravel()
        mu_b = v.mean()
        sigma_b = np.sqrt(((v - mu_b) ** 2).mean() + EPS)
        sigma = np.sqrt(rv[c] + EPS)
        r = min(max(sigma_b / sigma, 1 / rmax), rmax)
        d = min(max((mu_b - rm[c]) / sigma, -dmax), dmax)
        xhat = (x[:, c] - mu_b) / sigma_b * r + d
        y[:, c] = w[c] * xhat + b[c]
        new_rm[c] = rm[c] + momentum * (mu_b - rm[c])
        new_rv[c] = rv[c] + momentum * (v.var(ddof=1) - rv[c])
    return y, new_rm, new_rv


@pytest.mark.parametrize("rmax, dmax", [(1.0, 0.0), (1.5, 0.2), (3.0, 5.0), (1.01, 0.01)])
def test_renorm_is_the_papers_algorithm(rmax, dmax):
    x, w, b, rm, rv = _data()
    y, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, renorm=True,
                                 rmax=rmax, dmax=dmax)
    want, want_rm, want_rv = _renorm_paper(x, w, b, rm, rv, rmax, dmax)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.running_mean, want_rm, rtol=1e-12)
    np.testing.assert_allclose(state.running_var, want_rv, rtol=1e-12)


def test_renorm_clips_bite_in_this_data():
    """The data of these tests moves r and d past small clips: a test of the clips, not of 1/0."""
    x, w, b, rm, rv = _data()
    _, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, renorm=True,
                                 rmax=1.5, dmax=0.2)
    piece = state.pieces[0]
    assert np.isclose(np.abs(piece.d), 0.2).any() and np.isclose(piece.r, 1.5).any()


def test_renorm_with_unit_clips_is_bn_exactly():
    x, w, b, rm, rv = _data()
    plain = reference.forward(x, w, b, rm, rv, training=True, eps=EPS)
    renorm = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, renorm=True)
    np.testing.assert_array_equal(plain[0], renorm[0])
    dy = np.ones_like(x)
    for a, b_ in zip(reference.backward(dy, plain[1]), reference.backward(dy, renorm[1])):
        np.testing.assert_array_equal(a, b_)


def test_renorm_eval_is_bn_eval():
    x, w, b, rm, rv = _data()
    y, _ = reference.forward(x, w, b, rm, rv, training=False, eps=EPS, renorm=True, rmax=3,
                             dmax=5)
    np.testing.assert_array_equal(y, reference.forward(x, w, b, rm, rv, training=False,
                                                       eps=EPS)[0])


@pytest.mark.parametrize("rmax, dmax", [(1.5, 0.2), (3.0, 5.0)])
def test_renorm_gradients_are_finite_differences_with_r_d_constant(rmax, dmax):
    # r and d are constants for the gradient: finite differences of a forward whose r, d are
    # frozen at this batch's values
    x, w, b, rm, rv = _data()
    _, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, renorm=True,
                                 rmax=rmax, dmax=dmax)
    r, d = state.pieces[0].r, state.pieces[0].d
    dy = np.random.default_rng(1).normal(size=x.shape)

    def frozen(x, w, b):
        mu = x.mean(axis=(0, 2), keepdims=True)
        var = x.var(axis=(0, 2), keepdims=True)
        xhat = (x - mu) / np.sqrt(var + EPS) * r[:, None] + d[:, None]
        return w[:, None] * xhat + b[:, None]

    dx, dw, db = reference.backward(dy, state)
    fdx, fdw, fdb = _fd_grads(frozen, x, w, b, dy)
    np.testing.assert_allclose(dx, fdx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, fdw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, fdb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Ghost BN


@pytest.mark.parametrize("n, vbs", [(6, 2), (7, 3), (5, 5), (5, 8), (4, 1)])
def test_ghost_is_bn_on_each_piece_and_the_running_update_is_the_whole_batchs(n, vbs):
    x, w, b, rm, rv = _data((n, 3, 5))
    y, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, virtual_batch_size=vbs)
    for start in range(0, n, vbs):
        piece = x[start:start + vbs]
        want, _ = reference.forward(piece, w, b, rm, rv, training=True, eps=EPS)
        np.testing.assert_allclose(y[start:start + vbs], want, rtol=1e-13, atol=1e-13)
    _, whole = reference.forward(x, w, b, rm, rv, training=True, eps=EPS)
    np.testing.assert_allclose(state.running_mean, whole.running_mean, rtol=1e-13)
    np.testing.assert_allclose(state.running_var, whole.running_var, rtol=1e-13)
    assert state.num_batches_tracked == 1


@pytest.mark.parametrize("n, vbs", [(6, 2), (7, 3)])
def test_ghost_gradients(n, vbs):
    _check_grads({"virtual_batch_size": vbs}, shape=(n, 3, 4))


def test_ghost_eval_is_bn_eval():
    x, w, b, rm, rv = _data()
    y, _ = reference.forward(x, w, b, rm, rv, training=False, eps=EPS, virtual_batch_size=2)
    np.testing.assert_array_equal(y, reference.forward(x, w, b, rm, rv, training=False,
                                                       eps=EPS)[0])


def test_ghost_piece_of_one_value_is_an_error():
    x, w, b, rm, rv = _data((5, 3))
    with pytest.raises(BatchNormError, match="ghost batches of more than 1 value"):
        reference.forward(x, w, b, rm, rv, training=True, virtual_batch_size=2)  # 2+2+1


def test_ghost_with_renorm_clips_each_piece():
    x, w, b, rm, rv = _data()
    y, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, renorm=True, rmax=1.5,
                                 dmax=0.2, virtual_batch_size=3)
    for start in (0, 3):
        want, _, _ = _renorm_paper(x[start:start + 3], w, b, rm, rv, 1.5, 0.2)
        np.testing.assert_allclose(y[start:start + 3], want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# masks


def _mask(shape=(6, 5), seed=2, p=0.6):
    mask = np.random.default_rng(seed).random(shape) < p
    mask[0, :2] = True
    return mask


def test_masked_statistics_are_bn_on_the_counted_values_gathered():
    x, w, b, rm, rv = _data()
    mask = _mask()
    y, state = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, mask=mask)
    gathered = np.moveaxis(x, 1, 2)[mask]  # (counted, C): the counted positions, densely
    dense_y, dense = reference.forward(gathered, w, b, rm, rv, training=True, eps=EPS)
    np.testing.assert_allclose(state.mean, dense.mean, rtol=1e-13)
    np.testing.assert_allclose(state.var, dense.var, rtol=1e-12)
    np.testing.assert_allclose(state.running_var, dense.running_var, rtol=1e-13)
    # every position is normalised with them, the counted ones as in the dense BN
    np.testing.assert_allclose(np.moveaxis(y, 1, 2)[mask], dense_y, rtol=1e-12, atol=1e-12)
    expect = (x - state.mean[:, None]) / np.sqrt(state.var[:, None] + EPS) * w[:, None] \
        + b[:, None]
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


def test_masked_gradients():
    _check_grads({"mask": _mask()})
    _check_grads({"mask": _mask(), "virtual_batch_size": 4})


def test_all_true_mask_is_no_mask():
    x, w, b, rm, rv = _data()
    a = reference.forward(x, w, b, rm, rv, training=True, eps=EPS)
    m = reference.forward(x, w, b, rm, rv, training=True, eps=EPS,
                          mask=np.ones((6, 5), bool))
    np.testing.assert_allclose(a[0], m[0], rtol=1e-14, atol=1e-14)


def test_channels_last_mask_is_the_same_positions():
    x, w, b, rm, rv = _data()
    mask = _mask()
    y1, _ = reference.forward(x, w, b, rm, rv, training=True, eps=EPS, mask=mask)
    y2, _ = reference.forward(np.moveaxis(x, 1, -1), w, b, rm, rv, training=True, eps=EPS,
                              axis=-1, mask=mask)
    np.testing.assert_allclose(np.moveaxis(y2, -1, 1), y1, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mask, match", [
    (np.ones((6, 4), bool), "mask of shape"),
    (np.ones((6, 5), np.float32), "boolean mask"),
    (np.zeros((6, 5), bool), "count at least 2"),
])
def test_bad_masks(mask, match):
    x, w, b, rm, rv = _data()
    with pytest.raises(BatchNormError, match=match):
        reference.forward(x, w, b, rm, rv, training=True, mask=mask)


# ---------------------------------------------------------------------------------------------
# test-time statistics


def test_eval_stats_batch_and_mix():
    x, w, b, rm, rv = _data()
    mu, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    for stats, mix, m, v in (("batch", 0.0, mu, var), ("mix", 0.3, 0.3 * mu + 0.7 * rm,
                                                       0.3 * var + 0.7 * rv),
                             ("mix", 0.0, rm, rv), ("running", 0.9, rm, rv)):
        y, state = reference.forward(x, w, b, rm, rv, training=False, eps=EPS,
                                     eval_stats=stats, eval_mix=mix)
        expect = (x - m[:, None]) / np.sqrt(v[:, None] + EPS) * w[:, None] + b[:, None]
        np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(state.running_mean, rm)  # buffers untouched
        assert state.num_batches_tracked == 0


@pytest.mark.parametrize("stats, mix", [("batch", 0.0), ("mix", 0.3), ("mix", 1.0)])
def test_eval_stats_gradients(stats, mix):
    _check_grads({"eval_stats": stats, "eval_mix": mix}, training=False)
    _check_grads({"eval_stats": stats, "eval_mix": mix, "mask": _mask()}, training=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"rmax": 0.5, "renorm": True}, "rmax >= 1"),
    ({"dmax": -1.0, "renorm": True}, "dmax >= 0"),
    ({"renorm": 1}, "renorm to be True or False"),
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"virtual_batch_size": 2.0}, "virtual_batch_size"),
    ({"eval_stats": "test"}, "eval_stats in"),
    ({"eval_mix": 1.5}, "eval_mix in"),
])
def test_bad_options(kwargs, match):
    x, w, b, rm, rv = _data()
    with pytest.raises(BatchNormError, match=match):
        reference.forward(x, w, b, rm, rv, training=True, **kwargs)


def test_renorm_needs_running_statistics():
    x, w, b, _, _ = _data()
    with pytest.raises(BatchNormError, match="running statistics with renorm"):
        reference.forward(x, w, b, None, None, training=True, renorm=True)
