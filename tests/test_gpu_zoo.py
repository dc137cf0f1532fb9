"""Issue 21: the lent-GPU step (`flowcore release gpu-zoo`), smoke-tested on the CPU (it must work the first
time a GPU is lent)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

import flowcore
from flowcore.cli import main
from flowcore.flows.models import count_parameters
from flowcore.release import gpu_zoo
from flowcore.training.train import load_train_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_LIMIT_MB = 15.0


def _unpacked(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return sorted(tar.getnames())


def test_gpu_zoo_script_sizes_trains_and_packs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (256, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    cfg = {"name": "tiny", "model": {"arch": "realnvp", "image_shape": [1, 8, 8], "scales": 2, "hidden": 4,
                                     "blocks": 1}, "dataset": f"npz:{npz}", "batch_size": 8, "epochs": 1,
           "warmup_steps": 2, "test_subset": 32}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["release", "gpu-zoo", "--device", "cpu", "--minutes", "0.1", "--max-epochs", "3", "--out", str(out),
                 "--work", str(work), str(tmp_path / "tiny.json")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report[0]["epochs"] >= 1 and report[0]["stopped_by"] in ("epochs", "time", "max_minutes")
    assert report[0]["img_per_s_probe"] > 0 and report[0]["returnable"]
    # only what must come back lies in $OUT: no run folder, no optimizer state
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "tiny.tar"]
    assert _unpacked(out / "tiny.tar") == ["tiny/config.json", "tiny/log.jsonl", "tiny/model.safetensors"]
    assert (work / "runs" / "tiny" / "state.pt").is_file()


def test_the_plan_is_larger_than_the_shipped_models_and_fits_a_checkpoint():
    plan = gpu_zoo.plan(ROOT)
    assert len(plan) == 5
    for path in plan:
        cfg = load_train_config(path)  # validated
        params = count_parameters(flowcore.build(cfg.model))
        shipped = cfg.name.removesuffix("_gpu")
        assert 4 * params / 1e6 <= SHIPPED_LIMIT_MB, (cfg.name, params)
        assert params > 3 * count_parameters(flowcore.load(shipped)), cfg.name
        assert cfg.dataset == load_train_config(ROOT / "configs" / f"{shipped}.json").dataset


def test_smoke_runs_the_plan_on_the_cpu(tmp_path, data_dir):
    """``--smoke``: every planned model through the same code path, tiny, on the CPU; each packed file would
    come back through the device tool (<= 16 MiB; at most 8 files in all)."""
    out = tmp_path / "out"
    assert main(["release", "gpu-zoo", "--smoke", "--root", str(ROOT), "--out", str(out),
                 "--work", str(tmp_path / "work"), "--data-dir", data_dir]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [Path(r["config"]).stem for r in report] == [p.stem for p in gpu_zoo.plan(ROOT)]
    assert all(r["device"] == "cpu" and r["returnable"] for r in report)
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    for r in report:
        name = Path(r["config"]).stem
        assert _unpacked(out / r["tar"]) == [f"{name}/config.json", f"{name}/log.jsonl", f"{name}/model.safetensors"]
