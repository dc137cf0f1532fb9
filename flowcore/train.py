"""Training: resumable, deterministic given the seed, NaN-safe, with optional negative training.

A run lives in a run folder (``runs/NAME`` by default)::

    state.pt      model + optimizer + position (atomic saves; loaded with weights_only=True)
    log.jsonl     one JSON object per logged event
    checkpoint/   the final model, exported when the run ends (``export_dir`` puts it elsewhere; an existing
                  checkpoint is replaced only with ``replace=True``, and its reference statistics go with it)

Determinism: the epoch's shuffle is seeded by ``(seed, epoch)`` and each step's dequantization noise
by ``(seed, global step)``, so a run killed and resumed ends with the same weights as an
uninterrupted one.

Several processes (``torchrun --nproc_per_node N flowcore train ...``; see :mod:`flowcore.distributed`):
``batch_size`` stays the *global* batch. Every rank draws the same seeded permutation and the same
global batch with its dequantization noise, then keeps its own slice of ``batch_size // N`` images
(``batch_size`` must be divisible by N); DistributedDataParallel averages the gradients, so a step is
the single-process step up to float summation order, and BatchNorm statistics (synchronised on GPUs,
per rank on CPU). ActNorm is initialised from the global batch. The saved position counts global
steps, so a run can be resumed with any number of processes. Only rank 0 writes ``log.jsonl``,
``state.pt`` and the exported checkpoint and shows the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import distributed as dist
from .checkpoints import CONFIG, WEIGHTS, CheckpointError, atomic_write, load, read_config, save, write_json
from .config import FlowConfig, check_int, check_number
from .data import load_images, match_shape
from .likelihood import LOG_256, as_image_tensor, dequantize, log_likelihood_nats, nats_to_bpd
from .models import build, log_prob_running_stats

__all__ = ["TrainConfig", "NegativeConfig", "load_train_config", "negative_term", "train"]


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
    # Sec. 8: train on the images' features from this extractor (flowcore.embeddings.EXTRACTOR), not the pixels
    features: str | None = None

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
        check_int("log_every", self.log_every, 1)
        if self.features is not None:
            from .embeddings import EXTRACTOR, FEATURE_DIM

            if self.features != EXTRACTOR:
                raise ValueError(f"unknown features {self.features!r}; available: {EXTRACTOR}")
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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    already holds a model and ``replace`` is not given (the run's own folder is its own to rewrite)."""
    out = Path(export_dir) if export_dir else Path(run_dir) / "checkpoint"
    if export_dir and (out / WEIGHTS).exists() and not replace:
        raise FileExistsError(
            f"{out} already holds a model; training never replaces one unless told to "
            "(--replace), so export elsewhere (--export DIR) or pass --replace"
        )
    return out


def drop_derived_files(folder: Path) -> None:
    """Before new weights land in ``folder``: remove what was computed from the old ones (reference
    statistics, histogram, model card, and the ``reference`` summary and ``data_note`` in ``config.json``)."""
    for derived in ("reference.npz", "histogram.png", "README.md"):
        (folder / derived).unlink(missing_ok=True)
    cfg_path = folder / CONFIG
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(old, dict) and {"reference", "data_note"} & old.keys():
            write_json(cfg_path, {k: v for k, v in old.items() if k not in ("reference", "data_note")})


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
) -> dict[str, Any]:
    """Train (or resume) a run; export to ``export_dir`` (default ``RUN_DIR/checkpoint``) when finished.

    An ``export_dir`` that already holds a model (a shipped checkpoint, say) is refused before any training
    unless ``replace``; replacing drops its reference statistics, histogram and card, which described the old
    weights. ``max_steps`` stops early (for tests: simulates a kill) without exporting.
    Returns a summary dict (the same on every rank when run under torchrun).
    """
    from tqdm.auto import tqdm

    device = dist.init(device)
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by {world} processes")
    local = slice(rank * (cfg.batch_size // world), (rank + 1) * (cfg.batch_size // world))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    out = export_folder(run_dir, export_dir, replace)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "log.jsonl", enabled=main)
    state_path = run_dir / "state.pt"
    shape = cfg.model.image_shape

    x_train = _images(cfg.dataset, "train", shape, data_dir, cfg.train_subset)
    x_test = _images(cfg.dataset, "test", shape, data_dir, cfg.test_subset)
    x_neg = _images(cfg.negative.dataset, "train", shape, data_dir) if cfg.negative else None
    dims = int(np.prod(shape))

    torch.manual_seed(cfg.seed)
    model = build(cfg.model).to(device)
    model, batchnorm = dist.convert_sync_batchnorm(model, device)
    opt = optimizer_for(cfg, model.parameters())
    steps_per_epoch = len(x_train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(x_train)})")
    total_steps = steps_per_epoch * cfg.epochs
    pos = {"epoch": 0, "step": 0, "elapsed": 0.0, "skipped": 0, "total_steps": total_steps, "warm_from": 0}
    if resume and state_path.is_file():
        st = _load_state(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        saved = st["position"]
        pos = {k: saved.get(k, pos[k]) for k in pos}
        log(event="resume", **pos)
        if saved.get("total_steps") != total_steps:  # more (or fewer) epochs than saved: warm up again from here
            pos["total_steps"] = total_steps
            pos["warm_from"] = pos["epoch"] * steps_per_epoch + pos["step"]
            log(event="schedule_extended", total_steps=total_steps, warm_from=pos["warm_from"])
    elif state_path.is_file() and not resume:
        raise FileExistsError(f"{state_path} exists: pass --resume to continue it, or remove {run_dir}")
    else:
        log(event="start", config=cfg.to_dict(), torch=torch.__version__, threads=torch.get_num_threads())
        if cfg.init_from:
            parent = _init_from(model, cfg)
            log(event="init_from", checkpoint=cfg.init_from, test_bpd=parent.get("metrics", {}).get("test_bpd_subset"))
    objective = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dist.global_actnorm_init(model)
        dev = torch.device(device)
        objective = DistributedDataParallel(dist.LogProb(model), device_ids=[dev.index] if dev.type == "cuda" else None)
        log(
            event="distributed",
            world_size=world,
            backend=dist.backend(),
            per_rank_batch=cfg.batch_size // world,
            batchnorm=batchnorm,
            device=device,
        )

    budget = max_minutes if max_minutes is not None else cfg.max_minutes
    done = pos["epoch"] * steps_per_epoch + pos["step"] >= total_steps
    if resume and pos["elapsed"] > 0 and budget is not None and pos["elapsed"] >= 60 * budget and not done:
        # max_minutes counts the whole run, resumes included: without this a resume would train one step and stop
        raise ValueError(
            f"{run_dir} has already trained {pos['elapsed'] / 60:.1f} minutes, over its budget of {budget:g}"
            " (max_minutes counts the whole run): pass a larger --max-minutes to continue it"
        )
    # the budget and the reported minutes are this process's CPU time on a CPU (two runs sharing two cores, or a
    # busy machine, get the same compute for the same budget), wall time on an accelerator
    clock = time.process_time if torch.device(device).type == "cpu" else time.time
    start_elapsed, t0 = pos["elapsed"], clock()
    last_save = time.time()

    def elapsed() -> float:
        return start_elapsed + clock() - t0

    def save_state() -> None:
        pos["elapsed"] = elapsed()
        if main:  # parameters agree on every rank; of per-rank BatchNorm running statistics, rank 0's are kept
            _atomic_torch_save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "position": dict(pos)}, state_path
            )
        log(event="save", **pos)

    def test_bpd() -> float:
        model.eval()
        if world > 1:
            dist.broadcast_state(model, buffers_only=True)

        def part(a: int, b: int) -> list:
            ll = log_likelihood_nats(model, x_test[a:b], seed=cfg.seed, batch_size=256, device=device)
            return list(ll)

        ll = (
            np.asarray(dist.map_batches(part, len(x_test), 256))
            if world > 1
            else log_likelihood_nats(model, x_test, seed=cfg.seed, batch_size=256, device=device)
        )
        _train_mode(model, cfg)
        return float(np.mean(nats_to_bpd(ll, dims)))

    stopped_by = "epochs"
    _train_mode(model, cfg)
    bar = tqdm(
        total=total_steps,
        initial=pos["step"] + pos["epoch"] * steps_per_epoch,
        disable=not progress or not main,
        unit="step",
        dynamic_ncols=True,
    )
    steps_this_call = 0
    while pos["epoch"] < cfg.epochs:
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + pos["epoch"]))
        while pos["step"] < steps_per_epoch:
            global_step = pos["epoch"] * steps_per_epoch + pos["step"]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + global_step)
            idx = perm[pos["step"] * cfg.batch_size : (pos["step"] + 1) * cfg.batch_size]
            k = x_train[idx]
            if cfg.pixel_noise_mu > 0:
                k = _add_pixel_noise(k, cfg.pixel_noise_mu, gen)
            v = dequantize(k, "uniform", gen)[local].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, global_step, total_steps, pos["warm_from"])
            # BatchNorm running stats change in the forward pass: keep them to undo a skipped step
            buffers_before = [b.clone() for b in model.buffers()]
            v_neg = None
            if x_neg is not None:
                nidx = torch.randint(0, len(x_neg), (cfg.batch_size,), generator=gen)
                v_neg = dequantize(x_neg[nidx], "uniform", gen)[local].to(device)
            if objective is None:
                log_p = model.log_prob(v) - dims * LOG_256
                log_q = None if v_neg is None else log_prob_running_stats(model, v_neg) - dims * LOG_256
            elif v_neg is None:
                log_p = objective(v) - dims * LOG_256
            else:
                log_p, log_q = objective(v, v_neg)
                log_p, log_q = log_p - dims * LOG_256, log_q - dims * LOG_256
            log_p_value = log_p.detach()
            loss = -log_p.mean() / (dims * math.log(2))
            neg_term = None
            if v_neg is not None:
                neg_term = negative_term(log_q, cfg.negative.threshold, world) / (dims * math.log(2))
                loss = loss + cfg.negative.weight * neg_term
            opt.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if world > 1:  # one collective: global-batch bpd for the log, and skip the step on every rank or none
                neg_value = neg_term.detach() if neg_term is not None else torch.zeros((), device=log_p.device)
                ok_value = torch.tensor(float(ok), device=log_p.device)
                parts = [log_p_value.double().sum(), ok_value, neg_value, loss.detach()]
                stats = dist.all_reduce_sum(torch.stack([t.double() for t in parts])).cpu()
                ok = bool(stats[1] == world)
                bpd_global = float(-stats[0]) / cfg.batch_size / (dims * math.log(2))
                neg_global = float(stats[2]) / world
                loss_global = float(stats[3]) / world
            if ok:
                loss.backward()
                # the total norm is non-finite iff some gradient is: such a step never reaches the weights
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                ok = bool(torch.isfinite(norm))
            if ok:
                opt.step()
            else:
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers_before, strict=True):
                        b.copy_(saved)
                pos["skipped"] += 1
                log(event="skip_nonfinite", step=global_step, loss=float(loss.detach()) if world == 1 else loss_global)
            pos["step"] += 1
            steps_this_call += 1
            bar.update(1)
            if global_step % 10 == 0 and main:
                bpd_bar = float(-log_p_value.mean()) / (dims * math.log(2)) if world == 1 else bpd_global
                bar.set_postfix(bpd=f"{bpd_bar:.3f}", ep=pos["epoch"])
            if global_step % cfg.log_every == 0:
                bpd_now = float(-log_p_value.mean()) / (dims * math.log(2)) if world == 1 else bpd_global
                lr_now = opt.param_groups[0]["lr"]
                event = {"event": "train", "step": global_step, "bpd": round(bpd_now, 5), "lr": lr_now}
                if neg_term is not None:
                    event["neg_bpd"] = round(float(-neg_term.detach()) if world == 1 else -neg_global, 5)
                log(**event)
            if main and time.time() - last_save > 60 * cfg.save_every_minutes:  # rank 0 alone: no collective
                save_state()
                last_save = time.time()
            if max_steps is not None and steps_this_call >= max_steps:
                save_state()
                bar.close()
                dist.barrier()
                return {"stopped_by": "max_steps", **pos}
            over_budget = budget is not None and elapsed() > 60 * budget
            if dist.broadcast_flag(over_budget) if world > 1 and budget is not None else over_budget:
                stopped_by = "max_minutes"
                break
        if stopped_by == "max_minutes":
            break
        pos["epoch"] += 1
        pos["step"] = 0
        bpd = test_bpd()
        log(event="epoch", epoch=pos["epoch"], test_bpd=round(bpd, 5), elapsed=round(elapsed(), 1))
        if main:
            bar.write(f"epoch {pos['epoch']}: test bpd {bpd:.4f}")
        save_state()
        last_save = time.time()
    bar.close()
    save_state()
    bpd = test_bpd()
    model.eval()
    images_seen = (pos["epoch"] * steps_per_epoch + pos["step"]) * cfg.batch_size
    training = {
        "dataset": cfg.dataset,
        "train_images": len(x_train),
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "epochs_completed": round(images_seen / len(x_train), 3),
        "images_seen": images_seen,
        "cpu_minutes": round(pos["elapsed"] / 60, 1),
        "clock": "process" if clock is time.process_time else "wall",  # what cpu_minutes measured
        "threads": torch.get_num_threads(),
        "stopped_by": stopped_by,
        "skipped_steps": pos["skipped"],
        "pixel_noise_mu": cfg.pixel_noise_mu,
        # "normalised_by": how the OOD term was averaged (eq. 7: over the N_OOD points above c)
        "negative": {**asdict(cfg.negative), "normalised_by": "n_ood"} if cfg.negative else None,
        "init_from": _parent_summary(cfg.init_from) if cfg.init_from else None,
        "torch": torch.__version__,
        "device": device,
        "world_size": world,
    }
    if main:
        drop_derived_files(out)
        save(
            model.cpu(),
            out,
            name=cfg.name,
            dataset=cfg.dataset,
            ood=cfg.ood,
            training=training,
            train_config=cfg.to_dict(),
            metrics={"test_bpd_subset": round(bpd, 5), "test_subset": len(x_test)},
        )
    dist.barrier()
    log(event="export", path=str(out), test_bpd=bpd)
    return {"stopped_by": stopped_by, "test_bpd": bpd, "export": str(out), **pos}
