"""Datasets as uint8 arrays, (N, H, W) grayscale or (N, H, W, 3) RGB.

One root directory, from ``data_dir=`` / ``--data-dir`` or ``$FLOWCORE_DATA_DIR``, holds ``NAME.npz``
files (uint8 ``x_train``, ``y_train``, ``x_test``, ``y_test``).

Cross-domain rule (applied only by :func:`match_shape`): grayscale -> RGB replicates the channel,
RGB -> grayscale averages the three channels (rounded); 28 -> 32 pads with zeros equally on all sides,
32 -> 28 crops the centre.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "DatasetNotFound",
    "DATASETS",
    "data_dir",
    "load_images",
    "match_shape",
]

DATASETS = ("fashion_mnist", "mnist", "notmnist", "cifar10", "celeba32", "svhn")
# celeba32.npz holds 10,000 faces without a split: the first 9,000 train, the rest test.
CELEBA_TRAIN = 9000


class DatasetNotFound(Exception):
    """A dataset could not be found; the message says where we looked and how to get it."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit`` or ``$FLOWCORE_DATA_DIR`` (None when neither is set)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("FLOWCORE_DATA_DIR")
    return Path(env) if env else None


def _from_npz(path: Path, split: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as d:
        key = f"x_{split}"
        if key in d.files:
            return np.asarray(d[key], dtype=np.uint8)
        if path.stem.startswith("celeba") and "x_test" in d.files:
            x = np.asarray(d["x_test"], dtype=np.uint8)
            return x[:CELEBA_TRAIN] if split == "train" else x[CELEBA_TRAIN:]
        raise DatasetNotFound(f"{path} has no {key!r} array (arrays: {', '.join(d.files)})")


def load_images(name: str, split: str = "train", data_dir_: str | os.PathLike | None = None) -> np.ndarray:
    """Images of dataset ``name`` (one of :data:`DATASETS`, or ``npz:PATH``) for ``split``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("npz:"):
        path = Path(name[4:])
        if not path.is_file():
            raise DatasetNotFound(f"npz file not found: {path}")
        return _from_npz(path, split)
    if name not in DATASETS:
        raise DatasetNotFound(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, npz:PATH")
    root = data_dir(data_dir_)
    if root is not None and (root / f"{name}.npz").is_file():
        return _from_npz(root / f"{name}.npz", split)
    where = str(root) if root else "(FLOWCORE_DATA_DIR not set)"
    raise DatasetNotFound(
        f"dataset {name!r} not found in {where}; set FLOWCORE_DATA_DIR (or --data-dir) to a folder "
        f"holding {name}.npz, or run `flowcore data download {name}`"
    )


def match_shape(images: np.ndarray, image_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """Bring uint8 images (N, H, W[, 3]) to a model's ``[C, H, W]`` by the project's cross-domain rule.

    Returns (N, H, W) for C = 1 and (N, H, W, 3) for C = 3.
    """
    c, h, w = (int(v) for v in image_shape)
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if c == 1 and x.ndim == 4:
        x = np.round(x.astype(np.float32).mean(axis=-1)).astype(np.uint8)
    elif c == 3 and x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    x = _fit_spatial(x, h, w)
    return np.ascontiguousarray(x)


def _fit_spatial(x: np.ndarray, h: int, w: int) -> np.ndarray:
    for axis, size in ((1, h), (2, w)):
        cur = x.shape[axis]
        if cur < size:
            before = (size - cur) // 2
            pad = [(0, 0)] * x.ndim
            pad[axis] = (before, size - cur - before)
            x = np.pad(x, pad)
        elif cur > size:
            start = (cur - size) // 2
            x = np.take(x, np.arange(start, start + size), axis=axis)
    return x
