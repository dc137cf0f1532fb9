"""Issue 16: hostile inputs get one clear line and the right exit code; shipped models are never overwritten."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import perturb_
from PIL import Image

import flowcore
from flowcore.cli import main
from flowcore.flows.config import FlowConfig
from flowcore.training.train import TrainConfig, load_train_config, train
from flowcore.zoo.checkpoints import CheckpointError, save

ARCH = dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=4, blocks=1)


def _checkpoint(folder: Path) -> Path:
    model = perturb_(flowcore.build(ARCH)).eval()
    save(model, folder, name=folder.name, dataset="npz:none", reference={"n_draws": 1, "seed": 0})
    ll = flowcore.log_likelihood_nats(model, np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8))
    np.savez(folder / "reference.npz", train__likelihood=ll[:10], test__likelihood=ll[10:])
    return folder


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scales": 0}, "scales must be in 1..6"),
        ({"scales": -1}, "scales must be in 1..6"),
        ({"hidden": 4000}, "hidden must be in 1..2048"),
        ({"hidden": 10**5}, "hidden must be in 1..2048"),
        ({"blocks": 10**7}, "blocks must be in 1..64"),
        ({"hidden": "32"}, "hidden must be a whole number"),
        ({"hidden": 2048, "blocks": 64}, "st-network weights"),
        ({"image_shape": "abc"}, "image_shape must be [C, H, W]"),
        ({"image_shape": [1, 10**6, 8]}, "image_shape H must be in 1..1024"),
        ({"logit_alpha": float("nan")}, "logit_alpha must be a finite number"),
        ({"arch": ["glow"]}, "arch must be a string"),
    ],
)
def test_absurd_architectures_are_refused_before_anything_is_built(change, message):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FlowConfig.from_dict({**ARCH, **change})
    assert time.perf_counter() - t0 < 1.0  # refused from the sizes alone, not after allocating gigabytes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs must be in 1.."),
        ({"batch_size": 0}, "batch_size must be in 1.."),
        ({"lr_schedule": "cosin"}, "unknown lr_schedule 'cosin'"),
        ({"lr": -1}, "lr must be in (0"),
        ({"negative": {"dataset": "mnist"}}, "negative needs dataset and threshold"),
        ({"negative": {"dataset": "mnist", "threshold": "high"}}, "negative.threshold must be a finite number"),
        ({"negative": [1, 2]}, "negative must be a table"),
        ({"model": 5}, "model must be a table"),
        ({"name": "../escape"}, "name must be a plain folder name"),
    ],
)
def test_training_configs_are_validated(change, message):
    base = {"name": "t", "model": ARCH}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig.from_dict({**base, **change})


def test_deep_or_wrongly_typed_config_files_give_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply|a table of keys"):
        load_train_config(deep)
    for text, needle in [('["a list"]', "a table of keys"), ("{not json", "not valid JSON"),
                         ('{"name": "x"}', "lacks ['model']")]:
        path = tmp_path / "c.json"
        path.write_text(text)
        code, _, err = _run(capsys, "train", str(path))
        assert code == 2
        _one_line_error(err, "flowcore train: error:", needle)


def test_training_never_touches_a_shipped_checkpoint_unless_forced(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    shipped = tmp_path / "checkpoints"
    _checkpoint(shipped / "tiny")
    before = {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir()}
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(shipped))
    monkeypatch.chdir(tmp_path)
    cfg = {"name": "tiny", "model": ARCH, "dataset": f"npz:{npz}", "batch_size": 16, "epochs": 1,
           "warmup_steps": 1, "test_subset": 16}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))

    # by default the model goes to the run folder
    code, out, _ = _run(capsys, "train", "tiny.json", "--no-progress")
    assert code == 0 and "runs/tiny/checkpoint" in out
    assert (tmp_path / "runs" / "tiny" / "checkpoint" / "model.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir()} == before

    # exporting onto it is refused before any training (no run folder made)
    code, _, err = _run(capsys, "train", "tiny.json", "--run-dir", "r2", "--export", str(shipped / "tiny"))
    assert code == 2 and not (tmp_path / "r2").exists()
    _one_line_error(err, "already holds a model", "--replace")
    assert {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir()} == before

    # forced: new weights, and the statistics of the old ones go with them
    code, _, _ = _run(capsys, "train", "tiny.json", "--run-dir", "r3", "--export", str(shipped / "tiny"),
                      "--replace", "--no-progress")
    assert code == 0
    assert not (shipped / "tiny" / "reference.npz").exists()
    assert "reference" not in json.loads((shipped / "tiny" / "config.json").read_text())
    assert (shipped / "tiny" / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_epochs_zero_from_the_command_line_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"name": "x", "model": ARCH}))
    code, _, err = _run(capsys, "train", str(tmp_path / "c.json"), "--epochs", "0")
    assert code == 2
    _one_line_error(err, "epochs must be in 1..")


def test_score_command_bad_cases_give_one_line_and_nonzero_exit(tmp_path, capsys):
    ck = _checkpoint(tmp_path / "ck")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)).save(good)
    (tmp_path / "empty").mkdir()

    code, _, err = _run(capsys, "score", str(ck), str(good), "--batch-size", "0")
    assert code == 2
    _one_line_error(err, "batch size must be a whole number >= 1")
    code, _, err = _run(capsys, "score", str(ck), str(good), "--batch-size", "-1")
    assert code == 2
    code, out, err = _run(capsys, "score", str(ck), str(tmp_path / "empty"))
    assert code == 2 and out == ""
    _one_line_error(err, "no image files found")

    # a FIFO and /dev/zero are refused at once, the good file beside them is still scored, the exit is non-zero
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, out, err = _run(capsys, "score", str(ck), str(fifo), "/dev/zero", str(good), "--no-progress")
    assert code == 1
    assert out.splitlines()[1].startswith(str(good))
    assert "not a regular file" in err and err.count("cannot score") == 2


def test_non_utf8_file_names_are_printed_escaped(tmp_path, capsys):
    ck = _checkpoint(tmp_path / "ck")
    name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not UTF-8
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    code, out, _ = _run(capsys, "score", str(ck), str(tmp_path), "--no-progress")
    assert code == 0
    assert "caf\\xe9.png" in out
    out.encode("utf-8")  # printable under a strict UTF-8 stdout


def test_unreadable_subfolder_is_reported(tmp_path, capsys, monkeypatch):
    ck = _checkpoint(tmp_path / "ck")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(locked / "hidden.png")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (root would read it anyway)
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = _run(capsys, "score", str(ck), str(tmp_path), "--no-progress")
    assert code == 1 and "a.png" in out and "hidden.png" not in out
    assert "locked: cannot list folder (Permission denied)" in err


def test_nan_checkpoint_is_an_error_not_a_verdict(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ck = _checkpoint(tmp_path / "ck")
    state = load_file(str(ck / "model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key] * float("nan")
    save_file(state, str(ck / "model.safetensors"))
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    code, out, err = _run(capsys, "score", str(ck), str(good))
    assert code == 2 and out == ""
    _one_line_error(err, f"tensor '{key}' holds non-finite values")


def test_mismatched_or_hostile_weights_fail_before_building(tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["hidden"] = 600  # allowed by itself (~65M weights to build), but not what the file holds
    (ck / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="weights do not match config.json .* of another shape"):
        flowcore.load(ck)
    assert time.perf_counter() - t0 < 5.0


def test_working_directory_folder_does_not_shadow_a_shipped_checkpoint(tmp_path, monkeypatch):
    from flowcore.zoo.checkpoints import resolve

    shipped = tmp_path / "checkpoints"
    _checkpoint(shipped / "tiny")
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(shipped))
    (tmp_path / "work" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve("tiny") == shipped / "tiny"
    assert resolve("./tiny") == Path("./tiny")


def test_library_refuses_bad_batches_with_value_errors():
    model = perturb_(flowcore.build(ARCH)).eval()
    with pytest.raises(ValueError, match="images must be uint8"):
        flowcore.log_likelihood_nats(model, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        flowcore.log_likelihood_nats(model, np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="expects images of shape"):
        flowcore.log_likelihood_nats(model, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        flowcore.sample(model, 2, temperature=float("nan"))


def test_training_run_is_not_overwritten_silently(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    cfg = TrainConfig.from_dict({"name": "t", "model": ARCH, "dataset": f"npz:{npz}", "batch_size": 16, "epochs": 1,
                                 "warmup_steps": 1, "test_subset": 16})
    summary = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert summary["export"] == str(tmp_path / "run" / "checkpoint")


def test_disk_full_leaves_no_temp_file_and_says_so(tmp_path):
    import errno

    from flowcore.zoo.checkpoints import atomic_write

    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fill_disk(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="disk full while writing .*state.pt"):
        atomic_write(target, fill_disk)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.json").write_text("{not json")
    assert main(["train", str(tmp_path / "c.json")]) == 2
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["--debug", "train", str(tmp_path / "c.json")])
    monkeypatch.setenv("FLOWCORE_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["train", str(tmp_path / "c.json")])


def test_dockerfile_runs_the_documented_command():
    """No container daemon here: check that the image's command is the README's and binds where -p reaches."""
    root = Path(__file__).resolve().parent.parent
    docker = (root / "Dockerfile").read_text()
    assert 'CMD ["flowcore", "app", "--port", "8501", "--host", "0.0.0.0"]' in docker
    assert "USER flowcore" in docker and "HEALTHCHECK" in docker and "/_stcore/health" in docker
    # every file the image copies exists in the repository (a moved folder would break the build)
    for line in docker.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), line
    readme = (root / "README.md").read_text()
    assert "docker build -t flowcore . && docker run -p 8501:8501 -v /path/to/data:/data flowcore" in readme
    from flowcore.cli import build_parser

    args = build_parser().parse_args(["app", "--port", "8501", "--host", "0.0.0.0"])
    assert (args.port, args.host) == (8501, "0.0.0.0")
    assert build_parser().parse_args(["app"]).host == "127.0.0.1"
