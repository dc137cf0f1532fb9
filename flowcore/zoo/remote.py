"""The model zoo: which checkpoints exist, where each one is, and fetching more from a mirror.

The manifest (``flowcore/bundled/manifest.json``, written by ``flowcore release manifest`` from the repository's
``checkpoints/``) lists every shipped checkpoint's files with their size and SHA-256. ``flowcore zoo fetch NAME``
downloads them from ``BASE_URL/NAME/FILE`` into the per-user zoo (``$FLOWCORE_CACHE/checkpoints``): each file is
verified before it is kept, and the checkpoint's folder appears only once all of its files are there, so a
failed or tampered download leaves nothing behind. Any static server of a source checkout's ``checkpoints/``
folder is a mirror (``python -m http.server -d checkpoints``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..data.download import DownloadError, RemoteFile, fetch, sha256_of
from .checkpoints import BUNDLED, FOLDER_FILES, CheckpointError, cache_dir, checkpoint_roots, list_checkpoints, resolve

__all__ = ["MANIFEST", "ZOO_URL_ENV", "manifest", "make_manifest", "zoo_rows", "fetch_checkpoint"]

MANIFEST = BUNDLED / "manifest.json"
ZOO_URL_ENV = "FLOWCORE_ZOO_URL"
STAGING_SUFFIX = ".part"  # a fetch's hidden staging folder: .NAME.xxxx.part beside the zoo's folders
# the files of a checkpoint folder that travel (the model card and histogram are derived but useful offline)
FILES = FOLDER_FILES


def manifest(path: Path | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{name: {file: {"size": int, "sha256": str}}}`` of the shipped checkpoints ({} if no manifest)."""
    path = path or MANIFEST
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("checkpoints", {})


def make_manifest(root: Path) -> dict[str, Any]:
    """The manifest of every checkpoint folder under ``root`` (what ``flowcore release manifest`` writes)."""
    entries = {}
    for name in list_checkpoints(root):
        folder = root / name
        entries[name] = {f: {"size": (folder / f).stat().st_size, "sha256": sha256_of(folder / f)}
                         for f in FILES if (folder / f).is_file()}
    return {"format": 1, "checkpoints": entries}


def zoo_rows() -> list[dict[str, str]]:
    """One row per checkpoint known here or in the manifest: its name and where it is (or how to fetch it)."""
    known = manifest()
    rows = []
    for name in sorted(set(known) | set(list_checkpoints())):
        try:
            where = str(resolve(name))
        except CheckpointError:
            where = f"not here: flowcore zoo fetch {name}"
        size = sum(f["size"] for f in known.get(name, {}).values())
        rows.append({"name": name, "where": where, "size": f"{size / 1e6:.1f} MB" if size else "?"})
    return rows


@contextlib.contextmanager
def _fetching(dest_root: Path, name: str) -> Iterator[None]:
    """Hold the per-name fetch lock (``flock``, blocking: a second fetch of ``name`` waits, then finds it done) and
    remove the staging folders a killed fetch of ``name`` left (``.NAME.xxxx.part``): with the lock held, no live
    fetch owns one. The lock file lives outside the zoo folder, which holds checkpoints only."""
    locks = dest_root.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"fetch-{name}.lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock (two fetches of one name at once may then collide)
            pass
        # exactly mkdtemp's names for this checkpoint (8 random characters, no dot): '.a.b.xxxxxxxx.part' of a
        # checkpoint 'a.b' is not one of 'a'
        mine = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}{re.escape(STAGING_SUFFIX)}")
        for stale in dest_root.iterdir():
            if mine.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        yield


def fetch_checkpoint(
    name: str,
    base_url: str | None = None,
    *,
    timeout: float = 60.0,
    deadline: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Download checkpoint ``name`` from ``base_url`` (else ``$FLOWCORE_ZOO_URL``) into the per-user zoo and return
    its folder. Every file must match the manifest's size and SHA-256; on any failure nothing is left behind, and
    what a killed fetch of ``name`` left is removed by the next one. ``timeout`` bounds each network wait,
    ``deadline`` each file's whole download (default: by its size, :func:`flowcore.data.download.fetch`)."""
    files = manifest().get(name)
    if files is None:
        raise ValueError(f"unknown checkpoint {name!r}; the zoo has: {', '.join(sorted(manifest())) or 'none'}")
    base = base_url or os.environ.get(ZOO_URL_ENV)
    if not base:
        raise DownloadError(
            f"no zoo mirror: pass --base-url or set {ZOO_URL_ENV} (any static server of a source checkout's "
            "checkpoints/ folder is one: python -m http.server -d checkpoints)"
        )
    dest_root = cache_dir() / "checkpoints"
    dest = dest_root / name
    dest_root.mkdir(parents=True, exist_ok=True)
    with _fetching(dest_root, name):
        if dest.is_dir() and all(
            (dest / f).is_file() and sha256_of(dest / f) == meta["sha256"] for f, meta in files.items()
        ):
            return dest
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=STAGING_SUFFIX, dir=dest_root))
        try:
            for filename, meta in files.items():
                remote = RemoteFile(filename, (f"{base.rstrip('/')}/{name}/{filename}",), meta["sha256"],
                                    meta["size"])
                fetch(remote.urls, staging / filename, remote, timeout, progress, deadline=deadline)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def roots_text() -> str:
    """Where bare names are looked up, for ``flowcore zoo list``."""
    return "looked up in: " + ", ".join(str(r) for r in checkpoint_roots())
