"""Training: resumable, deterministic given the seed, NaN-safe, with optional negative training.

A run lives in a run folder (``runs/NAME`` by default)::

    state.pt      model + optimizer + position (atomic saves; loaded with weights_only=True)
    log.jsonl     one JSON object per logged event
    .lock         held (flock) by the process training there: a second run in the folder is refused
    checkpoint/   the final model, exported when the run ends (``export_dir`` puts it elsewhere; an existing
                  checkpoint is replaced only with ``replace=True``, and its reference statistics go with it)

One loop, :func:`run_epochs`, trains every kind of run: a pixel flow here, a flow on features or table rows in
:mod:`flowcore.ood.vectors` (its data, step, per-epoch validation and export are its own; the folder, saves,
resume and stops are the loop's).

Determinism: the epoch's shuffle is seeded by ``(seed, epoch)`` and each step's dequantization noise
by ``(seed, global step)``, so a run killed and resumed ends with the same weights as an
uninterrupted one.

Several processes (``torchrun --nproc_per_node N flowcore train ...``; see :mod:`flowcore.training.distributed`):
``batch_size`` stays the *global* batch. Every rank draws the same seeded permutation and the same
global batch with its dequantization noise, then keeps its own slice of ``batch_size // N`` images
(``batch_size`` must be divisible by N); DistributedDataParallel averages the gradients, so a step is
the single-process step up to float summation order, and BatchNorm statistics (synchronised on GPUs,
per rank on CPU). ActNorm is initialised from the global batch. The saved position counts global
steps, so a run can be resumed with any number of processes. Only rank 0 writes ``log.jsonl``,
``state.pt`` and the exported checkpoint and shows the progress bar.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import load_images, match_shape
from ..data.files import atomic_write
from ..flows.config import FlowConfig, check_int, check_number
from ..flows.likelihood import LOG_256, as_image_tensor, dequantize, log_likelihood_nats, nats_to_bpd
from ..flows.models import build, log_prob_running_stats
from ..flows.precision import PRECISIONS, check_precision_runs_natively, set_st_precision, st_precision
from ..zoo.checkpoints import (
    FOLDER_FILES,
    CheckpointError,
    load,
    read_config,
    save,
    staged_checkpoint,
)
from . import distributed as dist

TABULAR = "tabular"  # TrainConfig.features of a flow on the rows of a tabular set

__all__ = ["TABULAR", "TrainConfig", "NegativeConfig", "load_train_config", "negative_term", "train", "RunBase",
           "run_epochs"]


@dataclass
class NegativeConfig:
    """App. B, eq. 7: also minimise log p(x) on ``dataset`` while log P(x) > ``threshold`` (nats)."""

    dataset: str
    threshold: float
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"negative.dataset must be a dataset name, got {self.dataset!r}")
        check_number("negative.threshold", self.threshold, -1e12, 1e12)
        check_number("negative.weight", self.weight, 0.0, open_low=True)


@dataclass
class TrainConfig:
    name: str
    model: FlowConfig
    dataset: str = "fashion_mnist"
    ood: list[str] = field(default_factory=list)
    optimizer: str = "adam"  # adam | adamw | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # constant | cosine (over epochs), both after a linear warmup
    warmup_steps: int = 200
    batch_size: int = 64
    epochs: int = 10
    max_minutes: float | None = None  # budget in CPU minutes of the training process (wall minutes on a GPU)
    grad_clip: float | None = 100.0
    seed: int = 0
    save_every_minutes: float = 3.0
    train_subset: int | None = None  # use only the first N training images
    test_subset: int | None = 2000  # images for the per-epoch test bpd
    pixel_noise_mu: float = 0.0  # Ren et al. background model: replace pixels by uniform noise w.p. mu
    negative: NegativeConfig | None = None
    init_from: str | None = None  # checkpoint (name or folder) whose weights start a fresh run: fine-tuning
    # BatchNorm normalises by its (then fixed) running statistics in training too, so the trained network is
    # the evaluated one. Negative training needs it: with batch statistics in training, the OOD term learns to
    # exploit the gap between batch and running statistics instead of lowering the evaluated likelihood.
    freeze_batchnorm: bool = False
    threads: int | None = None
    log_every: int = 100  # steps between 'train' events in log.jsonl
    # Sec. 8: train on the images' features from this extractor (flowcore.data.embeddings.EXTRACTOR), not the pixels;
    # "tabular": on the rows of a tabular set (App. K.3, flowcore.data.tabular)
    features: str | None = None
    # torch.compile (inductor) of the log-density a training step differentiates: 1.15-1.35x faster steps on a
    # CPU (benchmarks/throughput.py --variants) for seconds to a minute of compilation; same loss within float
    # tolerance (tests/test_train.py). Single-process runs without an OOD term only.
    compile: bool = False
    # "bf16": every st-network runs under bfloat16 autocast in channels_last (1.3-2.1x the training img/s on an
    # AVX-512 BF16 CPU, 0.09x on an AVX2-only one, where training refuses it: benchmarks/throughput.py --variants);
    # everything bijective, the master weights, the optimizer state and every evaluation stay float32
    # (flowcore.flows.precision)
    precision: str = "fp32"
    # flows on vectors: this fraction of the training vectors (a seeded draw) is held out as a validation set; the
    # exported model is the epoch with the best validation log-likelihood, and training stops after ``patience``
    # epochs without a better one (None: runs every epoch)
    validation_fraction: float = 0.0
    patience: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a training config is a table of keys, got {type(d).__name__}")
        d = dict(d)
        missing = {"name", "model"} - set(d)
        if missing:
            raise ValueError(f"training config lacks {sorted(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        model = d.get("model", {})
        if not isinstance(model, dict):
            raise ValueError(f"model must be a table of architecture keys, got {model!r}")
        d["model"] = FlowConfig.from_dict(model)
        neg = d.get("negative")
        if neg is not None and not isinstance(neg, dict):
            raise ValueError(f"negative must be a table (dataset, threshold, weight), got {neg!r}")
        if neg:
            unknown_neg = set(neg) - {f.name for f in fields(NegativeConfig)}
            if unknown_neg or not {"dataset", "threshold"} <= set(neg):
                raise ValueError(f"negative needs dataset and threshold (and optionally weight), got {sorted(neg)}")
            d["negative"] = NegativeConfig(**neg)
        return cls(**d)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a dataset name, got {self.dataset!r}")
        if not isinstance(self.ood, list) or not all(isinstance(s, str) for s in self.ood):
            raise ValueError(f"ood must be a list of dataset names, got {self.ood!r}")
        if self.optimizer not in ("adam", "adamw", "rmsprop"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected adam, adamw or rmsprop")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; expected constant or cosine")
        check_number("lr", self.lr, 0.0, 10.0, open_low=True)
        check_number("weight_decay", self.weight_decay, 0.0, 10.0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        check_int("epochs", self.epochs, 1, 100_000)  # 0 epochs would export an untrained model
        check_number("max_minutes", self.max_minutes, 0.0, optional=True, open_low=True)
        check_number("grad_clip", self.grad_clip, 0.0, optional=True, open_low=True)
        check_int("seed", self.seed, 0)
        check_number("save_every_minutes", self.save_every_minutes, 0.0, open_low=True)
        check_int("train_subset", self.train_subset, 1, optional=True)
        check_int("test_subset", self.test_subset, 1, optional=True)
        check_number("pixel_noise_mu", self.pixel_noise_mu, 0.0, 1.0)
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError(f"init_from must be a checkpoint name or folder, got {self.init_from!r}")
        if not isinstance(self.freeze_batchnorm, bool):
            raise ValueError(f"freeze_batchnorm must be true or false, got {self.freeze_batchnorm!r}")
        check_int("threads", self.threads, 1, 1024, optional=True)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.compile and self.negative is not None:
            raise ValueError("compile does not cover negative training (two batches a step); drop one of them")
        check_int("log_every", self.log_every, 1)
        check_number("validation_fraction", self.validation_fraction, 0.0, 0.5)
        check_int("patience", self.patience, 1, optional=True)
        if (self.validation_fraction or self.patience) and not self.features:
            raise ValueError("validation_fraction and patience are for flows on vectors (features set)")
        if self.patience and not self.validation_fraction:
            raise ValueError("patience needs a validation set: set validation_fraction")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {sorted(PRECISIONS)}")
        if self.features == TABULAR:
            from ..data.tabular import is_tabular

            if self.model.arch != "realnvp_tabular" or not is_tabular(self.dataset):
                raise ValueError("tabular features need model arch realnvp_tabular and a tabular dataset "
                                 "(SOURCE:CLASS, e.g. miniboone:signal)")
        elif self.features is not None:
            from ..data.embeddings import EXTRACTOR, FEATURE_DIM

            if self.features != EXTRACTOR:
                raise ValueError(f"unknown features {self.features!r}; available: {EXTRACTOR}, {TABULAR}")
            if self.model.arch != "realnvp_tabular" or self.model.dim != FEATURE_DIM:
                raise ValueError(f"features need model arch realnvp_tabular with dim {FEATURE_DIM}")
        elif self.model.arch == "realnvp_tabular":
            raise ValueError("a realnvp_tabular model trains on vectors: set features (e.g. efficientnet-lite0)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Read a JSON or TOML training config."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a training config") from None
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    return TrainConfig.from_dict(raw)


def optimizer_for(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int, total_steps: int, warm_from: int = 0) -> float:
    """Learning rate at global ``step``; the linear warmup starts at ``warm_from`` (0, or where a resumed run's
    schedule was extended: jumping from an annealed rate straight back to a high one knocks a converged model
    far off its optimum within a few dozen steps)."""
    warm = min(1.0, (step - warm_from + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        frac = min(1.0, step / max(1, total_steps))
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * warm


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Serialise in memory, then write the bytes: torch's zip writer reports a full disk as a RuntimeError
    ('unexpected pos 704 vs 598'), a plain write as the OSError it is (ENOSPC: 'disk full', one line)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def negative_term(log_q: Tensor, threshold: float, world: int = 1) -> Tensor:
    """Eq. 7's OOD term: ``(1 / N_OOD) sum_x log p(x) I[log p(x) > c]`` over the OOD batch, ``N_OOD`` the number
    of OOD points above ``c`` (the term is 0 when none is). ``log_q`` is the discrete log-likelihood in nats,
    the units of the paper's code (its loss is ``-(log N(z) + log det - D log 256)`` of ``(k + u) / 256``), so
    its thresholds (c = -30000 for the MNIST family, -100000 for CIFAR-10, CelebA, SVHN) carry over unchanged.

    Under ``world`` processes each rank holds a slice and DistributedDataParallel averages the gradients, so
    each rank divides by the global count over ``world``: the average is then the single-process gradient.
    """
    active = (log_q > threshold).to(log_q.dtype)
    n_ood = active.sum().detach()
    if world > 1:
        n_ood = dist.all_reduce_sum(n_ood.double()).to(log_q.dtype) / world
    return (log_q * active).sum() / torch.clamp(n_ood, min=1.0)


def _load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _images(name: str, split: str, shape, data_dir: str | None, limit: int | None = None) -> Tensor:
    x = match_shape(load_images(name, split, data_dir), shape)
    if limit:
        x = x[:limit]
    return as_image_tensor(x)


def _add_pixel_noise(k: Tensor, mu: float, gen: torch.Generator) -> Tensor:
    replace = torch.rand(k.shape, generator=gen) < mu
    noise = torch.randint(0, 256, k.shape, generator=gen, dtype=torch.uint8)
    return torch.where(replace, noise, k)


def _train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if cfg.freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _init_from(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Copy a shipped checkpoint's weights (buffers included) into ``model``; return its config.json."""
    parent = load(cfg.init_from)
    if parent.config.to_dict() != cfg.model.to_dict():
        raise ValueError(f"init_from {cfg.init_from!r}: its architecture differs from this config's model")
    model.load_state_dict(parent.state_dict(), strict=True)
    return read_config(cfg.init_from)


def _parent_summary(name: str) -> dict[str, Any]:
    """What the fine-tuned model inherits: its parent's training budget, for the model card."""
    try:
        t = read_config(name).get("training", {})
    except CheckpointError:
        return {"checkpoint": name}
    keep = ("dataset", "epochs_completed", "images_seen", "cpu_minutes", "threads")
    return {"checkpoint": name, **{k: t[k] for k in keep if k in t}}


class RunLog:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def __call__(self, **event: Any) -> None:
        if not self.enabled:
            return
        event = {"time": round(time.time(), 3), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


def export_folder(run_dir: Path, export_dir: str | os.PathLike | None, replace: bool) -> Path:
    """Where a run exports (``export_dir``, else ``RUN_DIR/checkpoint``), refused before any training when it
    already holds any file of a checkpoint folder (:data:`FOLDER_FILES`: weights, or only the card, statistics or
    histogram that a model left there) and ``replace`` is not given (the run's own folder is its own to
    rewrite)."""
    out = Path(export_dir) if export_dir else Path(run_dir) / "checkpoint"
    if export_dir and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is not a folder: export to a folder (--export DIR)")
    if export_dir and not replace:
        # the export folder's derived files would be dropped with the old weights: without --replace nothing there
        # is ours to drop, with or without a model.safetensors beside them
        held = [f for f in FOLDER_FILES if (out / f).exists()]
        if held:
            raise FileExistsError(
                f"{out} already holds a model's files ({', '.join(held)}); training never replaces them unless "
                "told to (--replace), so export elsewhere (--export DIR) or pass --replace"
            )
    return out


LOCK = ".lock"  # in a run folder: held (flock) by the one process training there


class RunFolderInUse(OSError):
    """Another process is training in this run folder."""


def lock_run_folder(run_dir: str | os.PathLike) -> IO[str] | None:
    """Take ``RUN_DIR/.lock`` exclusively (``flock``, non-blocking) for as long as the returned file stays open;
    the kernel drops it when the process ends, killed or not, so a lock is never stale. Two runs in one folder
    would interleave their log.jsonl, state.pt and export, and the last export would silently win: the second
    is refused at once with one line. ``None`` where the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # never truncated before the lock is ours: it names the holder
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read(32).strip()
        f.close()
        by = f" (process {holder})" if holder.isdigit() else ""
        raise RunFolderInUse(f"{run_dir} is in use by another training run{by}: wait for it to end, or train into "
                             "another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_fresh_log(run_dir: Path, resume: bool, replace: bool) -> None:
    """A fresh run (no --resume) into a folder that holds another run's log.jsonl (and no state.pt, which
    :func:`restore_or_begin` refuses by itself) would append its events to that log: one file, two runs. Refused,
    unless ``replace`` (the old log is replaced)."""
    log = run_dir / "log.jsonl"
    if resume or not log.is_file() or (run_dir / "state.pt").is_file():
        return
    if not replace:
        raise FileExistsError(f"{log} is the log of another run: continue that run with --resume, start over with "
                              "--replace (its log is replaced), or train into another --run-dir")
    log.unlink()


@dataclass(kw_only=True)
class RunBase:
    """What every run (pixels or vectors) shares with :func:`run_epochs`, the one training loop: its config,
    model, optimizer, log, saved position and clock. A kind of run adds its data and four methods:
    ``permutation()`` (this epoch's seeded order), ``step(perm)`` (one optimisation step; the values it returns are
    logged, the first one shown on the progress bar), ``end_epoch(epoch)`` (evaluate, log, and say whether to stop
    early) and ``steps_per_epoch``; ``extra_state()`` / ``restore_extra(state)`` carry what else a resume needs."""

    cfg: TrainConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    log: RunLog
    state_path: Path
    device: str
    pos: dict[str, Any]
    world: int = 1
    main: bool = True
    # the budget and the reported minutes are this process's CPU time on a CPU (two runs sharing two cores, or a
    # busy machine, get the same compute for the same budget), wall time on an accelerator
    clock: Any = time.process_time
    start_elapsed: float = 0.0
    t0: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    @property
    def global_step(self) -> int:
        return self.pos["epoch"] * self.steps_per_epoch + self.pos["step"]

    def elapsed(self) -> float:
        return self.start_elapsed + self.clock() - self.t0

    def start_clock(self) -> None:
        self.clock = time.process_time if torch.device(self.device).type == "cpu" else time.time
        self.start_elapsed, self.t0 = self.pos["elapsed"], self.clock()

    def extra_state(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:
        pass

    def save_state(self) -> None:
        self.pos["elapsed"] = self.elapsed()
        if self.main:  # parameters agree on every rank; of per-rank BatchNorm running statistics, rank 0's are kept
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "position": dict(self.pos),
                     **self.extra_state()}
            _atomic_torch_save(state, self.state_path)
        self.log(event="save", **self.pos)


@dataclass(kw_only=True)
class _Run(RunBase):
    """A pixel flow's run: uint8 images, dequantized per step, with optional negative training and torchrun."""

    x_train: Tensor
    x_test: Tensor
    x_neg: Tensor | None
    local: slice = field(default_factory=lambda: slice(None))
    # what a step differentiates instead of model.log_prob: the DistributedDataParallel wrapper under torchrun,
    # or the compiled log_prob
    objective: Any = None

    @property
    def dims(self) -> int:
        return int(np.prod(self.cfg.model.image_shape))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x_train) // self.cfg.batch_size

    def permutation(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.pos["epoch"])
        return torch.randperm(len(self.x_train), generator=gen)

    def step(self, perm: Tensor) -> dict[str, float]:
        result = _step(self, perm)
        return {"bpd": result.bpd, **({"neg_bpd": result.neg_bpd} if result.neg_bpd is not None else {})}

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], str, str | None]:
        bpd = self.test_bpd()
        self.log(event="epoch", epoch=epoch, test_bpd=round(bpd, 5), elapsed=round(self.elapsed(), 1))
        return {"epoch": epoch, "test_bpd": bpd, "elapsed": self.elapsed()}, f"epoch {epoch}: test bpd {bpd:.4f}", None

    def test_bpd(self) -> float:
        """Mean test bits/dim in float32 (every rank computes a share under torchrun), then back to training mode."""
        with st_precision(self.model, "fp32"):
            return self._test_bpd()

    def log_likelihoods(self, images: np.ndarray) -> np.ndarray:
        """log P(x) in nats of uint8 ``images`` under the model as it is now, evaluated like the test set (float32,
        eval mode, the run's seed), then back to training mode. Single process only."""
        with st_precision(self.model, "fp32"):
            self.model.eval()
            try:
                return np.asarray(log_likelihood_nats(self.model, images, seed=self.cfg.seed, batch_size=256,
                                                      device=self.device))
            finally:
                _train_mode(self.model, self.cfg)

    def _test_bpd(self) -> float:
        self.model.eval()
        if self.world > 1:
            dist.broadcast_state(self.model, buffers_only=True)

        def part(a: int, b: int) -> list:
            return list(log_likelihood_nats(self.model, self.x_test[a:b], seed=self.cfg.seed, batch_size=256,
                                            device=self.device))

        ll = np.asarray(dist.map_batches(part, len(self.x_test), 256)) if self.world > 1 else np.asarray(
            part(0, len(self.x_test)))
        _train_mode(self.model, self.cfg)
        return float(np.mean(nats_to_bpd(ll, self.dims)))


@dataclass
class _StepResult:
    ok: bool  # the step reached the weights (every rank agrees)
    bpd: float  # the global batch's bits/dim
    loss: float
    neg_bpd: float | None  # eq. 7's OOD term in bits/dim, with negative training


def _start(cfg: TrainConfig, run_dir: Path, resume: bool, data_dir: str | None, device: str) -> _Run:
    """Data, model and optimizer of a new run, or of the saved one when resuming."""
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by {world} processes")
    if cfg.compile and world > 1:  # before any data is loaded
        raise ValueError("compile is for single-process runs; under torchrun set \"compile\": false")
    shape = cfg.model.image_shape
    x_train = _images(cfg.dataset, "train", shape, data_dir, cfg.train_subset)
    if len(x_train) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(x_train)})")
    torch.manual_seed(cfg.seed)
    model = build(cfg.model).to(device)
    model, batchnorm = dist.convert_sync_batchnorm(model, device)
    set_st_precision(model, cfg.precision)  # before DDP and compile wrap it, and before a resume loads into it
    share = cfg.batch_size // world
    run = _Run(
        cfg=cfg, model=model, opt=optimizer_for(cfg, model.parameters()),
        log=RunLog(run_dir / "log.jsonl", enabled=rank == 0), state_path=run_dir / "state.pt", device=device,
        x_train=x_train, x_test=_images(cfg.dataset, "test", shape, data_dir, cfg.test_subset),
        x_neg=_images(cfg.negative.dataset, "train", shape, data_dir) if cfg.negative else None,
        pos={"epoch": 0, "step": 0, "elapsed": 0.0, "skipped": 0, "total_steps": 0, "warm_from": 0},
        world=world, main=rank == 0, local=slice(rank * share, (rank + 1) * share),
    )
    run.pos["total_steps"] = run.steps_per_epoch * cfg.epochs
    restore_or_begin(run, resume)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dist.global_actnorm_init(model)
        dev = torch.device(device)
        run.objective = DistributedDataParallel(dist.LogProb(model), device_ids=[dev.index] if dev.type == "cuda"
                                                else None)
        run.log(event="distributed", world_size=world, backend=dist.backend(), per_rank_batch=share,
                batchnorm=batchnorm, device=device)
    elif cfg.compile:
        from torch import _dynamo

        # every coupling of a scale has its own tensor shapes: dynamo's default of 8 recompilations per function
        # would leave the deeper ones eager
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        run.objective = torch.compile(model.log_prob)
        run.log(event="compile", backend="inductor")
    return run


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(e).__name__)[:160]


def restore_or_begin(run: RunBase, resume: bool) -> None:
    """Load the saved state (a resume, possibly with more epochs: the schedule warms up again from there), or
    log the start of a new run (and load ``init_from``'s weights)."""
    total_steps = run.pos["total_steps"]
    if resume and run.state_path.is_file():
        st = _load_state(run.state_path)
        try:
            run.model.load_state_dict(st["model"])
            run.opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # the config's model was edited after the save
            raise ValueError(f"{run.state_path} was saved by a different model than the config now describes "
                             f"({_first_line(e)}): restore the config, or start a new run in another folder") from None
        saved = st["position"]
        run.pos = {k: saved.get(k, v) for k, v in run.pos.items()}
        run.restore_extra(st)
        run.log(event="resume", **run.pos)
        if saved.get("total_steps") != total_steps:  # more (or fewer) epochs than saved: warm up again from here
            run.pos["total_steps"] = total_steps
            run.pos["warm_from"] = run.global_step
            run.log(event="schedule_extended", total_steps=total_steps, warm_from=run.pos["warm_from"])
    elif run.state_path.is_file():
        folder = run.state_path.parent
        raise FileExistsError(f"{run.state_path} exists: pass --resume to continue it, or remove {folder}")
    else:
        run.log(event="start", config=run.cfg.to_dict(), torch=torch.__version__, threads=torch.get_num_threads())
        if run.cfg.init_from:
            parent = _init_from(run.model, run.cfg)
            run.log(event="init_from", checkpoint=run.cfg.init_from,
                    test_bpd=parent.get("metrics", {}).get("test_bpd_subset"))


def _batches(run: _Run, perm: Tensor) -> tuple[Tensor, Tensor | None]:
    """This step's dequantized training batch and OOD batch (this rank's share), from the step's own seed."""
    cfg, step = run.cfg, run.pos["step"]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.global_step)
    k = run.x_train[perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
    if cfg.pixel_noise_mu > 0:
        k = _add_pixel_noise(k, cfg.pixel_noise_mu, gen)
    v = dequantize(k, "uniform", gen)[run.local].to(run.device)
    if run.x_neg is None:
        return v, None
    nidx = torch.randint(0, len(run.x_neg), (cfg.batch_size,), generator=gen)
    return v, dequantize(run.x_neg[nidx], "uniform", gen)[run.local].to(run.device)


def _log_likelihoods(run: _Run, v: Tensor, v_neg: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Discrete log-likelihoods (nats) of the batch and of the OOD batch (under running BatchNorm statistics)."""
    shift = run.dims * LOG_256
    if run.objective is None:  # the batch first: its forward pass updates the running statistics the OOD batch uses
        log_p = run.model.log_prob(v) - shift
        return log_p, None if v_neg is None else log_prob_running_stats(run.model, v_neg) - shift
    if v_neg is None:
        return run.objective(v) - shift, None
    log_p, log_q = run.objective(v, v_neg)
    return log_p - shift, log_q - shift


def _reduce(run: _Run, log_p: Tensor, loss: Tensor, neg_term: Tensor | None, ok: bool) -> tuple[bool, float, float,
                                                                                                 float | None]:
    """The one collective of a step: whether every rank's loss is finite (skip on all or none), and the global
    batch's bits/dim, loss and OOD term for the log. A single process reads its own values."""
    nats_to_bits = run.dims * math.log(2)
    if run.world == 1:
        neg = None if neg_term is None else float(-neg_term.detach())
        return ok, float(-log_p.detach().mean()) / nats_to_bits, float(loss.detach()), neg
    zero = torch.zeros((), device=log_p.device)
    parts = [log_p.detach().double().sum(), torch.tensor(float(ok), device=log_p.device),
             neg_term.detach() if neg_term is not None else zero, loss.detach()]
    stats = dist.all_reduce_sum(torch.stack([t.double() for t in parts])).cpu()
    bpd = float(-stats[0]) / run.cfg.batch_size / nats_to_bits
    neg = None if neg_term is None else -float(stats[2]) / run.world
    return bool(stats[1] == run.world), bpd, float(stats[3]) / run.world, neg


def _step(run: _Run, perm: Tensor) -> _StepResult:
    """One optimisation step. A non-finite loss or gradient never reaches the weights: the step is skipped on
    every rank and the BatchNorm running statistics its forward pass changed are restored."""
    cfg = run.cfg
    v, v_neg = _batches(run, perm)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(cfg, run.global_step, run.pos["total_steps"], run.pos["warm_from"])
    buffers_before = [b.clone() for b in run.model.buffers()]
    log_p, log_q = _log_likelihoods(run, v, v_neg)
    loss = -log_p.mean() / (run.dims * math.log(2))
    neg_term = None
    if log_q is not None:
        neg_term = negative_term(log_q, cfg.negative.threshold, run.world) / (run.dims * math.log(2))
        loss = loss + cfg.negative.weight * neg_term
    run.opt.zero_grad(set_to_none=True)
    ok, bpd, loss_value, neg_bpd = _reduce(run, log_p, loss, neg_term, bool(torch.isfinite(loss)))
    if ok:
        loss.backward()
        # the total norm is non-finite iff some gradient is: such a step never reaches the weights
        ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)))
    if ok:
        run.opt.step()
    else:
        with torch.no_grad():
            for b, saved in zip(run.model.buffers(), buffers_before, strict=True):
                b.copy_(saved)
        run.pos["skipped"] += 1
        run.log(event="skip_nonfinite", step=run.global_step, loss=loss_value)
    return _StepResult(ok, bpd, loss_value, neg_bpd)


def check_budget(run: RunBase, budget: float | None, run_dir: Path) -> None:
    """A resumed run that has already spent its budget is refused: ``max_minutes`` counts the whole run, resumes
    included, so without this check a resume would train one step and stop."""
    spent = run.pos["elapsed"]
    if budget is not None and spent > 0 and spent >= 60 * budget and run.global_step < run.pos["total_steps"]:
        raise ValueError(
            f"{run_dir} has already trained {spent / 60:.1f} minutes, over its budget of {budget:g}"
            " (max_minutes counts the whole run): pass a larger --max-minutes to continue it"
        )


def _export(run: _Run, out: Path, stopped_by: str, bpd: float) -> None:
    """Write the trained model, its training record and config to ``out`` (rank 0)."""
    cfg = run.cfg
    images_seen = run.global_step * cfg.batch_size
    training = {
        "dataset": cfg.dataset,
        "train_images": len(run.x_train),
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "epochs_completed": round(images_seen / len(run.x_train), 3),
        "images_seen": images_seen,
        "cpu_minutes": round(run.pos["elapsed"] / 60, 1),
        "clock": "process" if run.clock is time.process_time else "wall",  # what cpu_minutes measured
        "threads": torch.get_num_threads(),
        "stopped_by": stopped_by,
        "skipped_steps": run.pos["skipped"],
        "pixel_noise_mu": cfg.pixel_noise_mu,
        # "normalised_by": how the OOD term was averaged (eq. 7: over the N_OOD points above c)
        "negative": {**asdict(cfg.negative), "normalised_by": "n_ood"} if cfg.negative else None,
        "init_from": _parent_summary(cfg.init_from) if cfg.init_from else None,
        "torch": torch.__version__,
        "device": run.device,
        "world_size": run.world,
        "precision": cfg.precision,  # of the st-networks in training; evaluation and scores are float32
    }
    if run.main:
        # all or nothing: the old checkpoint (weights, statistics, card) stays whole until the new files are written
        with staged_checkpoint(out) as stage:
            save(run.model.cpu(), stage, name=cfg.name, dataset=cfg.dataset, ood=cfg.ood, training=training,
                 train_config=cfg.to_dict(),
                 metrics={"test_bpd_subset": round(bpd, 5), "test_subset": len(run.x_test)})


def run_epochs(run: RunBase, budget: float | None, max_steps: int | None, progress: bool,
               after_epoch: Callable[[dict[str, Any]], None] | None = None) -> str:
    """The one training loop, for pixel flows and flows on vectors alike: epochs of seeded steps from the run's
    saved position, a log line every ``log_every`` steps, a state save every ``save_every_minutes`` and after
    each epoch, and the stops every flag asks for. Returns why it stopped: "epochs" (all done), "max_minutes"
    (``budget``, minutes of the run's clock, resumes included), the run's own early stop (e.g. "patience"), or
    "max_steps" (this call's steps; the state is saved and nothing is exported, as if the process were killed)."""
    from tqdm.auto import tqdm

    cfg, pos = run.cfg, run.pos
    last_save, stopped_by, steps_this_call = time.time(), "epochs", 0
    bar = tqdm(total=pos["total_steps"], initial=run.global_step, disable=not progress or not run.main, unit="step",
               dynamic_ncols=True)
    try:
        while pos["epoch"] < cfg.epochs and stopped_by == "epochs":
            perm = run.permutation()
            while pos["step"] < run.steps_per_epoch:
                global_step = run.global_step
                values = list(run.step(perm).items())
                pos["step"] += 1
                steps_this_call += 1
                bar.update(1)
                (shown, value), rest = values[0], values[1:]
                if global_step % 10 == 0 and run.main:
                    bar.set_postfix({shown: f"{value:.3f}", "ep": pos["epoch"]})
                if global_step % cfg.log_every == 0:
                    run.log(event="train", step=global_step, **{shown: round(value, 5)},
                            lr=run.opt.param_groups[0]["lr"], **{k: round(v, 5) for k, v in rest})
                if run.main and time.time() - last_save > 60 * cfg.save_every_minutes:  # rank 0 alone: no collective
                    run.save_state()
                    last_save = time.time()
                if max_steps is not None and steps_this_call >= max_steps:
                    run.save_state()
                    return "max_steps"
                over_budget = budget is not None and run.elapsed() > 60 * budget
                if dist.broadcast_flag(over_budget) if run.world > 1 and budget is not None else over_budget:
                    stopped_by = "max_minutes"
                    break
            if stopped_by == "epochs":
                pos["epoch"] += 1
                pos["step"] = 0
                record, line, early = run.end_epoch(pos["epoch"])
                if run.main:
                    bar.write(line)
                if after_epoch is not None:
                    after_epoch(record)
                run.save_state()
                last_save = time.time()
                stopped_by = early or stopped_by
    finally:
        bar.close()
    return stopped_by


@dist.float32_work
def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    data_dir: str | None = None,
    export_dir: str | os.PathLike | None = None,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    replace: bool = False,
    on_epoch: Callable[[dict[str, Any], Callable[[np.ndarray], np.ndarray]], None] | None = None,
    allow_emulated_bf16: bool = False,
    export_paused: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run; export to ``export_dir`` (default ``RUN_DIR/checkpoint``) when finished.

    ``on_epoch(record, log_likelihood)``, single process only, is called after each epoch with the epoch's log
    record (``epoch``, ``epochs``, ``test_bpd``, ``elapsed``, ``budget_minutes``) and a function giving log P(x) in
    nats of uint8 images under the model of that moment (how the own-data page draws its live histogram).

    An ``export_dir`` that already holds a model or its files (a shipped checkpoint, say) is refused before any
    training unless ``replace``; replacing drops its reference statistics, histogram and card, which described the
    old weights, once the new files are written (a failed export leaves the old checkpoint whole). The run folder
    is locked for the call (a second run there is refused), and a fresh run never appends to another run's
    log.jsonl (``replace`` replaces it). ``max_steps`` stops early (for tests: simulates a kill) without
    exporting. ``max_minutes`` (else the config's) is a budget of CPU minutes of this process for the whole run,
    resumes included. ``"precision": "bf16"`` is refused where the device would emulate bfloat16 (slower than
    float32), unless ``allow_emulated_bf16``. ``export_paused`` (with ``resume``) trains nothing: it exports the
    saved run's model as it stands, its card saying ``"stopped_by": "paused"`` and how far it got, and leaves the
    state as it was, so the run can go on later (a long run's model, usable before the run ends).
    Returns a summary dict (the same on every rank when run under torchrun).
    """
    if export_paused and not resume:
        raise ValueError("exporting a paused run needs --resume: it exports the run saved in the run folder")
    if export_paused and max_steps is not None:
        raise ValueError("exporting a paused run trains no steps: leave out --max-steps")
    device = dist.init(device)
    if not export_paused:  # nothing is trained, so nothing runs in bfloat16
        check_precision_runs_natively(cfg.precision, device, allow_emulated_bf16)
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    out = export_folder(run_dir, export_dir, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 alone holds the lock: under torchrun every rank trains in the same folder, as one run
    lock = lock_run_folder(run_dir) if dist.is_main() else None
    try:
        if dist.is_main():
            check_fresh_log(run_dir, resume, replace)
        if on_epoch is not None and dist.world_size() > 1:
            raise ValueError("on_epoch is for single-process runs")
        with dist.torch_threads(cfg.threads):
            return _train(cfg, run_dir, out, resume, data_dir, max_minutes, max_steps, progress, device, on_epoch,
                          export_paused)
    finally:
        if lock is not None:  # released here, not whenever a traceback holding this frame is dropped
            lock.close()


def _train(cfg: TrainConfig, run_dir: Path, out: Path, resume: bool, data_dir: str | None,
           max_minutes: float | None, max_steps: int | None, progress: bool, device: str,
           on_epoch: Callable[[dict[str, Any], Callable[[np.ndarray], np.ndarray]], None] | None = None,
           export_paused: bool = False) -> dict[str, Any]:
    """The body of :func:`train`, in a run folder this process holds."""
    if export_paused and not (run_dir / "state.pt").is_file():  # else _start would begin a new, untrained run
        raise FileNotFoundError(f"{run_dir} holds no saved run (state.pt) to export")
    run = _start(cfg, run_dir, resume, data_dir, device)
    if export_paused:
        return _export_as_it_stands(run, out)
    budget = max_minutes if max_minutes is not None else cfg.max_minutes
    check_budget(run, budget, run_dir)
    run.start_clock()
    _train_mode(run.model, cfg)
    after = None
    if on_epoch is not None:
        def after(record: dict[str, Any]) -> None:
            on_epoch({**record, "epochs": cfg.epochs, "budget_minutes": budget}, run.log_likelihoods)

    stopped_by = run_epochs(run, budget, max_steps, progress, after)
    if stopped_by == "max_steps":
        dist.barrier()
        return {"stopped_by": "max_steps", **run.pos}
    run.save_state()
    return _measure_and_export(run, out, stopped_by)


def _measure_and_export(run: _Run, out: Path, stopped_by: str) -> dict[str, Any]:
    """Test bpd of the run's model as it is now, then its export, logged."""
    bpd = run.test_bpd()
    run.model.eval()
    set_st_precision(run.model, "fp32")
    _export(run, out, stopped_by, bpd)
    dist.barrier()
    run.log(event="export", path=str(out), test_bpd=bpd, stopped_by=stopped_by)
    return {"stopped_by": stopped_by, "test_bpd": bpd, "export": str(out), **run.pos}


def _export_as_it_stands(run: _Run, out: Path) -> dict[str, Any]:
    """A saved run's model exported without a step trained: its state file is left as it was."""
    if run.global_step >= run.pos["total_steps"]:
        raise ValueError(f"{run.state_path.parent} has finished: its model was exported when it did")
    return _measure_and_export(run, out, "paused")
