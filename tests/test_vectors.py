"""Issue 18: flows on image features (paper Sec. 8): cached extraction, training, evaluation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fake_extract

import flowcore
from flowcore.cli import main
from flowcore.data import embeddings
from flowcore.ood import vectors
from flowcore.ood.evaluate import load_reference

DIM = embeddings.FEATURE_DIM


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls = []

    def extract(images, batch_size=64, progress=None):
        calls.append(len(images))
        return fake_extract(images, batch_size, progress)

    monkeypatch.setattr(embeddings, "extract", extract)
    monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:8, :8]
    blobs = np.clip(200 * np.exp(-((yy - 4) ** 2 + (xx - 4) ** 2) / rng.uniform(2, 8, (300, 1, 1))) +
                    rng.normal(0, 5, (300, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "blobs.npz", x_train=blobs[:240], x_test=blobs[240:])
    np.savez(tmp_path / "noise.npz", x_test=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8))
    return tmp_path, calls


def _config(tmp_path) -> dict:
    return {"name": "blobs_embeddings", "features": embeddings.EXTRACTOR, "dataset": f"npz:{tmp_path / 'blobs.npz'}",
            "ood": [f"npz:{tmp_path / 'noise.npz'}"],
            "model": {"arch": "realnvp_tabular", "dim": DIM, "hidden": 32, "blocks": 1, "couplings": 4},
            "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 60, "epochs": 8,
            "warmup_steps": 2, "test_subset": None, "seed": 0}


def test_features_are_extracted_once_and_cached(fake):
    tmp_path, calls = fake
    first = vectors.dataset_features(f"npz:{tmp_path / 'blobs.npz'}", "test")
    again = vectors.dataset_features(f"npz:{tmp_path / 'blobs.npz'}", "test")
    assert calls == [60] and np.array_equal(first, again) and first.shape == (60, DIM)
    # a prefix is read from the same entry; a longer request embeds only the images not yet cached
    np.testing.assert_array_equal(vectors.dataset_features(f"npz:{tmp_path / 'blobs.npz'}", "test", limit=10),
                                  first[:10])
    assert calls == [60]
    (cache,) = (tmp_path / "cache" / "features").iterdir()
    np.savez(cache, features=first[:25])  # as if an earlier run had embedded only 25
    np.testing.assert_allclose(vectors.dataset_features(f"npz:{tmp_path / 'blobs.npz'}", "test"), first, atol=1e-6)
    assert calls == [60, 35]
    np.savez(cache, features=np.full((60, DIM), np.nan, dtype=np.float32))  # a damaged entry is recomputed
    np.testing.assert_allclose(vectors.dataset_features(f"npz:{tmp_path / 'blobs.npz'}", "test"), first, atol=1e-6)
    assert calls == [60, 35, 60]


def test_train_evaluate_and_score_a_flow_on_features(fake, capsys):
    tmp_path, _ = fake
    (tmp_path / "cfg.json").write_text(json.dumps(_config(tmp_path)))
    ck = tmp_path / "ck"
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run"), "--export", str(ck),
                 "--no-progress"]) == 0
    assert "nats/feature" in capsys.readouterr().out
    assert main(["evaluate", str(ck), "--train-subset", "100"]) == 0
    cfg = json.loads((ck / "config.json").read_text())
    ref = cfg["reference"]
    assert ref["counts"] == {"train": 100, "test": 60, "noise": 60}
    assert ref["auroc"]["likelihood"]["noise"] > 0.95  # the features of noise are far from those of blobs
    # the standardisation travels with the weights: the loaded flow takes raw extractor output
    model = flowcore.load(ck)
    raw = fake_extract(np.load(tmp_path / "blobs.npz")["x_test"])
    stored = load_reference(ck)["test__likelihood"]
    np.testing.assert_allclose(model.log_prob(torch.from_numpy(raw)).double().detach().numpy(), stored, rtol=1e-5)
    assert float(model.standardize.scale.min()) > 0 and float(model.standardize.mean.abs().max()) > 0


def test_vector_configs_are_checked(fake):
    from flowcore.training.train import TrainConfig

    tmp_path, _ = fake
    cfg = _config(tmp_path)
    with pytest.raises(ValueError, match="unknown features 'resnet'"):
        TrainConfig.from_dict({**cfg, "features": "resnet"})
    with pytest.raises(ValueError, match="realnvp_tabular with dim 1280"):
        TrainConfig.from_dict({**cfg, "model": {**cfg["model"], "dim": 10}})
    with pytest.raises(ValueError, match="trains on vectors: set features"):
        TrainConfig.from_dict({**cfg, "features": None})


def _trained_and_evaluated(tmp_path, ck):
    """The blobs feature flow trained and evaluated through the CLI, exported to ``ck``."""
    (tmp_path / "cfg.json").write_text(json.dumps(_config(tmp_path)))
    main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run"), "--export", str(ck),
          "--no-progress"])
    main(["evaluate", str(ck), "--train-subset", "100"])
    return ck


def test_score_command_on_a_feature_flow(fake, capsys):
    from PIL import Image

    tmp_path, _ = fake
    ck = _trained_and_evaluated(tmp_path, tmp_path / "ck")
    capsys.readouterr()
    blob = np.load(tmp_path / "blobs.npz")["x_test"][0]
    Image.fromarray(blob).convert("RGB").save(tmp_path / "blob.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "noise.png")
    (tmp_path / "broken.png").write_bytes(b"no")
    files = [str(tmp_path / n) for n in ("blob.png", "noise.png", "broken.png")]
    code = main(["score", str(ck), *files, "--format", "json", "--no-progress"])
    out, err = capsys.readouterr()
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out)}
    assert code == 1 and "broken.png" in err
    assert rows["blob.png"]["ood"] is False and rows["noise.png"]["ood"] is True and rows["blob.png"]["bpd"] == ""
    assert main(["score", str(ck), str(tmp_path / "blob.png"), "--score", "typicality"]) == 2


def test_embedding_likelihood_is_a_score_of_the_paired_pixel_flow(fake, capsys, monkeypatch):
    """`flowcore score PIXEL --score embedding_likelihood` gives each file exactly what the paired flow on features
    gives it (value, percentile, verdict against that flow's own test images); a pixel flow without a pair refuses."""
    from PIL import Image

    from flowcore.ood.evaluate import evaluate
    from flowcore.zoo.checkpoints import paired_feature_flow

    tmp_path, _ = fake
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(zoo))
    (tmp_path / "cfg.json").write_text(json.dumps(_config(tmp_path)))
    main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run"), "--export",
          str(zoo / "blobs_embeddings"), "--no-progress"])
    main(["evaluate", "blobs_embeddings", "--train-subset", "100"])
    blobs = f"npz:{tmp_path / 'blobs.npz'}"
    for name, dataset, shape in (("blobs_realnvp", blobs, [1, 8, 8]), ("noise_realnvp", "npz:elsewhere", [1, 8, 8]),
                                 ("blobs_wide", blobs, [1, 10, 10])):
        torch.manual_seed(0)
        pixel = flowcore.build({"arch": "realnvp", "image_shape": shape, "scales": 1, "hidden": 4, "blocks": 1})
        flowcore.save(pixel, zoo / name, name=name, dataset=dataset)
    evaluate("blobs_realnvp", ood=[f"npz:{tmp_path / 'noise.npz'}"], train_subset=20)
    assert paired_feature_flow("blobs_realnvp") == "blobs_embeddings"
    assert paired_feature_flow("noise_realnvp") is None  # another dataset
    assert paired_feature_flow("blobs_wide") is None  # another input size: the two flows would see other images
    assert paired_feature_flow("blobs_embeddings") is None  # a flow on features has no pair of its own

    x = np.load(tmp_path / "blobs.npz")["x_test"]
    for i in range(3):
        Image.fromarray(x[i]).save(tmp_path / f"b{i}.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "n.png")
    files = [str(tmp_path / n) for n in ("b0.png", "b1.png", "b2.png", "n.png")]
    capsys.readouterr()
    assert main(["score", "blobs_embeddings", *files, "--format", "json", "--no-progress"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["score", "blobs_realnvp", *files, "--format", "json", "--no-progress",
                 "--score", "embedding_likelihood", "--invert", "no"]) == 0
    paired = json.loads(capsys.readouterr().out)
    assert [r["score"] for r in paired] == ["embedding_likelihood"] * 4
    assert [r["value"] for r in paired] == [r["value"] for r in alone]
    assert [(r["percentile"], r["ood"]) for r in paired] == [(r["percentile"], r["ood"]) for r in alone]
    assert paired[-1]["ood"] is True and all(r["bpd"] != "" for r in paired)  # the pixel flow's own bpd too
    # both flows score the image the pixel flow sees: a light-bordered grey image inverted by --invert auto
    assert main(["score", "blobs_realnvp", files[-1], "--format", "json", "--no-progress",
                 "--score", "embedding_likelihood"]) == 0
    inverted = 255 - np.asarray(Image.open(files[-1]))
    want = vectors.image_log_likelihood(flowcore.load("blobs_embeddings"), inverted[None])[0]
    assert json.loads(capsys.readouterr().out)[0]["value"] == pytest.approx(float(want), abs=1e-4)
    assert main(["score", "noise_realnvp", files[0], "--score", "embedding_likelihood"]) == 2
    assert "no paired flow on image features" in capsys.readouterr().err


def test_cli_without_the_extractor_says_how_to_install_it(fake, capsys, monkeypatch):
    """Scoring with a flow on features where the optional extractor is not installed: one line naming the extra,
    exit 2, no traceback."""
    tmp_path, _ = fake
    ck = _trained_and_evaluated(tmp_path, tmp_path / "ck")
    from PIL import Image

    Image.fromarray(np.load(tmp_path / "blobs.npz")["x_test"][0]).save(tmp_path / "blob.png")

    def missing(*args, **kwargs):
        raise embeddings.ExtractorMissing('image embeddings need the optional packages: pip install -e ".[embeddings]"')

    monkeypatch.setattr(embeddings, "extract", missing)
    capsys.readouterr()
    assert main(["score", str(ck), str(tmp_path / "blob.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[embeddings]" in err and "Traceback" not in err


# ---- Issue 28: baselines on the same features, and feature flows trained against a validation set ----


def _whitening_config(tmp_path, **changes) -> dict:
    cfg = _config(tmp_path)
    cfg["model"] = {**cfg["model"], "whiten": True, "flow_dims": 16}
    return {**cfg, "validation_fraction": 0.25, "patience": 3, "epochs": 12, **changes}


def test_ledoit_wolf_and_the_gaussian_score_match_scikit_learn_and_numpy():
    """The whitening layer's Gaussian is scikit-learn's LedoitWolf fit, and its log-density is the Gaussian
    log-density written out in NumPy (Mahalanobis distance, log-determinant)."""
    from sklearn.covariance import LedoitWolf

    from flowcore.flows.bijectors import ledoit_wolf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 40)) @ rng.normal(size=(40, 40)) + rng.normal(size=40)
    mean, cov, shrinkage = ledoit_wolf(torch.from_numpy(x))
    lw = LedoitWolf().fit(x)
    assert shrinkage == pytest.approx(lw.shrinkage_, rel=1e-10) and 0 < shrinkage < 1
    np.testing.assert_allclose(cov.numpy(), lw.covariance_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean.numpy(), lw.location_, rtol=1e-12)

    flow = flowcore.build({"arch": "realnvp_tabular", "dim": 40, "hidden": 8, "blocks": 1, "couplings": 2,
                           "whiten": True, "flow_dims": 6})
    flow.standardize.fit(torch.from_numpy(x).float())
    test = rng.normal(size=(7, 40)) * 3
    diff = test - lw.location_
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(lw.covariance_), diff)
    want = -0.5 * (maha + np.linalg.slogdet(lw.covariance_)[1] + 40 * np.log(2 * np.pi))
    got = vectors.gaussian_log_likelihood(flow, test.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # the flow is exact: inverse(forward(x)) = x and its log-det is the autograd Jacobian's
    xt = torch.from_numpy(test).float()
    z, log_det = flow(xt)
    np.testing.assert_allclose(flow.inverse(z).detach().numpy(), test, atol=2e-4)
    from torch.autograd.functional import jacobian

    brute = torch.stack([torch.linalg.slogdet(jacobian(lambda a: flow(a[None])[0][0], xi))[1] for xi in xt])
    np.testing.assert_allclose(log_det.detach().numpy(), brute.numpy(), atol=2e-3)


def test_knn_score_matches_a_brute_force_search():
    from flowcore.ood.scores import knn_score

    rng = np.random.default_rng(1)
    bank_raw = rng.normal(size=(50, 12))
    bank = bank_raw / np.linalg.norm(bank_raw, axis=1, keepdims=True)
    queries = rng.normal(size=(9, 12)) * rng.uniform(0.1, 10, (9, 1))
    for k in (1, 3, 50):
        want = []
        for q in queries:
            u = q / np.linalg.norm(q)
            distances = sorted(float(np.sqrt(((u - b) ** 2).sum())) for b in bank)
            want.append(-distances[k - 1])
        np.testing.assert_allclose(knn_score(queries, bank, k), want, atol=1e-9)
    with pytest.raises(ValueError, match="k must be in 1..50"):
        knn_score(queries, bank, 51)


def test_a_whitening_flow_trains_against_validation_and_stores_its_baselines(fake, capsys):
    """validation_fraction holds vectors out; the exported weights are the epoch with the best validation NLL (read
    back from the card's curve); patience stops the run; the k-NN bank and the Gaussian travel with the flow; the
    evaluation stores all three scores and the CLI scores each."""
    from PIL import Image

    from flowcore.ood.scores import knn_score

    tmp_path, _ = fake
    (tmp_path / "cfg.json").write_text(json.dumps(_whitening_config(tmp_path, patience=2, epochs=40, lr=3e-3)))
    ck = tmp_path / "ck"
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run"), "--export", str(ck),
                 "--no-progress"]) == 0
    cfg = json.loads((ck / "config.json").read_text())
    training = cfg["training"]
    curve = training["curve"]
    val = [p["validation_nll_per_dim"] for p in curve]
    assert training["validation"]["selected_epoch"] == curve[int(np.argmin(val))]["epoch"]
    assert curve[0]["epoch"] == 0 and len(curve) == training["epochs_completed"] + 1  # epoch 0: the Gaussian
    assert training["validation"]["vectors"] == 60 and training["train_images"] == 180
    if training["stopped_by"] == "patience":
        assert curve[-1]["epoch"] - training["validation"]["selected_epoch"] == 2
    # the exported weights are the selected epoch's: its test NLL is the card's metric
    best = curve[training["validation"]["selected_epoch"]]
    assert cfg["metrics"]["test_nll_per_dim"] == pytest.approx(best["test_nll_per_dim"], abs=1e-5)
    assert cfg["knn"] == {"k": 1, "bank": 180, "metric": "euclidean, unit-length features"}

    assert main(["evaluate", str(ck), "--train-subset", "100"]) == 0
    ref = load_reference(ck)
    scorer = vectors.load_feature_scorer(ck)
    raw = fake_extract(np.load(tmp_path / "blobs.npz")["x_test"])
    np.testing.assert_allclose(ref["test__embedding_knn"], knn_score(raw, scorer.knn_bank, 1), rtol=1e-6)
    np.testing.assert_allclose(ref["test__embedding_gaussian"], vectors.gaussian_log_likelihood(scorer.flow, raw),
                               rtol=1e-6)
    auroc = json.loads((ck / "config.json").read_text())["reference"]["auroc"]
    assert set(auroc) == {"likelihood", "embedding_gaussian", "embedding_knn"}
    assert auroc["embedding_gaussian"]["noise"] > 0.95 and auroc["embedding_knn"]["noise"] > 0.95

    Image.fromarray(np.load(tmp_path / "blobs.npz")["x_test"][0]).convert("RGB").save(tmp_path / "blob.png")
    capsys.readouterr()
    for score in ("embedding_gaussian", "embedding_knn"):
        assert main(["score", str(ck), str(tmp_path / "blob.png"), "--score", score, "--format", "json",
                     "--no-progress"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        value = scorer.score(fake_extract(np.asarray(Image.open(tmp_path / "blob.png"))[None]))[score][0]
        assert row["score"] == score and row["value"] == pytest.approx(float(value), abs=1e-4)


def test_feature_training_runs_in_the_one_loop_and_a_resumed_run_is_bit_identical(fake, capsys):
    """Flows on vectors train in the pixel flows' loop: ``--max-steps`` stops with the state saved and nothing
    exported, ``--resume`` continues it, and the resumed run exports exactly the uninterrupted run's weights,
    curve and selected epoch; a fresh run into a used folder is refused like a pixel run's."""
    from safetensors.torch import load_file

    tmp_path, _ = fake
    (tmp_path / "cfg.json").write_text(json.dumps(_whitening_config(tmp_path)))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run_whole"), "--export",
                 str(whole), "--no-progress"]) == 0
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run_parts"), "--export",
                 str(parts), "--no-progress", "--max-steps", "5"]) == 0
    assert "state saved, continue with --resume" in capsys.readouterr().out
    assert not parts.exists() and (tmp_path / "run_parts" / "state.pt").is_file()
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run_parts"), "--export",
                 str(parts), "--no-progress"]) == 2  # a fresh run over a saved one: refused, one line
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "cfg.json"), "--run-dir", str(tmp_path / "run_parts"), "--export",
                 str(parts), "--no-progress", "--resume"]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (json.loads((d / "config.json").read_text())["training"] for d in (whole, parts))
    assert ta["curve"] == tb["curve"] and ta["validation"] == tb["validation"]
    assert ta["images_seen"] == tb["images_seen"] and ta["stopped_by"] == tb["stopped_by"]
    events = [json.loads(line)["event"] for line in (tmp_path / "run_parts" / "log.jsonl").open()]
    assert events.count("start") == 1 and "resume" in events and events[-1] == "export"


def test_an_old_feature_flow_without_baselines_says_so(fake, capsys):
    """A feature flow trained before the baselines (per-feature standardisation, no bank) refuses them with the
    reason instead of scoring something else."""
    from PIL import Image

    tmp_path, _ = fake
    ck = _trained_and_evaluated(tmp_path, tmp_path / "ck")
    (ck / "knn.safetensors").unlink()
    Image.fromarray(np.load(tmp_path / "blobs.npz")["x_test"][0]).save(tmp_path / "blob.png")
    capsys.readouterr()
    for score in ("embedding_gaussian", "embedding_knn"):
        assert main(["score", str(ck), str(tmp_path / "blob.png"), "--score", score]) == 2
        assert f"stores no {score} baseline" in capsys.readouterr().err
