"""Dequantization, discrete log-likelihood and bits/dim: the one place for the convention.

For uint8 images ``k`` in {0..255}^D the flow models ``v = (k + u) / 256`` in (0, 1)^D, and::

    log P(k) = log p_model((k + u) / 256) - D log 256            (nats)
    bpd      = -log P(k) / (D log 2)

with ``u`` either uniform noise (seeded; averaged over ``n_draws`` estimates, each a lower bound
of log P(k)) or the fixed midpoint ``u = 1/2``. The paper's own code scales by 255 instead of 256
and so reports about log2(256/255) ~ 0.0056 bpd more for the same model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "as_image_tensor",
    "dequantize",
    "log_likelihood_nats",
    "bits_per_dim",
    "nats_to_bpd",
]

LOG_256 = math.log(256.0)


def as_image_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> uint8 tensor (N, C, H, W).

    A 4-d array whose last axis has 1 or 3 entries is read as channels-last.
    """
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got {t.dtype}")
    if t.dim() == 3:
        t = t[:, None]
    elif t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.dim() != 4:
        raise ValueError(f"expected a batch of images, got shape {tuple(t.shape)}")
    return t.contiguous()


def dequantize(
    images: Tensor, mode: str = "uniform", generator: torch.Generator | None = None, dtype=torch.float32
) -> Tensor:
    """uint8 (N, C, H, W) -> ``v = (k + u) / 256`` with ``u ~ U[0, 1)`` or ``u = 1/2``."""
    k = images.to(dtype)
    if mode == "midpoint":
        u = torch.full_like(k, 0.5)
    elif mode == "uniform":
        u = torch.rand(k.shape, generator=generator, dtype=dtype).to(k.device)
    else:
        raise ValueError(f"unknown dequantization {mode!r}")
    return (k + u) / 256.0


def nats_to_bpd(log_likelihood: Tensor | np.ndarray | float, dims: int) -> Tensor | np.ndarray | float:
    """bits/dim of a discrete log-likelihood in nats over ``dims`` dimensions."""
    return -log_likelihood / (dims * math.log(2.0))


@torch.no_grad()
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

    Deterministic given ``seed`` and ``batch_size``.
    ``progress`` is an optional callable taking the number of images done.
    """
    if n_draws < 1:
        raise ValueError("n_draws must be >= 1")
    x = as_image_tensor(images)
    dims = x[0].numel()
    out = np.empty(len(x), dtype=np.float64)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        total = torch.zeros(len(chunk), dtype=torch.float64)
        for j in range(n_draws):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + j * 7919 + start)
            v = dequantize(chunk, dequantization, gen, dtype).to(device)
            total += model.log_prob(v).double().cpu()
            if dequantization == "midpoint":
                total *= n_draws
                break
        out[start : start + len(chunk)] = (total / n_draws - dims * LOG_256).numpy()
        if progress is not None:
            progress(len(chunk))
    return out


def bits_per_dim(model: nn.Module, images: np.ndarray | Tensor, **kwargs) -> np.ndarray:
    """Per-image bits/dim (see :func:`log_likelihood_nats` for the options)."""
    x = as_image_tensor(images)
    return nats_to_bpd(log_likelihood_nats(model, x, **kwargs), x[0].numel())
