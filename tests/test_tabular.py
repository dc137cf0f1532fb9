"""Issue 18 (App. K.3, Table 2b): the UCI tabular loaders on synthetic files in the official formats, their
verified download over loopback, and a flow trained on one class with the other as OOD."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import serve_folder

import flowcore
from flowcore.cli import main
from flowcore.data import datasets as data
from flowcore.data import tabular
from flowcore.data.datasets import DatasetNotFound, download
from flowcore.data.download import ChecksumError, DownloadError, RemoteFile

RNG = np.random.default_rng(0)


def miniboone_text(n_signal: int, n_background: int, missing_rows: tuple[int, ...] = ()) -> tuple[str, np.ndarray]:
    """The official layout: a counts line, then one 50-value event per line (signal first)."""
    rows = np.concatenate([RNG.normal(2.0, 1.0, (n_signal, 50)), RNG.normal(-2.0, 1.0, (n_background, 50))])
    for i in missing_rows:
        rows[i, 7] = -999.0
    body = "\n".join(" ".join(f"{v:.6E}" for v in row) for row in rows)
    return f"  {n_signal}  {n_background}\n{body}\n", rows


def test_miniboone_file_is_parsed_by_class_without_missing_events():
    text, rows = miniboone_text(6, 4, missing_rows=(1, 8))
    classes = tabular.parse_miniboone(text)
    assert classes["signal"].shape == (5, 50) and classes["background"].shape == (3, 50)
    np.testing.assert_allclose(classes["signal"][1], rows[2], rtol=1e-6)  # event 1 (missing) dropped
    assert not (classes["background"] == -999.0).any()
    with pytest.raises(ValueError, match="announces 6 \\+ 5 events, 10 follow"):
        tabular.parse_miniboone(text.replace("  6  4", "  6  5", 1))
    with pytest.raises(ValueError, match="not a MiniBooNE_PID.txt file"):
        tabular.parse_miniboone("hello\n1 2 3\n")


def test_miniboone_splits_ten_percent_of_each_class_for_test(tmp_path):
    text, _ = miniboone_text(40, 30)
    (tmp_path / "miniboone").mkdir()
    (tmp_path / "miniboone" / "MiniBooNE_PID.txt").write_text(text)
    train = tabular.load_tabular("miniboone:signal", "train", tmp_path)
    test = tabular.load_tabular("miniboone:signal", "test", tmp_path)
    assert (len(train), len(test)) == (36, 4)
    assert not {r.tobytes() for r in train} & {r.tobytes() for r in test}  # disjoint
    np.testing.assert_array_equal(test, tabular.load_tabular("miniboone:signal", "test", tmp_path))  # seeded
    assert len(tabular.load_tabular("miniboone:background", "test", tmp_path)) == 3
    assert tabular.other_class("miniboone:signal") == "miniboone:background"
    with pytest.raises(DatasetNotFound, match="unknown tabular set 'miniboone:noise'"):
        tabular.load_tabular("miniboone:noise", "train", tmp_path)


def hepmass_csv(labels: np.ndarray, features: np.ndarray, mass: float = 1000.0) -> bytes:
    lines = ["# label, " + ", ".join(f"f{i}" for i in range(27)) + ", mass"]
    lines += [",".join([f"{int(y)}", *(f"{v:.6f}" for v in row), f"{mass}"]) for y, row in zip(labels, features,
                                                                                             strict=True)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def test_hepmass_drops_the_mass_and_features_with_repeated_values(tmp_path):
    n = 60
    features = RNG.normal(size=(n, 27))
    features[:, 3] = np.round(features[:, 3])  # few distinct values: more than 5 repeats, dropped
    labels = np.arange(n) % 2
    (tmp_path / "hepmass").mkdir()
    (tmp_path / "hepmass" / "1000_train.csv.gz").write_bytes(hepmass_csv(labels, features))
    (tmp_path / "hepmass" / "1000_test.csv.gz").write_bytes(hepmass_csv(labels[:10], features[:10]))
    signal = tabular.load_tabular("hepmass:signal", "train", tmp_path)
    assert signal.shape == (30, 26)
    np.testing.assert_allclose(signal[0], np.delete(features[1], 3), rtol=1e-5)
    assert tabular.load_tabular("hepmass:background", "test", tmp_path).shape == (5, 26)
    with pytest.raises(DownloadError, match="digests are not pinned here"):
        download("hepmass", tmp_path)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    with serve_folder(root) as url:
        yield root, url


def test_miniboone_download_is_verified_against_its_pinned_digest(served, tmp_path, monkeypatch):
    root, url = served
    text, _ = miniboone_text(10, 10)
    raw = text.encode()
    (root / "MiniBooNE_PID.txt").write_bytes(raw)
    assert data.OFFICIAL_FILES["miniboone"][0].size == 91_174_877  # the official file, pinned
    wrong = RemoteFile("MiniBooNE_PID.txt", (), hashlib.sha256(b"other").hexdigest(), len(raw))
    monkeypatch.setitem(data.OFFICIAL_FILES, "miniboone", (wrong,))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download("miniboone", tmp_path / "data", base_url=url)
    assert list((tmp_path / "data" / "miniboone").iterdir()) == []
    right = RemoteFile("MiniBooNE_PID.txt", (), hashlib.sha256(raw).hexdigest(), len(raw))
    monkeypatch.setitem(data.OFFICIAL_FILES, "miniboone", (right,))
    download("miniboone", tmp_path / "data", base_url=url)
    assert len(tabular.load_tabular("miniboone:signal", "train", tmp_path / "data")) == 9


def test_a_flow_on_one_class_ranks_the_other_lower(tmp_path, monkeypatch, capsys):
    text, _ = miniboone_text(300, 300)
    (tmp_path / "miniboone").mkdir()
    (tmp_path / "miniboone" / "MiniBooNE_PID.txt").write_text(text)
    monkeypatch.setenv("FLOWCORE_DATA_DIR", str(tmp_path))
    cfg = {"name": "mb", "features": "tabular", "dataset": "miniboone:signal", "ood": ["miniboone:background"],
           "model": {"arch": "realnvp_tabular", "dim": 50, "couplings": 4, "hidden": 32, "blocks": 1},
           "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 32, "epochs": 3, "seed": 0}
    (tmp_path / "mb.json").write_text(json.dumps(cfg))
    ck = tmp_path / "ck"
    assert main(["train", str(tmp_path / "mb.json"), "--run-dir", str(tmp_path / "run"), "--export", str(ck),
                 "--no-progress"]) == 0
    assert main(["evaluate", str(ck)]) == 0
    ref = json.loads((ck / "config.json").read_text())["reference"]
    assert ref["counts"] == {"train": 270, "test": 30, "miniboone_background": 30}
    assert ref["auroc"]["likelihood"]["miniboone_background"] > 0.95
    rows = tabular.load_tabular("miniboone:signal", "test")
    stored = np.load(ck / "reference.npz")["test__likelihood"]
    log_p = flowcore.load(ck).log_prob(torch.from_numpy(rows)).double().detach().numpy()
    np.testing.assert_allclose(log_p, stored, rtol=1e-5)
    capsys.readouterr()
    assert main(["score", str(ck), str(tmp_path / "mb.json")]) == 2
    assert "not on images" in capsys.readouterr().err
    bad = {**cfg, "model": {**cfg["model"], "dim": 49}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["train", str(tmp_path / "bad.json"), "--run-dir", str(tmp_path / "r2"), "--no-progress"]) == 2


def test_breast_cancer_stand_in_comes_from_the_installed_package():
    pytest.importorskip("sklearn")
    benign = tabular.load_tabular("breast_cancer:benign", "train")
    assert benign.shape == (286, 30) and benign.dtype == np.float32
    assert len(tabular.load_tabular("breast_cancer:malignant", "test")) == 42
