"""Re-evaluate shipped checkpoints with the settings their reference statistics are documented with.

    FLOWCORE_DATA_DIR=... python benchmarks/evaluate_zoo.py                 # every checkpoint
    FLOWCORE_DATA_DIR=... python benchmarks/evaluate_zoo.py NAME [NAME ...]  # some of them

Each run is ``flowcore evaluate NAME`` with the subsets below (a train subset for the typicality score's H,
the full test set, up to 5,000 images of each OOD set); a background model is evaluated before the model
that links it. Then run ``python benchmarks/results.py`` to regenerate the report and model cards.
"""

from __future__ import annotations

import argparse
import sys
import time

from flowcore.ood.evaluate import evaluate
from flowcore.zoo.checkpoints import list_checkpoints, read_config

DEFAULT = {"train_subset": 1000, "test_subset": None, "ood_subset": 5000}
# The background model only serves the likelihood ratio of its parent: smaller sets are enough for its card.
SETTINGS = {"fashion_realnvp_background": {"train_subset": 500, "test_subset": 2000, "ood_subset": 1000}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="checkpoints (default: all shipped)")
    args = p.parse_args()
    names = args.names or list_checkpoints()
    backgrounds = {read_config(n).get("background") for n in names} - {None}
    names = sorted(names, key=lambda n: n not in backgrounds)  # backgrounds first
    for name in names:
        t0 = time.perf_counter()
        summary = evaluate(name, **SETTINGS.get(name, DEFAULT))
        like = summary["auroc"].get("likelihood", {})
        aurocs = ", ".join(f"{s} {100 * v:.1f}" for s, v in like.items())
        quality = (f"test bpd {summary['bpd_mean']:.4f}" if "bpd_mean" in summary else
                   f"test nll {summary['nll_per_feature_mean']:.4f} nats/feature")
        print(f"{name}: {quality}; likelihood AUROC % {aurocs} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
