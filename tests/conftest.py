import contextlib
import dataclasses
import functools
import http.server
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps timings predictable.
torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Make a freshly built (identity) flow non-trivial: add small noise to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture
def data_dir() -> str:
    d = os.environ.get("FLOWCORE_DATA_DIR")
    if not d or not os.path.isdir(d):
        pytest.skip("set FLOWCORE_DATA_DIR to the folder holding fashion_mnist.npz etc. to run this test")
    return d


def fake_extract(images, batch_size=64, progress=None):
    """A stand-in image feature extractor (the real one needs 20 MB of weights and minutes): a fixed random
    projection of the pixels to 1280 dimensions, so images of different kinds get different feature
    distributions. Each image's features depend on that image only, as with the real one."""
    from flowcore.data.embeddings import FEATURE_DIM

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:  # grayscale replicated to RGB, as the real extractor does
        x = np.repeat(x[..., None], 3, axis=-1)
    x = x.reshape(len(images), -1) / 255.0
    proj = np.random.default_rng(0).standard_normal((x.shape[1], FEATURE_DIM)).astype(np.float32)
    if progress is not None:
        progress(len(images))
    return np.tanh(x @ proj / np.sqrt(x.shape[1])).astype(np.float32)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder):
    """A loopback HTTP server over ``folder`` (for download tests: nothing leaves the machine); yields its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclasses.dataclass(frozen=True)
class WheelInstall:
    python: Path  # the fresh venv's interpreter
    flowcore: Path  # its flowcore command
    env: dict[str, str]  # the environment to run it in: no FLOWCORE_* variable, HOME and the cache in tmp
    work: Path  # an unrelated working folder


def install_built_wheel(tmp_path: Path, root: Path) -> WheelInstall:
    """Build the wheel from a clean copy of the sources (a stale build/ folder in the checkout must not hide a
    broken build; only the default model and its background model among the checkpoints) and install it into a
    fresh venv whose dependencies, torch included, are those of this environment, reached through a path file."""
    src = tmp_path / "src"

    def skipped(folder: str, names: list[str]) -> list[str]:
        drop = {".git", ".venv", "build", "dist", "runs", "tests", "docs", "__pycache__", ".cache"}
        if Path(folder) == root / "checkpoints":
            drop |= {n for n in names if n not in ("fashion_realnvp", "fashion_realnvp_background")}
        return [n for n in names if n in drop or n.endswith(".egg-info")]

    shutil.copytree(root, src, ignore=skipped)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("flowcore-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # dependencies only: a plain path line does not run this environment's own .pth files (the editable install)
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCORE_")}
    env.update(HOME=str(tmp_path / "home"), FLOWCORE_CACHE=str(tmp_path / "cache"), PYTHONNOUSERSITE="1")
    where = subprocess.run([str(python), "-c", "import flowcore; print(flowcore.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), where  # the wheel's copy, not the checkout
    return WheelInstall(python, venv / "bin" / "flowcore", env, work)
