"""Single-image latency of one inspection click: coupling trace + one Jacobian row + 8 patch resamples.

Usage::

    python benchmarks/inspection_latency.py                       # the two default architectures
    python benchmarks/inspection_latency.py --checkpoint NAME ... # trained checkpoints instead

Freshly built models have zero-initialised st-net outputs, which does not change the cost. Prints the
median over ``--repeats`` runs (after one warm-up) of each part and of the total, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from flowcore import build, load
from flowcore.inspection.probes import coupling_trace, jacobian_map, resample_patch

DEFAULT_MODELS = {
    "realnvp": {"arch": "realnvp", "image_shape": [1, 28, 28], "hidden": 32, "blocks": 2},
    "glow": {"arch": "glow", "image_shape": [1, 28, 28], "hidden": 128, "steps": 8},
}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench(name: str, model: torch.nn.Module, repeats: int, device: str) -> None:
    c, h, w = model.image_shape
    gen = torch.Generator().manual_seed(0)
    v = 0.05 + 0.9 * torch.rand((c, h, w), generator=gen)
    index = (0, h // 2, w // 2)
    parts = {
        "trace": lambda: coupling_trace(model, v, device=device),
        "jacobian": lambda: jacobian_map(model, v, index, device=device),
        "resample x8": lambda: resample_patch(model, v, n=8, seed=0, device=device),
    }
    times = {part: _median_ms(fn, repeats) for part, fn in parts.items()}
    total = _median_ms(lambda: [fn() for fn in parts.values()], repeats)
    n_params = sum(p.numel() for p in model.parameters())
    detail = "  ".join(f"{part} {ms:8.1f} ms" for part, ms in times.items())
    print(f"{name:<24} {n_params / 1e6:6.2f}M params  {detail}  total {total:8.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME", help="load with flowcore.load")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, median of {args.repeats}"
    )
    if args.checkpoint:
        models = {name: load(name, device=args.device) for name in args.checkpoint}
    else:
        models = {name: build(cfg).to(args.device).eval() for name, cfg in DEFAULT_MODELS.items()}
    for name, model in models.items():
        bench(name, model, args.repeats, args.device)


if __name__ == "__main__":
    main()
