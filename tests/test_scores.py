"""Issue 7: OOD scores, one sign convention, AUROC/percentile/threshold helpers."""

import numpy as np
import pytest
import torch
from conftest import perturb_

import flowcore
from flowcore.ood.scores import (
    WEBP_METHOD,
    auroc,
    compressed_bits,
    compute_scores,
    ood_threshold,
    percentile_of,
    typicality_batch_test,
)


def test_compressed_bits_orders_simple_below_noisy_images():
    rng = np.random.default_rng(0)
    flat = np.full((2, 28, 28), 7, np.uint8)
    noise = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    for codec in ("png", "webp"):
        bits_flat, bits_noise = compressed_bits(flat, codec), compressed_bits(noise, codec)
        assert (bits_flat < bits_noise / 5).all()
        # lossless: noise cannot be compressed below ~8 bits per pixel by much
        assert (bits_noise > 0.9 * 8 * 784).all()


def test_compute_scores_signs_and_decomposition():
    model = perturb_(flowcore.build(dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=4, blocks=1)))
    model.eval()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    ref = {"train__likelihood": np.array([-300.0, -310.0])}
    bg = perturb_(flowcore.build(dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=4, blocks=1)), seed=3)
    s = compute_scores(model, x, reference=ref, background=bg.eval())
    ll = flowcore.log_likelihood_nats(model, x)
    np.testing.assert_allclose(s["likelihood"], ll)
    np.testing.assert_allclose(s["typicality"], -np.abs(ll + 305.0))
    np.testing.assert_allclose(s["likelihood_ratio"], ll - flowcore.log_likelihood_nats(bg.eval(), x))
    np.testing.assert_allclose(s["log_det"] + s["scale_0"] + s["scale_1"] - 64 * np.log(256), ll, atol=1e-6)
    np.testing.assert_allclose(s["last_scale"], s["scale_1"])
    np.testing.assert_allclose(s["complexity_png"], -(s["bpd"] - compressed_bits(x, "png") / 64))
    # without reference/background those scores are absent rather than wrong
    s2 = compute_scores(model, x)
    assert "typicality" not in s2 and "likelihood_ratio" not in s2


def test_auroc_percentile_threshold():
    inside, outside = np.array([3.0, 4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.5])
    assert auroc(inside, outside) == pytest.approx(11 / 12)
    assert auroc(outside, inside) == pytest.approx(1 / 12)
    with pytest.raises(ValueError):
        auroc(inside, np.array([np.nan]))
    np.testing.assert_allclose(percentile_of(np.array([0.0, 4.5, 10.0]), inside), [0, 50, 100])
    ref = np.arange(100.0)
    thr = ood_threshold(ref, 0.05)
    assert np.mean(ref < thr) == pytest.approx(0.05, abs=0.011)


def test_typicality_batch_test_separates_shifted_batches():
    rng = np.random.default_rng(0)
    train = rng.normal(-1000, 30, 5000)
    test = rng.normal(-1000, 30, 2000)
    # in-distribution batches are rejected at about the nominal rate; batches that are *more* likely than
    # the training data (as MNIST under a Fashion-MNIST model) are rejected every time
    p_same = [typicality_batch_test(rng.normal(-1000, 30, 20), train, test, n_boot=500, seed=i)[1] for i in range(40)]
    p_shift = [typicality_batch_test(rng.normal(-950, 30, 20), train, test, n_boot=500, seed=i)[1] for i in range(40)]
    assert np.mean(np.array(p_same) < 0.05) < 0.2
    assert np.max(p_shift) < 0.01


def test_scores_do_not_depend_on_threads_or_batching_of_calls():
    model = perturb_(flowcore.build(dict(arch="glow", image_shape=[1, 8, 8], scales=2, steps=1, hidden=4))).eval()
    x = np.random.default_rng(2).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    a = compute_scores(model, x)
    torch.set_num_threads(1)
    b = compute_scores(model, x)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_compression_length_is_the_encoded_size_and_decodes_back():
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for images in (gray, rgb):
        for codec, fmt in (("png", "PNG"), ("webp", "WEBP")):
            bits = compressed_bits(images, codec)
            for img, b in zip(images, bits, strict=True):
                buf = io.BytesIO()
                kw = {"optimize": True, "compress_level": 9} if fmt == "PNG" else {
                    "lossless": True, "quality": 100, "method": WEBP_METHOD}
                Image.fromarray(img).save(buf, format=fmt, **kw)
                assert b == 8 * len(buf.getvalue())
                decoded = Image.open(io.BytesIO(buf.getvalue()))
                if img.ndim == 2:  # WebP stores grayscale as RGB with equal channels
                    decoded = decoded.convert("L")
                assert np.array_equal(np.asarray(decoded), img)


def test_typicality_p_values_are_uniform_in_distribution():
    rng = np.random.default_rng(7)
    train, test = rng.normal(-1000, 30, 4000), rng.normal(-1000, 30, 4000)
    p = [typicality_batch_test(rng.normal(-1000, 30, 25), train, test, n_boot=400, seed=i)[1] for i in range(100)]
    assert np.mean(np.array(p) < 0.05) < 0.10
    assert 0.3 < np.mean(p) < 0.7


def test_typicality_flags_a_batch_of_mnist_under_the_fashion_model():
    """On the bundled test images (no data folder needed): 10 digits are an atypical batch, 10 garments are not."""
    from flowcore.data.datasets import load_examples
    from flowcore.ood.evaluate import load_reference
    from flowcore.zoo.checkpoints import list_checkpoints

    if "fashion_realnvp" not in list_checkpoints():
        pytest.skip("fashion_realnvp is not shipped yet")
    ref = load_reference("fashion_realnvp")
    if "train__likelihood" not in ref:
        pytest.skip("fashion_realnvp has no reference statistics yet")
    model = flowcore.load("fashion_realnvp")
    mnist = load_examples("mnist")[:10]
    fashion = load_examples("fashion_mnist")[-10:]
    _, p_mnist = typicality_batch_test(flowcore.log_likelihood_nats(model, mnist), ref["train__likelihood"],
                                       ref["test__likelihood"])
    _, p_fashion = typicality_batch_test(flowcore.log_likelihood_nats(model, fashion), ref["train__likelihood"],
                                         ref["test__likelihood"])
    assert p_mnist < 0.01 < p_fashion


# ---------------------------------------------------------------- issue 16: one score per image, no NaN verdicts


def _tiny_checkpoint(root, seed: int = 0):
    """A 1x8x8 checkpoint with reference statistics computed by the same code the CLI uses."""
    from flowcore.zoo.checkpoints import save

    arch = dict(arch="realnvp", image_shape=[1, 8, 8], scales=2, hidden=4, blocks=1)
    model = perturb_(flowcore.build(arch), seed=seed)
    model.eval()
    folder = save(model, root / "ck", name="ck", dataset="npz:none", reference={"n_draws": 2, "seed": 7})
    rng = np.random.default_rng(seed)
    ref_images = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    ll = flowcore.log_likelihood_nats(model, ref_images, n_draws=2, seed=7)
    np.savez(folder / "reference.npz", train__likelihood=ll[:20], test__likelihood=ll[20:])
    return folder, model


def _write_pngs(folder, images):
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, a in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def test_score_is_a_function_of_the_image_alone(tmp_path):
    from flowcore.ood.scoring import score_files

    ck, model = _tiny_checkpoint(tmp_path)
    images = np.random.default_rng(5).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    paths = _write_pngs(tmp_path / "imgs", images)
    twin = tmp_path / "twin.png"
    twin.write_bytes(paths[3].read_bytes())
    rows, failures = score_files(ck, [*paths, twin], invert="no", batch_size=16)
    assert failures == []
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(twin)]["log_likelihood_nats"] == by_path[str(paths[3])]["log_likelihood_nats"]
    reversed_rows, _ = score_files(ck, paths[::-1], invert="no", batch_size=7)
    for r in reversed_rows:
        assert r == by_path[r["path"]]
    # and equal to the library on one image alone, with the reference's draws and seed (as the app scores)
    alone = flowcore.log_likelihood_nats(model, images[10:11], n_draws=2, seed=7)[0]
    assert by_path[str(paths[10])]["log_likelihood_nats"] == round(float(alone), 4)


def test_nan_weights_and_reference_are_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from flowcore.ood.evaluate import load_reference
    from flowcore.zoo.checkpoints import CheckpointError

    ck, _ = _tiny_checkpoint(tmp_path)
    state = load_file(str(ck / "model.safetensors"))
    bn = next(k for k in state if k.endswith("running_var"))
    state[bn][0] = float("nan")
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{bn}' holds non-finite"):
        flowcore.load(ck)

    ref = dict(np.load(ck / "reference.npz"))
    ref["test__likelihood"][3] = np.nan
    np.savez(ck / "reference.npz", **ref)
    with pytest.raises(CheckpointError, match="'test__likelihood' holds 1 non-finite"):
        load_reference(ck)
    np.savez(ck / "reference.npz", test__likelihood=np.array([]))
    with pytest.raises(CheckpointError, match="non-empty 1-d array of numbers"):
        load_reference(ck)
    np.savez(ck / "reference.npz", test__likelihood=np.array(["a", "b"]))
    with pytest.raises(CheckpointError, match="non-empty 1-d array of numbers"):
        load_reference(ck)


def test_zip_bomb_reference_is_refused_before_inflating(tmp_path):
    import zipfile

    from flowcore.ood.evaluate import load_reference
    from flowcore.zoo.checkpoints import CheckpointError

    ck, _ = _tiny_checkpoint(tmp_path)
    header = {"descr": "<f8", "fortran_order": False, "shape": (40_000_000,)}
    with zipfile.ZipFile(ck / "reference.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("test__likelihood.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(8_000_000)
            for _ in range(40):
                f.write(chunk)
    assert (ck / "reference.npz").stat().st_size < 2_000_000
    with pytest.raises(CheckpointError, match="would unpack to 320 MB"):
        load_reference(ck)


def test_non_finite_score_is_an_error_row_never_a_verdict(tmp_path, monkeypatch):
    import flowcore.ood.scoring as scores_module
    from flowcore.ood.scoring import score_files

    ck, _ = _tiny_checkpoint(tmp_path)
    paths = _write_pngs(tmp_path / "imgs", np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    real = scores_module.compute_scores

    def one_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out["likelihood"][1] = np.nan
        return out

    monkeypatch.setattr(scores_module, "compute_scores", one_nan)
    rows, failures = score_files(ck, paths, invert="no")
    assert [r["path"] for r in rows] == [str(paths[0]), str(paths[2])]
    assert failures == [(str(paths[1]), "non-finite likelihood score (nan)")]


def test_score_files_refuses_bad_batch_size_and_empty_input(tmp_path):
    from flowcore.ood.scoring import score_files

    ck, _ = _tiny_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="batch size must be a whole number >= 1"):
        score_files(ck, [tmp_path], batch_size=0)
    with pytest.raises(ValueError, match="no image files found"):
        score_files(ck, [tmp_path / "empty"])


def test_auroc_equals_sklearn_with_ties_and_needs_both_sets():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 6, rng.integers(1, 40)).astype(float)  # many ties
        b = rng.integers(0, 6, rng.integers(1, 40)).astype(float)
        assert auroc(a, b) == pytest.approx(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]),
                                            abs=1e-12)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        auroc(np.array([1.0]), np.array([]))


def test_one_verdict_function_refuses_nan():
    from flowcore.ood.scores import is_ood, verdict

    assert is_ood(-5.0, -4.0) and not is_ood(-3.0, -4.0)
    assert verdict(-5.0, -4.0) == "OOD" and verdict(-3.0, -4.0) == "in-distribution"
    with pytest.raises(ValueError, match="non-finite score"):
        is_ood(float("nan"), -4.0)


def test_judge_agrees_with_counting_and_numpy_quantile():
    """Issue 30: the one verdict service, checked against a computation of its own: the percentile by counting the
    reference values strictly below, the threshold by np.quantile, the verdict by comparing with it."""
    from flowcore.ood.verdicts import IN_DISTRIBUTION, OOD, Judge, Verdict, judge_for

    rng = np.random.default_rng(30)
    for _ in range(20):
        ref = rng.integers(-50, 50, rng.integers(1, 300)).astype(float)  # ties, and values equal to the reference
        fpr = float(rng.uniform(0.01, 0.5))
        judge = Judge(rng.permutation(ref), fpr)  # the order of the reference does not matter
        values = np.r_[rng.uniform(-60, 60, 40), ref[:10]]
        assert judge.threshold == pytest.approx(float(np.quantile(ref, fpr)), abs=1e-12)
        counted = np.array([100.0 * np.count_nonzero(ref < v) / len(ref) for v in values])
        np.testing.assert_allclose(judge.percentile(values), counted, atol=1e-12)
        for v, pct in zip(values, counted, strict=True):
            judged = judge.judge(v)
            assert isinstance(judged, Verdict) and isinstance(judged.ood, bool)
            assert judged.percentile == pytest.approx(pct, abs=1e-12)
            assert judged.ood == (v < np.quantile(ref, fpr)) == judge.is_ood(v)
            assert judged.words == (OOD if judged.ood else IN_DISTRIBUTION)
            assert (judged.value, judged.threshold, judged.fpr) == (float(v), judge.threshold, fpr)
    # at a threshold read from many distinct values, about an fpr share of the reference itself is flagged
    ref = rng.normal(size=10_000)
    assert np.mean([Judge(ref, 0.1).is_ood(v) for v in ref]) == pytest.approx(0.1, abs=0.002)
    # built from a checkpoint's reference dict: the in-distribution test values of that score
    reference = {"train__likelihood": ref + 5, "test__likelihood": ref, "test__typicality": -np.abs(ref)}
    assert judge_for(reference, "typicality", 0.2).threshold == pytest.approx(np.quantile(-np.abs(ref), 0.2))
    assert judge_for(reference, "likelihood").fpr == 0.05  # `flowcore score`'s default


def test_every_verdict_reads_from_the_one_service():
    """The old helpers of flowcore.ood.scores are the service's own functions, and the CSV rows of
    ``flowcore score`` carry the service's percentile and verdict."""
    import flowcore.ood.scores as scores
    from flowcore.ood import verdicts
    from flowcore.ood.scores import result_rows

    for fn in ("ood_threshold", "percentile_of", "is_ood", "verdict"):
        assert getattr(scores, fn) is getattr(verdicts, fn), fn
    rng = np.random.default_rng(3)
    reference = {"test__likelihood": rng.normal(-1000, 30, 500)}
    ll = np.r_[rng.normal(-1000, 60, 7), np.nan]
    rows = result_rows([f"{i}.png" for i in range(8)], {"likelihood": ll, "bpd": -ll}, "likelihood", reference, 0.1)
    judge = verdicts.judge_for(reference, "likelihood", 0.1)
    for row, value in zip(rows[:7], ll, strict=False):
        assert row["ood"] == bool(value < np.quantile(reference["test__likelihood"], 0.1)) == judge.judge(value).ood
        assert row["percentile"] == round(100 * np.mean(reference["test__likelihood"] < value), 2)
    assert rows[7] == {"path": "7.png", "error": "non-finite likelihood score (nan)"}


def test_judge_refuses_nan_and_a_reference_it_cannot_read():
    from flowcore.ood.verdicts import Judge, judge_for, percentile_of

    judge = Judge(np.arange(10.0), 0.05)
    for bad in (float("nan"), float("inf"), -float("inf"), np.float32("nan")):
        with pytest.raises(ValueError, match="non-finite score"):
            judge.judge(bad)
        with pytest.raises(ValueError, match="non-finite score"):
            judge.is_ood(bad)
    # a NaN has no percentile either (np.searchsorted would put it past every value: the 100th percentile)
    assert np.isnan(judge.percentile(float("nan")))
    np.testing.assert_array_equal(np.isnan(judge.percentile([1.5, np.nan, -np.inf])), [False, True, True])
    assert np.isnan(percentile_of(np.nan, np.arange(10.0)))
    with pytest.raises(ValueError, match="non-finite"):
        Judge(np.array([1.0, np.nan, 3.0]))  # its threshold would be NaN: every verdict "in-distribution"
    with pytest.raises(ValueError, match="at least one"):
        Judge(np.array([]))
    for fpr in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="fpr must be in"):
            Judge(np.arange(10.0), fpr)
    with pytest.raises(ValueError, match=r"no in-distribution test scores for 'typicality' \(no 'test__typicality'"):
        judge_for({"test__likelihood": np.arange(3.0), "train__typicality": np.arange(3.0)}, "typicality")
    with pytest.raises(AttributeError):
        judge.threshold = 0.0  # frozen: a page cannot move the threshold it was given
    with pytest.raises(ValueError):
        judge.reference[0] = 99.0  # nor the reference under it


def test_no_dashboard_page_computes_a_verdict_itself():
    """Every page reads its thresholds, percentiles and verdicts from flowcore.ood.verdicts (issue 30)."""
    import re
    from pathlib import Path

    views = Path(__file__).resolve().parent.parent / "app" / "views"
    own = re.compile(r"ood_threshold|percentile_of|quantile\(|searchsorted|(?<![.\w])(is_ood|verdict)\(")
    pages = sorted(views.glob("*.py"))
    assert {"score.py", "perturb.py", "features.py", "compare.py"} <= {p.name for p in pages}
    for page in pages:
        found = own.search(page.read_text())
        assert found is None, f"{page.name} computes {found.group(0)} itself instead of asking flowcore.ood.verdicts"
