"""Issue 20: installable like real software. The model zoo (manifest, list, verified fetch over loopback) and a
built wheel that works in a fresh environment, outside the source checkout."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import install_built_wheel, perturb_, serve_folder
from PIL import Image

import flowcore
from flowcore.cli import main
from flowcore.data.download import ChecksumError, DownloadError
from flowcore.zoo import remote as zoo
from flowcore.zoo.checkpoints import CheckpointError, resolve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a folder holding one tiny checkpoint, and a manifest naming it."""
    served = tmp_path / "served"
    model = perturb_(flowcore.build({"arch": "realnvp", "image_shape": [1, 8, 8], "hidden": 4, "blocks": 1}))
    flowcore.save(model.eval(), served / "tiny_zoo", name="tiny_zoo", dataset="fashion_mnist")
    (served / "tiny_zoo" / "README.md").write_text("# tiny_zoo\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(zoo.make_manifest(served)))
    monkeypatch.setattr(zoo, "MANIFEST", manifest)
    monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLOWCORE_CHECKPOINTS", raising=False)
    monkeypatch.delenv(zoo.ZOO_URL_ENV, raising=False)
    with serve_folder(served) as url:
        yield url, served


def test_zoo_fetch_verifies_every_file_and_the_name_then_resolves(mirror, tmp_path, capsys):
    url, served = mirror
    with pytest.raises(CheckpointError):
        resolve("tiny_zoo")
    assert main(["zoo", "fetch", "tiny_zoo", "--base-url", url]) == 0
    folder = tmp_path / "cache" / "checkpoints" / "tiny_zoo"
    assert resolve("tiny_zoo") == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (served / "tiny_zoo").iterdir())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(flowcore.load("tiny_zoo").log_prob(x), flowcore.load(served / "tiny_zoo").log_prob(x))
    capsys.readouterr()
    assert main(["zoo", "list"]) == 0
    assert any(line.startswith("tiny_zoo") and str(folder) in line for line in capsys.readouterr().out.splitlines())


def test_zoo_fetch_of_a_tampered_file_leaves_nothing_behind(mirror, tmp_path, capsys):
    url, served = mirror
    weights = served / "tiny_zoo" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        zoo.fetch_checkpoint("tiny_zoo", url)
    cache = tmp_path / "cache" / "checkpoints"
    assert list(cache.iterdir()) == []  # no folder, no staging, no partial file
    assert main(["zoo", "fetch", "tiny_zoo", "--base-url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum mismatch" in err[0]
    with pytest.raises(CheckpointError):
        resolve("tiny_zoo")


def test_zoo_fetch_without_a_mirror_or_of_an_unknown_name_says_why(mirror):
    with pytest.raises(DownloadError, match="no zoo mirror: pass --base-url or set FLOWCORE_ZOO_URL"):
        zoo.fetch_checkpoint("tiny_zoo")
    with pytest.raises(ValueError, match="unknown checkpoint 'nope'; the zoo has: tiny_zoo"):
        zoo.fetch_checkpoint("nope", mirror[0])


def test_shipped_manifest_matches_the_shipped_checkpoints():
    """`flowcore zoo fetch` checks downloads against this manifest: it must describe the files we ship."""
    result = subprocess.run([sys.executable, "-m", "flowcore.cli", "release", "manifest", "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_shipped_model_has_the_config_that_reproduces_it():
    """`flowcore train configs/NAME.json` must train what checkpoints/NAME holds: the config beside the weights
    (``train_config``, written by the trainer) and the file in configs/ describe the same run, defaults filled in."""
    from flowcore.training.train import TrainConfig, load_train_config

    shipped = sorted(p for p in (ROOT / "checkpoints").iterdir() if (p / "config.json").is_file())
    assert len(shipped) >= 30
    for folder in shipped:
        stored = json.loads((folder / "config.json").read_text())["train_config"]
        path = ROOT / "configs" / f"{folder.name}.json"
        assert path.is_file(), f"{folder.name}: no configs/{folder.name}.json"
        want, have = TrainConfig.from_dict(stored).to_dict(), load_train_config(path).to_dict()
        differ = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        assert not differ, f"configs/{folder.name}.json differs from the shipped run (config, shipped): {differ}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_built_wheel_scores_and_serves_the_dashboard_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv (its dependencies, torch included, are those of this
    environment, reached through a path file), and from an unrelated folder score an image with the bundled
    default model and start the dashboard until its health endpoint answers."""
    pytest.importorskip("streamlit")
    wheel = install_built_wheel(tmp_path, ROOT)
    work, env, flowcore_cmd = wheel.work, wheel.env, wheel.flowcore
    image = work / "shirt.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(image)
    scored = subprocess.run([str(flowcore_cmd), "score", "fashion_realnvp", str(image), "--format", "json",
                             "--no-progress"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    (row,) = json.loads(scored.stdout)
    assert row["path"].endswith("shirt.png") and row["ood"] in (True, False) and row["bpd"] > 0
    # the default model's background model ships with it: its likelihood-ratio score works out of the box
    ratio = subprocess.run([str(flowcore_cmd), "score", "fashion_realnvp", str(image), "--format", "json",
                            "--score", "likelihood_ratio", "--no-progress"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert ratio.returncode == 0, ratio.stderr
    assert np.isfinite(json.loads(ratio.stdout)[0]["value"])
    listed = subprocess.run([str(flowcore_cmd), "zoo", "list"], cwd=work, env=env, capture_output=True, text=True)
    assert any(line.startswith("fashion_realnvp") and "bundled" in line for line in listed.stdout.splitlines())
    port = _free_port()
    app = subprocess.Popen([str(flowcore_cmd), "app", "--port", str(port)], cwd=work, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.time() + 120, ""
        while time.time() < deadline and app.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    answer = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert answer == "ok", (app.poll(), app.stdout.read().decode() if app.poll() is not None else "")
    finally:
        app.terminate()
        app.wait(timeout=30)
    shutil.rmtree(wheel.python.parent.parent, ignore_errors=True)


def test_the_repository_tracks_no_optimizer_state_and_every_shipped_run_log():
    """runs/ is ignored: a training state (optimizer moments) would double a model's size in every clone, while a
    shipped model's run log is what its card's per-epoch curve is read from (force-added)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "runs", "checkpoints"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    shipped = {f.split("/")[1] for f in tracked if f.startswith("checkpoints/") and f.endswith("config.json")}
    # a run still in progress keeps its state, so a later session can resume it: one with no shipped model yet, or
    # one whose shipped model was exported from it while paused (its card says so)
    paused = {name for name in shipped
              if json.loads((ROOT / "checkpoints" / name / "config.json").read_text()).get("training", {})
              .get("stopped_by") == "paused"}
    finished = [f for f in tracked if f.endswith(".pt")
                and (f.split("/")[1] in shipped - paused or f.startswith("checkpoints"))]
    assert not finished, finished
    logs = {f.split("/")[1] for f in tracked if f.startswith("runs/") and f.endswith("log.jsonl")}
    local = {p.parent.name for p in (ROOT / "runs").glob("*/log.jsonl")}
    # a log that exists here for a shipped model but is not committed would make the docs differ on a clone
    assert not (shipped & local) - logs, sorted((shipped & local) - logs)
