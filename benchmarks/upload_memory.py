"""Peak memory of scoring one large upload, as the app and the CLI do it (decode, preprocess, score).

    python benchmarks/upload_memory.py [--checkpoint fashion_realnvp]

Each case runs in a fresh process: a file is written first, then the process records its peak resident set
size (``VmHWM``, Linux) after importing flowcore and loading the model (the baseline every server process pays
once) and again after decoding, preprocessing and scoring the file. The difference is what one upload adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [  # (label, Pillow mode, format, side in pixels)
    ("RGBA PNG 6300x6300", "RGBA", "PNG", 6300),
    ("RGB JPEG 8000x8000 (64 MP photo size)", "RGB", "JPEG", 8000),
    ("grayscale PNG 8000x8000", "L", "PNG", 8000),
    ("lossless RGB WebP 4000x4000 (its limit)", "RGB", "WEBP", 4000),
]

CHILD = r"""
import json, sys
import numpy as np
import flowcore
from flowcore.data.images import load_image_file
from flowcore.ood.scores import compute_scores
from flowcore.ood.evaluate import load_reference

def peak_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would carry over the parent's peak from the fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, checkpoint = sys.argv[1], sys.argv[2]
model = flowcore.load(checkpoint)
reference = load_reference(checkpoint)
compute_scores(model, np.zeros((1, *model.config.image_shape[1:]), np.uint8), reference)  # warm up
base = peak_mb()
prepared = load_image_file(path, model.config.image_shape)
scores = compute_scores(model, prepared.array[None], reference)
peak = peak_mb()
print(json.dumps({"base_mb": base, "peak_mb": peak, "bpd": float(scores["bpd"][0])}))
"""


def _write(mode: str, fmt: str, side: int, path: Path) -> None:
    import numpy as np
    from PIL import Image

    # a smooth gradient with some texture: compresses well, like the red team's small-but-huge files
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    plane = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = np.repeat(plane[..., None], channels, axis=2) if channels > 1 else plane
    extra = {"lossless": True, "method": 0} if fmt == "WEBP" else {}  # method 0: a quick encode, same decode
    Image.fromarray(arr, mode).save(path, format=fmt, **extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="fashion_realnvp")
    args = p.parse_args()
    print(f"checkpoint {args.checkpoint}; peak RSS of a fresh process (MB)")
    print(f"{'upload':42s} {'file KB':>8s} {'baseline':>9s} {'peak':>7s} {'added':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode, fmt, side in CASES:
            path = Path(tmp) / f"upload.{fmt.lower()}"
            _write(mode, fmt, side, path)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.checkpoint],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:42s} {path.stat().st_size / 1024:8.0f} {r['base_mb']:9.0f} {r['peak_mb']:7.0f} "
                  f"{r['peak_mb'] - r['base_mb']:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
