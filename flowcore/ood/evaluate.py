"""Reference statistics, AUROC tables and histogram figures for a checkpoint.

``reference.npz`` (beside the weights) holds one float64 array per ``SET__SCORE``, e.g.
``test__likelihood``, ``mnist__complexity_png``; sets are ``train`` (a subset), ``test`` and each OOD
set. ``config.json`` gets a ``reference`` summary: bpd mean/median, counts and the AUROC table
(one row per score, one column per OOD set; in-distribution = positive class).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import DATASETS, DatasetNotFound, load_images, match_shape, set_label
from ..data.files import atomic_write
from ..flows.likelihood import nats_to_bpd
from ..training.distributed import float32_work
from ..zoo.checkpoints import (
    HISTOGRAM,
    MAX_DRAWS,
    REFERENCE,
    CheckpointError,
    load,
    read_config,
    resolve,
    write_json,
)
from .scores import SCORE_NAMES, auroc, complexity, compute_scores

__all__ = ["evaluate", "refresh_complexity", "load_reference", "auroc_table", "default_ood_sets", "histogram_figure"]

# A real reference is a few MB; a small file that would inflate past this is a zip bomb, not statistics.
MAX_REFERENCE_BYTES = 256_000_000


def default_ood_sets(dataset: str, image_shape) -> list[str]:
    """28x28 models: Fashion-MNIST, MNIST, notMNIST; 32x32 RGB: CIFAR-10, CelebA, SVHN and the
    grayscale sets under the cross-domain rule. The training set itself is left out."""
    gray = ["fashion_mnist", "mnist", "notmnist"]
    sets = gray if image_shape[0] == 1 else ["cifar10", "celeba32", "svhn", *gray]
    return [s for s in sets if s != dataset]


def load_reference(name_or_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A checkpoint's reference statistics (empty dict when it has none)."""
    path = resolve(name_or_path) / REFERENCE
    if not path.is_file():
        return {}
    try:
        with zipfile.ZipFile(path) as z:  # sizes from the zip directory, before anything is inflated
            unpacked = sum(i.file_size for i in z.infolist())
            if unpacked > MAX_REFERENCE_BYTES:
                raise CheckpointError(
                    f"{path}: reference statistics would unpack to {unpacked / 1e6:.0f} MB "
                    f"(more than {MAX_REFERENCE_BYTES / 1e6:.0f} MB): refusing to load"
                )
            for member in z.infolist():
                _check_array_header(path, z, member)
        with np.load(path, allow_pickle=False) as d:
            out = {k: np.asarray(d[k]) for k in d.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable reference statistics ({e})") from None
    for key, values in out.items():
        if values.dtype.kind not in "fiu" or values.ndim != 1 or len(values) == 0:
            raise CheckpointError(
                f"{path}: {key!r} must be a non-empty 1-d array of numbers, got {values.dtype} {values.shape}"
            )
        bad = int(np.sum(~np.isfinite(values)))
        if bad:
            raise CheckpointError(f"{path}: {key!r} holds {bad} non-finite value(s); re-run flowcore evaluate")
    _check_reference_size(path, out)
    return out


def _check_array_header(path: Path, z: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """An array's .npy header states its shape, and NumPy allocates that much before reading a byte of data: a
    header claiming 37 GB in a file of a few bytes must be refused by the header, not by a MemoryError."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f, max_header_size=10_000)
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > member.file_size:
        raise CheckpointError(f"{path}: {member.filename} claims {claimed / 1e6:,.0f} MB of values but holds "
                              f"{member.file_size:,} bytes: refusing to load")


def _check_reference_size(path: Path, reference: dict[str, np.ndarray]) -> None:
    """The reference was computed at the image size the config names now. A pixel flow's weights do not depend on
    H and W, so an edited ``image_shape`` would still load and score images at the new size against statistics of
    the old one, without a word; but each stored pair of log-likelihood and bits/dim fixes the number of values
    they were computed over (bpd = -ll / (D ln 2)), which must be the config's C x H x W."""
    shape = (read_config(path.parent).get("model") or {}).get("image_shape")
    ll, bpd = reference.get("test__likelihood"), reference.get("test__bpd")
    if not shape or ll is None or bpd is None or len(ll) != len(bpd):
        return
    usable = np.abs(bpd) > 1e-6
    if not usable.any():
        return
    dims = float(np.median(-ll[usable] / (bpd[usable] * np.log(2))))
    expected = int(np.prod(shape))
    if abs(dims - expected) > 0.01 * expected:
        raise CheckpointError(f"{path.parent}: the reference statistics were computed over {dims:,.0f} values per "
                              f"image, but config.json's image_shape {list(shape)} has {expected:,}: the config was "
                              "changed after evaluation; restore it or re-run flowcore evaluate")


def auroc_table(reference: dict[str, np.ndarray], in_set: str = "test") -> dict[str, dict[str, float]]:
    """``{score: {ood_set: auroc}}`` from stored per-image scores."""
    sets = sorted({k.split("__")[0] for k in reference} - {"train", in_set})
    table: dict[str, dict[str, float]] = {}
    for score in SCORE_NAMES:
        key = f"{in_set}__{score}"
        if key not in reference:
            continue
        row = {s: auroc(reference[key], reference[f"{s}__{score}"]) for s in sets if f"{s}__{score}" in reference}
        if row:
            table[score] = row
    return table


@float32_work
def evaluate(
    checkpoint: str | os.PathLike,
    data_dir: str | None = None,
    n_draws: int = 1,
    train_subset: int = 2000,
    test_subset: int | None = None,
    ood_subset: int | None = None,
    ood: list[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Score train subset, test set and OOD sets; store ``reference.npz`` and the summary.

    Under torchrun each process scores a contiguous run of whole batches of every set (so the seeded
    noise of each batch is that of a single-process run) and the per-image scores are gathered in
    order on every rank; only rank 0 writes files. Every rank returns the same summary.
    """
    from tqdm.auto import tqdm

    from ..training import distributed as dist

    # the reference stores n_draws and every later score of this model pays for each draw: the bound a stored
    # reference is held to (read_config) holds here, before hours are spent writing one it would refuse
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or not 1 <= n_draws <= MAX_DRAWS:
        raise ValueError(f"draws must be a whole number in 1..{MAX_DRAWS}, got {n_draws!r}")
    for label, subset in (("train_subset", train_subset), ("test_subset", test_subset), ("ood_subset", ood_subset)):
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise ValueError(f"{label} must be a whole number of images >= 1, got {subset!r}")
    device = dist.init(device)
    folder = resolve(checkpoint)
    cfg = read_config(folder)
    if cfg.get("features"):  # a flow on image features (Sec. 8): its own, much cheaper, evaluation
        from .vectors import evaluate_vectors

        reference, fields = evaluate_vectors(folder, cfg, data_dir, train_subset, test_subset, ood_subset, ood,
                                             progress)
        summary = {**fields, "n_draws": 1, "seed": seed, "auroc": _rounded_aurocs(reference),
                   "torch": torch.__version__}
        if write and dist.is_main():
            _store(folder, cfg, reference, summary, None)
        return summary
    model = load(folder, device=device)
    shape = model.config.image_shape
    dataset = cfg.get("dataset")
    if not dataset:
        raise CheckpointError(f"{folder}/config.json names no training 'dataset' to evaluate against")
    background = None
    if cfg.get("background"):
        background = load(cfg["background"], device=device)

    sets: dict[str, np.ndarray] = {
        "train": load_images(dataset, "train", data_dir)[:train_subset],
        "test": load_images(dataset, "test", data_dir)[:test_subset],
    }
    skipped = {}
    for name in ood if ood is not None else default_ood_sets(dataset, shape):
        try:
            sets[set_label(name)] = load_images(name, "test", data_dir)[:ood_subset]
        except DatasetNotFound as e:
            if ood is not None or name not in DATASETS:
                raise
            skipped[name] = str(e)
    reference: dict[str, np.ndarray] = {}
    batch = 256  # compute_scores' default; sharding is in whole batches of it
    total = sum(b - a for a, b in (dist.batch_range(len(v), batch) for v in sets.values()))
    bar = tqdm(total=total, disable=not progress or not dist.is_main(), unit="img", desc="evaluate")
    for name, images in sets.items():
        x = match_shape(images, shape)
        ref = reference if name != "train" else None
        if dist.world_size() == 1:
            scores = compute_scores(model, x, ref, background, n_draws, seed, device=device, progress=bar.update)
        else:
            a, b = dist.batch_range(len(x), batch)
            part = None
            if b > a:
                part = compute_scores(model, x[a:b], ref, background, n_draws, seed, batch, device, bar.update)
            parts = [p for p in dist.all_gather_objects(part) if p is not None]
            scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for score, values in scores.items():
            reference[f"{name}__{score}"] = values
        if name == "train":  # typicality for the train subset itself, now that H exists
            reference["train__typicality"] = -np.abs(scores["likelihood"] - np.mean(scores["likelihood"]))
    bar.close()
    dims = int(np.prod(shape))
    summary = {
        **_bpd_summary(reference, dims),
        "n_draws": n_draws,
        "seed": seed,
        "counts": {k: len(v) for k, v in sets.items()},
        "auroc": _rounded_aurocs(reference),
        "skipped_sets": skipped,
        "torch": torch.__version__,
    }
    if write and dist.is_main():
        _store(folder, cfg, reference, summary, dims)
    dist.barrier()
    return summary


def _bpd_summary(reference: dict[str, np.ndarray], dims: int) -> dict[str, float]:
    test_bpd = -reference["test__likelihood"] / (dims * math.log(2))
    return {"bpd_mean": round(float(np.mean(test_bpd)), 5), "bpd_median": round(float(np.median(test_bpd)), 5)}


def _rounded_aurocs(reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {k: {s: round(a, 5) for s, a in row.items()} for k, row in auroc_table(reference).items()}


def _store(
    folder: Path, cfg: dict[str, Any], reference: dict[str, np.ndarray], summary: dict, dims: int | None
) -> None:
    """Write reference.npz (atomically), the summary into config.json, and the histogram."""
    arrays = {k: v.astype(np.float32) if k.endswith("__bpd") else v for k, v in reference.items()}
    atomic_write(folder / REFERENCE, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    cfg["reference"] = summary
    write_json(folder / "config.json", cfg)
    histogram_figure(reference, folder / HISTOGRAM, title=cfg.get("name", folder.name), dims=dims)


def refresh_complexity(checkpoint: str | os.PathLike, data_dir: str | None = None) -> dict[str, Any]:
    """Recompute the input-complexity scores of stored reference statistics without the model.

    Complexity = -(model bpd - codec bits/dim): the model part is the stored likelihood, so after a change of
    codec settings only the images are re-encoded (seconds instead of a full evaluation). The images are
    those ``evaluate`` used: the first ``counts[SET]`` of each set. Returns the updated summary.
    """
    folder = resolve(checkpoint)
    cfg = read_config(folder)
    summary, reference = cfg.get("reference"), load_reference(folder)
    if not summary or "test__likelihood" not in reference:
        raise CheckpointError(f"{folder}: no reference statistics to refresh (run flowcore evaluate first)")
    shape = cfg["model"]["image_shape"]
    dims = int(np.prod(shape))
    for name, n in summary["counts"].items():
        source, split = (cfg["dataset"], name) if name in ("train", "test") else (name, "test")
        if source not in DATASETS and not source.startswith(("npz:", "folder:")):
            raise CheckpointError(f"{folder}: cannot reload set {name!r} to refresh it; run flowcore evaluate")
        x = match_shape(load_images(source, split, data_dir)[:n], shape)
        ll = reference[f"{name}__likelihood"]
        if len(x) != n or len(ll) != n:
            raise CheckpointError(f"{folder}: set {name!r} no longer has the {n} images it was evaluated on")
        for codec in ("png", "webp"):
            reference[f"{name}__complexity_{codec}"] = complexity(nats_to_bpd(ll, dims), x, codec)
    summary["auroc"] = _rounded_aurocs(reference)
    _store(folder, cfg, reference, summary, dims)
    return summary


def histogram_figure(
    reference: dict[str, np.ndarray],
    path: str | os.PathLike,
    title: str = "",
    dims: int | None = 784,
    score: str = "likelihood",
) -> Path | None:
    """Paper Fig. 8-style histogram of per-image log-likelihoods (bpd) per set; PNG via matplotlib.
    ``dims=None``: a flow on features, drawn in nats (a continuous density has no bits/dim)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure state stay untouched
    except ImportError:
        return None
    sets = [k.split("__")[0] for k in reference if k.endswith(f"__{score}")]
    data = {}
    for s in sets:
        values = np.asarray(reference[f"{s}__{score}"], dtype=np.float64)
        if score == "likelihood" and dims:
            values = -values / (dims * math.log(2))
        data[s] = values[np.isfinite(values)]
    pooled = np.concatenate([v for v in data.values() if v.size] or [np.zeros(1)])
    lo, hi = float(pooled.min()), float(pooled.max())
    p_lo, p_hi = np.percentile(pooled, [1, 99])
    # a few far values would squash every set into one bar: a flow on vectors (nats, OOD sets can lie thousands
    # of nats below) gets a symmetric-log axis; bits/dim an axis cut at the 1st and 99th percentiles
    spread = hi > lo and (p_hi - p_lo) < 0.2 * (hi - lo)
    symlog = spread and score == "likelihood" and not dims
    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.subplots()
    note = ""
    if symlog:
        scale = max(1.0, float(np.subtract(*np.percentile(data.get("test", pooled), [75, 25]))))

        def forward(x):
            return np.sign(x) * np.log10(1 + np.abs(x) / scale)

        edges = np.linspace(forward(lo), forward(hi), 81)
        bins = np.sign(edges) * scale * (10 ** np.abs(edges) - 1)
        ax.set_xscale("symlog", linthresh=scale)
        note = " (symmetric-log axis)"
    else:
        if spread:
            lo, hi = float(p_lo), float(p_hi)
            note = " (axis cut at the 1st-99th percentiles; values beyond drawn at the edge)"
        bins = np.linspace(lo, hi, 81) if hi > lo else 80
    for s, values in data.items():
        shown = np.clip(values, lo, hi)
        ax.hist(shown, bins=bins, alpha=0.5, weights=np.full(len(shown), 1 / max(1, len(shown))),
                label=f"{s} (n={len(values)})")
    if score == "likelihood":
        label = "bits/dim (lower = more likely)" if dims else "log-likelihood, nats (higher = more likely)"
    else:
        label = score
    ax.set_xlabel(label + note, fontsize=8 if note else None)
    ax.set_ylabel("share of the set")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
