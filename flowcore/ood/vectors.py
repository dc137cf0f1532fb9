"""Flows on image features (paper Sec. 8, App. K.2): extract once, cache, train, evaluate.

A config with ``"features": "efficientnet-lite0"`` and a ``realnvp_tabular`` model of ``dim`` 1280 trains on the
features of its dataset's images (:mod:`flowcore.data.embeddings`) instead of the pixels. Features are cached as
npz files under ``$FLOWCORE_CACHE`` (default ``~/.cache/flowcore``), keyed by the extractor and a hash of the
images, so a set is embedded once. The standardisation of the features is part of the model (its first
layer), so ``flowcore.load(NAME).log_prob(features)`` takes the extractor's raw output; log-likelihoods are
continuous densities of the features in nats (no pixel quantisation, so no bits/dim).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import embeddings
from ..data.datasets import DatasetNotFound, load_images, set_label
from ..flows.models import build
from ..training.train import TABULAR, RunLog, TrainConfig, drop_derived_files, export_folder, lr_at, optimizer_for
from ..zoo.checkpoints import atomic_write, cache_dir, save

__all__ = [
    "cache_dir", "dataset_features", "train_vectors", "log_likelihood", "image_log_likelihood", "input_shape",
    "feature_projection", "project", "PROJECTION",
]


def dataset_vectors(
    features: str, dataset: str, split: str, data_dir: str | None = None, limit: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The vectors a flow of kind ``features`` trains and is evaluated on: the rows of a tabular set, or the
    extractor's features of an image set (:func:`dataset_features`)."""
    if features == TABULAR:
        from ..data.tabular import load_tabular

        rows = load_tabular(dataset, split, data_dir)
        return rows[:limit] if limit else rows
    return dataset_features(dataset, split, data_dir, limit, progress)


def dataset_features(
    dataset: str, split: str, data_dir: str | None = None, limit: int | None = None, progress: bool = False
) -> np.ndarray:
    """Features ``(N, 1280)`` of the first ``limit`` images of ``dataset``'s ``split``, extracted once and cached.

    One cache file per split (keyed by the extractor and a hash of the whole split) holds the features of its
    first n images; a request for more extends it, a request for fewer reads a prefix. So the 5,000 test images
    an evaluation asks for and the 10,000 a training run asks for are embedded once, not twice."""
    from tqdm.auto import tqdm

    images = load_images(dataset, split, data_dir)
    wanted = min(limit, len(images)) if limit else len(images)
    label = Path(dataset.split(":", 1)[-1]).stem if ":" in dataset else dataset
    path = cache_dir() / "features" / f"{label}_{split}_{embeddings.data_key(images)}.npz"
    cached = np.empty((0, embeddings.FEATURE_DIM), dtype=np.float32)
    if path.is_file():
        with np.load(path, allow_pickle=False) as d:
            stored = np.asarray(d["features"], dtype=np.float32)
        # a damaged or foreign file is recomputed, never trusted
        if stored.ndim == 2 and stored.shape[1] == embeddings.FEATURE_DIM and len(stored) <= len(images) and \
                np.isfinite(stored).all():
            cached = stored
    if len(cached) >= wanted:
        return cached[:wanted].copy()
    todo = images[len(cached) : wanted]
    with tqdm(total=len(todo), disable=not progress, unit="img", desc=f"embed {label} {split}") as bar:
        features = np.concatenate([cached, embeddings.extract(todo, progress=bar.update)])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, features=features), suffix=".npz")
    return features


@torch.no_grad()
def log_likelihood(model: torch.nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Log-density in nats (float64) of each feature vector under a vector flow."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != model.config.dim:
        raise ValueError(f"expected features of shape (N, {model.config.dim}), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("empty batch: no features to score")
    parts = [model.log_prob(x[i : i + batch_size]).double().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


def image_log_likelihood(model: torch.nn.Module, images_uint8: np.ndarray) -> np.ndarray:
    """Log-density in nats of each uint8 image's features, each image embedded alone (its score never depends
    on the images beside it)."""
    x = np.asarray(images_uint8)
    if len(x) == 0:
        raise ValueError("empty batch: no images to score")
    return np.concatenate([log_likelihood(model, embeddings.extract(x[i : i + 1])) for i in range(len(x))])


def input_shape(dataset: str, data_dir: str | None = None) -> list[int]:
    """``[C, H, W]`` of ``dataset``'s images: an image to be scored is first brought to this size, like the
    images whose features the flow was trained on (a sharp 1024-pixel photo and a 32-pixel thumbnail of it
    give different features)."""
    x = load_images(dataset, "test", data_dir)
    return [3, *x.shape[1:3]] if x.ndim == 4 else [1, *x.shape[1:3]]


def train_vectors(
    cfg: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    export_dir: str | os.PathLike | None = None,
    replace: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a vector flow on ``cfg.dataset``'s features (a few minutes on a CPU: not resumable); export it."""
    if not cfg.features:
        raise ValueError("train_vectors needs a config with features")
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    out = export_folder(run_dir, export_dir, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = RunLog(run_dir / "log.jsonl")
    log(event="start", config=cfg.to_dict(), torch=torch.__version__)
    kind = cfg.features
    x_train = torch.from_numpy(dataset_vectors(kind, cfg.dataset, "train", data_dir, cfg.train_subset, progress))
    x_test = torch.from_numpy(dataset_vectors(kind, cfg.dataset, "test", data_dir, cfg.test_subset, progress))
    if x_train.shape[1] != cfg.model.dim:
        raise ValueError(f"{cfg.dataset} has {x_train.shape[1]} columns; the model's dim is {cfg.model.dim}")
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    model.standardize.fit(x_train)
    opt = optimizer_for(cfg, model.parameters())
    steps_per_epoch = max(1, len(x_train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    dim = cfg.model.dim
    start, skipped, step = time.process_time(), 0, 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        model.train()
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, total)
            batch = x_train[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            loss = -model.log_prob(batch).mean() / dim  # nats per feature
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1
                step += 1
                continue
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if step % cfg.log_every == 0:
                log(event="train", step=step, nll_per_dim=round(float(loss.detach()), 5), lr=opt.param_groups[0]["lr"])
            step += 1
        model.eval()
        test_nll = float(-np.mean(log_likelihood(model, x_test.numpy())) / dim)
        log(event="epoch", epoch=epoch + 1, test_nll_per_dim=round(test_nll, 5))
        if progress:
            print(f"epoch {epoch + 1}: test nll {test_nll:.4f} nats/feature")
    minutes = (time.process_time() - start) / 60
    training = {
        "dataset": cfg.dataset,
        "features": cfg.features,
        "train_images": len(x_train),
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "epochs_completed": cfg.epochs,
        "images_seen": step * cfg.batch_size,
        "cpu_minutes": round(minutes, 1),  # process CPU time of the flow's training (features cached apart)
        "clock": "process",
        "threads": torch.get_num_threads(),
        "stopped_by": "epochs",
        "skipped_steps": skipped,
        "torch": torch.__version__,
        "device": "cpu",
        "world_size": 1,
    }
    drop_derived_files(out)
    save(model, out, name=cfg.name, dataset=cfg.dataset, features=cfg.features, ood=cfg.ood, training=training,
         input_shape=None if cfg.features == TABULAR else input_shape(cfg.dataset, data_dir),
         train_config=cfg.to_dict(), metrics={"test_nll_per_dim": round(test_nll, 5), "test_subset": len(x_test)})
    log(event="export", path=str(out), test_nll_per_dim=test_nll)
    return {"stopped_by": "epochs", "test_nll_per_dim": test_nll, "export": str(out), "epoch": cfg.epochs}


def evaluate_vectors(
    folder: Path, cfg: dict[str, Any], data_dir: str | None, train_subset: int, test_subset: int | None,
    ood_subset: int | None, ood: list[str] | None, progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference log-likelihoods (nats) of the train subset, test set and OOD sets' features, and the summary
    fields that differ from images (no bits/dim: the mean and median negative log-likelihood per feature)."""
    from ..zoo.checkpoints import load

    model = load(folder)
    dataset = cfg["dataset"]
    kind = cfg["features"]
    wanted = ood if ood is not None else [s for s in cfg.get("ood") or [] if s != dataset]
    sets: dict[str, np.ndarray] = {
        "train": dataset_vectors(kind, dataset, "train", data_dir, train_subset, progress),
        "test": dataset_vectors(kind, dataset, "test", data_dir, test_subset, progress),
    }
    skipped = {}
    for name in wanted:
        label = name.replace(":", "_") if kind == TABULAR else set_label(name)
        try:
            sets[label] = dataset_vectors(kind, name, "test", data_dir, ood_subset, progress)
        except DatasetNotFound as e:
            skipped[label] = str(e)
    reference = {f"{name}__likelihood": log_likelihood(model, x) for name, x in sets.items()}
    projection = feature_projection(sets)
    nll = -reference["test__likelihood"] / model.config.dim
    summary = {
        "nll_per_feature_mean": round(float(np.mean(nll)), 5),
        "nll_per_feature_median": round(float(np.median(nll)), 5),
        "counts": {k: len(v) for k, v in sets.items()},
        "skipped_sets": skipped,
    }
    if not math.isfinite(summary["nll_per_feature_mean"]):
        raise ValueError(f"{folder}: non-finite test log-likelihoods; the model is broken")
    atomic_write(folder / PROJECTION, lambda tmp: np.savez(tmp, **projection), suffix=".npz")
    return reference, summary


PROJECTION = "projection.npz"  # a feature flow's 2-D PCA view of its reference sets (for the dashboard)
PROJECTION_POINTS = 500  # per set


def feature_projection(sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The 2-D principal-component view of reference features: the mean and the two leading directions of the
    training features, and the first :data:`PROJECTION_POINTS` of each set projected on them (``{set}``)."""
    train = np.asarray(sets["train"], dtype=np.float64)
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    components = vt[:2]
    out = {"mean": mean.astype(np.float32), "components": components.astype(np.float32)}
    for name, x in sets.items():
        out[f"set__{name}"] = project(x[:PROJECTION_POINTS], out)
    return out


def project(features: np.ndarray, projection: dict[str, np.ndarray]) -> np.ndarray:
    """Features ``(N, 1280)`` on the two principal directions of :func:`feature_projection` (``(N, 2)``)."""
    x = np.asarray(features, dtype=np.float64) - projection["mean"]
    return (x @ np.asarray(projection["components"], dtype=np.float64).T).astype(np.float32)
