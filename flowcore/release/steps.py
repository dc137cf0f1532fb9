"""Release steps besides the report: reference statistics, the download manifest, the bundled examples."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.datasets import EXAMPLE_SETS, EXAMPLES_FILE, EXAMPLES_PER_SET, load_images
from ..data.files import atomic_write
from ..ood.evaluate import evaluate
from ..zoo.checkpoints import list_checkpoints, read_config
from ..zoo.remote import MANIFEST, make_manifest

# The subsets each card states: a train subset for the typicality score's H, the full test set, up to 5,000 images
# of each OOD set. The background model only serves its parent's likelihood ratio: smaller sets suffice for it.
EVALUATE_DEFAULT = {"train_subset": 1000, "test_subset": None, "ood_subset": 5000}
EVALUATE_SETTINGS = {"fashion_realnvp_background": {"train_subset": 500, "test_subset": 2000, "ood_subset": 1000}}


class ReleaseError(ValueError):
    """A release step cannot run here (one line for the user)."""


def checkout_root(root: str | Path | None = None) -> Path:
    """The flowcore checkout the release steps write into (default: the working directory)."""
    path = Path(root) if root is not None else Path.cwd()
    if not (path / "checkpoints").is_dir() or not (path / "configs").is_dir() or not (path / "README.md").is_file():
        raise ReleaseError(f"{path} is not a flowcore checkout (checkpoints/, configs/ and README.md): "
                           "run flowcore release from the repository's root or pass --root")
    return path


def evaluate_zoo(names: list[str] | None = None, say: Callable[[str], None] = print) -> None:
    """``flowcore evaluate`` each named (default: every shipped) checkpoint with the settings its card states;
    a background model before the model that links it."""
    names = names or list_checkpoints()
    backgrounds = {read_config(n).get("background") for n in names} - {None}
    for name in sorted(names, key=lambda n: n not in backgrounds):
        t0 = time.perf_counter()
        summary = evaluate(name, **EVALUATE_SETTINGS.get(name, EVALUATE_DEFAULT))
        like = summary["auroc"].get("likelihood", {})
        aurocs = ", ".join(f"{s} {100 * v:.1f}" for s, v in like.items())
        quality = (f"test bpd {summary['bpd_mean']:.4f}" if "bpd_mean" in summary else
                   f"test nll {summary['nll_per_feature_mean']:.4f} nats/feature")
        say(f"{name}: {quality}; likelihood AUROC % {aurocs} ({time.perf_counter() - t0:.0f} s)")


def manifest_text(root: Path) -> str:
    return json.dumps(make_manifest(root / "checkpoints"), indent=1, sort_keys=True) + "\n"


def write_manifest(root: Path, check: bool = False) -> tuple[bool, str]:
    """The size and SHA-256 of every shipped checkpoint file, which ``flowcore zoo fetch`` verifies downloads
    against. With ``check`` nothing is written. Returns ``(ok, message)``."""
    text = manifest_text(root)
    if check:
        ok = MANIFEST.is_file() and MANIFEST.read_text() == text
        return ok, "the manifest is up to date" if ok else "the manifest is out of date: run flowcore release manifest"
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return True, f"wrote {MANIFEST}"


def write_examples(data_dir: str | None = None) -> str:
    """The first test images of each set whose licence lets us ship them, into the package (CelebA's agreement
    does not allow redistribution; sources and licences: flowcore/examples/README.md)."""
    arrays = {name: load_images(name, "test", data_dir)[:EXAMPLES_PER_SET] for name in EXAMPLE_SETS}
    EXAMPLES_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(EXAMPLES_FILE, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")
    shapes = ", ".join(f"{name} {x.shape}" for name, x in arrays.items())
    return f"wrote {EXAMPLES_FILE} ({shapes})"
