"""Train a flow on the user's own images (``flowcore train --images DIR``): the workflow from a folder tree to a
checkpoint in the per-user zoo that every page and ``flowcore score NAME`` find.

1. Every image below the folder (subfolders included) is decoded and brought to the preset's input with the same
   code the Score page uses (:func:`flowcore.data.images.preprocess`: mode conversion, scale and centre-crop,
   never inverted); unreadable files are skipped and counted, conversions counted.
2. A seeded tenth (at least :data:`MIN_TEST` images) is held out as the test set; the rest trains.
3. The images are stored as an npz under ``$FLOWCORE_CACHE/own_data/NAME/`` and trained on like any dataset
   (``npz:PATH``), with bfloat16 st-nets where the CPU has native bfloat16 (else float32); OOD folders become
   npz test sets the same way.
4. The checkpoint is exported to ``$FLOWCORE_CACHE/own_models/NAME`` and evaluated on the held-out images and the
   OOD folders, so its reference statistics, AUROC table and card exist at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.files import atomic_write
from ..data.images import ImageError, decode_image, display_path, find_image_files, preprocess
from ..flows import precision
from ..training.train import TrainConfig
from ..zoo.checkpoints import cache_dir, list_checkpoints, own_models_dir, read_config, write_json

__all__ = ["PRESETS", "MIN_IMAGES", "MIN_TEST", "ImageSet", "read_image_folder", "all_single_channel", "own_config",
           "check_name", "train_on_images"]

MIN_IMAGES = 50  # fewer cannot both train a flow and leave a test set that measures anything
MIN_TEST = 20
TEST_FRACTION = 0.1
SINGLE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # a palette (P) may hold colours
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# quick: a small RealNVP, 4 CPU minutes of training at most: on 600 MNIST digits against 300 Fashion-MNIST
# images, 127 s from folder to evaluated checkpoint on two idle cores, AUROC 99.8 % (benchmarks/own_data_quick.py);
# standard: a wider one, 50 CPU minutes at most. Both train the st-nets in bfloat16 where the CPU computes it
# natively, else in float32 (flowcore.flows.precision.bf16_is_native).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"model": {"arch": "realnvp", "scales": 2, "hidden": 32, "blocks": 2}, "epochs": 60,
              "max_minutes": 4.0, "lr": 1e-3, "warmup_steps": 50},
    "standard": {"model": {"arch": "realnvp", "scales": 2, "hidden": 64, "blocks": 4}, "epochs": 400,
                 "max_minutes": 50.0, "lr": 1e-3, "warmup_steps": 200},
}


@dataclass
class ImageSet:
    """Images read from a folder tree, brought to one ``[C, H, W]``, and what happened on the way."""

    images: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    modes: dict[str, int] = field(default_factory=dict)  # source mode -> count
    resized: int = 0  # images whose size was not the target's

    def summary(self) -> str:
        """One line: how many were read, skipped and converted."""
        text = f"{len(self.images)} images"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        if self.resized:
            text += f", {self.resized} scaled and centre-cropped"
        if self.modes:
            text += ", modes " + ", ".join(f"{m} x{n}" for m, n in sorted(self.modes.items()))
        return text


def _below(root: Path, path: str | os.PathLike) -> str:
    """A file's path as the user knows it: below the folder they gave."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return display_path(path)


def read_image_folder(path: str | os.PathLike, image_shape: tuple[int, int, int]) -> ImageSet:
    """Every readable image below ``path`` at ``image_shape`` (sorted by path, so the same folder always gives the
    same array); unreadable and non-image files are skipped and counted, never fatal."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{display_path(root)} is not a folder of images")
    files, problems = find_image_files([root])
    skipped = list(problems)
    listed = {Path(f) for f in files}
    skipped += [(_below(root, p), "not an image file (by its name)") for p in sorted(root.rglob("*"))
                if p.is_file() and p not in listed and not p.name.startswith(".")]
    arrays, modes, resized = [], Counter(), 0
    for f in files:
        try:
            image = decode_image(f)
            arrays.append(preprocess(image, image_shape, invert=False).array)
        except (ImageError, OSError) as e:
            skipped.append((_below(root, f), str(e).removeprefix(f"{Path(f).name}: ")))
            continue
        modes[image.mode] += 1
        resized += image.size != (image_shape[2], image_shape[1])
    shape = (0, image_shape[1], image_shape[2]) + ((3,) if image_shape[0] == 3 else ())
    images = np.stack(arrays) if arrays else np.zeros(shape, np.uint8)
    return ImageSet(images, skipped, dict(modes), resized)


def all_single_channel(found: ImageSet) -> bool:
    """Whether every image read was single-channel (grayscale, 16-bit, binary): then a grayscale flow loses
    nothing, and an RGB one would model three copies of one channel."""
    return bool(found.modes) and set(found.modes) <= SINGLE_CHANNEL_MODES


def own_config(name: str, preset: str, image_shape: tuple[int, int, int], dataset: str, ood: list[str],
               n_train: int) -> TrainConfig:
    """The training config of a preset on the prepared npz ``dataset`` of ``n_train`` training images (validated
    like any config); the batch is 64 images or the whole training set where it is smaller."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    return TrainConfig.from_dict({
        "name": name, "model": {**spec["model"], "image_shape": list(image_shape)}, "dataset": dataset, "ood": ood,
        "optimizer": "adam", "lr": spec["lr"], "lr_schedule": "cosine", "warmup_steps": spec["warmup_steps"],
        "batch_size": min(64, n_train), "epochs": spec["epochs"], "max_minutes": spec["max_minutes"],
        "test_subset": None,
        "save_every_minutes": 1.0, "seed": 0, "threads": min(2, os.cpu_count() or 1),
        # bfloat16 st-nets where the CPU computes bfloat16 natively (faster), float32 where it would emulate them
        "precision": "bf16" if precision.bf16_is_native("cpu") else "fp32",
    })


def check_name(name: str, replace: bool) -> Path:
    """The folder a model of this name gets in the user's zoo; a bad name, a shipped model's name, or (without
    ``replace``) a name the user's zoo already holds is refused with one line."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    mine = own_models_dir() / name
    if name in list_checkpoints() and not (mine / "config.json").is_file():
        raise ValueError(f"{name!r} is the name of a model in the zoo; pick another name (a shipped or fetched "
                         "model is never replaced)")
    if (mine / "config.json").is_file() and not replace:
        raise FileExistsError(f"your models already include {name!r} ({mine}); pass --replace to train it again")
    return mine


def train_on_images(
    images_dir: str | os.PathLike,
    name: str,
    ood_dirs: list[str | os.PathLike] | None = None,
    preset: str = "quick",
    size: int = 28,
    gray: bool | None = None,
    replace: bool = False,
    progress: bool = False,
    max_minutes: float | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any], Callable[[np.ndarray], np.ndarray]], None] | None = None,
    on_phase: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Read, split, train, export and evaluate (see the module doc). ``gray=None`` trains on grayscale when every
    readable image is single-channel, else on RGB. Returns a summary with the checkpoint's folder, the counts of
    each set and the AUROCs against each OOD folder.

    ``resume`` continues the run a killed call left in the work folder (same images, same preset), ``on_epoch`` is
    :func:`flowcore.training.train.train`'s, and ``on_phase(phase, facts)`` is told when reading ends
    (``"read"``: counts and the held-out and OOD images, uint8), training ends (``"trained"``) and evaluation ends
    (``"evaluated"``)."""
    from ..training.train import train
    from .evaluate import evaluate

    if size not in (28, 32):
        raise ValueError(f"size must be 28 or 32, got {size}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    export = check_name(name, replace)
    found = read_image_folder(images_dir, (1 if gray or gray is None else 3, size, size))
    if gray is None:
        gray = all_single_channel(found)
        if not gray:
            found = read_image_folder(images_dir, (3, size, size))
    shape = (1 if gray else 3, size, size)
    if len(found.images) < MIN_IMAGES:
        raise ValueError(f"{display_path(images_dir)}: {len(found.images)} readable images; at least {MIN_IMAGES} "
                         f"are needed to train and keep a test set ({found.summary()})")
    work = cache_dir() / "own_data" / name
    work.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(found.images))
    n_test = max(MIN_TEST, round(TEST_FRACTION * len(found.images)))
    x_test, x_train = found.images[order[:n_test]], found.images[order[n_test:]]
    data = work / f"{name}.npz"
    atomic_write(data, lambda tmp: np.savez(tmp, x_train=x_train, x_test=x_test), suffix=".npz")
    ood, ood_notes = [], {}
    for folder in ood_dirs or []:
        other = read_image_folder(folder, shape)
        if not len(other.images):
            raise ValueError(f"OOD folder {display_path(folder)} holds no readable image ({other.summary()})")
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(folder).resolve().name) or "ood"
        while any(Path(o[4:]).stem == label for o in ood) or label == name:
            label += "_"
        path = work / f"{label}.npz"
        atomic_write(path, lambda tmp, x=other.images: np.savez(tmp, x_test=x), suffix=".npz")
        ood.append(f"npz:{path}")
        ood_notes[label] = {"folder": display_path(folder), "read": other.summary()}
    cfg = own_config(name, preset, shape, f"npz:{data}", ood, len(x_train))
    if max_minutes is not None:
        cfg = dataclasses.replace(cfg, max_minutes=max_minutes)
    if on_phase is not None:
        on_phase("read", {"read": found.summary(), "train_images": len(x_train), "test_images": len(x_test),
                          "x_test": x_test, "ood": {label: np.load(o[4:])["x_test"]
                                                    for label, o in zip(ood_notes, ood, strict=True)}})
    run_dir = work / "run"
    resume = resume and (run_dir / "state.pt").is_file()
    summary = train(cfg, run_dir=run_dir, export_dir=export, replace=True, progress=progress, resume=resume,
                    on_epoch=on_epoch)
    if on_phase is not None:
        on_phase("trained", {"test_bpd": summary.get("test_bpd"), "stopped_by": summary.get("stopped_by")})
    result = evaluate(export, ood=ood, train_subset=min(2000, len(x_train)), progress=progress)
    stored = read_config(export)
    stored["own_data"] = {
        "images": display_path(images_dir), "read": found.summary(), "train_images": len(x_train),
        "test_images": len(x_test), "preset": preset, "ood": ood_notes,
        "preprocessing": f"decoded, converted to {'grayscale' if gray else 'RGB'}, scaled (Lanczos) and centre-"
                         f"cropped to {size}x{size}, never inverted: the Score page's preprocessing",
    }
    write_json(export / "config.json", stored)
    if on_phase is not None:
        on_phase("evaluated", {"auroc": (result.get("auroc") or {}).get("likelihood", {})})
    return {"checkpoint": str(export), "train_images": len(x_train), "test_images": len(x_test),
            "skipped": len(found.skipped), "read": found.summary(), "stopped_by": summary.get("stopped_by"),
            "test_bpd": summary.get("test_bpd"), "auroc": (result.get("auroc") or {}).get("likelihood", {})}
