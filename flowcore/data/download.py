"""Verified downloads: a file is fetched into a temporary file beside its target, checked against its pinned
size and SHA-256, and renamed into place only when it matches (datasets: :mod:`flowcore.data.datasets`; checkpoints:
:mod:`flowcore.zoo.remote`). Only http(s) URLs are followed."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DownloadError", "ChecksumError", "RemoteFile", "fetch", "sha256_of"]


class DownloadError(OSError):
    """A download failed; nothing was written in place of the target file."""


class ChecksumError(DownloadError):
    """A downloaded file did not match its pinned digest; the partial file was deleted."""


@dataclass(frozen=True)
class RemoteFile:
    """One official file: where to get it and the digest it must have (verified: ``sha256``)."""

    filename: str
    urls: tuple[str, ...]
    sha256: str
    size: int
    md5: str = ""  # as published by the source; recorded for cross-checking only
    source: str = ""  # where the sha256 was taken from


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    urls: tuple[str, ...],
    target: Path,
    rf: RemoteFile,
    timeout: float,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    errors: list[str] = []
    mismatch = False
    for url in urls:
        if not re.match(r"https?://", url):
            errors.append(f"{url}: only http(s) URLs are allowed")
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{rf.filename}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            done = 0
            req = urllib.request.Request(url, headers={"User-Agent": "flowcore-data/0.1"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > rf.size:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(rf.filename, done, rf.size)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if done != rf.size or digest != rf.sha256:
                mismatch = True
                got = f"{done} bytes" if done != rf.size else f"sha256 {digest}"
                errors.append(f"{url}: checksum mismatch (expected {rf.size} bytes, sha256 {rf.sha256}; got {got})")
                continue
            os.replace(tmp, target)
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            tmp.unlink(missing_ok=True)
    cls = ChecksumError if mismatch else DownloadError
    raise cls(f"could not download {rf.filename}: " + "; ".join(errors))
