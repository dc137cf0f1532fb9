"""Training on the user's own images (flowcore.ood.own_data, `flowcore train --images`): a generated folder tree
with the files a real one holds (subfolders, RGBA and odd sizes, a broken PNG, a text file), no data folder."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from flowcore.cli import build_parser, main
from flowcore.flows.precision import bf16_is_native
from flowcore.ood import jobs, own_data
from flowcore.ood.evaluate import load_reference
from flowcore.ood.scores import auroc
from flowcore.zoo.checkpoints import cache_dir, list_checkpoints, own_models_dir, read_config


def blob_image(rng: np.random.Generator, size: int = 28) -> Image.Image:
    """A bright Gaussian blob on black (MNIST-like: dark background, smooth foreground)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(9, 19, 2)
    r = rng.uniform(3, 6)
    return Image.fromarray((255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))).astype(np.uint8))


def noise_image(rng: np.random.Generator, size: int = 28) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    mine, other = tmp_path / "mine", tmp_path / "other"
    (mine / "sub").mkdir(parents=True)
    other.mkdir()
    for i in range(60):
        blob_image(rng).save(mine / ("sub" if i % 3 else ".") / f"{i:03d}.png")
    blob_image(rng, 56).convert("RGBA").save(mine / "big_rgba.png")  # scaled and converted, not skipped
    (mine / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (mine / "notes.txt").write_text("not an image")
    for i in range(25):
        noise_image(rng).save(other / f"{i:03d}.png")
    return mine, other


def test_read_image_folder_counts_what_it_skips_and_converts(folders):
    mine, _ = folders
    found = own_data.read_image_folder(mine, (1, 28, 28))
    assert found.images.shape == (61, 28, 28) and found.images.dtype == np.uint8
    assert sorted(p for p, _ in found.skipped) == ["broken.png", "notes.txt"]
    assert found.resized == 1 and found.modes == {"L": 60, "RGBA": 1}
    again = own_data.read_image_folder(mine, (1, 28, 28))
    assert np.array_equal(found.images, again.images)  # same folder, same array
    rgb = own_data.read_image_folder(mine, (3, 32, 32))
    assert rgb.images.shape == (61, 32, 32, 3)
    # one RGBA file makes the folder a colour one (train_on_images' default); all-grayscale stays grayscale
    assert not own_data.all_single_channel(found)
    (mine / "big_rgba.png").unlink()
    assert own_data.all_single_channel(own_data.read_image_folder(mine, (1, 28, 28)))


def test_train_on_images_gives_a_scored_model_in_the_users_zoo(folders, capsys):
    mine, other = folders
    result = own_data.train_on_images(mine, "my_blobs", [other], gray=True, max_minutes=0.3)
    export = own_models_dir() / "my_blobs"
    assert result["checkpoint"] == str(export)
    assert result["train_images"] + result["test_images"] == 61 and result["test_images"] == own_data.MIN_TEST
    assert result["skipped"] == 2 and np.isfinite(result["test_bpd"])
    assert set(result["auroc"]) == {"other"} and 0.0 <= result["auroc"]["other"] <= 1.0
    stored = read_config(export)
    assert stored["own_data"]["train_images"] == 41 and stored["own_data"]["ood"]["other"]["read"].startswith("25")
    native = "bf16" if bf16_is_native("cpu") else "fp32"  # the precision this CPU trains fastest in
    assert stored["train_config"]["precision"] == native and stored["model"]["image_shape"] == [1, 28, 28]
    # the AUROC is the one of the stored likelihoods: the held-out images against the OOD folder's
    reference = load_reference(export)
    assert len(reference["test__likelihood"]) == 20 and len(reference["other__likelihood"]) == 25
    assert result["auroc"]["other"] == pytest.approx(
        auroc(reference["test__likelihood"], reference["other__likelihood"]), abs=1e-5)
    # and it learned: the held-out bpd fell from the first epoch to the exported model's
    epochs = [json.loads(line) for line in (cache_dir() / "own_data" / "my_blobs" / "run" / "log.jsonl").open()]
    first = next(e["test_bpd"] for e in epochs if e.get("event") == "epoch")
    assert result["test_bpd"] < first
    # the model is found by name like a shipped one, and scores a file
    capsys.readouterr()  # what training printed
    rc = main(["score", "my_blobs", str(mine / "000.png"), "--format", "json", "--no-progress"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and np.isfinite(rows[0]["log_likelihood_nats"])
    # a second run under the same name is refused without --replace and nothing is lost
    before = sorted(p.name for p in export.iterdir())
    with pytest.raises(FileExistsError, match="--replace"):
        own_data.train_on_images(mine, "my_blobs", [other], max_minutes=0.05)
    assert sorted(p.name for p in export.iterdir()) == before


def test_bad_requests_get_one_clear_message_and_create_nothing(folders, tmp_path, capsys):
    mine, other = folders
    few = tmp_path / "few"
    few.mkdir()
    rng = np.random.default_rng(1)
    for i in range(own_data.MIN_IMAGES - 1):
        blob_image(rng).save(few / f"{i}.png")
    with pytest.raises(ValueError, match=f"{own_data.MIN_IMAGES - 1} readable images; at least {own_data.MIN_IMAGES}"):
        own_data.train_on_images(few, "too_few")
    with pytest.raises(ValueError, match="model in the zoo"):
        own_data.train_on_images(mine, "fashion_realnvp")
    with pytest.raises(ValueError, match="name"):
        own_data.train_on_images(mine, "../escape")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no readable image"):
        own_data.train_on_images(mine, "no_ood", [empty])
    assert not (own_models_dir() / "too_few").exists()
    assert not (own_models_dir() / "no_ood").exists()
    for argv, message in [
        (["train", "--images", str(mine)], "--images needs --name"),
        (["train"], "give a config file"),
        (["train", "configs/fashion_realnvp.json", "--images", str(mine), "--name", "x"], "not both"),
        (["train", "--images", str(mine), "--name", "x", "--resume"], "--resume only apply with a config file"),
        (["train", "configs/fashion_realnvp.json", "--preset", "quick"], "--preset only apply with --images"),
        (["train", "configs/fashion_realnvp.json", "--ood", str(other)], "--ood only apply with --images"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)


def test_cli_presets_are_the_modules_presets():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    preset = next(a for a in train._actions if a.dest == "preset")
    assert list(preset.choices) == list(own_data.PRESETS)


# ---- jobs: the dashboard's separate training processes ----

def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def wait_for(job_id: str, states: tuple[str, ...], timeout: float = 240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = jobs.read_status(job_id)
        if status.get("state") in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states}: {jobs.read_status(job_id)}\n"
                         + (jobs.jobs_dir() / job_id / "worker.log").read_text())


@pytest.mark.parametrize("entries,link,message", [
    ({"ok/0.png": b"x", "../evil.png": b"x"}, None, "outside its folder"),
    ({"/abs/evil.png": b"x"}, None, "outside its folder"),
    ({"ok/0.png": b"x"}, "ok/link.png", "a link"),
])
def test_unpack_zip_refuses_a_hostile_zip_before_writing_anything(tmp_path, entries, link, message):
    target = tmp_path / "out"
    with pytest.raises(jobs.JobError, match=message):
        jobs.unpack_zip(zip_bytes(entries, link), target)
    assert not target.exists()


def test_unpack_zip_limits_and_skips(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    entries = {f"digits/{i}.png": png_bytes(blob_image(rng)) for i in range(5)}
    entries |= {"digits/notes.txt": b"hello", "__MACOSX/digits/._0.png": b"junk", "digits/.hidden.png": b"x"}
    assert jobs.unpack_zip(zip_bytes(entries), tmp_path / "a") == 5
    assert sorted(p.name for p in (tmp_path / "a" / "digits").iterdir()) == [f"{i}.png" for i in range(5)]
    monkeypatch.setattr(jobs, "MAX_FILES", 4)
    with pytest.raises(jobs.JobError, match="at most 4 are accepted"):
        jobs.unpack_zip(zip_bytes(entries), tmp_path / "b")
    monkeypatch.setattr(jobs, "MAX_FILES", 100)
    monkeypatch.setattr(jobs, "MAX_UNPACKED_BYTES", 100)
    with pytest.raises(jobs.JobError, match="MiB are accepted"):
        jobs.unpack_zip(zip_bytes(entries), tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(jobs.JobError, match="not a readable zip"):
        jobs.unpack_zip(b"PK\x03\x04 broken", tmp_path / "d")


def test_jobs_train_in_their_own_process_one_at_a_time_and_can_be_cancelled_and_retried(folders, tmp_path):
    mine, other = folders
    images = [(p.name, p.read_bytes()) for p in sorted(mine.rglob("*")) if p.is_file()]
    noise = [(p.name, p.read_bytes()) for p in sorted(other.iterdir())]
    with pytest.raises(ValueError, match="at least 50"):
        jobs.submit("few", images[:10])
    assert jobs.list_jobs() == []  # a refused request leaves no job folder
    first = jobs.submit("job_one", images, {"noise": noise}, gray=True, max_minutes=0.3)
    second = jobs.submit("job_two", [("digits.zip", zip_bytes(dict(images)))], gray=True, max_minutes=0.3)
    # one training at a time: while the first is queued or running, the second waits
    status = wait_for(first, ("running", "done"))
    assert jobs.read_status(second)["state"] == "queued"
    assert jobs.active_job()["job"] == first
    done = wait_for(first, ("done", "failed"))
    assert done["state"] == "done", done
    assert done["read"].startswith("61 images, 1 skipped (first: broken.png: not a PNG") and len(done["epochs"]) >= 1
    assert set(done["epochs"][-1]["auroc"]) == {"noise"} and done["progress"] == 1.0
    live = jobs.read_live(first)
    assert set(live) == {"test", "noise"} and len(live["test"]) == 20 and np.isfinite(live["noise"]).all()
    assert "job_one" in list_checkpoints()
    # the second got the slot; cancel it while it runs (or still waits)
    wait_for(second, ("running", "done"))
    assert jobs.cancel(second)
    cancelled = wait_for(second, ("cancelled", "done"))
    if cancelled["state"] == "cancelled":  # it may have finished before the signal landed
        assert "retry" in cancelled["message"]
        jobs.retry(second)
        assert wait_for(second, ("done", "failed"))["state"] == "done"
    assert "job_two" in list_checkpoints()
    assert status["name"] == "job_one"


def test_a_worker_that_dies_is_reported_failed(folders):
    mine, _ = folders
    images = [(p.name, p.read_bytes()) for p in sorted(mine.rglob("*.png"))]
    job = jobs.submit("dies", images, gray=True, max_minutes=0.4)
    status = wait_for(job, ("running",))
    run_log = cache_dir() / "own_data" / "dies" / "run" / "log.jsonl"
    deadline = time.time() + 120
    while '"event": "save"' not in (run_log.read_text() if run_log.exists() else "") and time.time() < deadline:
        time.sleep(0.2)  # killed after its first epoch's save
    os.kill(status["pid"], signal.SIGKILL)
    failed = wait_for(job, ("failed",), timeout=30)
    assert "ended unexpectedly" in failed["message"]
    assert jobs.active_job() is None
    # a retry resumes the saved run instead of starting over, and finishes
    jobs.retry(job)
    assert wait_for(job, ("done", "failed"))["state"] == "done"
    events = [json.loads(line)["event"] for line in run_log.read_text().splitlines()]
    assert "resume" in events and "dies" in list_checkpoints()
