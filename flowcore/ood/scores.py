"""OOD scores beside raw likelihood. One sign convention: higher = more in-distribution.

- ``likelihood``: log P(x) in nats (the baseline the paper shows failing).
- ``complexity_png`` / ``complexity_webp``: input complexity (Serra et al. 2020),
  ``-(bpd_model(x) - L(x) / D)`` with ``L`` the bit length of a lossless PNG (level 9) or WebP
  (lossless, method 6) encoding of the uint8 image.
- ``typicality``: ``-|log P(x) - H|``, ``H`` the mean in-distribution train log-likelihood
  (Nalisnick et al. 2019); :func:`typicality_batch_test` is their batch test.
- ``likelihood_ratio``: ``log P_model(x) - log P_background(x)`` (Ren et al. 2019), the background
  model trained on in-distribution images with pixels replaced by uniform noise w.p. mu.
- ``last_scale``: log N(z_S; 0, I) of the latents of the last (most global) scale alone
  (after Schirrmeister et al. 2020); ``scale_k`` gives every scale's prior term.
- ``embedding_gaussian``: the baseline a flow on features must beat: the log-density of the features under the
  Gaussian of the training features with Ledoit-Wolf shrinkage (a Mahalanobis distance, in nats); stored in the
  feature flow as its whitening layer (:meth:`flowcore.flows.models.TabularFlow.gaussian_log_prob`).
- ``embedding_knn``: the non-parametric baseline of Sun et al. (ICML 2022): minus the Euclidean distance of the
  unit-length features to the k-th nearest unit-length training feature of a bank stored with the feature flow.
- ``embedding_likelihood``: log-density of the image's ImageNet-classifier features under the flow on features
  trained on the same data (Sec. 8, :func:`flowcore.zoo.checkpoints.paired_feature_flow`), the paper's positive
  result. The image is the one the pixel flow sees (inverted too where ``--invert auto`` inverted it); its
  reference values are the feature flow's own (:func:`with_embedding_reference`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch import nn

from ..flows.layout import to_channels_last
from ..flows.likelihood import as_image_tensor, log_likelihood_terms, nats_to_bpd
from .knn import knn_score, normalise  # their one home; kept here for callers
from .verdicts import is_ood, judge_for, ood_threshold, percentile_of, verdict  # their one home; kept here for callers

__all__ = [
    "SCORE_NAMES",
    "SCORE_DESCRIPTIONS",
    "compressed_bits",
    "compute_scores",
    "auroc",
    "percentile_of",
    "ood_threshold",
    "is_ood",
    "verdict",
    "typicality_batch_test",
    "result_rows",
    "with_embedding_reference",
    "EMBEDDING_SCORES",
    "normalise",
    "knn_score",
    "CSV_FIELDS",
]

SCORE_DESCRIPTIONS = {
    "likelihood": "log-likelihood log P(x) in nats (baseline)",
    "complexity_png": "input complexity: -(model bpd - PNG bpd)",
    "complexity_webp": "input complexity: -(model bpd - lossless WebP bpd)",
    "typicality": "-|log P(x) - mean train log P|",
    "likelihood_ratio": "log P_model(x) - log P_background(x)",
    "last_scale": "log-density of the last scale's latents alone",
    "embedding_likelihood": "log-density of the image's classifier features under the paired flow on features",
    "embedding_gaussian": "log-density of the image's features under a Ledoit-Wolf Gaussian of the training features",
    "embedding_knn": "minus the distance of the unit-length features to their k-th nearest training feature",
}
EMBEDDING_SCORES = ("embedding_likelihood", "embedding_gaussian", "embedding_knn")
SCORE_NAMES = tuple(SCORE_DESCRIPTIONS)


WEBP_METHOD = 4


def compressed_bits(images, codec: str = "png") -> np.ndarray:
    """Bit length of a lossless encoding of each uint8 image (header included, as Serra et al.)."""
    out = np.empty(len(images))
    for i, arr in enumerate(to_channels_last(as_image_tensor(images))):
        buf = io.BytesIO()
        img = Image.fromarray(arr)
        if codec == "png":
            img.save(buf, format="PNG", optimize=True, compress_level=9)
        elif codec == "webp":
            # effort: method 4 (libwebp's default) with quality 100 encodes a 32x32 RGB image ~40x faster than
            # method 6 and no larger (benchmarks/codecs.py), which decides how long an evaluation takes
            img.save(buf, format="WEBP", lossless=True, quality=100, method=WEBP_METHOD)
        else:
            raise ValueError(f"unknown codec {codec!r}")
        out[i] = 8 * buf.tell()
    return out


def complexity(bpd: np.ndarray, images, codec: str) -> np.ndarray:
    """Input complexity (Serra et al.): -(model bpd - lossless ``codec`` bits/dim) of each image."""
    dims = as_image_tensor(images)[0].numel()
    return -(bpd - compressed_bits(images, codec) / dims)


def compute_scores(
    model: nn.Module,
    images,
    reference: dict[str, np.ndarray] | None = None,
    background: nn.Module | None = None,
    n_draws: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress=None,
    *,
    feature_flow=None,
) -> dict[str, np.ndarray]:
    """Every available score for a batch of uint8 images, plus ``bpd`` and per-scale terms.

    ``reference`` (a checkpoint's reference statistics) provides ``H`` for typicality; without it or
    without a ``background`` model those scores are left out; ``feature_flow`` (the paired flow on features, a
    :class:`flowcore.ood.vectors.FeatureScorer`) adds ``embedding_likelihood`` and the baselines stored with it
    (``embedding_gaussian``, ``embedding_knn``), each image embedded alone. Each row is a function of its image alone
    (dequantization noise is keyed by the image's pixels: see ``log_likelihood_terms``).
    """
    x = as_image_tensor(images)
    dims = x[0].numel()
    terms = log_likelihood_terms(
        model, x, n_draws, seed, "uniform", batch_size, device, progress
    )
    ll = terms["log_likelihood"]
    bpd = nats_to_bpd(ll, dims)
    out = {"likelihood": ll, "bpd": bpd, "log_det": terms["log_det"]}
    for s in range(terms["prior_by_scale"].shape[1]):
        out[f"scale_{s}"] = terms["prior_by_scale"][:, s]
    out["last_scale"] = terms["prior_by_scale"][:, -1]
    for codec in ("png", "webp"):
        out[f"complexity_{codec}"] = complexity(bpd, x, codec)
    if reference is not None and "train__likelihood" in reference:
        out["typicality"] = -np.abs(ll - float(np.mean(reference["train__likelihood"])))
    if background is not None:
        bg = log_likelihood_terms(background, x, n_draws, seed, "uniform", batch_size, device)["log_likelihood"]
        out["background_likelihood"] = bg
        out["likelihood_ratio"] = ll - bg
    if feature_flow is not None:
        from .vectors import FeatureScorer  # the optional extractor is imported only when asked for

        scorer = feature_flow if isinstance(feature_flow, FeatureScorer) else FeatureScorer(feature_flow)
        for key, values in scorer.score_images(np.asarray(images)).items():
            out["embedding_likelihood" if key == "likelihood" else key] = values
    return out


def with_embedding_reference(
    reference: dict[str, np.ndarray], feature_reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A pixel flow's reference plus its paired feature flow's likelihoods as ``{set}__embedding_likelihood`` (and
    its baselines' ``{set}__embedding_gaussian``, ``{set}__embedding_knn`` as they are):
    percentiles, thresholds and AUROCs of ``embedding_likelihood`` are read against the feature flow's own
    reference images (its sets are those it was evaluated on)."""
    extra = {k[: -len("likelihood")] + "embedding_likelihood": v
             for k, v in feature_reference.items() if k.endswith("__likelihood")}
    extra.update({k: v for k, v in feature_reference.items() if k.split("__")[-1] in EMBEDDING_SCORES[1:]})
    return {**reference, **extra}


def auroc(in_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """AUROC with in-distribution as the positive class (paper convention); NaN-safe inputs only.

    The Mann-Whitney form: the probability that a random in-distribution score exceeds a random OOD one, ties
    counting a half (average ranks), which is the area under the ROC curve exactly.
    """
    pos, neg = np.asarray(in_scores, dtype=np.float64).ravel(), np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    s = np.concatenate([pos, neg])
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def typicality_batch_test(
    batch_ll: np.ndarray, train_ll: np.ndarray, reference_ll: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Nalisnick et al.'s test for a batch of M images: statistic |mean(batch) - H| and a bootstrap
    p-value from in-distribution batches of the same size drawn from ``reference_ll`` (e.g. test)."""
    batch_ll = np.asarray(batch_ll)
    h = float(np.mean(train_ll))
    stat = abs(float(np.mean(batch_ll)) - h)
    rng = np.random.default_rng(seed)
    m = len(batch_ll)
    boots = np.abs(rng.choice(np.asarray(reference_ll), size=(n_boot, m), replace=True).mean(1) - h)
    p = (1 + int(np.sum(boots >= stat))) / (n_boot + 1)
    return stat, p


CSV_FIELDS = ["path", "log_likelihood_nats", "bpd", "score", "value", "percentile", "ood"]


def result_rows(
    names: Sequence[str], scores: dict[str, np.ndarray], score: str, reference: dict[str, np.ndarray], fpr: float
) -> list[dict]:
    """One row per image in the one schema of ``flowcore score`` and the app's CSV (:data:`CSV_FIELDS`): its
    log-likelihood, bpd, the chosen score, its percentile among the reference test images and the OOD verdict
    at false-positive rate ``fpr``. An image with a non-finite value gets ``{"path", "error"}`` instead: NaN
    compares False with every threshold, so it must never reach a percentile or a verdict."""
    judge = judge_for(reference, score, fpr)
    rows: list[dict] = []
    for i, name in enumerate(names):
        value, ll = float(scores[score][i]), float(scores["likelihood"][i])
        if not (np.isfinite(value) and np.isfinite(ll)):
            rows.append({"path": name, "error": f"non-finite {score} score ({value})"})
            continue
        judged = judge.judge(value)
        rows.append(
            {
                "path": name,
                "log_likelihood_nats": round(ll, 4),
                "bpd": round(float(scores["bpd"][i]), 5) if "bpd" in scores else "",  # none for feature flows
                "score": score,
                "value": round(value, 5),
                "percentile": round(judged.percentile, 2),
                "ood": judged.ood,
            }
        )
    return rows
