"""Image layouts: the one place that reads any accepted arrangement of an image's axes.

The flows compute on batches ``(N, C, H, W)``; files, PIL and plots want channels last with a single channel
dropped (``(H, W)`` or ``(H, W, 3)``). Every conversion between the two goes through these three functions, so a
rule (which axis is the channel axis when a shape is ambiguous) is decided once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_batch", "to_channels_last", "to_picture"]

CHANNEL_COUNTS = (1, 3)


def _tensor(images: np.ndarray | Tensor) -> Tensor:
    if isinstance(images, Tensor):
        return images.detach()
    images = np.ascontiguousarray(images)
    # a read-only array (a cached, shared one) is copied: a tensor on its memory could be written through
    return torch.as_tensor(images if images.flags.writeable else images.copy())


def to_batch(images: np.ndarray | Tensor, image_shape: tuple[int, int, int] | list[int] | None = None) -> Tensor:
    """Any accepted layout -> contiguous tensor ``(N, C, H, W)``, dtype unchanged.

    Without ``image_shape`` the input is a batch: ``(N, H, W)`` is one channel, and a 4-d array whose last axis has 1
    or 3 entries (and whose second has not) is channels-last. With the model's ``image_shape`` a single image is
    accepted too (``(H, W)``, ``(C, H, W)``, ``(H, W, C)``), and the result must have exactly that shape per image.
    """
    t = _tensor(images)
    shape = tuple(t.shape)
    if image_shape is None:
        if t.dim() == 3:
            t = t[:, None]
        elif t.dim() == 4 and shape[-1] in CHANNEL_COUNTS and shape[1] not in CHANNEL_COUNTS:
            t = t.permute(0, 3, 1, 2)
        if t.dim() != 4:
            raise ValueError(f"expected a batch of images, got shape {shape}")
        return t.contiguous()
    c, h, w = (int(s) for s in image_shape)
    if t.dim() == 2 and shape == (h, w) and c == 1:
        t = t[None, None]
    elif t.dim() == 3:
        if shape == (c, h, w):
            t = t[None]
        elif shape == (h, w, c):
            t = t.permute(2, 0, 1)[None]
        elif c == 1 and shape[1:] == (h, w):
            t = t[:, None]
    elif t.dim() == 4 and shape[1:] != (c, h, w) and shape[1:] == (h, w, c):
        t = t.permute(0, 3, 1, 2)
    if t.dim() != 4 or tuple(t.shape[1:]) != (c, h, w):
        raise ValueError(f"images of shape {shape} do not match the model's image shape {[c, h, w]}")
    return t.contiguous()


def to_channels_last(images: np.ndarray | Tensor,
                     image_shape: tuple[int, int, int] | list[int] | None = None) -> np.ndarray:
    """Any accepted layout (see :func:`to_batch`) -> array ``(N, H, W)`` for one channel, else ``(N, H, W, C)``."""
    x = to_batch(images, image_shape).permute(0, 2, 3, 1).contiguous().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def to_picture(image: np.ndarray | Tensor) -> np.ndarray:
    """One image ``(C, H, W)``, ``(H, W, C)`` or ``(H, W)`` -> ``(H, W)`` or ``(H, W, 3)``, for drawing or saving.

    A 3-d array is channels-first when its first axis has 1 or 3 entries and its last has not."""
    a = _tensor(image).numpy() if isinstance(image, Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in CHANNEL_COUNTS and a.shape[-1] not in CHANNEL_COUNTS:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"cannot draw an array of shape {np.shape(image)} as an image")
    return a
