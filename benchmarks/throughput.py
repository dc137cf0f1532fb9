"""Scoring and training throughput of a flow, as ratios of a matmul peak measured in the same run.

    python benchmarks/throughput.py                       # shipped sizes, built fresh
    python benchmarks/throughput.py --checkpoint fashion_realnvp --threads 2
    python benchmarks/throughput.py --config configs/fashion_glow_appc.json --batch 32 --repeats 2
    python benchmarks/throughput.py --variants            # + the training step in channels_last, compiled, bf16
    python benchmarks/throughput.py --profile             # + where a training step's time goes (by operator kind)

Prints img/s, achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) and that as a fraction of
the float32 matmul GFLOP/s measured here, so numbers from a busy or a different machine stay comparable.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import flowcore
from flowcore.flows.precision import bf16_is_native, set_st_precision
from flowcore.training.train import load_train_config

SHIPPED = {
    "realnvp (fashion_realnvp size)": {"arch": "realnvp", "image_shape": [1, 28, 28], "hidden": 32, "blocks": 2},
    "realnvp hidden 64 x 6 blocks": {"arch": "realnvp", "image_shape": [1, 28, 28], "hidden": 64, "blocks": 6},
    "glow (fashion_glow size)": {"arch": "glow", "image_shape": [1, 28, 28], "hidden": 128, "steps": 8},
}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_gflops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, repeats) / 1e9


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(model: torch.nn.Module, batch: int, repeats: int) -> dict[str, float]:
    shape = model.config.image_shape
    v = (torch.randint(0, 256, (batch, *shape)).float() + 0.5) / 256
    model.eval()

    def score():
        with torch.no_grad():
            model.log_prob(v)

    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-5)

    def step():
        opt.zero_grad()
        (-model.log_prob(v).mean()).backward()
        opt.step()

    step()  # ActNorm init etc. before counting
    model.eval()
    f_score, t_score = count_flops(score), _median_time(score, repeats)
    model.train()
    f_train, t_train = count_flops(step), _median_time(step, repeats)
    model.eval()
    return {
        "score_img_s": batch / t_score,
        "score_gflops": f_score / t_score / 1e9,
        "train_img_s": batch / t_train,
        "train_gflops": f_train / t_train / 1e9,
        "gflop_per_img": f_score / batch / 1e9,
    }


def train_step_variants(model_cfg: dict, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per training step of the same model and batch: eager, channels_last, ``torch.compile`` of the
    log-density (inductor; its compile time is reported apart), bfloat16 st-nets (``"precision": "bf16"``, the
    training code's own switch) and bfloat16 st-nets compiled, all measured in this run."""
    def fresh(layout=torch.contiguous_format, precision="fp32"):
        torch.manual_seed(0)
        m = flowcore.build(model_cfg).to(memory_format=layout)
        set_st_precision(m, precision)
        m.train()
        return m, torch.optim.Adam(m.parameters(), 1e-5)

    v = (torch.randint(0, 256, (batch, *model_cfg["image_shape"])).float() + 0.5) / 256

    def stepper(log_prob, opt, x):
        def step():
            opt.zero_grad()
            (-log_prob(x).mean()).backward()
            opt.step()
        return step

    out = {}
    m, opt = fresh()
    out["eager"] = _median_time(stepper(m.log_prob, opt, v), repeats)
    m, opt = fresh(torch.channels_last)
    out["channels_last"] = _median_time(stepper(m.log_prob, opt, v.contiguous(memory_format=torch.channels_last)),
                                        repeats)
    m, opt = fresh()
    compiled = torch.compile(m.log_prob)
    step = stepper(compiled, opt, v)
    t = time.perf_counter()
    step()
    out["compile_seconds"] = time.perf_counter() - t
    out["compiled"] = _median_time(step, repeats)
    m, opt = fresh(precision="bf16")
    out["bf16"] = _median_time(stepper(m.log_prob, opt, v), repeats)
    out["bf16_flops"] = count_flops(stepper(m.log_prob, opt, v))
    m, opt = fresh(precision="bf16")
    step = stepper(torch.compile(m.log_prob), opt, v)
    t = time.perf_counter()
    step()
    out["bf16_compile_seconds"] = time.perf_counter() - t
    out["bf16_compiled"] = _median_time(step, repeats)
    return out


# operator-name fragments of each kind a training step's time is split into (forward and backward alike)
KINDS = {"convolution": ("convolution",), "batch norm": ("batch_norm",)}


def train_step_profile(model_cfg: dict, batch: int, steps: int = 5) -> dict[str, float]:
    """Share of a training step's CPU time (torch.profiler, self time, ``steps`` steps after a warm-up) spent in
    convolutions, in batch norm, and in everything else: what a faster step could still win."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    m = flowcore.build(model_cfg)
    m.train()
    opt = torch.optim.Adam(m.parameters(), 1e-5)
    v = (torch.randint(0, 256, (batch, *model_cfg["image_shape"])).float() + 0.5) / 256

    def step():
        opt.zero_grad()
        (-m.log_prob(v).mean()).backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = {kind: 0.0 for kind in KINDS} | {"everything else": 0.0}
    for event in prof.key_averages():
        kind = next((k for k, frags in KINDS.items() if any(f in event.key for f in frags)), "everything else")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {k: v / whole for k, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=None)
    p.add_argument("--config", action="append", default=None, help="a training config: its architecture, built fresh")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", action="store_true",
                   help="also time the training step in channels_last, under torch.compile, with bfloat16 st-nets "
                        "and both (minutes)")
    p.add_argument("--profile", action="store_true", help="also split a training step's time by operator kind")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {n: flowcore.load(n) for n in args.checkpoint or []}
    for path in args.config or []:
        cfg = load_train_config(path)
        models[cfg.name] = flowcore.build(cfg.model)
    if not models:
        models = {n: flowcore.build(c) for n, c in SHIPPED.items()}
    peak = matmul_gflops()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{args.threads} thread(s), batch {args.batch}, SIMD {torch.backends.cpu.get_cpu_capability()}, "
          f"native bfloat16: {'yes' if bf16_is_native('cpu') else 'no (emulated: flowcore train refuses bf16)'}")
    print(f"float32 matmul 1024^3: {peak:.1f} GFLOP/s (reference peak for the ratios below)")
    print(f"{'model':<32}{'params':>10}{'GFLOP/img':>10}{'score img/s':>13}{'score/peak':>11}"
          f"{'train img/s':>13}{'train/peak':>11}")
    for name, model in models.items():
        r = bench(model, args.batch, args.repeats)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<32}{params:>10,}{r['gflop_per_img']:>10.3f}{r['score_img_s']:>13.1f}"
              f"{r['score_gflops'] / peak:>11.2%}{r['train_img_s']:>13.1f}{r['train_gflops'] / peak:>11.2%}")
    if args.variants:
        peak_bf16 = matmul_gflops(dtype=torch.bfloat16)
        print(f"bfloat16 matmul 1024^3: {peak_bf16:.1f} GFLOP/s ({peak_bf16 / peak:.2f}x float32, this run)")
        print(f"{'model':<32}{'eager ms':>9}{'chan_last':>10}{'compile':>9}{'bf16':>7}{'bf16+comp':>10}"
              f"{'bf16 img/s':>11}{'bf16/bf16 peak':>15}")
        for name, model in models.items():
            v = train_step_variants(model.config.to_dict(), args.batch, args.repeats)
            share = v["bf16_flops"] / v["bf16"] / 1e9 / peak_bf16
            print(f"{name:<32}{1000 * v['eager']:>9.0f}{v['eager'] / v['channels_last']:>9.2f}x"
                  f"{v['eager'] / v['compiled']:>8.2f}x{v['eager'] / v['bf16']:>6.2f}x"
                  f"{v['eager'] / v['bf16_compiled']:>9.2f}x{args.batch / v['bf16']:>11.1f}{share:>15.1%}")
        print("ratios: training img/s over eager float32, measured in this run (compilation time excluded: "
              f"{v['compile_seconds']:.0f} s float32, {v['bf16_compile_seconds']:.0f} s bf16 for the last model)")
    if args.profile:
        for name, model in models.items():
            shares = train_step_profile(model.config.to_dict(), args.batch)
            print(f"{name}: training step time, " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
                  + f" (torch.profiler self CPU time); removing everything but convolutions would give at most "
                  f"{1 / shares['convolution']:.2f}x")


if __name__ == "__main__":
    main()
