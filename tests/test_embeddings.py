"""Issue 18: the ImageNet-trained feature extractor (paper Sec. 8) works and is used as the paper describes."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite_pytorch", reason='needs pip install -e ".[embeddings]"')
skimage_data = pytest.importorskip("skimage.data")

from flowcore.data import embeddings  # noqa: E402

# ImageNet class indices: 281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug, 967 espresso, 968 cup
CATS, COFFEE = {281, 282, 285}, {504, 967, 968}


def test_imagenet_labels_of_real_photos_are_sensible():
    photos = np.stack([skimage_data.chelsea()[:300, :300], skimage_data.coffee()[:300, 100:400]])  # a cat, a cup
    top, probs = embeddings.classify(photos)
    assert len(CATS & set(top[0][:3])) >= 2, top[0]
    assert top[1][0] in COFFEE, top[1]
    assert probs[1][0] > 0.5


def test_features_are_1280_d_pooled_and_batch_independent():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    f = embeddings.extract(images, batch_size=2)
    assert f.shape == (5, embeddings.FEATURE_DIM) and f.dtype == np.float32 and np.isfinite(f).all()
    np.testing.assert_allclose(embeddings.extract(images[3:4]), f[3:4], atol=1e-4)
    # grayscale images are replicated to RGB, as the paper's pipeline does
    gray = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(embeddings.extract(gray), embeddings.extract(np.repeat(gray[..., None], 3, -1)),
                               atol=1e-5)


def test_preprocessing_matches_the_stated_recipe():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 255
    x = embeddings.preprocess(img[None])
    assert x.shape == (1, 3, 224, 224)
    # shorter side 40 -> 256 (width 512), centre crop 224: the white right half covers the right half of the crop
    assert x[0, :, :, :100].max() < -0.9 and x[0, :, :, 124:].min() > 0.9
    assert float(x.max()) == pytest.approx((255 - 127) / 128)
    with pytest.raises(ValueError, match="expected uint8 images"):
        embeddings.preprocess(np.zeros((1, 8, 8, 4), np.uint8))


def test_missing_packages_give_one_clear_line(monkeypatch):
    embeddings.load_extractor.cache_clear()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(embeddings.ExtractorMissing, match=r'pip install -e "\.\[embeddings\]"'):
        embeddings.load_extractor()
    embeddings.load_extractor.cache_clear()
