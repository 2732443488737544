"""The tour's data: scikit-learn's bundled digits, or the user's MNIST IDX files or ``.npz``.

Every loader returns a :class:`Dataset`: float32 images (N, 1, H, W) scaled to [0, 1], int64
labels, split into train and test. The split (when the source has none) is drawn from a NumPy
``Generator`` seeded by the caller, so a seed fixes the data the tour sees.

Accepted ``--data`` paths:

- a folder holding MNIST files: ``*images-idx3-ubyte`` and ``*labels-idx1-ubyte`` (each optionally
  ``.gz``); files whose names start with ``t10k`` or ``test`` are the test split;
- one IDX images file: its labels file is found by name (``images-idx3`` -> ``labels-idx1``);
- an ``.npz`` with ``x`` (N, H, W) or (N, 1, H, W) and ``y`` (N,), optionally ``x_test``/``y_test``.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BatchNormError, expected

TEST_FRACTION = 0.25
# IDX type byte -> NumPy dtype (big-endian where it matters)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    """Images (N, 1, H, W) float32 in [0, 1] and int64 labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    num_classes: int
    pooled_from: tuple[int, int] | None = None  # original (H, W) when :func:`downsample` pooled


    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        return {
            "source": self.source,
            "train": int(len(self.y_train)),
            "test": int(len(self.y_test)),
            "image_shape": list(self.image_shape),
            "classes": int(self.num_classes),
            "pooled_from": list(self.pooled_from) if self.pooled_from else None,
        }


def downsample(data: Dataset, max_side: int) -> Dataset:
    """Average-pool images by the smallest integer factor that brings each side to <= max_side.

    The tour trains a dozen small CNNs and evaluates one at every step; on 8x8 digits that takes
    about a minute, on 28x28 MNIST twelve times longer. Pooling MNIST 2x2 (to 14x14) keeps the
    digits legible and the tour within minutes. Sides not divisible by the factor are cropped.
    """
    h, w = data.image_shape[1:]
    factor = -(-max(h, w) // max_side)  # ceil
    if factor <= 1:
        return data

    def pool(x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        hh, ww = h // factor, w // factor
        x = x[:, :, :hh * factor, :ww * factor].reshape(n, c, hh, factor, ww, factor)
        return x.mean(axis=(3, 5), dtype=np.float64).astype(np.float32)

    return Dataset(pool(data.x_train), data.y_train, pool(data.x_test), data.y_test,
                   data.source, data.num_classes, pooled_from=(h, w))


def load(path: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """Load the digits (``path=None``), a folder of MNIST IDX files, one IDX file or an ``.npz``."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.astype(np.float64)  # (1797, 8, 8), values 0..16
        return _split(x, digits.target, None, None, "scikit-learn digits (load_digits)", seed)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file or folder: {path}")
    if path.is_dir():
        return _load_idx_folder(path, seed)
    if path.suffix == ".npz":
        return _load_npz(path, seed)
    return _load_idx_pair(path, seed)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzip-compressed or not, into a NumPy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise expected(f"an IDX file (magic 00 00 <type> <ndim>) in {path}", f"bytes {raw[:4]!r}")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise expected(f"{ndim} dimension sizes in the IDX header of {path}", f"{len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise expected(
            f"{count * dtype.itemsize} data bytes for shape {shape} in {path}", len(raw) - header
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _labels_for(images: Path) -> Path:
    name = images.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    candidates = [images.with_name(name)]
    if name.endswith(".gz"):
        candidates.append(images.with_name(name[:-3]))
    else:
        candidates.append(images.with_name(name + ".gz"))
    for candidate in candidates:
        if candidate != images and candidate.exists():
            return candidate
    raise BatchNormError(
        f"expected a labels file beside {images} named like {candidates[0].name} (got none)"
    )


def _load_idx_pair(images: Path, seed: int) -> Dataset:
    x, y = read_idx(images), read_idx(_labels_for(images))
    return _split(x, y, None, None, f"IDX {images.name}", seed)


def _load_idx_folder(folder: Path, seed: int) -> Dataset:
    images = sorted(p for p in folder.iterdir()
                    if "images-idx3" in p.name or "images.idx3" in p.name)
    if not images:
        raise expected(f"MNIST files (*images-idx3-ubyte[.gz]) in {folder}", "none")
    test = [p for p in images if p.name.startswith(("t10k", "test"))]
    train = [p for p in images if p not in test]
    if len(train) > 1 or len(test) > 1:
        raise expected(f"one train and at most one test images file in {folder}",
                       ", ".join(p.name for p in images))
    if not train:
        train, test = test, []
    x, y = read_idx(train[0]), read_idx(_labels_for(train[0]))
    xt = yt = None
    if test:
        xt, yt = read_idx(test[0]), read_idx(_labels_for(test[0]))
    return _split(x, y, xt, yt, f"MNIST IDX files in {folder.name}", seed)


def _load_npz(path: Path, seed: int) -> Dataset:
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        if not {"x", "y"} <= keys:
            raise expected(f"arrays 'x' and 'y' in {path.name}", sorted(keys))
        x, y = f["x"], f["y"]
        xt = f["x_test"] if "x_test" in keys else None
        yt = f["y_test"] if "y_test" in keys else None
    if (xt is None) != (yt is None):
        raise expected(f"both 'x_test' and 'y_test' or neither in {path.name}", sorted(keys))
    return _split(x, y, xt, yt, f"npz {path.name}", seed)


def _images(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) or (N, 1, H, W) real values -> (N, 1, H, W) float64."""
    x = np.asarray(x)
    if x.dtype.kind not in "uif":
        raise expected(f"{what} to hold numbers", f"dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise expected(f"{what} of shape (N, H, W) or (N, 1, H, W)", f"shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] < 2 or x.shape[3] < 2:
        raise expected(f"{what} with at least one image of at least 2x2", f"shape {tuple(x.shape)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise expected(f"finite values in {what}", "NaN or Inf")
    return x


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise expected(f"{what} of shape ({n},)", f"shape {tuple(y.shape)}")
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise expected(f"{what} to be non-negative integers", f"dtype {y.dtype}")
    return y.astype(np.int64)


def _split(x, y, x_test, y_test, source: str, seed: int) -> Dataset:
    x = _images(x, "images")
    y = _labels(y, len(x), "labels")
    if x_test is None:
        order = np.random.default_rng(seed).permutation(len(x))
        n_test = max(1, int(round(len(x) * TEST_FRACTION)))
        if len(x) - n_test < 2:
            raise expected("at least 3 images to split into train and test", len(x))
        test, train = order[:n_test], order[n_test:]
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    else:
        x_test = _images(x_test, "test images")
        y_test = _labels(y_test, len(x_test), "test labels")
        if x_test.shape[1:] != x.shape[1:]:
            raise expected(f"test images of shape {x.shape[1:]}", x_test.shape[1:])
    # One scale for both splits, from the training images: pixels land in [0, 1].
    scale = float(np.max(np.abs(x))) or 1.0
    num_classes = int(max(y.max(), y_test.max())) + 1
    return Dataset(
        (x / scale).astype(np.float32), y, (x_test / scale).astype(np.float32), y_test,
        source, num_classes,
    )
