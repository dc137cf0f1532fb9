"""Sun et al.'s (ICML 2022) k-nearest-neighbour OOD score on unit-length features, in one place.

Pure NumPy and below both :mod:`flowcore.ood.scores` (which scores images) and :mod:`flowcore.ood.vectors`
(which stores the bank beside a feature flow), so neither has to import the other to reach it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalise", "knn_score"]


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean length (float64); an all-zero row stays zero."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """``-||f/|f| - b_(k)||``: minus the distance of each unit-length feature to its ``k``-th nearest row of
    ``bank`` (unit-length training features), Sun et al.'s k-NN OOD score (higher = more in-distribution)."""
    bank = np.asarray(bank, dtype=np.float64)
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in 1..{len(bank)} (the bank's size), got {k}")
    f = normalise(features)
    sq = (f**2).sum(1)[:, None] - 2 * f @ bank.T + (bank**2).sum(1)[None, :]
    kth = np.partition(sq, k - 1, axis=1)[:, k - 1]
    return -np.sqrt(np.maximum(kth, 0.0))
