"""Issue 21: the lent-GPU script, smoke-tested on the CPU with a tiny config (it must work the first time)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_zoo_script_sizes_trains_and_packs(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (256, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    cfg = {"name": "tiny", "model": {"arch": "realnvp", "image_shape": [1, 8, 8], "scales": 2, "hidden": 4,
                                     "blocks": 1}, "dataset": f"npz:{npz}", "batch_size": 8, "epochs": 1,
           "warmup_steps": 2, "test_subset": 32}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    spec = importlib.util.spec_from_file_location("gpu_zoo", ROOT / "tools" / "gpu_zoo.py")
    gpu_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_zoo)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_zoo", "--device", "cpu", "--minutes", "0.1", "--max-epochs", "3",
                                      "--out", str(out), str(tmp_path / "tiny.json")])
    assert gpu_zoo.main() == 0
    report = json.loads((out / "report.json").read_text())
    assert report[0]["epochs"] >= 1 and report[0]["stopped_by"] in ("epochs", "time")
    with tarfile.open(out / "zoo.tar") as tar:
        names = sorted(tar.getnames())
    assert names == ["report.json", "tiny/config.json", "tiny/log.jsonl", "tiny/model.safetensors"]
