"""Files written all or nothing: the one atomic-write helper of the library (checkpoints, states, caches, downloads,
job status files all go through it)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary file beside it, which is synced and
    renamed over ``path``. On any failure (a full disk, a kill signal's exception) the temporary file is
    removed and ``path`` is left as it was; a full disk is named as such."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"disk full while writing {path} (nothing was replaced)") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
