"""Verified downloads: a file is fetched into a temporary file beside its target, checked against its pinned
size and SHA-256, and renamed into place only when it matches (datasets: :mod:`flowcore.data.datasets`; checkpoints:
:mod:`flowcore.zoo.remote`). Only http(s) URLs are followed."""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write

__all__ = ["DownloadError", "ChecksumError", "RemoteFile", "default_deadline", "fetch", "sha256_of"]


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


# A file's whole download must end within BASE_DEADLINE + size / MIN_RATE seconds: a per-read timeout alone lets a
# mirror that sends one byte every few seconds hold a download (and the CLI) forever.
BASE_DEADLINE = 120.0  # seconds for connecting and a small file
MIN_RATE = 25_000.0  # bytes per second, on average over the file: far below any working connection


def default_deadline(size: int) -> float:
    """Seconds a download of ``size`` bytes may take in all (:data:`BASE_DEADLINE` + ``size`` / :data:`MIN_RATE`)."""
    return BASE_DEADLINE + max(0, size) / MIN_RATE


class _Deadline:
    """The time left until a fixed moment, for one file's download over all its mirrors."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def wait(self, timeout: float) -> float:
        """A socket timeout for the next wait: ``timeout``, or less when the deadline is nearer."""
        left = self.left()
        if left <= 0:
            raise TimeoutError(f"gave up after {self.seconds:g} s (the deadline for the whole file)")
        return min(timeout, left)


def _limit_wait(resp, seconds: float) -> None:
    # the socket under the response, so that a read blocks no longer than the deadline allows; http.client keeps
    # it as resp.fp.raw._sock (SocketIO). Where it is not there, each read is still bounded by ``timeout`` and the
    # deadline checked after it.
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


class _Mismatch(Exception):
    """A mirror served a file of the wrong size or digest (the next mirror may serve the right one)."""


def _stream(url: str, tmp: Path, rf: RemoteFile, timeout: float, clock: _Deadline,
            progress: Callable[[str, int, int], None] | None) -> None:
    """Download ``url`` into ``tmp``, hashing as it arrives; raise :class:`_Mismatch` unless it is ``rf`` exactly."""
    h = hashlib.sha256()
    done = 0
    req = urllib.request.Request(url, headers={"User-Agent": "flowcore-data/0.1"})
    with open(tmp, "wb") as out, urllib.request.urlopen(req, timeout=clock.wait(timeout)) as resp:
        while True:
            _limit_wait(resp, clock.wait(timeout))
            # read1: whatever has arrived (at most 1 MiB), so a trickle returns and the deadline is seen;
            # read(n) would wait for all n bytes
            chunk = resp.read1(1 << 20)
            if not chunk:
                break
            done += len(chunk)
            if done > rf.size:
                break
            h.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(rf.filename, done, rf.size)
    digest = h.hexdigest()
    if done != rf.size or digest != rf.sha256:
        got = f"{done} bytes" if done != rf.size else f"sha256 {digest}"
        raise _Mismatch(f"checksum mismatch (expected {rf.size} bytes, sha256 {rf.sha256}; got {got})")


def fetch(
    urls: tuple[str, ...],
    target: Path,
    rf: RemoteFile,
    timeout: float,
    progress: Callable[[str, int, int], None] | None,
    deadline: float | None = None,
) -> None:
    """Download ``rf`` from the first of ``urls`` that serves it whole and verified, into ``target``. ``timeout``
    bounds each wait on the network, ``deadline`` (seconds; default :func:`default_deadline` of its size) the
    whole file over all mirrors."""
    errors: list[str] = []
    mismatch = False
    clock = _Deadline(default_deadline(rf.size) if deadline is None else deadline)
    for url in urls:
        if not re.match(r"https?://", url):
            errors.append(f"{url}: only http(s) URLs are allowed")
            continue
        try:
            atomic_write(target, lambda tmp, url=url: _stream(url, tmp, rf, timeout, clock, progress), suffix=".part")
            return
        except _Mismatch as e:
            mismatch = True
            errors.append(f"{url}: {e}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            if clock.left() <= 0:  # a socket timeout cut short by the deadline: say which limit it was
                reason = f"gave up after {clock.seconds:g} s (the deadline for the whole file)"
            errors.append(f"{url}: {reason}")
    cls = ChecksumError if mismatch else DownloadError
    raise cls(f"could not download {rf.filename}: " + "; ".join(errors))
