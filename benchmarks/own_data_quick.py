"""The own-data workflow's quick preset, end to end, on a folder a user could have: 600 MNIST test digits as PNG
files in two subfolders (plus a broken PNG and a text file, skipped and counted) against 300 Fashion-MNIST test
images as the OOD folder. Prints the wall time, the held-out bpd and the AUROC (in-distribution positive).

    FLOWCORE_DATA_DIR=/path/to/data python benchmarks/own_data_quick.py [--preset quick] [--digits 600]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from flowcore.data.datasets import load_images


def write_pngs(images, folder: Path, subfolders: int = 2) -> None:
    for i, image in enumerate(images):
        target = folder / f"part{i % subfolders}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--digits", type=int, default=600)
    parser.add_argument("--ood", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FLOWCORE_CACHE"] = str(root / "cache")  # a fresh zoo: nothing of the user's is touched
        from flowcore.ood.own_data import train_on_images  # after FLOWCORE_CACHE is set

        write_pngs(load_images("mnist", "test")[: args.digits], root / "digits")
        (root / "digits" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        (root / "digits" / "notes.txt").write_text("not an image")
        write_pngs(load_images("fashion_mnist", "test")[: args.ood], root / "fashion", 1)
        start = time.perf_counter()
        result = train_on_images(root / "digits", "my_digits", [root / "fashion"], preset=args.preset)
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        result.pop("checkpoint")  # a temporary folder, gone when this ends
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
