"""Flows on image features (paper Sec. 8, App. K.2): extract once, cache, train, evaluate.

A config with ``"features": "efficientnet-lite0"`` and a ``realnvp_tabular`` model of ``dim`` 1280 trains on the
features of its dataset's images (:mod:`flowcore.data.embeddings`) instead of the pixels. Features are cached as
npz files under ``$FLOWCORE_CACHE`` (default ``~/.cache/flowcore``), keyed by the extractor and a hash of the
images, so a set is embedded once. The standardisation of the features is part of the model (its first
layer), so ``flowcore.load(NAME).log_prob(features)`` takes the extractor's raw output; log-likelihoods are
continuous densities of the features in nats (no pixel quantisation, so no bits/dim).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import embeddings
from ..data.datasets import DatasetNotFound, load_images, set_label
from ..data.files import atomic_write
from ..flows.models import build
from ..flows.precision import check_precision_runs_natively
from ..training.distributed import float32_work, torch_threads
from ..training.train import (
    TABULAR,
    RunBase,
    RunLog,
    TrainConfig,
    check_budget,
    check_fresh_log,
    export_folder,
    lock_run_folder,
    lr_at,
    optimizer_for,
    restore_or_begin,
    run_epochs,
)
from ..zoo.checkpoints import KNN, PROJECTION, cache_dir, save, staged_checkpoint
from .knn import knn_score, normalise

__all__ = [
    "cache_dir", "dataset_features", "train_vectors", "log_likelihood", "image_log_likelihood", "input_shape",
    "feature_projection", "project", "PROJECTION", "FeatureScorer", "load_feature_scorer", "gaussian_log_likelihood",
    "KNN", "knn_bank", "write_knn_bank",
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


def _checked_vectors(model: torch.nn.Module, features: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != model.config.dim:
        raise ValueError(f"expected features of shape (N, {model.config.dim}), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("empty batch: no features to score")
    return x


@torch.no_grad()
def log_likelihood(model: torch.nn.Module, features: np.ndarray, batch_size: int = 1024,
                   device: str = "cpu") -> np.ndarray:
    """Log-density in nats (float64) of each feature vector under a vector flow."""
    x = _checked_vectors(model, features)
    parts = [model.log_prob(x[i : i + batch_size].to(device)).double().cpu().numpy()
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


@torch.no_grad()
def gaussian_log_likelihood(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Log-density in nats (float64) of each feature vector under the Ledoit-Wolf Gaussian of a whitening vector
    flow's training features (its first layer alone): the ``embedding_gaussian`` baseline."""
    return model.gaussian_log_prob(_checked_vectors(model, features)).double().numpy()


@dataclass
class FeatureScorer:
    """A flow on image features with the baselines stored beside it: ``score`` gives ``likelihood`` (the flow),
    ``embedding_gaussian`` (its whitening layer's Gaussian, for whitening flows) and ``embedding_knn`` (when the
    checkpoint holds a bank of training features)."""

    flow: torch.nn.Module
    knn_bank: np.ndarray | None = None
    knn_k: int | None = None

    @property
    def names(self) -> list[str]:
        """The keys of :meth:`score`."""
        return ["likelihood"] + ["embedding_gaussian"] * bool(self.flow.config.whiten) + \
            ["embedding_knn"] * (self.knn_bank is not None)

    def score(self, features: np.ndarray) -> dict[str, np.ndarray]:
        out = {"likelihood": log_likelihood(self.flow, features)}
        if self.flow.config.whiten:
            out["embedding_gaussian"] = gaussian_log_likelihood(self.flow, features)
        if self.knn_bank is not None:
            out["embedding_knn"] = knn_score(features, self.knn_bank, self.knn_k)
        return out

    def score_images(self, images_uint8: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`score` of each uint8 image's features, each image embedded and scored alone (float32 rounds
        differently with the batch: a score must never depend on the images beside it)."""
        x = np.asarray(images_uint8)
        if len(x) == 0:
            raise ValueError("empty batch: no images to score")
        rows = [self.score(embeddings.extract(x[i : i + 1])) for i in range(len(x))]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def load_feature_scorer(name_or_path: str | os.PathLike, device: str = "cpu") -> FeatureScorer:
    """A feature flow checkpoint with its stored baselines (:class:`FeatureScorer`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ..zoo.checkpoints import CheckpointError, load, read_config, resolve

    folder = resolve(name_or_path)
    flow = load(folder, device=device)
    knn = read_config(folder).get("knn")
    if not (folder / KNN).is_file() or not isinstance(knn, dict):
        return FeatureScorer(flow)
    try:
        bank = load_file(str(folder / KNN))["bank"]
    except (OSError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{folder / KNN}: unreadable k-NN bank ({e})") from None
    k = knn.get("k")
    if bank.ndim != 2 or bank.shape[1] != flow.config.dim or not isinstance(k, int) or not 1 <= k <= len(bank) \
            or not np.isfinite(bank).all():
        raise CheckpointError(f"{folder}: its k-NN bank {bank.shape} or k={k!r} does not fit the model")
    return FeatureScorer(flow, bank, k)


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


KNN_BANK = 2500  # features in the bank (float16: 6.4 MB at 1280 dimensions)


def knn_neighbours(bank_size: int) -> int:
    """k of the k-NN baseline: one per 1,000 bank features (Sun et al. 2022 use k = 50 with the 50,000 CIFAR-10
    training features and scale k with the fraction of the training set kept)."""
    return max(1, math.ceil(bank_size / 1000))


def knn_bank(train_features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The k-NN baseline's bank: :data:`KNN_BANK` training features drawn with ``seed``, unit length, float16; and
    its description for ``config.json`` (``knn``: k, bank size, metric)."""
    rows = np.random.default_rng(seed + 104729).permutation(len(train_features))[:KNN_BANK]
    bank = normalise(np.asarray(train_features)[rows]).astype(np.float16)
    return bank, {"k": knn_neighbours(len(bank)), "bank": len(bank), "metric": "euclidean, unit-length features"}


def write_knn_bank(folder: str | os.PathLike, bank: np.ndarray) -> None:
    """Store a bank of :func:`knn_bank` in a checkpoint folder (atomically)."""
    from safetensors.numpy import save_file

    atomic_write(Path(folder) / KNN, lambda tmp: save_file({"bank": bank}, str(tmp)), suffix=".safetensors")


@dataclass(kw_only=True)
class _VectorRun(RunBase):
    """A flow on vectors' run in :func:`flowcore.training.train.run_epochs`: its training, validation and test
    vectors, the curve of held-out NLLs and the best epoch so far (both saved with the state, so a resumed run
    selects and stops as an uninterrupted one would)."""

    x_train: torch.Tensor
    x_val: torch.Tensor
    x_test: torch.Tensor
    curve: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # epoch, val (its validation NLL) and state (its weights)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.x_train) // self.cfg.batch_size)

    def nll(self, x: torch.Tensor) -> float:
        return float(-np.mean(log_likelihood(self.model, x.numpy(), device=self.device)) / self.cfg.model.dim)

    def permutation(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.pos["epoch"])
        return torch.randperm(len(self.x_train), generator=gen)

    def step(self, perm: torch.Tensor) -> dict[str, float]:
        cfg, i = self.cfg, self.pos["step"]
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.global_step, self.pos["total_steps"], self.pos["warm_from"])
        batch = self.x_train[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]].to(self.device)
        loss = -self.model.log_prob(batch).mean() / cfg.model.dim  # nats per feature
        self.opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):  # never reaches the weights
            self.pos["skipped"] += 1
            return {"nll_per_dim": float(loss.detach())}
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.pos["loss_sum"] += float(loss.detach())
        self.pos["loss_n"] += 1
        return {"nll_per_dim": float(loss.detach())}

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Log this epoch's train (mean step loss), validation and test NLL and keep the best epoch's weights.
        Epoch 0 is the untrained flow: its couplings start as the identity, so after a whitening layer it is
        exactly the Ledoit-Wolf Gaussian, and the flow is exported only where it beats it on held-out vectors."""
        self.model.eval()
        n = self.pos["loss_n"]
        train = self.pos["loss_sum"] / n if n else (self.nll(self.x_train) if epoch == 0 else math.nan)
        point = {"epoch": epoch, "train_nll_per_dim": round(train, 5),
                 "test_nll_per_dim": round(self.nll(self.x_test), 5)}
        if len(self.x_val):
            point["validation_nll_per_dim"] = round(self.nll(self.x_val), 5)
        self.curve.append(point)
        self.log(event="epoch", **point)
        self.pos["loss_sum"], self.pos["loss_n"] = 0.0, 0
        # without a validation set the last epoch is the model
        score = point["validation_nll_per_dim"] if len(self.x_val) else -math.inf
        if not self.best or not len(self.x_val) or score < self.best["val"]:
            self.best = {"epoch": epoch, "val": score, "state": copy.deepcopy(self.model.state_dict())}
        self.model.train()
        return point

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], str, str | None]:
        point = self.evaluate(epoch)
        patience = self.cfg.patience
        stop = "patience" if patience and len(self.x_val) and epoch - self.best["epoch"] >= patience else None
        return point, "epoch " + ", ".join(f"{k} {v}" for k, v in point.items() if k != "epoch") + f" ({epoch})", stop

    def extra_state(self) -> dict[str, Any]:
        return {"curve": [dict(p) for p in self.curve], "best": dict(self.best)}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.curve = [dict(p) for p in state.get("curve", [])]
        self.best = dict(state.get("best", {}))


@float32_work
def train_vectors(
    cfg: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    export_dir: str | os.PathLike | None = None,
    replace: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    allow_emulated_bf16: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a vector flow on ``cfg.dataset``'s features or rows and export it, in the training loop
    of the pixel flows (:func:`flowcore.training.train.run_epochs`: the same run folder, lock, state saves,
    ``resume``, ``max_minutes`` and ``max_steps``).

    With ``validation_fraction`` a seeded share of the training vectors is held out: every epoch logs the train,
    validation and test log-likelihoods, the exported weights are the best epoch's on validation, and
    ``patience`` epochs without a better one end the run. ``max_minutes`` (else the config's; CPU minutes of
    this process, resumes included) ends it too, and the best epoch so far is exported; ``max_steps`` stops it
    without exporting (resume it). A flow on image features also stores a bank of its training features for the
    ``embedding_knn`` baseline (:data:`KNN`)."""
    from ..training import distributed as dist

    if not cfg.features:
        raise ValueError("train_vectors needs a config with features")
    if dist.world_size() > 1:
        raise ValueError("a flow on vectors trains in one process: run it without torchrun")
    device = dist.resolve_device(device)
    check_precision_runs_natively(cfg.precision, device, allow_emulated_bf16)
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    out = export_folder(run_dir, export_dir, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(run_dir)  # held until this call ends: a second run in this folder is refused
    try:
        check_fresh_log(run_dir, resume, replace)
        with torch_threads(cfg.threads):
            return _train_vectors(cfg, run_dir, out, data_dir, progress, max_minutes, max_steps, device, resume)
    finally:
        if lock is not None:
            lock.close()


def _train_vectors(cfg: TrainConfig, run_dir: Path, out: Path, data_dir: str | None, progress: bool,
                   max_minutes: float | None, max_steps: int | None, device: str, resume: bool) -> dict[str, Any]:
    """The body of :func:`train_vectors`, in a run folder this process holds."""
    budget = max_minutes if max_minutes is not None else cfg.max_minutes
    kind = cfg.features
    x_all = torch.from_numpy(dataset_vectors(kind, cfg.dataset, "train", data_dir, cfg.train_subset, progress))
    x_test = torch.from_numpy(dataset_vectors(kind, cfg.dataset, "test", data_dir, cfg.test_subset, progress))
    if x_all.shape[1] != cfg.model.dim:
        raise ValueError(f"{cfg.dataset} has {x_all.shape[1]} columns; the model's dim is {cfg.model.dim}")
    held = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed + 7919))
    n_val = round(cfg.validation_fraction * len(x_all))
    if cfg.validation_fraction and not 0 < n_val < len(x_all):
        raise ValueError(f"validation_fraction {cfg.validation_fraction} of {len(x_all)} vectors leaves no "
                         "validation or no training set")
    x_val, x_train = x_all[held[:n_val]], x_all[held[n_val:]] if n_val else x_all
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    shrinkage = model.standardize.fit(x_train)
    model.to(device)
    run = _VectorRun(
        cfg=cfg, model=model, opt=optimizer_for(cfg, model.parameters()), log=RunLog(run_dir / "log.jsonl"),
        state_path=run_dir / "state.pt", device=device, x_train=x_train, x_val=x_val, x_test=x_test,
        pos={"epoch": 0, "step": 0, "elapsed": 0.0, "skipped": 0, "total_steps": 0, "warm_from": 0,
             "loss_sum": 0.0, "loss_n": 0},
    )
    run.pos["total_steps"] = run.steps_per_epoch * cfg.epochs
    restore_or_begin(run, resume)
    check_budget(run, budget, run_dir)
    run.start_clock()
    if not run.curve:  # a new run: epoch 0, the Gaussian the flow starts as
        run.evaluate(0)
    run.model.train()
    stopped_by = run_epochs(run, budget, max_steps, progress)
    if stopped_by == "max_steps":
        return {"stopped_by": "max_steps", **run.pos}
    if stopped_by == "max_minutes" and run.pos["step"]:  # the part-epoch's weights are a candidate too
        run.evaluate(run.pos["epoch"] + 1)
    run.save_state()
    model.load_state_dict(run.best["state"])
    model.eval()
    test_nll = run.nll(x_test)
    curve, steps = run.curve, run.global_step
    training = {
        "dataset": cfg.dataset,
        "features": cfg.features,
        "train_images": len(x_train),
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "epochs_completed": len(curve) - 1,
        "images_seen": steps * cfg.batch_size,
        "cpu_minutes": round(run.pos["elapsed"] / 60, 1),  # the flow's training (features cached apart)
        "clock": "process" if run.clock is time.process_time else "wall",
        "threads": torch.get_num_threads(),
        "stopped_by": stopped_by,
        "skipped_steps": run.pos["skipped"],
        "torch": torch.__version__,
        "device": device,
        "world_size": 1,
        "curve": curve,
    }
    if n_val:
        training["validation"] = {"fraction": cfg.validation_fraction, "vectors": n_val,
                                  "selected_epoch": run.best["epoch"], "patience": cfg.patience}
    if cfg.model.whiten:
        training["ledoit_wolf_shrinkage"] = round(float(shrinkage), 6)
    bank, knn = knn_bank(x_train.numpy(), cfg.seed) if kind != TABULAR else (None, None)
    # all or nothing, like a pixel flow's export: the old checkpoint stays whole until every new file is written
    with staged_checkpoint(out) as stage:
        save(model.cpu(), stage, name=cfg.name, dataset=cfg.dataset, features=cfg.features, ood=cfg.ood,
             training=training, input_shape=None if kind == TABULAR else input_shape(cfg.dataset, data_dir),
             train_config=cfg.to_dict(), metrics={"test_nll_per_dim": round(test_nll, 5), "test_subset": len(x_test)},
             **({"knn": knn} if knn else {}))
        if knn:
            write_knn_bank(stage, bank)
    run.log(event="export", path=str(out), test_nll_per_dim=test_nll, selected_epoch=run.best["epoch"])
    return {"stopped_by": stopped_by, "test_nll_per_dim": test_nll, "export": str(out), "epoch": len(curve) - 1,
            "selected_epoch": run.best["epoch"]}


def evaluate_vectors(
    folder: Path, cfg: dict[str, Any], data_dir: str | None, train_subset: int, test_subset: int | None,
    ood_subset: int | None, ood: list[str] | None, progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reference log-likelihoods (nats) of the train subset, test set and OOD sets' features, and the summary
    fields that differ from images (no bits/dim: the mean and median negative log-likelihood per feature)."""
    scorer = load_feature_scorer(folder)
    model = scorer.flow
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
    reference = {f"{name}__{score}": values for name, x in sets.items() for score, values in scorer.score(x).items()}
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
