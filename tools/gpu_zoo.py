"""Train several zoo configs on a lent GPU in one call, sized to a time budget, and pack the results.

    python tools/gpu_zoo.py --minutes 8 --out "$OUT" configs/cifar10_realnvp.json configs/cifar10_glow.json

For each config: a 30-step probe measures training images per second on this device, the number of epochs is
set so that the run fits its share of the budget (at least one), and the run trains with its own cosine
schedule to the end, then exports. Everything the device machine must send back is packed into one
``zoo.tar`` under ``--out`` (weights, configs, logs; no optimizer state), small enough for the device tool's
file limit (16 MiB) for the 32x32 zoo. Unpack it here, copy each export into ``checkpoints/`` if it beats the
shipped model, and evaluate with ``python benchmarks/evaluate_zoo.py NAME``.

Smoke-test on a CPU first: ``python tools/gpu_zoo.py --device cpu --minutes 1 --out /tmp/zoo CONFIG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tarfile
import time
from pathlib import Path

from flowcore.train import load_train_config, train

PROBE_STEPS = 30


def images_per_second(cfg, device: str, run_dir: Path, data_dir: str | None) -> float:
    """Training throughput of ``cfg`` on ``device``, from a short probe run (its folder is thrown away)."""
    t0 = time.perf_counter()
    train(cfg, run_dir=run_dir, data_dir=data_dir, max_steps=PROBE_STEPS, progress=False, device=device)
    return PROBE_STEPS * cfg.batch_size / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--out", required=True, help="folder for the results (the device tool's $OUT)")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget for all configs together")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-epochs", type=int, default=200)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    share = args.minutes * 60 / len(args.configs)
    report = []
    for path in args.configs:
        cfg = load_train_config(path)
        rate = images_per_second(cfg, args.device, out / "probe" / cfg.name, args.data_dir)
        n_train = cfg.train_subset or _train_size(cfg, args.data_dir)
        # the probe includes start-up (data loading, first steps): a conservative rate, so runs end in time
        epochs = max(1, min(args.max_epochs, int(0.85 * share * rate / n_train)))
        run = dataclasses.replace(cfg, epochs=epochs, max_minutes=share / 60 * 1.5, threads=None)
        t0 = time.perf_counter()
        summary = train(run, run_dir=out / "runs" / cfg.name, data_dir=args.data_dir, export_dir=out / cfg.name,
                        replace=True, progress=False, device=args.device)
        report.append({"config": path, "img_per_s_probe": round(rate, 1), "epochs": epochs,
                       "seconds": round(time.perf_counter() - t0, 1), "test_bpd_subset": summary["test_bpd"],
                       "stopped_by": summary["stopped_by"]})
        print(json.dumps(report[-1]), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    with tarfile.open(out / "zoo.tar", "w") as tar:  # weights, configs and logs only: no optimizer states
        tar.add(out / "report.json", arcname="report.json")
        for item in report:
            name = load_train_config(item["config"]).name
            for f in ("model.safetensors", "config.json"):
                tar.add(out / name / f, arcname=f"{name}/{f}")
            tar.add(out / "runs" / name / "log.jsonl", arcname=f"{name}/log.jsonl")
    print(f"packed {out / 'zoo.tar'} ({(out / 'zoo.tar').stat().st_size / 2**20:.1f} MiB)")
    return 0


def _train_size(cfg, data_dir: str | None) -> int:
    from flowcore.data import load_images

    return len(load_images(cfg.dataset, "train", data_dir))


if __name__ == "__main__":
    sys.exit(main())
