"""Train larger versions of the headline models on a lent GPU in one call, sized to a time budget, and pack them.

    flowcore release gpu-zoo --minutes 8 --out "$OUT"                # the plan below (configs/gpu/*.json)
    flowcore release gpu-zoo --minutes 8 --out "$OUT" CONFIG [CONFIG ...]
    flowcore release gpu-zoo --smoke --out /tmp/zoo                  # the same code path on the CPU, tiny

The plan (``configs/gpu/``): each model is the shipped one made wider or deeper, up to the 15 MB a shipped
checkpoint may weigh (float32 weights; ``flowcore release gpu-zoo --plan`` prints this table from the configs,
``tests/test_gpu_zoo.py`` checks the sizes):

    config                 architecture                          params   weights   shipped now
    fashion_realnvp_gpu    RealNVP, 2 scales, 64 ch x 4 blocks    3.00 M   12.0 MB   fashion_realnvp (0.39 M)
    mnist_realnvp_gpu      RealNVP, 2 scales, 64 ch x 4 blocks    3.00 M   12.0 MB   mnist_realnvp (0.39 M)
    fashion_glow_gpu       Glow, 2 scales x 16 steps, 256 ch      2.78 M   11.1 MB   fashion_glow_long (0.43 M)
    mnist_glow_gpu         Glow, 2 scales x 16 steps, 256 ch      2.78 M   11.1 MB   mnist_glow (0.43 M)
    cifar10_realnvp_gpu    RealNVP, 3 scales, 48 ch x 4 blocks    2.84 M   11.4 MB   cifar10_realnvp (0.71 M)

Time: the budget (``--minutes``, 8 by default so that one 10-minute device command also covers start-up and
packing) is split evenly, 1.6 minutes a model. For each config a short probe (30 steps) measures training
images per second on this device, the number of epochs is set so that the run fits its share (at least one),
and the run trains with its own cosine schedule to the end, then exports; ``max_minutes`` stops a run at 1.5x
its share if the probe was optimistic. No GPU has been lent to this project yet, so there is no measured GPU
rate to plan epochs from in advance: the probe is that measurement, and ``report.json`` records it per model.

What comes back: one ``NAME.tar`` per model (weights, config, run log; no optimizer state; about 12 MB, under
the device tool's 16 MiB a file) and ``report.json``: six files, within its limit of eight. Unpack each here,
copy the export into ``checkpoints/`` if it beats the shipped model, compute its reference statistics on the
CPU with ``flowcore release evaluate NAME`` and say in its card where it was trained (the config keeps
``device``).

``--smoke`` runs exactly this on the CPU with each config cut to a few small batches (30 s or so for the plan):
``tests/test_gpu_zoo.py`` runs it, so the script works the first time a GPU is lent.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..data.files import atomic_write
from ..training.train import load_train_config, train

PROBE_STEPS = 30
RETURN_LIMIT_MIB = 16  # the device tool's limit per returned file


def images_per_second(cfg, device: str, run_dir: Path, data_dir: str | None, steps: int) -> float:
    """Training throughput of ``cfg`` on ``device`` from a short probe run (its folder is thrown away): timed
    between its first and last logged steps, so data loading and device start-up do not count."""
    every = max(1, steps // 3)
    t0 = time.perf_counter()
    train(dataclasses.replace(cfg, log_every=every), run_dir=run_dir, data_dir=data_dir, max_steps=steps,
          progress=False, device=device)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    logged = [(e["step"], e["time"]) for e in events if e.get("event") == "train"]
    if len(logged) >= 2 and logged[-1][1] > logged[0][1]:
        return (logged[-1][0] - logged[0][0]) * cfg.batch_size / (logged[-1][1] - logged[0][1])
    return steps * cfg.batch_size / wall


def smoke_config(cfg):
    """The same model and data, cut to a few small batches: the whole path in seconds on a CPU."""
    return dataclasses.replace(cfg, batch_size=8, train_subset=32, test_subset=16, warmup_steps=1)


def pack(work: Path, out: Path, name: str) -> Path:
    """``out/NAME.tar``: the export's weights and config and the run's log (no optimizer state)."""
    path = out / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        for f in ("model.safetensors", "config.json"):
            tar.add(work / name / f, arcname=f"{name}/{f}")
        tar.add(work / "runs" / name / "log.jsonl", arcname=f"{name}/log.jsonl")
    return path


def plan(root: Path) -> list[Path]:
    """The plan: the checkout's ``configs/gpu/*.json``, by name."""
    return sorted((root / "configs" / "gpu").glob("*.json"))


def plan_rows(paths: list[Path]) -> list[str]:
    """Each planned model's parameters and float32 weight size, beside the shipped model it enlarges."""
    from .. import build, load
    from ..flows.models import count_parameters

    rows = []
    for path in paths:
        cfg = load_train_config(path)
        params = count_parameters(build(cfg.model))
        shipped = cfg.name.removesuffix("_gpu")
        base = count_parameters(load(shipped))
        rows.append(f"{cfg.name:<22}{params / 1e6:6.2f} M {4 * params / 1e6:6.1f} MB   {shipped} "
                    f"({base / 1e6:.2f} M): {params / base:.1f}x")
    return rows


def run(paths: list[Path], out: Path, work: Path | None = None, minutes: float = 8.0, device: str = "cuda",
        data_dir: str | None = None, max_epochs: int = 200, smoke: bool = False,
        say: Callable[[str], None] = print) -> list[dict]:
    """Train each config for its share of ``minutes`` on ``device``, pack it into ``out`` and write
    ``out/report.json`` after each model (a timeout keeps what finished); returns the report. ``smoke``: the
    CPU, tiny batches and subsets, about 6 s a model."""
    if smoke:
        device, minutes, max_epochs = "cpu", 0.1 * len(paths), 1
    out.mkdir(parents=True, exist_ok=True)
    # runs (with optimizer states), probes and exports stay outside $OUT: everything there is sent back
    work = work or Path(tempfile.mkdtemp(prefix="gpu_zoo_"))
    share = minutes * 60 / len(paths)
    report = []
    for path in paths:
        cfg = load_train_config(path)
        if smoke:
            cfg = smoke_config(cfg)
        probe_steps = 3 if smoke else PROBE_STEPS
        rate = images_per_second(cfg, device, work / "probe" / cfg.name, data_dir, probe_steps)
        n_train = cfg.train_subset or _train_size(cfg, data_dir)
        # 15 % of the share is left for the per-epoch test bpd, the export and the first steps' warm-up
        epochs = max(1, min(max_epochs, int(0.85 * share * rate / n_train)))
        job = dataclasses.replace(cfg, epochs=epochs, max_minutes=share / 60 * 1.5, threads=None)
        t0 = time.perf_counter()
        summary = train(job, run_dir=work / "runs" / cfg.name, data_dir=data_dir, export_dir=work / cfg.name,
                        replace=True, progress=False, device=device)
        packed = pack(work, out, cfg.name)
        mib = packed.stat().st_size / 2**20
        report.append({"config": str(path), "device": device, "img_per_s_probe": round(rate, 1),
                       "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
                       "test_bpd_subset": summary["test_bpd"], "stopped_by": summary["stopped_by"],
                       "tar": packed.name, "tar_mib": round(mib, 2), "returnable": mib <= RETURN_LIMIT_MIB})
        say(json.dumps(report[-1]))
        text = json.dumps(report, indent=1) + "\n"
        atomic_write(out / "report.json", lambda tmp, text=text: tmp.write_text(text))
    return report


def _train_size(cfg, data_dir: str | None) -> int:
    from ..data.datasets import load_images

    return len(load_images(cfg.dataset, "train", data_dir))
