"""Page latency of the dashboard in a real browser: every page, cold (first visit) and warm (second visit).

    python benchmarks/page_latency.py                                   # fashion_realnvp and cifar10_realnvp
    python benchmarks/page_latency.py --checkpoint mnist_realnvp --markdown

For each checkpoint a fresh Streamlit server starts (the checkpoint preselected), headless Chromium opens the
dashboard, one image of the model's own test set is uploaded (the first Fashion-MNIST / CIFAR-10 test image from
``$FLOWCORE_DATA_DIR``, else a generated photo), and every page is visited through the sidebar twice: the time
from the click until the script run is over, no spinner is left and every plotly chart has drawn. Cold is the
first visit (models loaded and results computed), warm the second (cached). The targets of issue 21 are printed
beside the measurements: warm <= 1 s on a 28x28 model and <= 2 s on a 32x32 one, cold <= 5 s. The machine's load
average is printed too: on a busy machine every number is larger.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flowcore.data.datasets import DatasetNotFound, load_images
from flowcore.release import screenshots as shots
from flowcore.zoo.checkpoints import read_config

TARGET_WARM = {28: 1.0, 32: 2.0}
TARGET_COLD = 5.0


def test_image(checkpoint: str, folder: Path) -> Path:
    """The first test image of the checkpoint's dataset as PNG (a generated photo without the data)."""
    dataset = str(read_config(checkpoint).get("dataset", ""))
    path = folder / f"{checkpoint}_input.png"
    try:
        Image.fromarray(np.squeeze(load_images(dataset, "test")[0])).save(path)
    except (DatasetNotFound, OSError, ValueError, IndexError):
        shots.synthetic_photo(0).save(path)
    return path


def measure(checkpoint: str, chromium: Path, pages: tuple[shots.PageSpec, ...]) -> dict[str, tuple[float, float]]:
    """``{page: (cold seconds, warm seconds)}`` for one checkpoint; also ``"open"`` and ``"upload"``."""
    from playwright.sync_api import sync_playwright

    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, shots.serve({"FLOWCORE_DEFAULT_CHECKPOINT": checkpoint}) as url:
        image = test_image(checkpoint, Path(tmp))
        with sync_playwright() as p:
            browser = shots.launch(p, chromium)
            page = browser.new_page(viewport=shots.VIEWPORT)
            t0 = time.perf_counter()
            shots.open_app(page, url)
            opened = time.perf_counter() - t0
            t0 = time.perf_counter()
            shots.upload(page, [image])
            out["open (first page)"] = (opened, float("nan"))
            out["upload and score"] = (time.perf_counter() - t0, float("nan"))
            cold = {}
            for spec in pages:
                t0 = time.perf_counter()
                shots.go_to(page, spec, settle_ms=0)
                cold[spec.name] = time.perf_counter() - t0
                shots.check_page(page)
            for spec in pages:
                t0 = time.perf_counter()
                shots.go_to(page, spec, settle_ms=0)
                out[spec.name] = (cold[spec.name], time.perf_counter() - t0)
            browser.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", help="checkpoint(s) to measure (repeatable)")
    p.add_argument("--chromium", type=Path, default=shots.CHROMIUM)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args()
    names = args.checkpoint or ["fashion_realnvp", "cifar10_realnvp"]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    header = "| checkpoint | page | cold s | warm s | target |"
    print(header if args.markdown else "")
    if args.markdown:
        print("|---|---|---|---|---|")
    for name in names:
        side = int(read_config(name)["model"]["image_shape"][-1])
        warm_target = TARGET_WARM.get(side, 2.0)
        for page, (cold, warm) in measure(name, args.chromium, shots.PAGES).items():
            ok = cold <= TARGET_COLD and (np.isnan(warm) or warm <= warm_target)
            target = f"cold <= {TARGET_COLD:g}" + ("" if np.isnan(warm) else f", warm <= {warm_target:g}")
            verdict = "met" if ok else "missed"
            warm_text = "–" if np.isnan(warm) else f"{warm:.2f}"
            if args.markdown:
                print(f"| `{name}` | {page} | {cold:.2f} | {warm_text} | {target}: {verdict} |")
            else:
                print(f"{name:<18} {page:<18} cold {cold:6.2f} s  warm {warm_text:>6} s  ({target}: {verdict})")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
