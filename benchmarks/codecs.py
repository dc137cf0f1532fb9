"""Lossless codecs for the input-complexity scores: time per image and mean size, per WebP effort setting.

    FLOWCORE_DATA_DIR=... python benchmarks/codecs.py [--n 200]

Prints, for 28x28 grayscale (Fashion-MNIST) and 32x32 RGB (CIFAR-10) test images, the milliseconds per image
and the mean encoded bytes of PNG (as flowcore.ood.scores uses it) and lossless WebP at methods 0, 4 and 6, with
the ratio of each to flowcore's setting (flowcore.ood.scores.WEBP_METHOD) measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from flowcore.data.datasets import load_images
from flowcore.ood.scores import WEBP_METHOD


def encode(arr: np.ndarray, codec: str, method: int) -> int:
    buf = io.BytesIO()
    if codec == "png":
        Image.fromarray(arr).save(buf, format="PNG", optimize=True, compress_level=9)
    else:
        Image.fromarray(arr).save(buf, format="WEBP", lossless=True, quality=100, method=method)
    return buf.tell()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    for dataset in ("fashion_mnist", "cifar10"):
        images = load_images(dataset, "test")[: args.n]
        rows = {}
        for codec, method in [("png", 0), ("webp", 0), ("webp", 4), ("webp", 6)]:
            t = time.perf_counter()
            sizes = [encode(a, codec, method) for a in images]
            rows[(codec, method)] = (1000 * (time.perf_counter() - t) / len(images), float(np.mean(sizes)))
        ms0, b0 = rows[("webp", WEBP_METHOD)]
        print(f"{dataset} ({images.shape[1:]}), {len(images)} images; ratios to webp method {WEBP_METHOD}")
        for (codec, method), (ms, b) in rows.items():
            name = "png" if codec == "png" else f"webp method {method}"
            print(f"  {name:<15} {ms:7.2f} ms/img ({ms / ms0:5.2f}x)   {b:8.1f} bytes ({b / b0:5.3f}x)")


if __name__ == "__main__":
    main()
