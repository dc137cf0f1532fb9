"""Image-feature extraction throughput (EfficientNet-Lite0, Sec. 8) as a ratio of a matmul peak measured in the
same run, and the layout speed-up (channels_last against the default layout), also measured in the same run.

    python benchmarks/extraction.py                 # one thread, batch 64
    python benchmarks/extraction.py --threads 2 --batch 32 --repeats 5

Prints img/s of the network alone (preprocessed 224x224 batches) in each layout, their ratio, the preprocessing's
img/s (resize and crop of 32x32 images), the FLOPs per image (torch.utils.flop_counter) and the achieved GFLOP/s
as a fraction of the float32 matmul GFLOP/s measured here. Needs ``pip install -e ".[embeddings]"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _median_time, count_flops, matmul_gflops  # noqa: E402

from flowcore.data import embeddings  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    prep_s = _median_time(lambda: embeddings.preprocess(images), args.repeats)
    model = embeddings.load_extractor()  # in channels_last, as extract() runs it
    batch = embeddings.preprocess(images)
    flops = count_flops(lambda: model.extract_features(batch[:1]))
    peak = matmul_gflops()

    def run(layout: torch.memory_format) -> float:
        m = model.to(memory_format=layout)
        x = batch.contiguous(memory_format=layout)
        with torch.inference_mode():
            return _median_time(lambda: m.extract_features(x), args.repeats)

    default_s = run(torch.contiguous_format)
    channels_last_s = run(torch.channels_last)
    model.to(memory_format=torch.channels_last)
    print(f"threads {args.threads}, batch {args.batch}; float32 matmul 1024^3: {peak:.1f} GFLOP/s")
    print(f"preprocessing (32x32 -> 224x224): {args.batch / prep_s:.0f} img/s")
    print(f"network FLOPs per image: {flops / 1e9:.2f} GFLOP")
    for label, seconds in (("default layout", default_s), ("channels_last", channels_last_s)):
        rate = args.batch / seconds
        achieved = rate * flops / 1e9
        print(f"{label:<15} {rate:6.1f} img/s  {achieved:6.1f} GFLOP/s  {achieved / peak:.0%} of the matmul peak")
    print(f"channels_last / default: {default_s / channels_last_s:.2f}x img/s (measured in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
