"""One table of batch-norm cases that every implementation in this project runs through.

A case fixes shape, channel axis, affine, tracking, momentum, eps and dtype. Each case is run for
three training steps then one eval step (``STEPS``); :func:`torch_trajectory` gives PyTorch's
answer for every step (output, dx, dweight, dbias, buffers), with channels-last cases compared
through a transpose. An implementation under test produces the same list of :class:`Step` and
:func:`assert_steps_close` compares them at the case's tolerance.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np

# logical (N, C, *spatial) shapes; 3 channels; N = 1 with spatial > 1 for every rank that has it
SHAPES = [
    (6, 3),
    (4, 3, 5),
    (1, 3, 5),
    (3, 3, 4, 5),
    (1, 3, 4, 5),
    (2, 3, 2, 3, 4),
    (1, 3, 2, 3, 4),
]
AXES = [1, -1]
MOMENTA = [0.1, 0.5, None]
EPSILONS = [1e-5, 1e-3]
DTYPES = ["float32", "float64"]
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
TRAIN_STEPS = 3
STEPS = [True] * TRAIN_STEPS + [False]  # training flag per step


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # logical channel-first shape
    axis: int  # 1 (N, C, *) or -1 (channels last)
    affine: bool
    track: bool
    momentum: float | None
    eps: float
    dtype: str

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return (f"{shape}-ax{self.axis}-{'affine' if self.affine else 'noaffine'}-"
                f"{'track' if self.track else 'notrack'}-m{self.momentum}-eps{self.eps}-"
                f"{self.dtype}")

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def tol(self) -> float:
        return TOLERANCE[self.dtype]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(self.id.encode()))

    def to_layout(self, a: np.ndarray) -> np.ndarray:
        """A channel-first array in this case's layout (contiguous)."""
        return np.ascontiguousarray(np.moveaxis(a, 1, self.axis))

    def from_layout(self, a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, self.axis, 1)

    def data(self):
        """Deterministic (params, [(x, dy) per step]) in this case's layout and dtype."""
        rng = self.rng()
        c = self.channels
        dt = np.dtype(self.dtype)
        params = {
            "weight": rng.normal(1.0, 0.5, c).astype(dt) if self.affine else None,
            "bias": rng.normal(0.0, 0.5, c).astype(dt) if self.affine else None,
            "running_mean": rng.normal(0.0, 0.5, c).astype(dt) if self.track else None,
            "running_var": rng.uniform(0.5, 1.5, c).astype(dt) if self.track else None,
        }
        steps = []
        for _ in STEPS:
            x = rng.normal(0.0, 1.0, self.shape) * rng.uniform(
                0.5, 2.0, (1, c) + (1,) * (len(self.shape) - 2))
            x = x + rng.normal(0.0, 1.0, (1, c) + (1,) * (len(self.shape) - 2))
            dy = rng.normal(0.0, 1.0, self.shape)
            steps.append((self.to_layout(x.astype(dt)), self.to_layout(dy.astype(dt))))
        return params, steps


@dataclass
class Step:
    """What one step produced; arrays in the case's layout, None where absent."""

    y: np.ndarray
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    num_batches_tracked: int | None


CASES = [
    Case(shape, axis, affine, track, momentum, eps, dtype)
    for shape, axis, affine, track, momentum, eps, dtype in itertools.product(
        SHAPES, AXES, [True, False], [True, False], MOMENTA, EPSILONS, DTYPES
    )
]


def make_module(case: Case, cls=None, **kwargs):
    """A BN module of class ``cls`` (default: PyTorch's BatchNorm{1,2,3}d for the case's rank)
    built with the case's arguments and initial parameters and buffers."""
    import torch

    if cls is None:
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[len(case.shape)]
    m = cls(case.channels, eps=case.eps, momentum=case.momentum, affine=case.affine,
            track_running_stats=case.track, dtype=getattr(torch, case.dtype), **kwargs)
    params, _ = case.data()
    with torch.no_grad():
        for name, value in params.items():
            if value is not None:
                getattr(m, name).copy_(torch.from_numpy(value))
    return m


def torch_module(case: Case):
    """PyTorch's BatchNorm{1,2,3}d for the case, with the case's initial parameters."""
    return make_module(case)


def module_trajectory(case: Case, m, *, copy: bool = False) -> list[Step]:
    """Run the case's steps through module m; x goes in as (N, C, *) over the case's layout.

    For channels-last cases that is a view of the (N, *, C) array, channels_last in memory, so a
    layer's channels-last path runs without a copy; ``copy=True`` hands in contiguous NCHW.
    """
    import torch

    _, steps = case.data()
    out = []
    for training, (x, dy) in zip(STEPS, steps):
        m.train(training)
        xn, dyn = case.from_layout(x), case.from_layout(dy)
        if copy:
            xn, dyn = xn.copy(), dyn.copy()
        xt = torch.from_numpy(xn).requires_grad_(True)
        for p in m.parameters():
            p.grad = None
        y = m(xt)
        assert y.shape == xt.shape and y.dtype == xt.dtype
        y.backward(torch.from_numpy(dyn))
        out.append(Step(
            y=case.to_layout(y.detach().numpy()),
            dx=case.to_layout(xt.grad.numpy()),
            dweight=None if m.weight is None else m.weight.grad.numpy().copy(),
            dbias=None if m.bias is None else m.bias.grad.numpy().copy(),
            running_mean=None if m.running_mean is None else m.running_mean.numpy().copy(),
            running_var=None if m.running_var is None else m.running_var.numpy().copy(),
            num_batches_tracked=(None if m.num_batches_tracked is None
                                 else int(m.num_batches_tracked)),
        ))
    return out


def torch_trajectory(case: Case) -> list[Step]:
    """PyTorch's answer for every step of the case (channels-last through a transpose)."""
    return module_trajectory(case, torch_module(case), copy=True)


def assert_steps_close(case: Case, got: list[Step], want: list[Step]) -> float:
    """Compare step by step at the case's tolerance; returns the largest error seen."""
    assert len(got) == len(want)
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        for field in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            a, b = getattr(g, field), getattr(w, field)
            assert (a is None) == (b is None), f"step {i} {field}: {a is None=} {b is None=}"
            if a is None:
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, (
                f"step {i} {field}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
            np.testing.assert_allclose(a, b, rtol=case.tol, atol=case.tol,
                                       err_msg=f"step {i} {field}")
            if a.size:
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        assert g.num_batches_tracked == w.num_batches_tracked, f"step {i} num_batches_tracked"
    return worst
