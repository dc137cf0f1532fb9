"""Own-data trainings as jobs: a folder per job, a separate process per training, one training at a time.

The dashboard's "Train on your images" page never trains in its script thread: :func:`submit` writes the
uploaded files and the request into ``$FLOWCORE_CACHE/own_data/jobs/JOB/`` and starts ``python -m
flowcore.ood.jobs JOB`` in its own session, so the training survives a page reload, a closed tab and the
Streamlit session that asked for it. The worker takes the server-wide training lock (an ``flock`` the kernel
releases when the process dies, so a killed worker never blocks the queue), waiting as ``queued`` while another
job holds it, then runs :func:`flowcore.ood.own_data.train_on_images` and after every epoch rewrites

- ``status.json``: state, phase, progress, time left, the per-epoch test bpd and AUROCs, the message;
- ``live.npz``: the held-out and OOD log-likelihoods under the model of that epoch (the live histogram).

Both are written atomically; :func:`read_status` is what the page draws from. A job whose status says it runs
but whose process is gone is reported ``failed``; :func:`retry` starts it again, resuming the saved run.
:func:`cancel` ends a job (queued or running) with SIGTERM; the worker records ``cancelled``.

Uploaded zips are unpacked by :func:`unpack_zip`: entries with absolute paths or ``..``, links, more than
:data:`MAX_FILES` files or more than :data:`MAX_UNPACKED_BYTES` unpacked are refused before anything is written.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..data.files import atomic_write
from ..data.images import IMAGE_SUFFIXES
from ..zoo.checkpoints import cache_dir, read_json_dict, write_json

__all__ = [
    "MAX_FILES", "MAX_UNPACKED_BYTES", "LIVE_IMAGES", "MINUTES_CAP_ENV", "JobError", "jobs_dir", "unpack_zip",
    "write_uploads",
    "submit", "read_status", "read_live", "list_jobs", "active_job", "cancel", "retry", "run_job",
]

MAX_FILES = 20_000  # per set: far more than a quick flow needs, few enough to read in a minute
MAX_UNPACKED_BYTES = 512 * 2**20
LIVE_IMAGES = 500  # held-out and OOD images scored after each epoch for the live histogram (per set)
ACTIVE = ("queued", "running")
MINUTES_CAP_ENV = "FLOWCORE_TRAIN_MINUTES_CAP"  # at most this many CPU minutes of training per job, when set
ENDED = ("done", "failed", "cancelled")


class JobError(ValueError):
    """A request that cannot become a job (bad zip, nothing uploaded, bad name): one line for the user."""


def jobs_dir() -> Path:
    return cache_dir() / "own_data" / "jobs"


def _safe_member(name: str) -> PurePosixPath | None:
    """The relative path a zip entry may be written to, or None for an entry that must be refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return None
    return path


def unpack_zip(data: bytes, target: Path) -> int:
    """Unpack the image files of a zip into ``target`` (folders kept), refusing the whole zip, before writing
    anything, when an entry points outside it, is a link, or the unpacked total exceeds the limits. Other files
    (notes, macOS resource forks) are skipped. Returns how many image files were written."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise JobError(f"not a readable zip file ({e})") from None
    wanted = []
    for info in members:
        if info.is_dir():
            continue
        path = _safe_member(info.filename)
        if path is None:
            raise JobError(f"the zip holds an entry outside its folder ({info.filename!r}); nothing was unpacked")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise JobError(f"the zip holds a link ({info.filename!r}); nothing was unpacked")
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") or p == "__MACOSX" for p in path.parts):
            wanted.append((info, path))
    if len(wanted) > MAX_FILES:
        raise JobError(f"the zip holds {len(wanted):,} images; at most {MAX_FILES:,} are accepted")
    total = sum(info.file_size for info, _ in wanted)
    if total > MAX_UNPACKED_BYTES:
        raise JobError(f"the zip's images unpack to {total / 2**20:,.0f} MiB; at most "
                       f"{MAX_UNPACKED_BYTES / 2**20:,.0f} MiB are accepted")
    written = 0
    for info, path in wanted:
        out = target.joinpath(*path.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src:
            # the declared size is checked above; read one byte more so a lying header cannot overrun it
            payload = src.read(info.file_size + 1)
        if len(payload) > info.file_size:
            raise JobError(f"the zip entry {info.filename!r} is larger than its header says; refused")
        out.write_bytes(payload)
        written += 1
    return written


def write_uploads(files: list[tuple[str, bytes]], target: Path) -> int:
    """Write uploaded files (name, bytes) into ``target``: zips are unpacked, images written under their base
    name (a name used twice gets a number), anything else skipped. Returns how many images were written."""
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, data in files:
        base = PurePosixPath(name.replace("\\", "/")).name
        if base.lower().endswith(".zip"):
            written += unpack_zip(data, target / f"zip{written}_{Path(base).stem}"[:80])
        elif Path(base).suffix.lower() in IMAGE_SUFFIXES and not base.startswith("."):
            out, n = target / base, 1
            while out.exists():
                out, n = target / f"{Path(base).stem}_{n}{Path(base).suffix}", n + 1
            out.write_bytes(data)
            written += 1
    return written


def _status_path(job: Path) -> Path:
    return job / "status.json"


def _write_status(job: Path, **changes: Any) -> dict[str, Any]:
    status = read_json_dict(_status_path(job))
    status.update(changes, updated=time.time())
    write_json(_status_path(job), status)
    return status


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own finished child not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def read_status(job: str | Path) -> dict[str, Any]:
    """The job's status, with a job whose process vanished while queued or running reported ``failed``."""
    folder = Path(job) if isinstance(job, Path) else jobs_dir() / job
    status = read_json_dict(_status_path(folder))
    if not status:
        return {}
    status["job"] = folder.name
    if status.get("state") in ACTIVE and not _alive(status.get("pid")):
        status = _write_status(folder, state="failed", message="the training process ended unexpectedly; "
                               "retry resumes from its last save")
        status["job"] = folder.name
    return status


def read_live(job: str | Path) -> dict[str, np.ndarray]:
    """The latest live log-likelihoods (``test`` and one array per OOD set), empty before the first epoch."""
    folder = Path(job) if isinstance(job, Path) else jobs_dir() / job
    try:
        with np.load(folder / "live.npz", allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, KeyError):
        return {}


def list_jobs() -> list[dict[str, Any]]:
    """Every job's status, newest first."""
    root = jobs_dir()
    if not root.is_dir():
        return []
    statuses = [read_status(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((s for s in statuses if s), key=lambda s: s.get("submitted", 0), reverse=True)


def active_job() -> dict[str, Any] | None:
    """The running job, else the oldest queued one, else None."""
    jobs = [s for s in list_jobs() if s.get("state") in ACTIVE]
    running = [s for s in jobs if s.get("state") == "running"]
    queued = sorted((s for s in jobs if s.get("state") == "queued"), key=lambda s: s.get("submitted", 0))
    return (running or queued or [None])[0]


def _start_worker(job: Path) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(job / "worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flowcore.ood.jobs", str(job)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc.pid


def submit(name: str, images: list[tuple[str, bytes]], ood: dict[str, list[tuple[str, bytes]]] | None = None,
           preset: str = "quick", size: int = 28, gray: bool | None = None, max_minutes: float | None = None,
           replace: bool = False) -> str:
    """Write the uploads and the request into a new job folder and start its worker; returns the job's id.

    ``ood`` maps a set's label to its files. The request is checked here (name, preset, size, at least one
    image) so a bad one is refused at once with one line, before any process starts."""
    from .own_data import MIN_IMAGES, PRESETS, check_name

    check_name(name, replace)
    cap = os.environ.get(MINUTES_CAP_ENV)
    if cap:  # a shared server's operator bounds every dashboard training
        try:
            cap_minutes = float(cap)
        except ValueError:
            raise JobError(f"{MINUTES_CAP_ENV}={cap!r} is not a number of minutes") from None
        max_minutes = min(max_minutes or PRESETS.get(preset, {}).get("max_minutes", cap_minutes), cap_minutes)
    if preset not in PRESETS:
        raise JobError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if size not in (28, 32):
        raise JobError(f"size must be 28 or 32, got {size}")
    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    job = jobs_dir() / job_id
    job.mkdir(parents=True)
    try:
        n = write_uploads(images, job / "images")
        if n < MIN_IMAGES:
            raise JobError(f"{n} image files uploaded; at least {MIN_IMAGES} are needed to train and keep a test "
                           "set (a zip of a folder works too)")
        ood_dirs = []
        for label, files in (ood or {}).items():
            folder = job / "ood" / "".join(c if c.isalnum() or c in "_-" else "_" for c in label)[:40]
            if write_uploads(files, folder) == 0:
                raise JobError(f"the OOD set {label!r} holds no image file")
            ood_dirs.append(str(folder))
    except BaseException:
        import shutil

        shutil.rmtree(job, ignore_errors=True)
        raise
    request = {"name": name, "preset": preset, "size": size, "gray": gray, "max_minutes": max_minutes,
               "replace": replace, "images": str(job / "images"), "ood": ood_dirs}
    write_json(job / "request.json", request)
    _write_status(job, state="queued", name=name, preset=preset, submitted=time.time(), epochs=[],
                  message="waiting for the training slot", attempt=1)
    _write_status(job, pid=_start_worker(job))
    return job_id


def cancel(job_id: str) -> bool:
    """End a queued or running job (SIGTERM to its worker); False when it is not active."""
    job = jobs_dir() / job_id
    status = read_status(job)
    if status.get("state") not in ACTIVE:
        return False
    (job / "cancel").touch()
    try:
        os.kill(int(status["pid"]), signal.SIGTERM)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        pass
    return True


def retry(job_id: str) -> None:
    """Start an ended (failed or cancelled) job again; its saved run resumes where it stopped."""
    job = jobs_dir() / job_id
    status = read_status(job)
    if status.get("state") not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {status.get('state', 'unknown')}; only a failed or cancelled job is retried")
    (job / "cancel").unlink(missing_ok=True)
    _write_status(job, state="queued", message="waiting for the training slot", attempt=status.get("attempt", 1) + 1,
                  submitted=time.time(), pid=None)
    _write_status(job, pid=_start_worker(job))


class _Cancelled(BaseException):
    pass


def _raise_cancelled(signum: int, frame: Any) -> None:
    raise _Cancelled


def run_job(job: Path) -> int:
    """The worker: wait for the training slot, train, record every epoch; exit status 0 unless it failed."""
    from .own_data import train_on_images
    from .scores import auroc

    signal.signal(signal.SIGTERM, _raise_cancelled)
    request = read_json_dict(job / "request.json")
    jobs_dir().mkdir(parents=True, exist_ok=True)
    lock = open(jobs_dir() / "training.lock", "w")  # noqa: SIM115 - held for the whole training
    try:
        me = read_json_dict(_status_path(job)).get("submitted", 0)
        while any(s.get("submitted", 0) < me for s in list_jobs() if s.get("state") in ACTIVE):
            time.sleep(0.5)  # first come, first served: every job submitted before this one goes first
        fcntl.flock(lock, fcntl.LOCK_EX)  # and the slot itself: held until the job ahead ends (or dies)
        if (job / "cancel").exists():
            raise _Cancelled
        started = time.time()
        _write_status(job, state="running", phase="reading images", started=started, progress=0.0, epochs=[],
                      message="reading the images")
        live: dict[str, Any] = {}

        def on_phase(phase: str, facts: dict[str, Any]) -> None:
            if phase == "read":
                rng = np.random.default_rng(0)
                live["test"] = facts["x_test"][:LIVE_IMAGES]
                live["ood"] = {k: v[rng.permutation(len(v))[:LIVE_IMAGES]] for k, v in facts["ood"].items()}
                _write_status(job, phase="training", read=facts["read"], train_images=facts["train_images"],
                              test_images=facts["test_images"], message="training")
            elif phase == "trained":
                _write_status(job, phase="evaluating", progress=0.97, eta_s=None,
                              message="computing the reference statistics and the AUROCs")

        def on_epoch(record: dict[str, Any], log_likelihood) -> None:
            scores = {"test": log_likelihood(live["test"])}
            scores.update({label: log_likelihood(x) for label, x in live["ood"].items()})
            atomic_write(job / "live.npz", lambda tmp: np.savez(tmp, **scores), suffix=".npz")
            aurocs = {label: round(auroc(scores["test"], v), 5) for label, v in scores.items() if label != "test"}
            budget = record["budget_minutes"]
            done = max(record["epoch"] / record["epochs"],
                       record["elapsed"] / (60 * budget) if budget else 0.0)
            done = min(done, 1.0)
            wall = time.time() - started
            medians = {label: round(float(np.median(v)), 3) for label, v in scores.items()}
            epochs = read_json_dict(_status_path(job)).get("epochs", []) + [
                {"epoch": record["epoch"], "test_bpd": round(record["test_bpd"], 5), "auroc": aurocs,
                 "median_log_likelihood": medians, "wall_s": round(wall, 1)}]
            _write_status(job, epochs=epochs, progress=round(0.95 * done, 4),
                          eta_s=round(wall * (1 - done) / done, 1) if done > 0 else None,
                          message=f"epoch {record['epoch']}: held-out bpd {record['test_bpd']:.3f}")

        result = train_on_images(request["images"], request["name"], request["ood"], preset=request["preset"],
                                 size=request["size"], gray=request["gray"], replace=True,
                                 max_minutes=request.get("max_minutes"), resume=True, on_epoch=on_epoch,
                                 on_phase=on_phase)
        _write_status(job, state="done", phase="done", progress=1.0, eta_s=0, result=result,
                      checkpoint=request["name"], message=f"{request['name']} is in your zoo")
        return 0
    except _Cancelled:
        _write_status(job, state="cancelled", message="cancelled; retry resumes from the last save")
        return 0
    except Exception as e:  # any failure is the job's, in one line; the traceback goes to worker.log
        import traceback

        traceback.print_exc()
        _write_status(job, state="failed", message=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        return 1
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
