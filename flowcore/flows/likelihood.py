"""Dequantization, discrete log-likelihood and bits/dim: the one place for the convention.

For uint8 images ``k`` in {0..255}^D the flow models ``v = (k + u) / 256`` in (0, 1)^D, and::

    log P(k) = log p_model((k + u) / 256) - D log 256            (nats)
    bpd      = -log P(k) / (D log 2)

with ``u`` either uniform noise (seeded; averaged over ``n_draws`` estimates, each a lower bound
of log P(k)) or the fixed midpoint ``u = 1/2``. The paper's own code scales by 255 instead of 256
and so reports about log2(256/255) ~ 0.0056 bpd more for the same model.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import Tensor, nn

from .layout import to_batch

__all__ = [
    "as_image_tensor",
    "dequantize",
    "image_seed",
    "per_image_noise",
    "log_likelihood_nats",
    "log_likelihood_terms",
    "bits_per_dim",
    "nats_to_bpd",
]

LOG_256 = math.log(256.0)


def as_image_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> uint8 tensor (N, C, H, W) (layout rule:
    :func:`flowcore.flows.layout.to_batch`)."""
    t = to_batch(images)
    if t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got {t.dtype}")
    return t


def dequantize(
    images: Tensor,
    mode: str = "uniform",
    generator: torch.Generator | None = None,
    dtype=torch.float32,
    noise: Tensor | None = None,
) -> Tensor:
    """uint8 (N, C, H, W) -> ``v = (k + u) / 256`` with ``u ~ U[0, 1)`` (from ``generator``, or the given
    ``noise``) or ``u = 1/2`` (``mode="midpoint"``)."""
    k = images.to(dtype)
    if mode == "midpoint":
        u = torch.full_like(k, 0.5)
    elif mode == "uniform":
        u = noise.to(dtype) if noise is not None else torch.rand(k.shape, generator=generator, dtype=dtype)
        u = u.to(k.device)
    else:
        raise ValueError(f"unknown dequantization {mode!r}")
    return (k + u) / 256.0


def image_seed(image: Tensor | np.ndarray, seed: int, draw: int) -> int:
    """A 63-bit generator seed from an image's pixels and shape, ``seed`` and ``draw``.

    Keyed by content, never by position: the same image gets the same noise alone, in any batch, at any
    position, in the app, the CLI and under torchrun; two different images get unrelated noise.
    """
    a = np.ascontiguousarray(image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image))
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.dtype.str}|{a.shape}|{int(seed)}|{int(draw)}|".encode())
    h.update(a.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def per_image_noise(images: Tensor, seed: int, draw: int, dtype=torch.float32) -> Tensor:
    """Uniform noise in [0, 1) shaped like ``images`` (N, C, H, W), draw ``draw``.

    Each image's noise depends only on ``(its pixels and shape, seed, draw)`` (:func:`image_seed`), so a
    score is a function of the image and the checkpoint: never of the other images in the call, their order
    or how the set is split into batches, processes or single-image calls.
    """
    out = torch.empty(images.shape, dtype=dtype)
    for r in range(len(images)):
        g = torch.Generator().manual_seed(image_seed(images[r], seed, draw))
        out[r] = torch.rand(tuple(images.shape[1:]), generator=g, dtype=dtype)
    return out


def nats_to_bpd(log_likelihood: Tensor | np.ndarray | float, dims: int) -> Tensor | np.ndarray | float:
    """bits/dim of a discrete log-likelihood in nats over ``dims`` dimensions."""
    return -log_likelihood / (dims * math.log(2.0))


@torch.no_grad()
def log_likelihood_terms(
    model: nn.Module,
    images: np.ndarray | Tensor,
    n_draws: int = 1,
    seed: int = 0,
    dequantization: str = "uniform",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress=None,
) -> dict[str, np.ndarray]:
    """Per-image terms of the discrete log-likelihood, each averaged over ``n_draws`` draws.

    ``log_likelihood`` (N,) = ``log_det`` (N,) + ``prior_by_scale.sum(1)`` - D log 256, where
    ``prior_by_scale`` (N, S) is log N(z; 0, I) summed over the latents factored out at each scale
    (``log_det`` includes the logit preprocessing and the 1/256 scaling is the - D log 256).
    Deterministic given ``seed``: each image's noise is seeded by its own pixels, ``seed`` and the draw
    (:func:`per_image_noise`), so a row never depends on the other images, their order or the batching.
    ``progress`` is called with each batch's size.
    """
    from .models import latent_scale_map

    if n_draws < 1:
        raise ValueError("n_draws must be >= 1")
    x = as_image_tensor(images)
    if len(x) == 0:
        raise ValueError("empty batch: no images to score")
    expected = getattr(getattr(model, "config", None), "image_shape", None)
    if expected is not None and list(x.shape[1:]) != list(expected):
        raise ValueError(f"model expects images of shape {list(expected)} (C, H, W), got {list(x.shape[1:])}")
    dims = x[0].numel()
    scale_map = latent_scale_map(model).to(device)
    n_scales = int(scale_map.max()) + 1
    out = {
        "log_likelihood": np.empty(len(x)),
        "log_det": np.empty(len(x)),
        "prior_by_scale": np.empty((len(x), n_scales)),
    }
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    draws = 1 if dequantization == "midpoint" else n_draws
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        log_det = torch.zeros(len(chunk), dtype=torch.float64)
        prior = torch.zeros(len(chunk), n_scales, dtype=torch.float64)
        for j in range(draws):
            noise = None
            if dequantization == "uniform":
                noise = per_image_noise(chunk, seed, j, dtype)
            v = dequantize(chunk, dequantization, dtype=dtype, noise=noise).to(device)
            z, ld = model(v)
            log_det += ld.double().cpu()
            per_latent = -0.5 * z.double().pow(2) - 0.5 * math.log(2 * math.pi)
            for s in range(n_scales):
                prior[:, s] += (per_latent * (scale_map == s)).flatten(1).sum(1).cpu()
        sl = slice(start, start + len(chunk))
        out["log_det"][sl] = (log_det / draws).numpy()
        out["prior_by_scale"][sl] = (prior / draws).numpy()
        out["log_likelihood"][sl] = out["log_det"][sl] + out["prior_by_scale"][sl].sum(1) - dims * LOG_256
        if progress is not None:
            progress(len(chunk))
    return out


def log_likelihood_nats(
    model: nn.Module,
    images: np.ndarray | Tensor,
    n_draws: int = 1,
    seed: int = 0,
    dequantization: str = "uniform",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress=None,
) -> np.ndarray:
    """Per-image discrete log-likelihood ``log P(k)`` in nats (float64 array of length N).

    Uniform dequantization averages ``n_draws`` seeded estimates (each a lower bound of log P(k));
    deterministic given ``seed``, and a function of each image alone (see :func:`log_likelihood_terms`).
    """
    return log_likelihood_terms(
        model, images, n_draws, seed, dequantization, batch_size, device, progress
    )["log_likelihood"]


def bits_per_dim(model: nn.Module, images: np.ndarray | Tensor, **kwargs) -> np.ndarray:
    """Per-image bits/dim (see :func:`log_likelihood_nats` for the options)."""
    x = as_image_tensor(images)
    return nats_to_bpd(log_likelihood_nats(model, x, **kwargs), x[0].numel())
