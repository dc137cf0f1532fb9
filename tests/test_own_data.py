"""Training on the user's own images (flowcore.ood.own_data, `flowcore train --images`): a generated folder tree
with the files a real one holds (subfolders, RGBA and odd sizes, a broken PNG, a text file), no data folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flowcore.cli import build_parser, main
from flowcore.ood import own_data
from flowcore.ood.evaluate import load_reference
from flowcore.ood.scores import auroc
from flowcore.zoo.checkpoints import cache_dir, read_config


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
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in found.skipped) == ["broken.png", "notes.txt"]
    assert found.resized == 1 and found.modes == {"L": 60, "RGBA": 1}
    again = own_data.read_image_folder(mine, (1, 28, 28))
    assert np.array_equal(found.images, again.images)  # same folder, same array
    rgb = own_data.read_image_folder(mine, (3, 32, 32))
    assert rgb.images.shape == (61, 32, 32, 3)


def test_train_on_images_gives_a_scored_model_in_the_users_zoo(folders, capsys):
    mine, other = folders
    result = own_data.train_on_images(mine, "my_blobs", [other], max_minutes=0.15)
    export = cache_dir() / "checkpoints" / "my_blobs"
    assert result["checkpoint"] == str(export)
    assert result["train_images"] + result["test_images"] == 61 and result["test_images"] == own_data.MIN_TEST
    assert result["skipped"] == 2 and np.isfinite(result["test_bpd"])
    assert set(result["auroc"]) == {"other"} and 0.0 <= result["auroc"]["other"] <= 1.0
    stored = read_config(export)
    assert stored["own_data"]["train_images"] == 41 and stored["own_data"]["ood"]["other"]["read"].startswith("25")
    assert stored["train_config"]["precision"] == "bf16"
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
    with pytest.raises(ValueError, match="shipped model"):
        own_data.train_on_images(mine, "fashion_realnvp")
    with pytest.raises(ValueError, match="name"):
        own_data.train_on_images(mine, "../escape")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no readable image"):
        own_data.train_on_images(mine, "no_ood", [empty])
    assert not (cache_dir() / "checkpoints" / "too_few").exists()
    assert not (cache_dir() / "checkpoints" / "no_ood").exists()
    for argv, message in [
        (["train", "--images", str(mine)], "--images needs --name"),
        (["train"], "give a config file"),
        (["train", "configs/fashion_realnvp.json", "--images", str(mine), "--name", "x"], "not both"),
        (["train", "--images", str(mine), "--name", "x", "--resume"], "--resume only apply with a config file"),
        (["train", "configs/fashion_realnvp.json", "--preset", "quick"], "--preset only apply with --images"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)


def test_cli_presets_are_the_modules_presets():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    preset = next(a for a in train._actions if a.dest == "preset")
    assert list(preset.choices) == list(own_data.PRESETS)
