"""The OOD verdict, in one place: a score's percentile among the in-distribution test scores, the threshold at a
false-positive rate, and the verdict itself (score below the threshold = OOD).

``flowcore score`` (:func:`flowcore.ood.scores.result_rows`) and every dashboard page read their verdicts from a
:class:`Judge`, so that the CLI's CSV and each page agree on the same image to the last digit and a NaN can never
read as in-distribution anywhere (NaN compares False with every threshold). Pure NumPy: the library and the
dashboard share it, and it pulls in nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DEFAULT_FPR",
    "OOD",
    "IN_DISTRIBUTION",
    "Verdict",
    "Judge",
    "judge_for",
    "ood_threshold",
    "percentile_of",
    "is_ood",
    "verdict",
]

DEFAULT_FPR = 0.05  # `flowcore score --fpr`'s default and the perturbation page's fixed rate
OOD = "OOD"
IN_DISTRIBUTION = "in-distribution"


def _sorted_percentile(values: ArrayLike, sorted_reference: np.ndarray) -> np.ndarray:
    """Percentile of each value among an already sorted reference; NaN where the value is not finite."""
    v = np.asarray(values, dtype=np.float64)
    pct = 100.0 * np.searchsorted(sorted_reference, v, side="left") / len(sorted_reference)
    # a NaN would land past every reference value and read as the 100th percentile, -inf as the 0th: neither
    # has a place among the reference
    return np.where(np.isfinite(v), pct, np.nan)[()]


def percentile_of(values: ArrayLike, reference: ArrayLike) -> np.ndarray:
    """Percentage of ``reference`` scores strictly below each value (0 = least in-distribution); NaN for a
    non-finite value, which has no percentile."""
    return _sorted_percentile(values, np.sort(np.asarray(reference, dtype=np.float64)))


def ood_threshold(reference_in: ArrayLike, fpr: float) -> float:
    """Score threshold flagging a fraction ``fpr`` of in-distribution images as OOD (score < threshold)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    return float(np.quantile(np.asarray(reference_in, dtype=np.float64), fpr))


def is_ood(value: float, threshold: float) -> bool:
    """The one OOD verdict: a score below the threshold of :func:`ood_threshold`. A non-finite score has no
    verdict (NaN compares False with everything, which would read as in-distribution): it is refused."""
    if not np.isfinite(value):
        raise ValueError(f"a non-finite score ({value}) has no OOD verdict")
    return bool(value < threshold)


def verdict(value: float, threshold: float) -> str:
    """:func:`is_ood` in words, as the dashboard shows it."""
    return OOD if is_ood(value, threshold) else IN_DISTRIBUTION


@dataclass(frozen=True)
class Verdict:
    """One score judged against a reference: everything a CSV row or a page shows about it."""

    value: float
    percentile: float  # share (%) of the in-distribution test scores strictly below ``value``
    threshold: float
    fpr: float
    ood: bool

    @property
    def words(self) -> str:
        """The words every page and table uses: "OOD" or "in-distribution"."""
        return OOD if self.ood else IN_DISTRIBUTION


@dataclass(frozen=True, eq=False)
class Judge:
    """The in-distribution test scores of one score and a false-positive rate: the threshold is fixed once, so
    that every value judged by it (a page's metric, its table, the CSV) meets the same threshold.

    ``reference`` is kept sorted and read-only. An empty or non-finite reference is refused: its threshold
    would be NaN, and every verdict against it "in-distribution".
    """

    reference: np.ndarray
    fpr: float = DEFAULT_FPR
    threshold: float = field(init=False)

    def __post_init__(self) -> None:
        ref = np.sort(np.asarray(self.reference, dtype=np.float64).ravel())
        if ref.size == 0:
            raise ValueError("a verdict needs at least one in-distribution reference score")
        bad = int(np.sum(~np.isfinite(ref)))
        if bad:
            raise ValueError(f"the reference holds {bad} non-finite score(s): no threshold can be read from it")
        ref.flags.writeable = False
        object.__setattr__(self, "reference", ref)
        object.__setattr__(self, "fpr", float(self.fpr))
        object.__setattr__(self, "threshold", ood_threshold(ref, self.fpr))

    def percentile(self, values: ArrayLike) -> np.ndarray:
        """Share (%) of the reference scores strictly below each value, as :func:`percentile_of`: an array for an
        array, a NumPy scalar for a scalar; NaN for a non-finite value (no place among the reference)."""
        return _sorted_percentile(values, self.reference)

    def is_ood(self, value: float) -> bool:
        """Whether ``value`` falls below the threshold; a non-finite value is refused (ValueError)."""
        return is_ood(float(value), self.threshold)

    def judge(self, value: float) -> Verdict:
        """``value``'s percentile and verdict; a non-finite value is refused (ValueError), never judged."""
        value = float(value)
        ood = self.is_ood(value)  # refuses NaN and inf before anything is read
        return Verdict(value, float(self.percentile(value)), self.threshold, self.fpr, ood)


def judge_for(reference: Mapping[str, np.ndarray], score: str, fpr: float = DEFAULT_FPR) -> Judge:
    """The :class:`Judge` of ``score`` from a checkpoint's reference statistics (``{set}__{score}`` arrays, as
    :func:`flowcore.ood.evaluate.load_reference` gives them): its in-distribution test scores ``test__{score}``.
    A reference without them is a clear error, never a silent fallback to another score."""
    key = f"test__{score}"
    if key not in reference:
        have = sorted(k.split("__", 1)[1] for k in reference if k.startswith("test__"))
        raise ValueError(
            f"the reference has no in-distribution test scores for {score!r} (no {key!r}; it has "
            f"{', '.join(have) or 'none'}): run `flowcore evaluate` on the checkpoint"
        )
    return Judge(reference[key], fpr)
