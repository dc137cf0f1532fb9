"""torch.distributed: 2 CPU processes (gloo, torchrun) against 1 process on tiny 8x8 data.

One torchrun launch (module fixture) runs every multi-process command in one process group; the
tests then compare its outputs with single-process runs made in this process.

Tolerances: the 2-process step is the 1-process step up to float summation order (gradients are
averaged over ranks instead of summed over one batch). At ActNorm's data-dependent initialisation
some gradients are analytically zero (~1e-8 of rounding noise) and Adam turns their sign into a
full learning-rate step, so Glow's curves agree to ~5e-4 bpd over 8 steps, not to 1e-7. RealNVP's
st-nets use BatchNorm, which on CPU normalises with per-rank statistics (SyncBatchNorm needs a GPU),
so its curve only agrees to ~1e-2 bpd. Step 0 (a forward pass only) agrees to rounding in both.
"""

import json
import os
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowcore.flows.likelihood import log_likelihood_nats
from flowcore.flows.models import build
from flowcore.ood.evaluate import evaluate, load_reference
from flowcore.ood.scoring import score_files
from flowcore.training import distributed
from flowcore.training.train import TrainConfig, load_train_config, train

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

# Runs each command of a JSON list through flowcore's CLI in one process group; per rank it keeps
# stdout, the return code and (for train) the state_dict of the model the rank trained.
WORKER = r"""
import contextlib, json, os, sys
import torch
torch.set_num_threads(1)
from flowcore.training import distributed
from flowcore.training import train as train_mod
from flowcore.cli import build_parser

out, commands = sys.argv[1], json.load(open(sys.argv[2]))
built = []
real_build = train_mod.build
train_mod.build = lambda cfg: built.append(real_build(cfg)) or built[-1]
rank = int(os.environ["RANK"])
for i, argv in enumerate(commands):
    built.clear()
    args = build_parser().parse_args(argv)
    with open(f"{out}/{i}.rank{rank}.out", "w") as f, contextlib.redirect_stdout(f):
        rc = args.func(args)
    if built:
        torch.save({k: v.detach().cpu() for k, v in built[0].state_dict().items()}, f"{out}/{i}.rank{rank}.pt")
    open(f"{out}/{i}.rank{rank}.rc", "w").write(str(rc))
distributed.shutdown()
"""


def _blobs(n, seed, size=8):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(2, size - 2, (2, n, 1, 1))
    r = rng.uniform(1.5, 3.0, (n, 1, 1))
    img = 230 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)) + rng.normal(0, 4, (n, size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


MODELS = {
    "glow": dict(arch="glow", image_shape=[1, 8, 8], scales=2, hidden=8, steps=2),
    "realnvp": dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=8, blocks=1),
}


def _cfg(npz, arch):
    # global batch 16 = 2 ranks x 8; 128 images = 8 steps; every step logged
    return dict(
        name=arch,
        model=MODELS[arch],
        dataset=f"npz:{npz}",
        lr=3e-3,
        batch_size=16,
        epochs=1,
        warmup_steps=2,
        test_subset=48,
        seed=1,
        log_every=1,
    )


def _events(run_dir, kind=None):
    events = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [e for e in events if kind is None or e["event"] == kind]


def _curve(run_dir):
    return {e["step"]: e["bpd"] for e in _events(run_dir, "train")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    npz = d / "blobs.npz"
    # 300 test images = 2 evaluation batches of 256, so evaluate really splits across the 2 ranks
    np.savez(npz, x_train=_blobs(128, 0), x_test=_blobs(300, 1))
    noise = d / "noise.npz"
    np.savez(noise, x_test=np.random.default_rng(3).integers(0, 256, (300, 8, 8), dtype=np.uint8))
    imgs = d / "imgs"
    imgs.mkdir()
    for i, a in enumerate(_blobs(23, 9)):
        Image.fromarray(a).save(imgs / f"{i:02d}.png")
    (imgs / "broken.png").write_bytes(b"not an image")

    # single process, in this process
    for arch in MODELS:
        (d / f"{arch}.json").write_text(json.dumps(_cfg(npz, arch)))
        train(
            TrainConfig.from_dict(_cfg(npz, arch)),
            run_dir=d / f"{arch}_1",
            export_dir=d / f"ck_{arch}_1",
            progress=False,
        )
    evaluate(d / "ck_glow_1", ood=[f"npz:{noise}"])
    shutil.copytree(d / "ck_glow_1", d / "ck_eval_2")
    (d / "ck_eval_2" / "reference.npz").unlink()
    rows_1, failures_1 = score_files(d / "ck_glow_1", [imgs], batch_size=5)  # 5 batches: 3 + 2 per rank

    # two processes, one torchrun launch
    commands = [
        *[
            [
                "train",
                str(d / f"{arch}.json"),
                "--run-dir",
                str(d / f"{arch}_2"),
                "--export",
                str(d / f"ck_{arch}_2"),
                "--no-progress",
            ]
            for arch in MODELS
        ],
        ["train", str(d / "glow.json"), "--run-dir", str(d / "killed"), "--max-steps", "3", "--no-progress"],
        ["evaluate", str(d / "ck_eval_2"), "--ood", f"npz:{noise}", "--json"],
        ["score", str(d / "ck_glow_1"), str(imgs), "--batch-size", "5", "--format", "json", "--no-progress"],
    ]
    (d / "commands.json").write_text(json.dumps(commands))
    (d / "worker.py").write_text(WORKER)
    out = d / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(d / "worker.py"),
            str(out),
            str(d / "commands.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    def result(i, rank):
        pt = out / f"{i}.rank{rank}.pt"
        return {
            "rc": int((out / f"{i}.rank{rank}.rc").read_text()),
            "stdout": (out / f"{i}.rank{rank}.out").read_text(),
            "state": torch.load(pt, weights_only=True) if pt.is_file() else None,
        }

    results = [[result(i, r) for r in (0, 1)] for i in range(len(commands))]
    return dict(dir=d, npz=npz, results=results, rows_1=rows_1, failures_1=failures_1)


@pytest.mark.parametrize("index,arch,tolerance", [(0, "glow", 2e-3), (1, "realnvp", 3e-2)])
def test_two_process_training_matches_one_process(runs, index, arch, tolerance):
    d = runs["dir"]
    rank0, rank1 = runs["results"][index]
    assert rank0["rc"] == rank1["rc"] == 0
    assert rank0["stdout"].startswith("epoch 1: test bpd") and "done: epochs" in rank0["stdout"]
    assert rank1["stdout"] == ""  # only rank 0 prints
    # both ranks end with the same weights and buffers, and rank 0 exported exactly those
    assert rank0["state"].keys() == rank1["state"].keys()
    for k in rank0["state"]:
        assert torch.equal(rank0["state"][k], rank1["state"][k]), k
    exported = load_file(str(d / f"ck_{arch}_2" / "model.safetensors"))
    assert all(torch.equal(exported[k], rank0["state"][k]) for k in exported)
    # rank 0 alone wrote the log; it documents the set-up, BatchNorm included
    assert len(_events(d / f"{arch}_2", "start")) == 1 and len(_events(d / f"{arch}_2", "export")) == 1
    (setup,) = _events(d / f"{arch}_2", "distributed")
    assert setup["world_size"] == 2 and setup["backend"] == "gloo" and setup["per_rank_batch"] == 8
    assert setup["batchnorm"] == ("per-rank" if arch == "realnvp" else "none")
    # the loss curve (global-batch bpd, one entry per step) follows the 1-process run
    one, two = _curve(d / f"{arch}_1"), _curve(d / f"{arch}_2")
    assert sorted(one) == sorted(two) == list(range(8))
    assert two[0] == pytest.approx(one[0], abs=2e-5)  # same global batch, same noise, same initial weights
    diffs = [abs(one[s] - two[s]) for s in one]
    assert max(diffs) < tolerance, (one, two)
    assert two[7] < two[0] - 0.1  # and it trains
    meta = json.loads((d / f"ck_{arch}_2" / "config.json").read_text())["training"]
    assert meta["world_size"] == 2 and meta["images_seen"] == 128 and meta["batch_size"] == 16


def test_two_process_score_returns_the_same_rows_in_order(runs):
    rank0, rank1 = runs["results"][4]
    assert rank0["rc"] == rank1["rc"] == 1  # the broken file, reported on both ranks' exit codes
    assert rank1["stdout"] == ""
    rows_2 = json.loads(rank0["stdout"])
    assert len(rows_2) == 23 and not any("broken" in r["path"] for r in rows_2)
    assert rows_2 == runs["rows_1"]  # exact equality, order included
    assert [Path(r["path"]).name for r in rows_2] == [f"{i:02d}.png" for i in range(23)]


def test_two_process_evaluate_equals_one_process(runs):
    d = runs["dir"]
    rank0, rank1 = runs["results"][3]
    assert rank0["rc"] == rank1["rc"] == 0 and rank1["stdout"] == ""
    one, two = load_reference(d / "ck_glow_1"), load_reference(d / "ck_eval_2")
    assert one.keys() == two.keys() and len(two["test__likelihood"]) == 300
    for k in one:
        assert np.array_equal(one[k], two[k]), k
    summary = json.loads(rank0["stdout"])
    assert summary["auroc"] == json.loads((d / "ck_glow_1" / "config.json").read_text())["reference"]["auroc"]


def test_two_process_run_resumes_with_one_process(runs):
    d = runs["dir"]
    rank0, rank1 = runs["results"][2]
    assert rank0["rc"] == rank1["rc"] == 0
    assert "stopped after 3 steps at epoch 0, step 3" in rank0["stdout"]
    state = torch.load(d / "killed" / "state.pt", weights_only=True)
    assert (state["position"]["epoch"], state["position"]["step"]) == (0, 3)
    for k in state["model"]:  # the saved state is what both ranks held
        assert torch.equal(state["model"][k], rank0["state"][k]) and torch.equal(rank1["state"][k], rank0["state"][k])
    # same 2-process computation as the uninterrupted 2-process run, so far
    assert {s: b for s, b in _curve(d / "killed").items()} == {s: _curve(d / "glow_2")[s] for s in range(3)}

    summary = train(
        TrainConfig.from_dict(_cfg(runs["npz"], "glow")),
        run_dir=d / "killed",
        resume=True,
        export_dir=d / "ck_killed",
        progress=False,
    )
    assert summary["stopped_by"] == "epochs"
    (resumed,) = _events(d / "killed", "resume")
    assert (resumed["epoch"], resumed["step"]) == (0, 3)
    steps = [e["step"] for e in _events(d / "killed", "train")]
    assert steps == list(range(8))  # continues at global step 3, nothing repeated or skipped
    meta = json.loads((d / "ck_killed" / "config.json").read_text())["training"]
    assert meta["world_size"] == 1 and meta["images_seen"] == 128
    one = _curve(d / "glow_1")
    assert max(abs(one[s] - b) for s, b in _curve(d / "killed").items()) < 2e-3


def test_batch_range_deals_whole_batches_in_order():
    for n in (0, 1, 5, 23, 256, 300, 1000):
        for bs in (1, 5, 256):
            for world in (1, 2, 3, 8):
                ranges = [distributed.batch_range(n, bs, world, r) for r in range(world)]
                assert ranges[0][0] == 0 and ranges[-1][1] == n
                assert all(a[1] == b[0] for a, b in pairwise(ranges))  # contiguous, in rank order
                assert all(a % bs == 0 for a, b in ranges if b > a)  # every shard starts on a batch boundary
                sizes = [-(-(b - a) // bs) for a, b in ranges]
                assert max(sizes) - min(sizes) <= 1


def test_shards_equal_the_whole():
    torch.manual_seed(0)
    model = build(MODELS["realnvp"]).eval()
    x = _blobs(30, 4)
    whole = log_likelihood_nats(model, x, n_draws=2, batch_size=8)
    parts = [log_likelihood_nats(model, x[a:b], n_draws=2, batch_size=8) for a, b in ((0, 16), (16, 30))]
    assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(log_likelihood_nats(model, x[16:], n_draws=2, batch_size=8, seed=1), whole[16:])


def test_device_is_checked_and_global_batch_must_divide(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown device"):
        distributed.resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.resolve_device("cuda")
    assert distributed.resolve_device("cpu") == "cpu"
    npz = tmp_path / "b.npz"
    np.savez(npz, x_train=_blobs(32, 0), x_test=_blobs(8, 1))
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="not divisible by 3"):
        train(TrainConfig.from_dict(_cfg(npz, "glow")), run_dir=tmp_path / "r", progress=False)


@pytest.mark.parametrize("name", ["paper_realnvp_cifar10", "paper_glow_cifar10"])
def test_paper_configs_load_with_the_papers_hyper_parameters(name):
    cfg = load_train_config(ROOT / "configs" / f"{name}.json")
    assert cfg.name == name and cfg.dataset == "cifar10" and cfg.model.image_shape == [3, 32, 32]
    assert cfg.model.scales == 3 and cfg.batch_size == 32 and cfg.weight_decay == 5e-5
    assert cfg.batch_size % 8 == 0 and cfg.batch_size % 16 == 0  # 1 x 8 GPUs and 2 x 8 GPUs
    if "realnvp" in name:
        assert (cfg.model.blocks, cfg.model.hidden, cfg.optimizer, cfg.lr, cfg.epochs) == (8, 64, "adam", 1e-4, 100)
    else:
        assert (cfg.model.steps, cfg.model.hidden, cfg.optimizer, cfg.lr) == (8, 400, "rmsprop", 1e-5)
