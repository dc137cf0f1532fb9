"""Issue 7: OOD scores, one sign convention, AUROC/percentile/threshold helpers."""

import numpy as np
import pytest
import torch
from conftest import perturb_

import flowcore
from flowcore.scores import (
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


def test_typicality_flags_a_batch_of_mnist_under_the_fashion_model(data_dir):
    from flowcore.checkpoints import list_checkpoints
    from flowcore.data import load_images
    from flowcore.evaluate import load_reference

    if "fashion_realnvp" not in list_checkpoints():
        pytest.skip("fashion_realnvp is not shipped yet")
    ref = load_reference("fashion_realnvp")
    if "train__likelihood" not in ref:
        pytest.skip("fashion_realnvp has no reference statistics yet")
    model = flowcore.load("fashion_realnvp")
    mnist = load_images("mnist", "test", data_dir)[:10]
    fashion = load_images("fashion_mnist", "test", data_dir)[-10:]
    _, p_mnist = typicality_batch_test(flowcore.log_likelihood_nats(model, mnist), ref["train__likelihood"],
                                       ref["test__likelihood"])
    _, p_fashion = typicality_batch_test(flowcore.log_likelihood_nats(model, fashion), ref["train__likelihood"],
                                         ref["test__likelihood"])
    assert p_mnist < 0.01 < p_fashion
