"""Issue 4: training drops bpd, resumes exactly, never saves NaN; evaluate and the CLI."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flowcore
from flowcore.cli import main
from flowcore.ood.evaluate import evaluate, load_reference
from flowcore.ood.scores import auroc
from flowcore.training import train as train_mod
from flowcore.training.train import TrainConfig, train


def _blobs(n, seed, size=8, invert=False):
    """Smooth structured 8x8 images: random Gaussian blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(2, size - 2, (2, n, 1, 1))
    r = rng.uniform(1.5, 3.0, (n, 1, 1))
    img = 230 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    img = img + rng.normal(0, 4, img.shape)
    if invert:
        img = 255 - img
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_data(tmp_path):
    main_npz = tmp_path / "blobs.npz"
    np.savez(main_npz, x_train=_blobs(256, 0), y_train=np.zeros(256, np.uint8), x_test=_blobs(64, 1),
             y_test=np.zeros(64, np.uint8))
    ood = tmp_path / "noise.npz"
    rng = np.random.default_rng(3)
    np.savez(ood, x_test=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8), y_test=np.zeros(64, np.uint8))
    return main_npz, ood


def _cfg(npz, **kw):
    d = dict(name="tiny", model=dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=8, blocks=1),
             dataset=f"npz:{npz}", lr=3e-3, batch_size=32, epochs=2, warmup_steps=2, test_subset=64, seed=1)
    d.update(kw)
    return TrainConfig.from_dict(d)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bpd_drops_and_resume_is_exact(tiny_data, tmp_path, precision):
    npz, _ = tiny_data
    full = train(_cfg(npz, precision=precision), run_dir=tmp_path / "a", export_dir=tmp_path / "ck_a",
                 progress=False, allow_emulated_bf16=True)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    first = [e["bpd"] for e in log if e["event"] == "train"][0]
    assert full["test_bpd"] < first - 0.5, (first, full["test_bpd"])
    # "kill" after 5 steps (mid-epoch 1), then resume in a new call
    part = train(_cfg(npz, precision=precision), run_dir=tmp_path / "b", max_steps=5, progress=False,
                 allow_emulated_bf16=True)
    assert part["stopped_by"] == "max_steps" and (part["epoch"], part["step"]) == (0, 5)
    with pytest.raises(FileExistsError):
        train(_cfg(npz, precision=precision), run_dir=tmp_path / "b", progress=False, allow_emulated_bf16=True)
    train(_cfg(npz, precision=precision), run_dir=tmp_path / "b", resume=True, export_dir=tmp_path / "ck_b",
          progress=False, allow_emulated_bf16=True)
    a = load_file(str(tmp_path / "ck_a" / "model.safetensors"))
    b = load_file(str(tmp_path / "ck_b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((tmp_path / "ck_b" / "config.json").read_text())
    assert meta["training"]["images_seen"] == 2 * 256 // 32 * 32
    assert meta["dataset"].startswith("npz:")
    assert meta["training"]["precision"] == precision


def test_bf16_training_runs_bf16_steps_and_float32_evaluation(tiny_data, tmp_path, monkeypatch):
    """With "precision": "bf16" the training steps' st-nets run in bfloat16 and the per-epoch test bpd, the
    export and the exported model in float32; the learning curve is the float32 one within bfloat16 tolerance."""
    from flowcore.flows.precision import st_precision_of

    npz, _ = tiny_data
    seen = []
    original = train_mod.log_likelihood_nats

    def spy(model, *a, **kw):
        seen.append(st_precision_of(model))
        return original(model, *a, **kw)

    monkeypatch.setattr(train_mod, "log_likelihood_nats", spy)
    out = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        out[precision] = train(_cfg(npz, precision=precision, log_every=1), run_dir=run, progress=False,
                               export_dir=tmp_path / f"ck_{precision}", allow_emulated_bf16=True)
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        out[precision]["curve"] = [e["bpd"] for e in log if e["event"] == "train"]
    assert seen and set(seen) == {"fp32"}  # every evaluation, bf16 run included
    assert st_precision_of(flowcore.load(tmp_path / "ck_bf16")) == "fp32"
    a, b = out["fp32"]["curve"], out["bf16"]["curve"]
    assert a != b and b == pytest.approx(a, abs=0.05)  # really different arithmetic, the same learning
    assert out["bf16"]["test_bpd"] == pytest.approx(out["fp32"]["test_bpd"], abs=0.05)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        _cfg(npz, precision="half")


def test_bf16_is_refused_where_it_would_be_emulated(tiny_data, tmp_path, monkeypatch, capsys):
    """On a CPU without native bfloat16 a bf16 step is slower than float32 (0.09x measured on an AVX2 CPU): a
    bf16 config is refused with one line before anything is written, unless the user allows emulation; float32
    configs train as before. The own-data presets pick the precision the CPU runs natively."""
    from flowcore.cli import main
    from flowcore.flows import precision as precision_mod
    from flowcore.ood import own_data

    npz, _ = tiny_data
    monkeypatch.setattr(precision_mod, "bf16_is_native", lambda device="cpu": False)
    with pytest.raises(ValueError, match="needs native bfloat16.*--allow-emulated-bf16"):
        train(_cfg(npz, precision="bf16"), run_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # refused before the run folder was made
    done = train(_cfg(npz, precision="bf16", epochs=1), run_dir=tmp_path / "allowed", progress=False,
                 allow_emulated_bf16=True)
    assert done["stopped_by"] == "epochs"
    cfg_file = tmp_path / "bf16.json"
    cfg_file.write_text(json.dumps({**_cfg(npz, precision="bf16").to_dict(), "epochs": 1}))
    assert main(["train", str(cfg_file), "--run-dir", str(tmp_path / "cli"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-emulated-bf16" in err[0]
    assert train(_cfg(npz, epochs=1), run_dir=tmp_path / "fp32", progress=False)["stopped_by"] == "epochs"
    assert own_data.own_config("mine", "quick", (1, 28, 28), f"npz:{npz}", [], 100).precision == "fp32"
    monkeypatch.setattr(precision_mod, "bf16_is_native", lambda device="cpu": True)
    assert own_data.own_config("mine", "quick", (1, 28, 28), f"npz:{npz}", [], 100).precision == "bf16"


def test_resume_with_more_epochs_warms_up_again(tiny_data, tmp_path):
    npz, _ = tiny_data
    train(_cfg(npz, epochs=1, warmup_steps=4, log_every=1), run_dir=tmp_path / "r", progress=False,
          export_dir=tmp_path / "ck")
    train(_cfg(npz, epochs=2, warmup_steps=4, log_every=1), run_dir=tmp_path / "r", resume=True, progress=False,
          export_dir=tmp_path / "ck", replace=True)
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    ext = [e for e in log if e["event"] == "schedule_extended"]
    assert [(e["total_steps"], e["warm_from"]) for e in ext] == [(16, 8)]
    lr = {e["step"]: e["lr"] for e in log if e["event"] == "train"}
    assert lr[7] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))  # first schedule: 8-step cosine
    for step in range(8, 16):  # then a fresh 4-step warmup into the longer cosine, not a jump
        cosine = 0.5 * (1 + math.cos(math.pi * step / 16))
        assert lr[step] == pytest.approx(3e-3 * min(1.0, (step - 7) / 4) * cosine), step


def test_a_paused_run_exports_its_model_as_it_stands_and_goes_on_unchanged(tiny_data, tmp_path):
    """--export-paused: the exported weights are the saved state's, the card says paused and how far the run got,
    nothing is trained, and the run then ends exactly where an uninterrupted one does. Even a bf16 run exports
    where bfloat16 would be emulated: nothing runs in it."""
    npz, _ = tiny_data
    cfg = _cfg(npz, precision="bf16")
    full = train(cfg, run_dir=tmp_path / "a", export_dir=tmp_path / "ck_a", progress=False, allow_emulated_bf16=True)
    train(cfg, run_dir=tmp_path / "b", max_steps=5, progress=False, allow_emulated_bf16=True)
    state_path = tmp_path / "b" / "state.pt"
    saved = state_path.read_bytes()
    with pytest.raises(ValueError, match="needs --resume"):
        train(cfg, run_dir=tmp_path / "b", export_dir=tmp_path / "ck_p", progress=False, export_paused=True)
    with pytest.raises(FileNotFoundError, match="no saved run"):
        train(cfg, run_dir=tmp_path / "none", resume=True, export_dir=tmp_path / "ck_n", progress=False,
              export_paused=True)
    assert not (tmp_path / "ck_n").exists() and not (tmp_path / "none" / "log.jsonl").exists()
    paused = train(cfg, run_dir=tmp_path / "b", resume=True, export_dir=tmp_path / "ck_p", progress=False,
                   export_paused=True)
    assert paused["stopped_by"] == "paused" and (paused["epoch"], paused["step"]) == (0, 5)
    assert state_path.read_bytes() == saved  # nothing trained, nothing saved
    exported = load_file(str(tmp_path / "ck_p" / "model.safetensors"))
    state = torch.load(state_path, weights_only=True)["model"]
    assert exported.keys() and all(torch.equal(exported[k], state[k]) for k in exported)
    card = json.loads((tmp_path / "ck_p" / "config.json").read_text())["training"]
    assert card["stopped_by"] == "paused" and card["images_seen"] == 5 * 32 and card["precision"] == "bf16"
    assert card["epochs_completed"] == pytest.approx(5 * 32 / 256, abs=1e-3)
    assert math.isfinite(paused["test_bpd"]) and paused["test_bpd"] > full["test_bpd"]  # 5 steps, not 16
    rest = train(cfg, run_dir=tmp_path / "b", resume=True, export_dir=tmp_path / "ck_b", progress=False,
                 allow_emulated_bf16=True)
    assert rest["test_bpd"] == full["test_bpd"]
    a = load_file(str(tmp_path / "ck_a" / "model.safetensors"))
    b = load_file(str(tmp_path / "ck_b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="has finished"):
        train(cfg, run_dir=tmp_path / "b", resume=True, export_dir=tmp_path / "ck_q", progress=False,
              export_paused=True)


def test_resume_over_budget_says_so_instead_of_training_a_step(tiny_data, tmp_path):
    npz, _ = tiny_data
    train(_cfg(npz), run_dir=tmp_path / "r", max_steps=3, progress=False)
    state_path = tmp_path / "r" / "state.pt"
    st = torch.load(state_path, weights_only=True)
    st["position"]["elapsed"] = 90.0  # as if the run had used 1.5 minutes
    torch.save(st, state_path)
    with pytest.raises(ValueError, match="over its budget of 1 .*--max-minutes"):
        train(_cfg(npz, max_minutes=1), run_dir=tmp_path / "r", resume=True, progress=False)
    assert torch.load(state_path, weights_only=True)["position"]["step"] == 3  # nothing trained, nothing lost
    out = train(_cfg(npz, max_minutes=1), run_dir=tmp_path / "r", resume=True, max_minutes=5,
                export_dir=tmp_path / "ck", progress=False)
    assert out["stopped_by"] == "epochs"


def test_crash_during_save_keeps_previous_state(tiny_data, tmp_path, monkeypatch):
    npz, _ = tiny_data
    train(_cfg(npz), run_dir=tmp_path / "r", max_steps=2, progress=False)
    state_path = tmp_path / "r" / "state.pt"
    before = torch.load(state_path, weights_only=True)

    real_write_bytes = Path.write_bytes

    def half_then_full(self, data):  # the state's bytes are half written when the disk fills
        if not self.name.startswith(".state.pt."):
            return real_write_bytes(self, data)
        real_write_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError):
        train(_cfg(npz), run_dir=tmp_path / "r", resume=True, max_steps=1, progress=False)
    after = torch.load(state_path, weights_only=True)
    assert after["position"] == before["position"]
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


def test_nonfinite_loss_is_skipped_and_never_saved(tiny_data, tmp_path, monkeypatch):
    npz, _ = tiny_data
    real = train_mod.dequantize
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        v = real(*args, **kw)
        if calls["n"] == 3:
            v = v.clone()
            v[0, 0, 0, 0] = float("nan")
        return v

    monkeypatch.setattr(train_mod, "dequantize", poisoned)
    summary = train(_cfg(npz, epochs=1), run_dir=tmp_path / "n", export_dir=tmp_path / "ck", progress=False)
    assert summary["skipped"] == 1
    log = (tmp_path / "n" / "log.jsonl").read_text()
    assert "skip_nonfinite" in log
    weights = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_negative_training_pushes_ood_down(tiny_data, tmp_path):
    npz, ood_npz = tiny_data
    inverted = tmp_path / "inv.npz"
    np.savez(inverted, x_train=_blobs(256, 5, invert=True), x_test=_blobs(64, 6, invert=True))
    base = train(_cfg(npz, epochs=3), run_dir=tmp_path / "p", export_dir=tmp_path / "ck_p", progress=False)
    neg = _cfg(npz, epochs=3, negative={"dataset": f"npz:{inverted}", "threshold": -1e9, "weight": 0.5})
    train(neg, run_dir=tmp_path / "q", export_dir=tmp_path / "ck_q", progress=False)
    x_inv = np.load(inverted)["x_test"]
    ll_base = flowcore.log_likelihood_nats(flowcore.load(tmp_path / "ck_p"), x_inv).mean()
    ll_neg = flowcore.log_likelihood_nats(flowcore.load(tmp_path / "ck_q"), x_inv).mean()
    assert ll_neg < ll_base - 50, (ll_base, ll_neg)
    assert base["test_bpd"] < 8


def test_negative_batches_use_running_statistics_and_leave_them_alone():
    from flowcore.flows.models import log_prob_running_stats

    torch.manual_seed(0)
    model = flowcore.build({"arch": "realnvp", "image_shape": [1, 8, 8], "hidden": 8, "blocks": 1, "scales": 2})
    with torch.no_grad():  # leave the identity initialisation, where the st-nets' BatchNorm has no effect
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    x = torch.rand(16, 1, 8, 8) * 0.98 + 0.01  # dequantized pixels in (0, 1)
    for _ in range(3):  # give the running statistics something to remember
        model.log_prob(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ood = torch.rand(16, 1, 8, 8) * 0.2 + 0.01  # dark images: batch statistics far from the running ones
    lp = log_prob_running_stats(model, ood)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "OOD leaked into BatchNorm"
    lp.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(lp.detach(), model.log_prob(ood), rtol=1e-5, atol=1e-3)
        model.train()
        assert not torch.allclose(lp.detach(), model.log_prob(ood), atol=1.0)  # train mode would differ


def test_init_from_starts_at_the_parent_weights(tiny_data, tmp_path):
    npz, _ = tiny_data
    train(_cfg(npz, epochs=1), run_dir=tmp_path / "p", export_dir=tmp_path / "ck_p", progress=False)
    parent = flowcore.load(tmp_path / "ck_p")
    child_cfg = _cfg(npz, epochs=1, init_from=str(tmp_path / "ck_p"))
    train(child_cfg, run_dir=tmp_path / "c", max_steps=1, progress=False)  # one step: state saved, no export
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log][:2] == ["start", "init_from"]
    # step 0 is a fine-tuning step from the parent, not from scratch: its loss is the parent's bpd level
    first_bpd = [e["bpd"] for e in log if e["event"] == "train"][0]
    scratch = train(_cfg(npz, epochs=1), run_dir=tmp_path / "s", max_steps=1, progress=False)
    scratch_log = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert first_bpd < [e["bpd"] for e in scratch_log if e["event"] == "train"][0] - 0.5
    assert scratch["step"] == 1
    # the copy is exact, BatchNorm running statistics and ActNorm state included
    fresh = flowcore.build(child_cfg.model)
    train_mod._init_from(fresh, child_cfg)
    ps, cs = parent.state_dict(), fresh.state_dict()
    assert ps.keys() == cs.keys() and all(torch.equal(ps[k], cs[k]) for k in ps)
    # the exported card records what the model inherited
    train(child_cfg, run_dir=tmp_path / "z", export_dir=tmp_path / "ck_z", max_minutes=0, progress=False)
    meta = flowcore.load(tmp_path / "ck_z").checkpoint_meta["training"]["init_from"]
    assert meta["checkpoint"] == str(tmp_path / "ck_p") and meta["images_seen"] > 0
    with pytest.raises(ValueError, match="architecture differs"):
        wider = _cfg(npz, init_from=str(tmp_path / "ck_p"))
        wider.model.hidden = 16
        train(wider, run_dir=tmp_path / "w", max_steps=1, progress=False)


def test_frozen_batchnorm_negative_fine_tune_lowers_the_evaluated_likelihood(tiny_data, tmp_path):
    npz, _ = tiny_data
    inverted = tmp_path / "inv.npz"
    np.savez(inverted, x_train=_blobs(256, 5, invert=True), x_test=_blobs(64, 6, invert=True))
    train(_cfg(npz, epochs=2), run_dir=tmp_path / "p", export_dir=tmp_path / "ck_p", progress=False)
    child = _cfg(npz, epochs=2, init_from=str(tmp_path / "ck_p"), freeze_batchnorm=True,
                 negative={"dataset": f"npz:{inverted}", "threshold": -1e9, "weight": 0.5})
    train(child, run_dir=tmp_path / "c", export_dir=tmp_path / "ck_c", progress=False)
    parent, tuned = flowcore.load(tmp_path / "ck_p"), flowcore.load(tmp_path / "ck_c")
    running = [k for k in parent.state_dict() if "running_" in k]
    assert running and all(torch.equal(parent.state_dict()[k], tuned.state_dict()[k]) for k in running)
    x_inv = np.load(inverted)["x_test"]
    assert flowcore.log_likelihood_nats(tuned, x_inv).mean() < flowcore.log_likelihood_nats(parent, x_inv).mean() - 50


def test_refresh_complexity_reproduces_evaluate_without_the_model(tiny_data, tmp_path, monkeypatch):
    from flowcore.ood import evaluate as evaluate_mod
    from flowcore.zoo.checkpoints import CheckpointError

    npz, ood = tiny_data
    root = tmp_path / "root"
    root.mkdir()
    (root / "mnist.npz").write_bytes(ood.read_bytes())  # a named set, so that refresh can reload it
    train(_cfg(npz, epochs=1), run_dir=tmp_path / "e", export_dir=tmp_path / "ck", progress=False)
    evaluate(tmp_path / "ck", data_dir=str(root), ood=["mnist"], train_subset=64)
    fresh = load_reference(tmp_path / "ck")
    summary = json.loads((tmp_path / "ck" / "config.json").read_text())["reference"]
    # a different codec effort changes the stored complexity scores ...
    monkeypatch.setattr("flowcore.ood.scores.WEBP_METHOD", 0)
    changed = evaluate_mod.refresh_complexity(tmp_path / "ck", data_dir=str(root))
    assert not np.allclose(load_reference(tmp_path / "ck")["test__complexity_webp"], fresh["test__complexity_webp"])
    assert changed["auroc"]["likelihood"] == summary["auroc"]["likelihood"]
    # ... and refreshing with the original one restores exactly what evaluate wrote
    monkeypatch.undo()
    again = evaluate_mod.refresh_complexity(tmp_path / "ck", data_dir=str(root))
    ref = load_reference(tmp_path / "ck")
    assert ref.keys() == fresh.keys() and all(np.array_equal(ref[k], fresh[k]) for k in fresh)
    assert again == summary
    evaluate(tmp_path / "ck", ood=[f"npz:{ood}"], train_subset=64)  # an unnamed set cannot be reloaded
    with pytest.raises(CheckpointError, match="cannot reload set 'noise'"):
        evaluate_mod.refresh_complexity(tmp_path / "ck")


def test_evaluate_auroc_matches_sklearn_and_cli(tiny_data, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    npz, ood = tiny_data
    train(_cfg(npz, epochs=1), run_dir=tmp_path / "e", export_dir=tmp_path / "ck", progress=False)
    summary = evaluate(tmp_path / "ck", ood=[f"npz:{ood}"], train_subset=64)
    ref = load_reference(tmp_path / "ck")
    y = np.r_[np.ones(64), np.zeros(64)]
    for score in ("likelihood", "complexity_png", "typicality", "last_scale"):
        s = np.r_[ref[f"test__{score}"], ref[f"noise__{score}"]]
        assert summary["auroc"][score]["noise"] == pytest.approx(roc_auc_score(y, s), abs=1e-5)
    assert summary["auroc"]["likelihood"]["noise"] > 0.9  # uniform noise is far less likely than blobs
    assert auroc(ref["test__likelihood"], ref["noise__likelihood"]) == pytest.approx(
        summary["auroc"]["likelihood"]["noise"], abs=1e-5)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["reference"]["counts"] == {"train": 64, "test": 64, "noise": 64}
    assert (tmp_path / "ck" / "histogram.png").stat().st_size > 1000
    # the CLI prints one JSON object with the same numbers
    capsys.readouterr()
    rc = main(["evaluate", str(tmp_path / "ck"), "--ood", f"npz:{ood}", "--train-subset", "64", "--json",
               "--no-write"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["auroc"] == summary["auroc"] and out["bpd_median"] == summary["bpd_median"]


def test_cli_train_runs_from_a_config_file(tiny_data, tmp_path):
    npz, _ = tiny_data
    cfg = _cfg(npz, epochs=1).to_dict()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    rc = main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "ck"),
               "--no-progress"])
    assert rc == 0
    assert flowcore.load(tmp_path / "ck").config.hidden == 8


@pytest.mark.parametrize("args,needle", [
    (["evaluate", "no_such_checkpoint"], "no checkpoint named"),
    (["train", "/no/such/config.json"], "No such file"),
])
def test_cli_errors_are_one_line(args, needle):
    r = subprocess.run([sys.executable, "-m", "flowcore.cli", *args], capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_score_folder_with_a_corrupt_file(tiny_data, tmp_path, capsys):
    from PIL import Image

    npz, ood = tiny_data
    train(_cfg(npz, epochs=1), run_dir=tmp_path / "s", export_dir=tmp_path / "ck", progress=False)
    evaluate(tmp_path / "ck", ood=[f"npz:{ood}"], train_subset=64)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    blobs = _blobs(3, 9)
    for i, b in enumerate(blobs):
        Image.fromarray(b).save(folder / f"blob{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    rc = main(["score", str(tmp_path / "ck"), str(tmp_path / "imgs"), "--format", "json", "--no-progress",
               "--invert", "no"])
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rc == 1
    assert [Path(r["path"]).name for r in rows] == ["blob0.png", "blob1.png", "blob2.png"]
    assert "broken.png" in captured.err and len(captured.err.strip().splitlines()) == 1
    expected = flowcore.log_likelihood_nats(flowcore.load(tmp_path / "ck"), blobs)
    np.testing.assert_allclose([r["log_likelihood_nats"] for r in rows], expected, atol=1e-3)
    ref = load_reference(tmp_path / "ck")["test__likelihood"]
    for r in rows:
        assert r["percentile"] == pytest.approx(100 * np.mean(ref < r["log_likelihood_nats"]), abs=2)
    # the typicality batch test of the good images, on its own stderr line
    capsys.readouterr()
    main(["score", str(tmp_path / "ck"), str(folder), "--no-progress", "--invert", "no", "--batch-test"])
    assert "bootstrap p =" in capsys.readouterr().err
    # CSV has a header and one line per good image
    capsys.readouterr()
    main(["score", str(tmp_path / "ck"), str(folder / "blob0.png"), "--no-progress", "--invert", "no"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,log_likelihood_nats,bpd") and len(lines) == 2


def test_negative_term_is_eq_7_normalised_by_the_points_above_the_threshold():
    from flowcore.training.train import negative_term

    log_q = torch.tensor([-10.0, -50.0, -20.0, -200.0], requires_grad=True)
    term = negative_term(log_q, threshold=-100.0)
    assert term.item() == pytest.approx((-10 - 50 - 20) / 3)  # N_OOD = 3 points above c, not the batch of 4
    term.backward()
    assert log_q.grad.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    none_active = negative_term(torch.tensor([-500.0, -600.0]), threshold=-100.0)
    assert none_active.item() == 0.0  # guarded: no division by zero when every OOD point is below c


def test_negative_term_equals_a_direct_transcription_of_eq_7():
    """Eq. 7's OOD part, written out term by term: (1 / N_OOD) sum_i log p(x_i) I[log p(x_i) > c], with N_OOD the
    count of points strictly above c; a point exactly at c is not counted (the indicator is strict)."""
    from flowcore.training.train import negative_term

    def transcribed(values: list[float], c: float) -> float:
        active = [v for v in values if v > c]
        return sum(active) / len(active) if active else 0.0

    c = -30000.0
    batches = [[-29000.0, -30000.0, -31000.0, -12000.5], [-30000.0, -30000.0], [-40000.0], [-1.0, -2.0, -3.0]]
    for values in batches:
        got = negative_term(torch.tensor(values, dtype=torch.float64), c).item()
        assert got == pytest.approx(transcribed(values, c)), values


def test_training_is_written_as_named_steps():
    """No function in flowcore/training/train.py longer than about 80 lines: the loop reads as named steps (start,
    batches, log-likelihoods, the one distributed reduction, step, export)."""
    import ast
    from pathlib import Path

    import flowcore.training.train

    tree = ast.parse(Path(flowcore.training.train.__file__).read_text())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert max(lengths.values()) <= 85, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("arch", ["realnvp", "glow"])
def test_compiled_training_follows_the_eager_loss_curve(tiny_data, tmp_path, arch):
    """"compile": true differentiates torch.compile(model.log_prob): the same steps, the same losses and weights
    within float tolerance (Glow: ActNorm's data-dependent initialisation runs inside the compiled step)."""
    npz, _ = tiny_data
    model = dict(arch=arch, image_shape=[1, 8, 8], scales=2, hidden=8)
    model.update(blocks=1) if arch == "realnvp" else model.update(steps=2)
    # one step's gradient: the same weights and batch through eager and compiled log_prob (ActNorm initialised
    # from that batch in both)
    torch.manual_seed(0)
    eager = flowcore.build(model).train()
    compiled = copy.deepcopy(eager)
    v = (torch.randint(0, 256, (16, 1, 8, 8)).float() + 0.5) / 256
    grads = {}
    for key, fn, m in (("eager", eager.log_prob, eager), ("compiled", torch.compile(compiled.log_prob), compiled)):
        loss = -fn(v).mean()
        loss.backward()
        grads[key] = (float(loss.detach()), [p.grad.clone() for p in m.parameters()])
    assert grads["compiled"][0] == pytest.approx(grads["eager"][0], rel=1e-5)
    for g_eager, g_compiled in zip(grads["eager"][1], grads["compiled"][1], strict=True):
        assert torch.allclose(g_compiled, g_eager, rtol=1e-3, atol=1e-4 * float(g_eager.abs().max()) + 1e-6)
    # and a short training run: the same loss curve (Adam's normalised steps let single weights drift apart by
    # about the learning rate, so the curve, not each weight, is compared)
    curves = {}
    for on in (False, True):
        run = tmp_path / f"{arch}{on}"
        train(_cfg(npz, model=model, compile=on, log_every=1), run_dir=run, max_steps=8, progress=False)
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert any(e["event"] == "compile" for e in log) == on
        curves[on] = [e["bpd"] for e in log if e["event"] == "train"]
    assert len(curves[True]) == len(curves[False]) == 8
    assert curves[True] == pytest.approx(curves[False], abs=1e-3)
    assert curves[False][-1] < curves[False][0] - 0.1  # it trained: the comparison is not between two flat lines

def test_compile_is_validated():
    with pytest.raises(ValueError, match="compile must be true or false"):
        _cfg("x.npz", compile="yes")
    with pytest.raises(ValueError, match="negative training"):
        _cfg("x.npz", compile=True, negative=dict(dataset="mnist", threshold=-1e3))


def test_a_runs_thread_setting_does_not_leak_into_the_caller(tiny_data, tmp_path):
    """A config's ``threads`` holds during the run and is undone after it, finished or failed (a notebook or the
    dashboard that calls train() keeps its own setting)."""
    npz, _ = tiny_data
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []
    train(_cfg(npz, threads=wanted, epochs=1), run_dir=tmp_path / "a", export_dir=tmp_path / "ck", progress=False,
          on_epoch=lambda record, ll: seen.append(torch.get_num_threads()))
    assert seen == [wanted] and torch.get_num_threads() == before

    def fail(record, ll):
        raise RuntimeError("a failure in the middle of a run")

    with pytest.raises(RuntimeError):
        train(_cfg(npz, threads=wanted, epochs=1), run_dir=tmp_path / "b", progress=False, on_epoch=fail)
    assert torch.get_num_threads() == before


def test_tf32_is_off_during_gpu_work_only_and_restored_after(monkeypatch):
    """Process settings belong to the work, not to resolving a device: on a CUDA device every training, evaluation
    and scoring call runs with TF32 off (its 10-bit mantissa would move likelihoods), and torch's settings come
    back afterwards, also after a failure; on the CPU nothing is touched. (The flags are settable without a GPU.)"""
    from flowcore.ood.evaluate import evaluate
    from flowcore.ood.scoring import score_files
    from flowcore.ood.vectors import train_vectors
    from flowcore.training import distributed as dist
    from flowcore.training.train import train

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    torch_defaults = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = True
    monkeypatch.delenv("FLOWCORE_ALLOW_TF32", raising=False)
    try:
        _check_tf32_scoping(flags, monkeypatch, dist)
    finally:
        for f, value in zip(flags, torch_defaults, strict=True):
            f.allow_tf32 = value
    for entry in (train, evaluate, score_files, train_vectors):  # every entry point of work carries it
        assert entry.__wrapped__ is not None


def _check_tf32_scoping(flags, monkeypatch, dist) -> None:
    assert dist.resolve_device("cpu") == "cpu" and all(f.allow_tf32 for f in flags)
    seen = []

    @dist.float32_work
    def work(x, device="cpu"):
        seen.append([f.allow_tf32 for f in flags])
        if x == "fail":
            raise RuntimeError("failed mid-way")
        return x

    assert work(1, device="cuda:0") == 1 and work(2, "cuda") == 2 and work(3) == 3
    with pytest.raises(RuntimeError):
        work("fail", device="cuda")
    assert seen == [[False, False], [False, False], [True, True], [False, False]]
    assert all(f.allow_tf32 for f in flags)
    monkeypatch.setenv("FLOWCORE_ALLOW_TF32", "1")
    work(4, device="cuda")
    assert seen[-1] == [True, True]
