"""Choose a flow on image features by its validation log-likelihood alone: train variants of a config (how many
leading principal axes the couplings model, st-net width, weight decay) and print, per variant, the held-out
negative log-likelihood per feature of the Ledoit-Wolf Gaussian (epoch 0) and of the flow's best epoch.

    FLOWCORE_DATA_DIR=... python benchmarks/feature_flow_selection.py configs/cifar10_embeddings.json \
        --flow-dims 16 64 256 --epochs 60

No OOD set is read: the variant a shipped config uses is the one with the lowest validation NLL (the OOD sets
only measure the result afterwards, so nothing is tuned to them). Each variant is exported into a temporary
folder and discarded; the shipped checkpoints are not changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from flowcore.ood.vectors import train_vectors
from flowcore.training.train import load_train_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--flow-dims", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--hidden", type=int, nargs="+", default=None)
    p.add_argument("--weight-decay", type=float, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    base = load_train_config(args.config)
    if not base.validation_fraction:
        print("the config holds out no validation set (validation_fraction): nothing to select on", file=sys.stderr)
        return 2
    rows = []
    for dims in args.flow_dims:
        for hidden in args.hidden or [base.model.hidden]:
            for decay in args.weight_decay or [base.weight_decay]:
                model = dataclasses.replace(base.model, flow_dims=None if dims >= base.model.dim else dims,
                                            hidden=hidden, whiten=True)
                cfg = dataclasses.replace(base, model=model, weight_decay=decay,
                                          epochs=args.epochs or base.epochs)
                with tempfile.TemporaryDirectory() as tmp:
                    summary = train_vectors(cfg, Path(tmp) / "run", args.data_dir, Path(tmp) / "out",
                                            progress=False)
                    training = json.loads((Path(tmp) / "out" / "config.json").read_text())["training"]
                curve = training["curve"]
                best = curve[training["validation"]["selected_epoch"]]
                rows.append((dims, hidden, decay, curve[0]["validation_nll_per_dim"], best["validation_nll_per_dim"],
                             best["epoch"], summary["stopped_by"], training["cpu_minutes"]))
                print(f"flow_dims {dims:5d} hidden {hidden:4d} weight_decay {decay:g}: validation NLL/feature "
                      f"Gaussian {rows[-1][3]:.5f}, flow {rows[-1][4]:.5f} (epoch {best['epoch']}, "
                      f"{summary['stopped_by']}, {training['cpu_minutes']} CPU min)", flush=True)
    best = min(rows, key=lambda r: r[4])
    print(f"lowest validation NLL: flow_dims {best[0]}, hidden {best[1]}, weight_decay {best[2]:g} "
          f"({best[4]:.5f} nats/feature; the Gaussian {best[3]:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
