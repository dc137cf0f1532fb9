"""Checkpoint folders: ``model.safetensors`` + ``config.json`` (+ optional ``reference.npz``).

Loading never unpickles: weights are safetensors, metadata is JSON, reference statistics are
``np.load(..., allow_pickle=False)``. Every failure is a :class:`CheckpointError` with one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.files import atomic_write
from ..flows.config import FlowConfig
from ..flows.models import build

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save",
    "staged_checkpoint",
    "load",
    "resolve",
    "checkpoints_dir",
    "checkpoint_roots",
    "own_models_dir",
    "read_json_dict",
    "cache_dir",
    "list_checkpoints",
    "paired_feature_flow",
    "read_config",
    "check_reference_summary",
    "MAX_DRAWS",
    "FOLDER_FILES",
    "DERIVED_FILES",
]

# The one description of a checkpoint folder: the files it may hold, and those computed from its weights.
WEIGHTS = "model.safetensors"  # the weights (and buffers) of the flow
CONFIG = "config.json"  # architecture, training record, reference summary
REFERENCE = "reference.npz"  # per-image scores of the reference sets (flowcore evaluate)
CARD = "README.md"  # the model card
HISTOGRAM = "histogram.png"  # test vs OOD log-likelihoods
PROJECTION = "projection.npz"  # a feature flow's 2-D PCA view of its reference sets (for the dashboard)
KNN = "knn.safetensors"  # a feature flow's bank of unit-length training features (the embedding_knn baseline)
FOLDER_FILES = (WEIGHTS, CONFIG, REFERENCE, CARD, HISTOGRAM, PROJECTION, KNN)
# what new weights make stale (KNN too: it is written with the weights of a feature flow, from its training data)
DERIVED_FILES = (REFERENCE, HISTOGRAM, CARD, PROJECTION, KNN)


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not match its config."""


# The default model ships inside the package (a wheel copies checkpoints/DEFAULT_MODEL here at build time), so
# a fresh install scores and shows the dashboard without any download.
BUNDLED = Path(__file__).resolve().parents[1] / "bundled"  # flowcore/bundled
DEFAULT_MODEL = "fashion_realnvp"


def cache_dir() -> Path:
    """``$FLOWCORE_CACHE`` or ``~/.cache/flowcore``: fetched checkpoints and extracted image features."""
    env = os.environ.get("FLOWCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flowcore"


def _source_checkout_checkpoints() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    return repo / "checkpoints" if (repo / "pyproject.toml").is_file() and (repo / "checkpoints").is_dir() else None


def own_models_dir() -> Path:
    """Where the models the user trained on their own images live (``flowcore train --images``, the dashboard's
    "Train on your images"): ``$FLOWCORE_CACHE/own_models``, apart from the fetched zoo, so that their names can
    never shadow or be shadowed by a shipped model's."""
    return cache_dir() / "own_models"


def checkpoint_roots() -> list[Path]:
    """Where bare checkpoint names are looked up, in order: ``$FLOWCORE_CHECKPOINTS`` when set, else the
    repository's ``checkpoints/`` (a source checkout), the per-user zoo (``flowcore zoo fetch``) and the model
    bundled with the package; in both cases the user's own models (:func:`own_models_dir`) too."""
    env = os.environ.get("FLOWCORE_CHECKPOINTS")
    if env:
        return [Path(env), own_models_dir()]
    repo = _source_checkout_checkpoints()
    return [*([repo] if repo else []), cache_dir() / "checkpoints", own_models_dir(), BUNDLED]


def checkpoints_dir() -> Path:
    """The first of :func:`checkpoint_roots`: where the zoo's files live in a checkout (reports, model cards)."""
    return checkpoint_roots()[0]


def _is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def list_checkpoints(root: Path | None = None) -> list[str]:
    """Names of every checkpoint in :func:`checkpoint_roots` (a name in an earlier root hides a later one), or in
    ``root`` only."""
    names: set[str] = set()
    for folder in [root] if root is not None else checkpoint_roots():
        if folder.is_dir():
            # hidden folders are work in progress (a fetch's or an export's staging, ``.NAME.xxxx.part``): a killed
            # one may hold complete-looking files, but it is not a model anyone chose to keep
            names |= {p.name for p in folder.iterdir() if not p.name.startswith(".") and _is_checkpoint(p)}
    return sorted(names)


def is_continuation(cfg: dict[str, Any]) -> bool:
    """A checkpoint config (``config.json``) of more epochs of a model on its whole training set: started from
    another checkpoint's weights (``init_from``) with the same objective (no OOD term) and no subset of the data."""
    t = cfg.get("training") or {}
    return bool(t.get("init_from")) and not t.get("negative") and (cfg.get("train_config") or {}).get(
        "train_subset") is None


def is_plain_pixel_flow(cfg: dict[str, Any]) -> bool:
    """A checkpoint config of a plain pixel flow, the kind of the paper's Table 1: multi-scale, checkerboard
    masks, no st-net bottleneck, no OOD term, no background noise, not a flow on features; started from
    another checkpoint only as a continuation. The Sec. 7 and App. B study variants are not plain."""
    m, t = cfg.get("model") or {}, cfg.get("training") or {}
    variant = (m.get("mask", "checkerboard") != "checkerboard" or m.get("scales") == 1 or m.get("bottleneck")
               or t.get("negative") or cfg.get("features") or not m.get("image_shape"))
    return not (variant or t.get("pixel_noise_mu") or (t.get("init_from") and not is_continuation(cfg)))


def best_plain_pixel_flows(configs: dict[str, dict[str, Any]], dataset: str) -> dict[str, str]:
    """Architecture -> the evaluated plain pixel flow (``is_plain_pixel_flow``) trained on ``dataset`` with the
    lowest mean test bits/dim, among ``configs`` (name -> checkpoint config; the first name wins a tie): the
    model a Table 1 cell reads and the pixel flow the features page sets beside a flow on features."""
    best: dict[str, tuple[float, str]] = {}
    for name in sorted(configs):
        cfg = configs[name]
        bpd = (cfg.get("reference") or {}).get("bpd_mean")
        arch = (cfg.get("model") or {}).get("arch")
        if bpd is None or cfg.get("dataset") != dataset or not is_plain_pixel_flow(cfg):
            continue
        if arch not in best or bpd < best[arch][0]:
            best[arch] = (bpd, name)
    return {arch: name for arch, (_, name) in best.items()}


def paired_feature_flow(name: str) -> str | None:
    """The flow on image features (Sec. 8) paired with the pixel flow ``name``: a checkpoint whose config has
    ``features`` set to an image extractor, trained on the same dataset, whose images are brought to the pixel
    flow's own input shape (so both flows see the same image). ``None`` when there is none; the first by name
    when there are several."""
    try:
        cfg = read_config(name)
    except CheckpointError:
        return None
    dataset, shape = cfg.get("dataset"), cfg.get("model", {}).get("image_shape")
    if cfg.get("features") or not dataset or not shape:
        return None
    for other in list_checkpoints():
        try:
            pair = read_config(other)
        except CheckpointError:
            continue
        features = pair.get("features")
        if features and features != "tabular" and pair.get("dataset") == dataset \
                and list(pair.get("input_shape") or []) == list(shape):
            return other
    return None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A bare name resolves in :func:`checkpoint_roots` first (a folder of that name in the working directory never
    shadows a shipped checkpoint: write ``./NAME`` for it); anything else is a path to a folder."""
    p = Path(name_or_path)
    bare = len(p.parts) == 1 and not str(name_or_path).startswith(".")
    if bare:
        for root in checkpoint_roots():
            if (root / p).exists():
                return root / p
    if not p.exists() and len(p.parts) == 1:
        known = ", ".join(list_checkpoints()) or "none"
        raise CheckpointError(f"no checkpoint named {str(name_or_path)!r} (known: {known}; `flowcore zoo list`)")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    return p


def _write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' writer reports a full disk as a SafetensorError naming the OS error; it is an OSError here, so a
    full disk is said as such (and handled like any other write) instead of escaping as a traceback."""
    try:
        save_file(state, str(path))
    except SafetensorError as e:
        code = errno.ENOSPC if "os error 28" in str(e) or "No space left" in str(e) else errno.EIO
        raise OSError(code, f"cannot write {path.name} ({e})") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def describe_stop(training: dict[str, Any]) -> str:
    """How a card's training ended, in words: a model exported from a paused run says it is not the run's last."""
    stopped_by = training.get("stopped_by", "?")
    if stopped_by == "paused":
        return "exported from a paused run as it stood (the run can go on)"
    return f"stopped by {stopped_by}"


def save(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (atomically, file by file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS, lambda tmp: _write_weights(state, tmp), suffix=".safetensors")
    old = {}
    if (path / CONFIG).is_file():
        try:
            old = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError, RecursionError):
            old = {}
    meta = {k: v for k, v in old.items() if k != "model"} if isinstance(old, dict) else {}
    meta.update(metadata)
    write_json(path / CONFIG, {"model": model.config.to_dict(), **meta})
    return path


# keys of config.json computed from the weights (by flowcore evaluate): stale once the weights change
DERIVED_CONFIG_KEYS = ("reference", "data_note")
STAGING_SUFFIX = ".staging"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_checkpoint(folder: str | os.PathLike) -> Iterator[Path]:
    """Rewrite the checkpoint folder ``folder`` all or nothing: write the new files into the yielded hidden staging
    folder beside it (``.NAME.xxxx.staging``, same file system); they are moved in only when the block ends
    without an exception. Until then nothing in ``folder`` is touched, so a full disk or a kill while writing leaves
    the old checkpoint (weights, statistics, card) intact, and the staging folder is removed.

    The staging folder starts with the old ``config.json`` less what described the old weights
    (:data:`DERIVED_CONFIG_KEYS`), so :func:`save` keeps the folder's own keys (a linked ``background``, say). On
    success the old derived files (:data:`DERIVED_FILES`) that the new set does not replace are removed: they
    describe weights that are gone. Files of other names in ``folder`` are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder, cannot hold a checkpoint")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_stages(folder)
    # the writer's process id in the name: a stage whose writer is gone (killed) is removed by the next writer
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=folder.parent))
    try:
        old = read_json_dict(folder / CONFIG)
        if old:
            write_json(stage / CONFIG, {k: v for k, v in old.items() if k not in DERIVED_CONFIG_KEYS})
        yield stage
        _swap_in(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # not a process id at all
        return False
    return True


def _remove_orphaned_stages(folder: Path) -> None:
    """Remove the staging folders of ``folder`` that a killed writer left (``.NAME.PID.xxxxxxxx.staging`` whose
    process no longer runs). They are hidden, so nothing lists them, but they would stay on disk forever; a live
    writer's stage (another export or evaluation of the same folder) is left alone."""
    mine = re.compile(rf"\.{re.escape(folder.name)}\.(\d+)\.[a-z0-9_]{{8}}{re.escape(STAGING_SUFFIX)}")
    for stale in folder.parent.iterdir():
        match = mine.fullmatch(stale.name)
        if match and stale.is_dir() and not stale.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object file's contents, or ``{}`` when it is missing, unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _swap_in(stage: Path, folder: Path) -> None:
    """Move every file of the complete ``stage`` into ``folder`` (a rename each: no copying, no disk space needed).
    The stale derived files go first and the weights last, so a reader never sees new weights beside statistics
    of the old ones; what it may see for the microseconds of the renames is a folder still missing them."""
    folder.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in stage.iterdir()}
    for derived in DERIVED_FILES:
        if derived not in new:
            (folder / derived).unlink(missing_ok=True)
    for name in sorted(new, key=lambda n: n == WEIGHTS):
        os.replace(stage / name, folder / name)
    _fsync_dir(folder)


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (architecture under ``"model"``)."""
    folder = resolve(name_or_path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except RecursionError:  # '[' * 100_000: the parser's stack, not a config
        raise CheckpointError(f"{cfg_path}: nested too deeply to be a checkpoint config") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: no 'model' section")
    check_reference_summary(cfg, cfg_path)
    return cfg


MAX_DRAWS = 64  # dequantization draws a reference may ask every scored image for (each is a full model pass)


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_reference_summary(cfg: dict[str, Any], where: str | os.PathLike = CONFIG) -> None:
    """Refuse a ``reference`` summary that scoring could not follow: ``flowcore score`` and the dashboard run
    ``n_draws`` model passes per image with ``seed`` (so 100000 draws would hang them, and ``null`` or a string
    would fail deep inside with a traceback). One :class:`CheckpointError` line instead."""
    if "reference" not in cfg:
        return
    summary = cfg["reference"]
    if not isinstance(summary, dict):
        raise CheckpointError(f"{where}: 'reference' must be a table (written by flowcore evaluate), got "
                              f"{type(summary).__name__}")
    if "n_draws" in summary and not _whole(summary["n_draws"], 1, MAX_DRAWS):
        raise CheckpointError(f"{where}: reference n_draws must be a whole number in 1..{MAX_DRAWS}, got "
                              f"{summary['n_draws']!r:.40}")
    if "seed" in summary and not _whole(summary["seed"], 0, 2**63 - 1):
        raise CheckpointError(f"{where}: reference seed must be a whole number >= 0, got {summary['seed']!r:.40}")


def _check_shapes(weights: Path, flow_cfg: FlowConfig) -> None:
    """Compare the safetensors header's tensor shapes with the config's architecture, built on the meta
    device (no memory): a mismatched or hostile pair fails here, in milliseconds, with one line."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        skeleton = build(flow_cfg)
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if found != wanted:
        missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
        wrong = [k for k in sorted(wanted.keys() & found.keys()) if wanted[k] != found[k]]
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {found[wrong[0]]} vs {wanted[wrong[0]]})"
                 if wrong else ""]
        detail = "; ".join(p for p in parts if p)
        raise CheckpointError(f"{weights}: weights do not match config.json ({detail})")


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model described by ``config.json`` and load its safetensors weights (eval mode)."""
    folder = resolve(name_or_path)
    cfg = read_config(folder)
    try:
        flow_cfg = FlowConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: invalid model config ({e})") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    _check_shapes(weights, flow_cfg)  # before anything of the model's size is allocated
    model = build(flow_cfg)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    for key, tensor in state.items():
        # NaN weights (or a NaN BatchNorm running_var) give NaN scores, which would read as verdicts
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights}: tensor {key!r} holds non-finite values (NaN or inf)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{weights}: weights do not match config.json ({detail[:300]})") from None
    model.eval()
    model.checkpoint_meta = {k: v for k, v in cfg.items() if k != "model"}
    model.checkpoint_path = str(folder)
    return model.to(device)
