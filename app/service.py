"""What the dashboard shows, computed without Streamlit: the checkpoints on offer and every result for one of them,
each cached for the process.

Pages draw; this module computes (by calling :mod:`flowcore`) and keeps the results. It imports no Streamlit, so
it can be used and tested from plain Python; the page layer (:mod:`flowcore.dashboard.state`) only adds the
session (which checkpoint and image are picked) and hands it a spinner through :func:`set_busy`.

Every cached result goes through one decorator, :func:`per_checkpoint`: models are loaded once per process, and
per-image results are keyed by the checkpoint's files (a re-exported checkpoint is recomputed), the image's bytes
and the options. Cached arrays are returned read-only, so a page that would alter a shared result fails loudly
instead of changing what the next page is shown.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import numpy as np
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import flowcore
from flowcore.data import embeddings
from flowcore.data.datasets import DATASETS, EXAMPLE_SETS, DatasetNotFound, load_examples, load_images, set_label
from flowcore.flows.likelihood import nats_to_bpd
from flowcore.flows.models import latent_scale_map
from flowcore.inspection.probes import default_box
from flowcore.ood.evaluate import auroc_table, default_ood_sets, load_reference
from flowcore.ood.scores import EMBEDDING_SCORES, SCORE_NAMES, compute_scores, with_embedding_reference
from flowcore.ood.vectors import FeatureScorer, load_feature_scorer
from flowcore.zoo.checkpoints import (
    DEFAULT_MODEL,
    FOLDER_FILES,
    CheckpointError,
    best_plain_pixel_flows,
    checkpoints_dir,
    list_checkpoints,
    paired_feature_flow,
    read_config,
    resolve,
)

__all__ = [
    "DEFAULT_CHECKPOINT", "set_busy", "memo", "per_checkpoint", "stamp", "clear_caches",
    "no_checkpoint_message", "is_feature_flow", "feature_checkpoints", "checkpoint_options", "default_checkpoint",
    "model", "config", "reference", "paired_flow", "background_name", "image_shape", "has_batchnorm",
    "auroc_rows", "auroc_percent_table", "reference_scores", "reference_sets", "to_units", "score_values",
    "gallery_sets", "gallery_images", "first_image", "samples", "scores", "finite_scores", "feature_scorer",
    "feature_scores", "features", "pixel_counterparts", "BATCHNORM_COMPANIONS", "batchnorm_companions",
    "latent_map", "trace", "jacobian", "footprint", "resampled", "latent_scales", "box_default", "resolve",
]

DEFAULT_CHECKPOINT = DEFAULT_MODEL


# ------------------------------------------------------------------------------------------------ caching

_busy: Callable[[str], ContextManager] = lambda message: contextlib.nullcontext()  # noqa: E731


def set_busy(indicator: Callable[[str], ContextManager]) -> None:
    """Show ``indicator(message)`` (e.g. ``st.spinner``) while a result is computed rather than served."""
    global _busy
    _busy = indicator


def _key(value: Any) -> Any:
    """A hashable key of an argument: arrays by shape, dtype and bytes, containers by their items."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return ("ndarray", data.shape, data.dtype.str, hashlib.blake2b(data.tobytes(), digest_size=16).digest())
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _frozen(value: Any) -> Any:
    """A served result: arrays read-only, a mapping or list copied (its values shared), so no caller alters it."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
        return value
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_frozen(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    return value


_CACHES: list[OrderedDict] = []


def clear_caches() -> None:
    """Forget every cached result (tests; a long-running server keeps them bounded by ``max_entries``)."""
    for cache in _CACHES:
        cache.clear()


def memo(*, busy: str | None = None, max_entries: int = 64, keyed: Callable[..., Any] | None = None) -> Callable:
    """Cache ``fn`` for the process in a bounded least-recently-used table: defaults are bound first (``f(x)`` and
    ``f(x, default)`` share an entry), NumPy arrays are passed contiguous and keyed by their bytes, and
    ``keyed(*arguments)`` adds to the key (the checkpoint's :func:`stamp`). ``busy`` is shown while computing."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        table: OrderedDict = OrderedDict()
        lock = threading.Lock()
        _CACHES.append(table)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in bound.arguments.values()]
            key = (_key(values), keyed(*values) if keyed else None)
            with lock:
                if key in table:
                    table.move_to_end(key)
                    return _frozen(table[key])
            with _busy(busy) if busy else contextlib.nullcontext():
                result = fn(*values)  # outside the lock: another session may compute meanwhile, never waits
            with lock:
                table[key] = result
                while len(table) > max_entries:
                    table.popitem(last=False)
            return _frozen(result)

        call.cache = table  # type: ignore[attr-defined]
        return call

    return decorate


def per_checkpoint(*, busy: str | None = None, max_entries: int = 64) -> Callable:
    """:func:`memo` for ``fn(name, ...)``, keyed also by the checkpoint's files (a re-exported one is recomputed)."""
    return memo(busy=busy, max_entries=max_entries, keyed=lambda name, *rest: stamp(name))


def stamp(name: str) -> str:
    """Cache key of a checkpoint: its folder and the modification times of its files."""
    folder = resolve(name)
    parts = [str(folder.resolve())]
    for f in FOLDER_FILES:
        p = folder / f
        parts.append(str(p.stat().st_mtime_ns) if p.is_file() else "-")
    return "|".join(parts)


# ---------------------------------------------------------------------------------------- checkpoints


def no_checkpoint_message() -> str:
    return (
        f"No checkpoint found in `{checkpoints_dir()}`. Train one with "
        "`flowcore train configs/fashion_realnvp.json`, then compute its reference statistics with "
        "`flowcore evaluate fashion_realnvp` (or point `FLOWCORE_CHECKPOINTS` at a folder of checkpoints)."
    )


def _features_of(name: str) -> str | None:
    try:
        return config(name).get("features")
    except CheckpointError:
        return None  # an unreadable checkpoint stays listed among the pixel flows, and picking it shows why


def is_feature_flow(name: str) -> bool:
    """A flow on vectors (image features, Sec. 8, or tabular rows): the pixel pages cannot show it."""
    return bool(_features_of(name))


def feature_checkpoints() -> list[str]:
    """Every flow on image features (the features page draws these; tabular flows have no images to score)."""
    return [n for n in list_checkpoints() if _features_of(n) == embeddings.EXTRACTOR]


def checkpoint_options() -> list[str]:
    """Every pixel-flow checkpoint in the checkpoints folder, plus ``$FLOWCORE_DEFAULT_CHECKPOINT`` if it is a
    path (flows on features have their own page)."""
    names = [n for n in list_checkpoints() if not is_feature_flow(n)]
    env = os.environ.get("FLOWCORE_DEFAULT_CHECKPOINT")
    if env and env not in names:
        try:
            folder = resolve(env)
        except CheckpointError:
            folder = None
        if folder is not None and (folder / "config.json").is_file():
            names.append(env)
    return names


def default_checkpoint(options: Sequence[str]) -> str | None:
    """``$FLOWCORE_DEFAULT_CHECKPOINT``, else the package's default model, else the first one (None if none)."""
    for candidate in (os.environ.get("FLOWCORE_DEFAULT_CHECKPOINT"), DEFAULT_CHECKPOINT):
        if candidate and candidate in options:
            return candidate
    return options[0] if options else None


@per_checkpoint(busy="Loading model...", max_entries=8)
def model(name: str) -> nn.Module:
    """The checkpoint's model, loaded once per process (eval mode, CPU)."""
    return flowcore.load(name)


@per_checkpoint(max_entries=32)
def config(name: str) -> dict[str, Any]:
    """The checkpoint's ``config.json``."""
    return read_config(name)


@per_checkpoint(max_entries=16)
def reference(name: str) -> dict[str, np.ndarray]:
    """The checkpoint's per-image reference scores (``{}`` before ``flowcore evaluate``), with its paired flow on
    features' likelihoods as ``embedding_likelihood`` (and its baselines' scores) where there is one
    (:func:`paired_flow`)."""
    ref = load_reference(name)
    pair = paired_flow(name)
    if ref and pair:
        pair_ref = load_reference(pair)
        if "test__likelihood" in pair_ref:
            return with_embedding_reference(ref, pair_ref)
    return ref


@per_checkpoint(max_entries=64)
def paired_flow(name: str) -> str | None:
    """The flow on image features paired with the pixel flow ``name`` (Sec. 8), when one is shipped and the
    optional extractor is installed: its likelihood is then one more score on the pixel pages."""
    if not embeddings.extractor_installed():
        return None
    return paired_feature_flow(name)


def background_name(name: str) -> str | None:
    """The background model of a likelihood-ratio checkpoint, if any."""
    bg = config(name).get("background")
    return str(bg) if bg else None


def image_shape(name: str) -> tuple[int, int, int]:
    shape = config(name)["model"].get("image_shape")
    if not shape or len(shape) != 3:
        raise CheckpointError(f"{name} is not an image model (no image_shape in config.json)")
    return tuple(int(v) for v in shape)


def has_batchnorm(m: nn.Module) -> bool:
    return any(isinstance(mod, _BatchNorm) for mod in m.modules())


# --------------------------------------------------------------------------------- reference statistics


def auroc_rows(name: str) -> list[dict[str, Any]]:
    """AUROC table rows ``{score, <ood set>: value, ...}``: config.json's summary, else computed."""
    table = dict((config(name).get("reference") or {}).get("auroc") or {})
    if not table:
        ref = reference(name)
        table = auroc_table(ref) if ref else {}
    pair = paired_flow(name)
    pair_table = ((config(pair).get("reference") or {}).get("auroc") or {}) if pair else {}
    for score, row in pair_table.items():  # the feature flow's rows, under their names on a pixel flow
        key = "embedding_likelihood" if score == "likelihood" else score
        if key in EMBEDDING_SCORES and key not in table:
            table[key] = row
    return [{"score": score, **{s: float(v) for s, v in row.items()}} for score, row in table.items()]


def auroc_percent_table(name: str):
    """The AUROC table as shown on every page: AUROC in % (1 decimal), a row per score, a column per OOD set.
    Pages draw it with ``st.table``, which fits the column it is in (a dataframe cut its right columns)."""
    import pandas as pd

    rows = auroc_rows(name)
    if not rows:
        return None
    frame = pd.DataFrame(rows).set_index("score") * 100
    return frame.round(1).map(lambda v: f"{v:.1f}")


def reference_scores(name: str) -> list[str]:
    """Scores with in-distribution reference values, in the order of :data:`SCORE_NAMES`."""
    ref = reference(name)
    return [s for s in SCORE_NAMES if f"test__{s}" in ref]


def reference_sets(name: str, score: str = "likelihood") -> list[str]:
    """Sets with values of ``score``: train, test, then the OOD sets."""
    ref = reference(name)
    sets = [k.split("__")[0] for k in ref if k.endswith(f"__{score}")]
    order = {"train": 0, "test": 1}
    return sorted(dict.fromkeys(sets), key=lambda s: (order.get(s, 2), s))


def to_units(values: np.ndarray | float, score: str, units: str, dims: int) -> np.ndarray | float:
    """Likelihoods in ``units`` ("nats" or "bpd"); other scores unchanged."""
    if score == "likelihood" and units == "bpd":
        return nats_to_bpd(values, dims)
    return values


def score_values(name: str, score: str, units: str = "nats") -> dict[str, np.ndarray]:
    """``{set: values}`` of one score from the reference, likelihood in ``units``."""
    ref = reference(name)
    dims = int(np.prod(image_shape(name)))
    return {s: np.asarray(to_units(ref[f"{s}__{score}"], score, units, dims)) for s in reference_sets(name, score)}


# -------------------------------------------------------------------------------------------- gallery


def gallery_sets(name: str) -> list[str]:
    """The model's dataset, then its OOD sets (config ``ood``, else the paper's defaults)."""
    cfg = config(name)
    dataset = cfg.get("dataset")
    sets = [str(dataset)] if dataset else []
    ood = cfg.get("ood") or (default_ood_sets(str(dataset), image_shape(name)) if dataset else [])
    sets += [str(s) for s in ood]
    known = {set_label(s) for s in sets}
    sets += [s for s in reference_sets(name) if s in DATASETS and s not in known]
    return list(dict.fromkeys(sets))


@memo(busy="Loading examples...", max_entries=32)
def gallery_images(dataset: str, shape: tuple[int, int, int], n: int, data_dir: str | None) -> tuple[np.ndarray, bool]:
    """The first ``n`` test images of ``dataset`` fitted to ``shape``, and whether they are the package's bundled
    examples (used when the full set is not found; ``data_dir`` only keys the cache)."""
    try:
        return np.ascontiguousarray(load_images(dataset, "test", image_shape=shape)[:n]), False
    except DatasetNotFound:
        if dataset not in EXAMPLE_SETS:
            raise
    return np.ascontiguousarray(load_examples(dataset, shape)[:n]), True


def first_image(name: str) -> tuple[str, np.ndarray]:
    """The image a single-image view shows before any input is chosen: the first in-distribution test image,
    else one of the model's own samples; and what it is."""
    dataset = config(name).get("dataset")
    if dataset:
        try:
            x, _ = gallery_images(str(dataset), image_shape(name), 1, os.environ.get("FLOWCORE_DATA_DIR"))
            if len(x):
                return f"{set_label(str(dataset))} test image 0 (no input chosen)", x[0]
        except (DatasetNotFound, ValueError, OSError):
            pass
    return "model sample (no input chosen, no data found)", samples(name, 1, 0.7, 0)[0]


# --------------------------------------------------------------------------------------- model results


@per_checkpoint(busy="Sampling...", max_entries=32)
def samples(name: str, n: int, temperature: float, seed: int) -> np.ndarray:
    """``n`` uint8 samples of the model at ``temperature``."""
    return flowcore.sample(model(name), int(n), temperature=float(temperature), seed=int(seed))[1]


@per_checkpoint(max_entries=2048)
def _score_one(name: str, array: np.ndarray, n_draws: int, seed: int) -> dict[str, float]:
    bg = background_name(name)
    ref = reference(name)
    out = compute_scores(model(name), array[None], ref or None, model(bg) if bg else None, n_draws=n_draws, seed=seed)
    return {k: float(v[0]) for k, v in out.items()}


def scores(name: str, arrays: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every score of uint8 images, with the reference's draws and seed: what ``flowcore score`` gives the same
    image (the dequantization noise is keyed by the image's pixels). Cached image by image."""
    summary = config(name).get("reference") or {}
    n_draws, seed = int(summary.get("n_draws", 1)), int(summary.get("seed", 0))
    with _busy("Scoring..."):
        rows = [_score_one(name, a, n_draws, seed) for a in arrays]
        pair = paired_flow(name)
        if pair and rows:  # the paired flow on features: each image embedded alone, cached per image
            for row, a in zip(rows, arrays, strict=True):
                for key, value in _feature_scores(pair, a).items():
                    row["embedding_likelihood" if key == "likelihood" else key] = value
    if not rows:
        return {}
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def finite_scores(name: str, items: Sequence[tuple[Any, Any]]) -> tuple[list, dict[str, np.ndarray], list]:
    """Score prepared inputs ``(item, prepared)``; return the finite ones, their scores and
    ``(item name, reason)`` for each input whose likelihood or any score is NaN or infinite."""
    if not items:
        return [], {}, []
    results = scores(name, [p.array for _, p in items])
    keys = [k for k in results if k in SCORE_NAMES or k == "bpd"]
    ok = np.all([np.isfinite(results[k]) for k in keys], axis=0)
    bad = [(item.name, "the model gives this image a non-finite score (NaN or inf); no verdict")
           for (item, _), fine in zip(items, ok, strict=True) if not fine]
    kept = [pair for pair, fine in zip(items, ok, strict=True) if fine]
    return kept, {k: v[ok] for k, v in results.items()}, bad


@per_checkpoint(busy="Loading the flow on features...", max_entries=4)
def feature_scorer(name: str) -> FeatureScorer:
    """A flow on features with its stored baselines, loaded once per process."""
    return load_feature_scorer(name)


@per_checkpoint(max_entries=4096)
def _feature_scores(name: str, array: np.ndarray) -> dict[str, float]:
    return {k: float(v[0]) for k, v in feature_scorer(name).score_images(array[None]).items()}


@per_checkpoint(max_entries=4096)
def _features(name: str, array: np.ndarray) -> np.ndarray:
    return embeddings.extract(array[None])[0]


def features(name: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The extractor's features ``(N, 1280)`` of uint8 images, each embedded alone and cached."""
    return np.stack([_features(name, a) for a in arrays])


def feature_scores(name: str, arrays: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Scores of uint8 images under a flow on features and its stored baselines: ``likelihood`` (nats) and, where
    stored, ``embedding_gaussian`` and ``embedding_knn``; each image embedded alone and cached."""
    with _busy("Embedding with EfficientNet-Lite0 and scoring..."):
        rows = [_feature_scores(name, a) for a in arrays]
    keys = rows[0] if rows else feature_scorer(name).names
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


def pixel_counterparts(name: str) -> list[str]:
    """The pixel flows set beside the feature flow ``name``: of each architecture, the plain one trained on the
    same dataset with the lowest test bpd (``best_plain_pixel_flows``, as Table 1 picks them), so no Sec. 7 or
    App. B study variant and no background model; by name."""
    configs = {}
    for n in checkpoint_options():
        try:
            configs[n] = config(n)
        except CheckpointError:
            continue
    return sorted(best_plain_pixel_flows(configs, config(name).get("dataset")).values())


# BatchNorm in train mode normalises with the statistics of the batch: the image plus this many companions (the
# model's own test images, else bundled examples, else its samples), as Fig. 10 computes them on a batch.
BATCHNORM_COMPANIONS = 31


def batchnorm_companions(name: str) -> tuple[np.ndarray, str]:
    """Images that share the batch with the current one when BatchNorm runs in train mode, and what they are."""
    dataset = config(name).get("dataset")
    shape = image_shape(name)
    if dataset:
        try:
            x, bundled = gallery_images(str(dataset), shape, BATCHNORM_COMPANIONS, os.environ.get("FLOWCORE_DATA_DIR"))
            if len(x):
                return x, f"{len(x)} {'bundled example' if bundled else 'test'} images of {set_label(str(dataset))}"
        except (DatasetNotFound, ValueError, OSError):
            pass
    return samples(name, BATCHNORM_COMPANIONS, 0.7, 0), f"{BATCHNORM_COMPANIONS} of the model's samples"


@per_checkpoint(busy="Computing latents...", max_entries=64)
def _latent_map(name: str, array: np.ndarray, n_draws: int, batchnorm: str) -> np.ndarray:
    batch = array[None]
    if batchnorm == "train":
        batch = np.concatenate([batch, batchnorm_companions(name)[0]])
    z = flowcore.latents(model(name), batch, n_draws=n_draws, batchnorm=batchnorm, batch_size=len(batch))
    return z[0]


def latent_map(name: str, array: np.ndarray, n_draws: int = 40, batchnorm: str = "eval") -> np.ndarray:
    """Latents ``(C, H, W)`` of one image averaged over ``n_draws`` dequantizations; with BatchNorm in train mode
    the statistics are those of a batch of the image and :func:`batchnorm_companions`."""
    return _latent_map(name, array, int(n_draws), batchnorm)


@per_checkpoint(busy="Tracing couplings...", max_entries=32)
def trace(name: str, array: np.ndarray) -> list[dict[str, Any]]:
    """Each coupling layer of one image: name, scale, mask and its (C, H, W) input, log_s, scale, t, output."""
    records = flowcore.coupling_trace(model(name), array)
    fields = ("input", "log_s", "scale", "t", "output", "transformed")
    return [
        {
            "name": r.name,
            "scale_index": r.scale_index,
            "mask": r.mask,
            "layer_shape": tuple(r.layer_shape),
            "log_det": float(r.log_det[0]),
            **{f: getattr(r, f)[0].numpy() for f in fields},
        }
        for r in records
    ]


@per_checkpoint(busy="Differentiating...", max_entries=256)
def _jacobian(name: str, array: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    return flowcore.jacobian_map(model(name), array, index)


def jacobian(name: str, array: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    """``dz[index]/dx`` over the input, shaped ``(C, H, W)``."""
    return _jacobian(name, array, tuple(int(i) for i in index))


@per_checkpoint(busy="Computing the footprint...", max_entries=32)
def footprint(name: str, array: np.ndarray, n_positions: int = 64, seed: int = 0) -> np.ndarray:
    """Mean ``|dz/dx|`` over ``n_positions`` latent positions drawn at random (``(C, H, W)``)."""
    shape = image_shape(name)
    total = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=min(n_positions, total), replace=False)
    positions = np.stack(np.unravel_index(np.sort(flat), shape), axis=1).tolist()
    return flowcore.jacobian_footprint(model(name), array, positions)


@per_checkpoint(busy="Resampling...", max_entries=64)
def _resampled(
    name: str, array: np.ndarray, box: tuple[int, int, int, int], n: int, temperature: float, seed: int
) -> np.ndarray:
    return flowcore.resample_patch(model(name), array, box=box, n=n, temperature=temperature, seed=seed)


def resampled(
    name: str, array: np.ndarray, box: tuple[int, int, int, int], n: int, temperature: float, seed: int
) -> np.ndarray:
    """``n`` images ``(n, C, H, W)`` in [0, 1] with the latents inside ``box`` redrawn at ``temperature``."""
    return _resampled(name, array, tuple(int(v) for v in box), int(n), float(temperature), int(seed))


@per_checkpoint(max_entries=32)
def latent_scales(name: str) -> np.ndarray:
    """(C, H, W): the scale (0 = the first factored out) of each latent in image layout."""
    return latent_scale_map(model(name)).numpy()


def box_default(shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    return default_box(shape[1], shape[2])
