"""Issues 16 and 31: hostile inputs get one clear line and the right exit code; shipped models are never overwritten;
file names, mirrors, killed processes and concurrent runs do not corrupt what is kept."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import perturb_
from PIL import Image

import flowcore
from flowcore.cli import main
from flowcore.data.images import ImageError, decode_image, preprocess
from flowcore.flows.config import FlowConfig
from flowcore.training.train import TrainConfig, load_train_config, train
from flowcore.zoo.checkpoints import CheckpointError, list_checkpoints, save, staged_checkpoint

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
        ({"image_shape": [1, 10**6, 8]}, "image_shape H must be in 1..256"),
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


def test_evaluate_refuses_draws_and_subsets_out_of_bounds_before_any_work(tmp_path, capsys):
    """--draws 100000 would make every later score of the model pay 100,000 model passes per image (the stored
    reference is held to MAX_DRAWS when read): refused at once, like absurd subsets; nothing is written."""
    from flowcore.zoo.checkpoints import MAX_DRAWS

    ck = _checkpoint(tmp_path / "ck")
    before = sorted(p.name for p in ck.iterdir())
    for args, message in [(["--draws", "100000"], f"draws must be a whole number in 1..{MAX_DRAWS}"),
                          (["--draws", "0"], "draws must be"), (["--train-subset", "0"], "train_subset must be"),
                          (["--ood-subset", "-5"], "ood_subset must be")]:
        code, _, err = _run(capsys, "evaluate", str(ck), *args)
        assert code == 2, args
        _one_line_error(err, message)
    assert sorted(p.name for p in ck.iterdir()) == before


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

    from flowcore.data.files import atomic_write

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


# ----------------------------------------------------------------------------------------- issue 31: trust under abuse


def _tiny_training(tmp_path: Path, name: str = "tiny") -> Path:
    """A training config of a few seconds (8x8 images, one epoch) in ``tmp_path``; returns its path."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    cfg = {"name": name, "model": ARCH, "dataset": f"npz:{npz}", "batch_size": 16, "epochs": 1, "warmup_steps": 1,
           "test_subset": 16}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_score_csv_cells_never_become_formulas_or_forge_rows(tmp_path, monkeypatch, capsys):
    import csv
    import io

    ck = _checkpoint(tmp_path / "ck")
    work = tmp_path / "uploads"
    work.mkdir()
    # names an uploader chooses: formula starts, a tab or CR first, and a bare CR inside (a row break to Excel)
    names = ["=HYPERLINK(1).png", "+cmd.png", "-2+3.png", "@SUM(1).png", "\tx.png", "\rlead.png", "a\rb,c.png",
             "plain.png"]
    for i, n in enumerate(names):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(work / n, format="PNG")
    monkeypatch.chdir(work)
    code, out, _ = _run(capsys, "score", str(ck), "--no-progress", "--", *names)
    assert code == 0
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert len(rows) == 1 + len(names), rows  # a CR in a name does not split its row
    assert rows[0][0] == "path"
    for row, name in zip(rows[1:], names, strict=True):
        path = row[0]
        if name[0] in "=+-@\t\r":
            assert path == "'" + name, (path, name)  # shown as text, the name still readable
        else:
            assert path == name
        assert not row[3].startswith(("=", "+", "-", "@", "\t", "\r"))  # the score's name
        for cell in row[1:3] + row[4:6]:
            float(cell)  # numbers stay numbers (a negative log-likelihood is not neutralised)
    for line in out.split("\n")[1:-1]:  # what a spreadsheet splitting on CR would see: no row starts a formula
        for piece in line.split("\r")[1:]:
            assert piece.startswith('"') or not piece.startswith(("=", "+", "-", "@")), repr(line)

    # the dashboard's download is written by the same function, not a CSV writer of its own
    app = Path(__file__).resolve().parent.parent / "app"
    score_view = (app / "views" / "score.py").read_text()
    assert "from flowcore.ood.scoring import write_rows" in score_view and 'write_rows(' in score_view
    for src in app.rglob("*.py"):
        text = src.read_text()
        assert "DictWriter" not in text and "to_csv" not in text and "csv.writer" not in text, src


def test_export_into_a_folder_with_a_models_files_but_no_weights_is_refused(tmp_path, monkeypatch, capsys):
    cfg = _tiny_training(tmp_path)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "README.md").write_text("# my notes on a model\n")
    np.savez(target / "reference.npz", test__likelihood=np.ones(3))
    (target / "histogram.png").write_bytes(b"\x89PNG not really")
    before = _files(target)
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "r", "--export", str(target), "--no-progress")
    assert code == 2 and not (tmp_path / "r").exists()
    _one_line_error(err, "already holds a model's files", "README.md", "--replace")
    assert _files(target) == before


def test_a_writer_killed_mid_export_leaves_no_folder_behind_for_good(tmp_path):
    """A process killed (SIGKILL: no clean-up runs) while it stages a checkpoint leaves its hidden staging folder;
    the next export or evaluation of that checkpoint removes it, while a live writer's stage is left alone, and the
    checkpoint itself was never touched."""
    import signal
    import subprocess
    import sys

    ck = _checkpoint(tmp_path / "ck")
    before = _files(ck)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\n"
         "from flowcore.zoo.checkpoints import staged_checkpoint\n"
         "with staged_checkpoint(sys.argv[1]) as stage:\n"
         "    (stage / 'model.safetensors').write_bytes(b'half a model')\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n", str(ck)],
        capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
    assert len(orphans) == 1 and orphans[0].is_dir()
    assert _files(ck) == before and list_checkpoints(tmp_path) == ["ck"]
    live = tmp_path / f".ck.{os.getpid()}.abcdefgh.staging"  # this process is alive: a writer at work
    live.mkdir()
    other = tmp_path / f".ckx.{killed_pid_stand_in()}.abcdefgh.staging"  # another checkpoint's: not ours to remove
    other.mkdir()
    with staged_checkpoint(ck) as stage:
        (stage / "note.txt").write_text("new")
    assert not orphans[0].exists() and live.is_dir() and other.is_dir()
    assert (ck / "note.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")) == [live.name]


def killed_pid_stand_in() -> int:
    """The process id of a process that has exited."""
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_replace_export_is_all_or_nothing_when_the_disk_fills(tmp_path, monkeypatch, capsys):
    import errno

    from flowcore.zoo import checkpoints

    cfg = _tiny_training(tmp_path)
    monkeypatch.chdir(tmp_path)
    shipped = _checkpoint(tmp_path / "zoo" / "tiny")
    (shipped / "README.md").write_text("# tiny\n")
    (shipped / "histogram.png").write_bytes(b"\x89PNG histogram")
    before = _files(shipped)
    real_save_file = checkpoints.save_file

    def half_then_full(state, filename, *a, **kw):  # the weights file is half written when the disk fills
        real_save_file(state, filename, *a, **kw)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", half_then_full)
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "r", "--export", str(shipped), "--replace",
                        "--no-progress")
    assert code == 2
    _one_line_error(err, "disk full")
    assert _files(shipped) == before  # weights, config, statistics, card and histogram: all the old ones
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["tiny"]  # no staging folder left beside it

    # with room on the disk the same export goes through, and what described the old weights goes with them
    monkeypatch.setattr(checkpoints, "save_file", real_save_file)
    code, _, _ = _run(capsys, "train", str(cfg), "--run-dir", "r2", "--export", str(shipped), "--replace",
                      "--no-progress")
    assert code == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "model.safetensors"]
    assert (shipped / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert "reference" not in json.loads((shipped / "config.json").read_text())
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["tiny"]


def test_the_weights_writers_own_disk_full_error_is_one_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as a SafetensorError (its message, seen on a full 1 MB tmpfs, below), not an
    OSError: the export still says 'disk full' in one line and leaves the old checkpoint and no staging folder."""
    from safetensors import SafetensorError

    from flowcore.zoo import checkpoints

    cfg = _tiny_training(tmp_path)
    monkeypatch.chdir(tmp_path)
    shipped = _checkpoint(tmp_path / "zoo" / "tiny")
    before = _files(shipped)

    def full(state, filename, *a, **kw):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", full)
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "r", "--export", str(shipped), "--replace",
                        "--no-progress")
    assert code == 2
    _one_line_error(err, "disk full while writing", "model.safetensors")
    assert _files(shipped) == before and sorted(p.name for p in shipped.parent.iterdir()) == ["tiny"]


def test_a_training_state_that_cannot_be_written_is_an_os_error_not_torchs_runtime_error(tmp_path):
    """torch.save straight to a file reports a failed write (a full disk: 'unexpected pos 704 vs 598', seen on a
    full tmpfs) as a RuntimeError, which the CLI would show as a traceback. Here a file-size limit makes the write
    fail for real: the state save raises the OSError, and neither the old state nor a temporary file is changed."""
    import subprocess
    import sys

    (tmp_path / "state.pt").write_bytes(b"old state")
    code = (
        "import errno, resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from flowcore.training.train import _atomic_torch_save\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    _atomic_torch_save({'weights': torch.zeros(1_000_000)}, Path(sys.argv[1]) / 'state.pt')\n"
        "except OSError as e:\n"
        "    print('OSError', errno.errorcode.get(e.errno))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OSError EFBIG", done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert (tmp_path / "state.pt").read_bytes() == b"old state"


def test_a_killed_fetch_leaves_nothing_that_lists_as_a_model(tmp_path, monkeypatch, capsys):
    from flowcore.zoo.checkpoints import list_checkpoints

    zoo = tmp_path / "zoo"
    _checkpoint(zoo / "tiny")
    _checkpoint(zoo / ".tiny.k1ll3d00.part")  # complete-looking files in a killed fetch's staging folder
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(zoo))
    assert list_checkpoints() == ["tiny"] and list_checkpoints(zoo) == ["tiny"]
    code, out, _ = _run(capsys, "zoo", "list")
    assert code == 0 and ".part" not in out and ".tiny" not in out


def test_fetch_removes_the_staging_folders_a_killed_fetch_left(tmp_path, monkeypatch, capsys):
    from conftest import serve_folder

    from flowcore.zoo import remote

    served = tmp_path / "served"
    _checkpoint(served / "tiny")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(remote.make_manifest(served)))
    monkeypatch.setattr(remote, "MANIFEST", manifest)
    monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLOWCORE_CHECKPOINTS", raising=False)
    root = tmp_path / "cache" / "checkpoints"
    stale = root / ".tiny.k1ll3d00.part"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a download")
    other = root / ".tiny.b.k1ll3d00.part"  # the staging folder of another checkpoint ("tiny.b"): not ours
    other.mkdir()
    with serve_folder(served) as url:
        code, _, err = _run(capsys, "zoo", "fetch", "tiny", "--base-url", url)
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == [".tiny.b.k1ll3d00.part", "tiny"]
    assert _files(root / "tiny") == _files(served / "tiny")


class _Trickle(http.server.BaseHTTPRequestHandler):
    """A mirror that promises 1000 bytes and sends one every 5 s: every read succeeds well within its timeout. (It
    hangs up after 4 bytes, so that a client without a deadline fails this test in 20 s, not 83 minutes.)"""

    stop = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(4):
                self.wfile.write(b"x")
                self.wfile.flush()
                if self.stop.wait(5.0):
                    return
        except OSError:  # the client gave up
            return

    def log_message(self, *args) -> None:
        pass


def test_a_trickling_mirror_fails_within_the_deadline_with_one_line(tmp_path, monkeypatch, capsys):
    from flowcore.data import download
    from flowcore.data.download import DownloadError, RemoteFile, fetch
    from flowcore.zoo import remote

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        rf = RemoteFile("blob.bin", (f"{url}/blob.bin",), "0" * 64, 1000)
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match="deadline") as info:
            fetch(rf.urls, tmp_path / "blob.bin", rf, timeout=60.0, progress=None, deadline=2.0)
        assert time.monotonic() - t0 < 4.5  # the deadline, not 1000 x 5 s (each read was within its 60 s timeout)
        assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == []

        # the CLI's default deadline (here shortened) gives one line and exit 2, and leaves no staging folder
        manifest = tmp_path / "manifest.json"
        manifest.write_text(json.dumps({"checkpoints": {"slow": {"model.safetensors": {"size": 1000,
                                                                                        "sha256": "0" * 64}}}}))
        monkeypatch.setattr(remote, "MANIFEST", manifest)
        monkeypatch.setattr(download, "BASE_DEADLINE", 2.0)
        monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
        t0 = time.monotonic()
        code, _, err = _run(capsys, "zoo", "fetch", "slow", "--base-url", url)
        assert code == 2 and time.monotonic() - t0 < 4.5
        _one_line_error(err, "flowcore zoo: error:", "model.safetensors", "deadline")
        assert list((tmp_path / "cache" / "checkpoints").iterdir()) == []
    finally:
        _Trickle.stop.set()
        httpd.shutdown()
        httpd.server_close()


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path`` (flock), as a running `flowcore train` holds its run folder's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_training_in_the_same_run_folder_is_refused(tmp_path, monkeypatch, capsys):
    from flowcore.ood.vectors import train_vectors

    cfg = _tiny_training(tmp_path)
    monkeypatch.chdir(tmp_path)
    holder = _hold_lock(tmp_path / "run" / ".lock")
    try:
        code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "run", "--no-progress")
        assert code == 2
        _one_line_error(err, "flowcore train: error:", "run is in use by another training run", "--run-dir")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # no log, no state, no export
        # a flow on vectors (Sec. 8, App. K.3) takes the same lock before it reads any data
        vectors = TrainConfig.from_dict({"name": "v", "features": "tabular", "dataset": "miniboone:signal",
                                         "model": {"arch": "realnvp_tabular", "dim": 4, "couplings": 2, "hidden": 4,
                                                   "blocks": 1}})
        with pytest.raises(OSError, match="in use by another training run"):
            train_vectors(vectors, run_dir=tmp_path / "run", progress=False)
    finally:
        holder.kill()
        holder.wait()
    # once the other run has ended (its lock goes with its process, killed or not) the folder is free again
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "run", "--no-progress")
    assert code == 0, err
    # and a run holds the lock only while it trains: the next call in the same process is not refused
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "run", "--resume", "--epochs", "2", "--no-progress")
    assert code == 0, err


def test_a_fresh_run_never_appends_to_another_runs_log(tmp_path, monkeypatch, capsys):
    cfg = _tiny_training(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    old_log = json.dumps({"time": 1.0, "event": "start", "config": {"name": "someone_else"}}) + "\n"
    (run / "log.jsonl").write_text(old_log)  # a run killed before its first save: a log, no state.pt
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "run", "--no-progress")
    assert code == 2
    _one_line_error(err, "log of another run", "--resume", "--replace")
    assert (run / "log.jsonl").read_text() == old_log
    code, _, err = _run(capsys, "train", str(cfg), "--run-dir", "run", "--replace", "--no-progress")
    assert code == 0, err
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["config"]["name"] == "tiny"
    assert sum(e["event"] == "start" for e in events) == 1


@pytest.mark.parametrize(
    "reference, message",
    [
        ({"n_draws": 100_000, "seed": 0}, "reference n_draws must be a whole number in 1..64"),
        ({"n_draws": None, "seed": 0}, "reference n_draws must be a whole number in 1..64"),
        ({"n_draws": "4", "seed": 0}, "reference n_draws must be a whole number in 1..64"),
        ({"n_draws": 0}, "reference n_draws must be a whole number in 1..64"),
        ({"n_draws": 1, "seed": -1}, "reference seed must be a whole number >= 0"),
        ([1, 2], "'reference' must be a table"),
        ("fast", "'reference' must be a table"),
        (None, "'reference' must be a table"),
    ],
)
def test_hostile_reference_summary_is_one_checkpoint_error(tmp_path, capsys, reference, message):
    from flowcore.zoo.checkpoints import read_config

    ck = _checkpoint(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["reference"] = reference
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        read_config(ck)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    t0 = time.perf_counter()
    code, out, err = _run(capsys, "score", str(ck), str(good), "--no-progress")
    assert code == 2 and out == "" and time.perf_counter() - t0 < 30
    _one_line_error(err, "flowcore score: error:", message)


def test_a_reference_array_claiming_gigabytes_is_refused_by_its_header(tmp_path, capsys):
    """A .npy header is a promise of size that NumPy allocates before reading: 37 GB claimed in a 200-byte member
    is one line (not a MemoryError traceback), found from the header in a moment."""
    import io
    import zipfile

    ck = _checkpoint(tmp_path / "ck")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (4_600_000_000,)})
    with zipfile.ZipFile(ck / "reference.npz", "w") as z:
        z.writestr("test__likelihood.npy", header.getvalue() + np.zeros(8).tobytes())
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    t0 = time.perf_counter()
    code, out, err = _run(capsys, "score", str(ck), str(good), "--no-progress")
    assert code == 2 and out == "" and time.perf_counter() - t0 < 30
    _one_line_error(err, "flowcore score: error:", "test__likelihood.npy claims 36,800 MB", "holds 192 bytes")


def test_deeply_nested_checkpoint_config_is_one_line(tmp_path, capsys):
    from flowcore.zoo.checkpoints import read_config

    ck = _checkpoint(tmp_path / "ck")
    (ck / "config.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_config(ck)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    code, out, err = _run(capsys, "score", str(ck), str(good))
    assert code == 2 and out == ""
    _one_line_error(err, "nested too deeply")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of closed connections is not a holder
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), so that a test can end exactly the processes it started."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
                frontier.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the dashboard's process")
def test_sigterm_to_flowcore_app_stops_the_dashboard_and_frees_its_port(tmp_path):
    pytest.importorskip("streamlit")
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path)}  # streamlit's own files (credentials, config) go there
    app = subprocess.Popen([sys.executable, "-c", "import sys; from flowcore.cli import main; sys.exit(main())",
                            "app", "--port", str(port)], env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        deadline, answer = time.time() + 180, ""
        while time.time() < deadline and app.poll() is None and answer != "ok":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    answer = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert answer == "ok", app.poll()
        started = _children(app.pid)
        assert started  # the Streamlit server runs in a child process
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=30) in (0, 143)
        t0 = time.time()
        while not _port_is_free(port) and time.time() - t0 < 5:
            time.sleep(0.2)
        assert _port_is_free(port), "the dashboard outlived `flowcore app` and still holds the port"
    finally:
        for pid in [app.pid, *started]:  # only what this test started, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        app.wait()


def test_an_edited_image_shape_is_caught_against_the_reference(tmp_path, capsys):
    """A RealNVP's weights do not depend on H and W, so an image_shape edited in config.json still loads; the
    reference's (log-likelihood, bpd) pairs say over how many values it was computed, and the mismatch is one
    line instead of scores at the wrong size against the old statistics."""
    from flowcore.flows.likelihood import nats_to_bpd
    from flowcore.ood.evaluate import load_reference

    ck = _checkpoint(tmp_path / "ck")
    ref = dict(np.load(ck / "reference.npz"))
    ref["test__bpd"] = nats_to_bpd(ref["test__likelihood"], 64)
    np.savez(ck / "reference.npz", **ref)
    assert len(load_reference(ck)["test__bpd"]) == 20  # consistent: 1 x 8 x 8 = 64 values
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["image_shape"] = [1, 16, 16]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="computed over 64 values per image, but config.json's image_shape"):
        load_reference(ck)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)).save(good)
    code, out, err = _run(capsys, "score", str(ck), str(good), "--no-progress")
    assert code == 2 and out == ""
    _one_line_error(err, "image_shape [1, 16, 16]")


def _image_file(tmp_path: Path, name: str, array: np.ndarray, fmt: str) -> Path:
    path = tmp_path / name
    Image.fromarray(array).save(path, format=fmt)
    return path


_GRID = np.arange(784).reshape(28, 28)


@pytest.mark.parametrize("name,array,fmt,message", [
    ("all_nan.tif", np.full((28, 28), np.nan, np.float32), "TIFF", "784 pixel value(s) are not finite"),
    ("some_inf.tif", np.where(_GRID % 7 == 0, np.inf, 0.5).astype(np.float32), "TIFF", "112 pixel value(s)"),
    ("hot_pixel.tif", np.where(_GRID == 5, 1.5, 0.3).astype(np.float32), "TIFF", "is it 0..1 or 0..255?"),
    ("negative.tif", np.where(_GRID == 5, -0.2, 0.3).astype(np.float32), "TIFF", "below 0"),
    ("huge_float.tif", np.linspace(0, 1000, 784, dtype=np.float32).reshape(28, 28), "TIFF", "up to 1000"),
    ("int32_wide.tif", (_GRID * 100_000).astype(np.int32), "TIFF", "beyond 16 bits"),
    ("big_nan.tif", np.where(np.arange(8200 * 16).reshape(8200, 16) == 77, np.nan, 0.5).astype(np.float32), "TIFF",
     "1 pixel value(s) are not finite"),
])
def test_wide_pixels_that_cannot_be_read_safely_are_refused(tmp_path, capsys, name, array, fmt, message):
    """Non-finite, negative or unscaled float and 32-bit pixels: one line per file, never a score of a guess
    (a NaN used to become 0, a stray 1.5 turned a 0..1 image black), and the good file beside it is scored."""
    bad = _image_file(tmp_path, name, array, fmt)
    ck = _checkpoint(tmp_path / "ck")
    good = _image_file(tmp_path, "good.png", np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8), "PNG")
    with pytest.raises(ImageError, match=re.escape(message)):
        preprocess(decode_image(bad), (1, 8, 8))
    code, out, err = _run(capsys, "score", str(ck), str(bad), str(good), "--no-progress")
    assert code == 1 and message in err and len(out.strip().splitlines()) == 2  # header + the good file


@pytest.mark.parametrize("array,fmt,want", [
    (np.linspace(0, 1, 784, dtype=np.float32).reshape(28, 28), "TIFF", np.linspace(0, 255, 784)),
    (np.linspace(0, 255, 784, dtype=np.float32).reshape(28, 28), "TIFF", np.linspace(0, 255, 784)),
    ((_GRID % 256).astype(np.int32), "TIFF", _GRID % 256),  # 8-bit values in a 32-bit file: not divided by 257
    ((_GRID * 80).astype(np.int32), "TIFF", _GRID * 80 / 257),
    ((_GRID * 80).astype(np.uint16), "PNG", _GRID * 80 / 257),
])
def test_wide_pixels_follow_the_stated_rule(tmp_path, array, fmt, want):
    path = _image_file(tmp_path, f"x.{fmt.lower()}", array, fmt)
    got = preprocess(decode_image(path), (1, 28, 28), invert=False).array
    assert np.abs(got.astype(float) - np.round(np.asarray(want, float)).reshape(28, 28)).max() <= 1


def test_a_large_16_bit_image_is_reduced_not_refused(tmp_path):
    """Pillow's reduce takes no 16-bit image: a 16-bit PNG over the working size is block-averaged by the same
    rule instead of failing the whole batch (or the whole app session)."""
    a = np.zeros((8400, 8400), np.uint16)
    a[:, 4200:] = 65535  # left half black, right half white
    path = _image_file(tmp_path, "big16.png", a, "PNG")
    got = preprocess(decode_image(path), (1, 28, 28), invert=False).array
    assert got[:, :13].max() <= 1 and got[:, 15:].min() >= 254


def test_a_jpeg_repeating_one_scan_is_refused_by_structure(tmp_path, capsys):
    """A progressive JPEG whose last scan is repeated decodes for minutes (the reported file: 517,000 scans, ~45 CPU
    minutes); counting start-of-scan markers refuses it in microseconds, while an ordinary progressive JPEG (10
    scans) is decoded as before."""
    from flowcore.data.images import MAX_JPEG_SCANS

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG", progressive=True)
    raw = buf.getvalue()
    assert decode_image(raw).size == (64, 64)
    last_scan = raw[raw.rfind(b"\xff\xda"):-2]
    evil = tmp_path / "evil.jpg"
    evil.write_bytes(raw[:-2] + last_scan * MAX_JPEG_SCANS + raw[-2:])
    start = time.process_time()
    with pytest.raises(ImageError, match="scans"):
        decode_image(evil)
    assert time.process_time() - start < 1.0
    code, _, err = _run(capsys, "score", str(_checkpoint(tmp_path / "ck")), str(evil), "--no-progress")
    assert code == 1 and "evil.jpg" in err and "scans" in err


def test_a_webp_larger_than_its_limit_is_refused_by_its_header(tmp_path):
    """A 2.5 KB lossless WebP of 8944 x 8944 peaked at 1,459 MB: WebP has no reduced-scale decode, so its size is
    bounded from the header, before any pixel is decoded; one at the limit still decodes."""
    from flowcore.data.images import MAX_WEBP_PIXELS

    side = int(MAX_WEBP_PIXELS**0.5)
    big, ok = tmp_path / "big.webp", tmp_path / "ok.webp"
    Image.new("RGB", (side + 1, side + 1), (200, 10, 10)).save(big, format="WEBP", lossless=True, method=0)
    Image.new("RGB", (side, side // 4), (200, 10, 10)).save(ok, format="WEBP", lossless=True, method=0)
    with pytest.raises(ImageError, match="a WebP image is decoded whole"):
        decode_image(big)
    assert decode_image(ok).info["original_size"] == (side, side // 4)


def test_resume_after_the_model_was_edited_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("d.npz", x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    cfg = {"name": "t", "model": {"arch": "realnvp", "image_shape": [1, 8, 8], "scales": 2, "hidden": 8, "blocks": 1},
           "dataset": "npz:d.npz", "epochs": 2, "batch_size": 16, "test_subset": 16}
    Path("c.json").write_text(json.dumps(cfg))
    code, _, _ = _run(capsys, "train", "c.json", "--max-steps", "2", "--no-progress")
    assert code == 0
    cfg["model"]["hidden"] = 16
    Path("c.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "train", "c.json", "--resume", "--no-progress")
    assert code == 2
    _one_line_error(err, "saved by a different model than the config now describes")
