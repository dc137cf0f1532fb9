"""Looking inside an image flow: coupling traces, latents, Jacobians, patch resampling and samples.

Every function here works on a shared :class:`~flowcore.flows.models.ImageFlow` without changing it:

- nothing is stored on modules, randomness comes from a local ``torch.Generator`` seeded by ``seed``
  (never the global RNG), so results are deterministic and calls are safe from many threads at once;
- the model is always evaluated in eval mode. A model that is (partly) in training mode is never
  switched: it is evaluated through a private copy that shares its parameters but has its own
  buffers, so BatchNorm running statistics, ``num_batches_tracked`` and ActNorm's ``initialized``
  flag of the shared model are never touched (the copy reads the parameters at call time, so a
  model being trained in another thread gives results for whatever weights it has at that moment);
- inputs are moved to ``device`` (the model must already live there), results come back on the CPU.

Image inputs ``v`` are either floats in (0, 1) (dequantized pixels, as the model sees them) or uint8
images, which are dequantized with the fixed midpoint ``v = (k + 1/2) / 256``. Layouts accepted:
``(N, C, H, W)``, ``(N, H, W, C)``, ``(N, H, W)`` for one channel, and one image without the batch axis.

Layouts of the results: latents ``z`` and everything in a :class:`CouplingRecord` are in the input's
image layout ``(N, C, H, W)``: ``z[:, c, h, w]`` sits at pixel ``(h, w)`` (squeezes reverted, parts
factored out at earlier scales joined back in, as App. E of Kirichenko et al. 2020).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..flows.bijectors import AffineCoupling, Chain, Squeeze, squeeze, unsqueeze
from ..flows.layout import to_batch, to_channels_last
from ..flows.likelihood import as_image_tensor, dequantize, per_image_noise
from ..flows.models import ImageFlow, MultiScale

__all__ = [
    "CouplingRecord",
    "coupling_trace",
    "latents",
    "jacobian_map",
    "jacobian_footprint",
    "receptive_field_size",
    "influence_concentration",
    "default_box",
    "resample_patch",
    "box_change_shares",
    "latent_image_correlation",
    "sample",
]

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------- helpers


def _check_model(model: nn.Module) -> ImageFlow:
    if not isinstance(model, ImageFlow):
        raise TypeError(f"expected an image flow (flowcore.flows.models.ImageFlow), got {type(model).__name__}")
    return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _check_device(model: nn.Module, device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    p = next(model.parameters(), None)
    if p is not None and (p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index)):
        raise ValueError(f"model lives on {p.device} but device={str(dev)!r}: move the model first")
    return dev


_COPY_LOCK = threading.Lock()


def _inference_model(model: ImageFlow, bn_train: bool = False) -> ImageFlow:
    """The model itself when it is entirely in eval mode, else a private eval-mode copy.

    The copy shares the parameters (no weights are copied) and owns copies of the buffers. With
    ``bn_train`` only the copy's BatchNorm modules are put in training mode, so they normalise with
    the statistics of the batch (and update only the copy's running statistics); every other module,
    ActNorm included, stays in eval mode and so can never initialise itself.
    """
    if not bn_train and not any(m.training for m in model.modules()):
        return model
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    with _COPY_LOCK:  # deepcopy reads module dicts; keep concurrent copies from interleaving
        clone = copy.deepcopy(model, memo)
    clone.eval()
    if bn_train:
        for m in clone.modules():
            if isinstance(m, _BatchNorm):
                m.train()
    return clone


def _float_input(model: ImageFlow, v: np.ndarray | Tensor, device: torch.device, single: bool = False) -> Tensor:
    """Model input (N, C, H, W) in the model's dtype on ``device``; uint8 is midpoint-dequantized."""
    x = to_batch(v, model.image_shape)
    if single and x.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
    dtype = _model_dtype(model)
    if x.dtype == torch.uint8:
        x = dequantize(x, "midpoint", dtype=dtype)
    elif not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floats in (0, 1), got {x.dtype}")
    return x.to(device=device, dtype=dtype)


def _check_index(index: Sequence[int], image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(index) != 3:
        raise ValueError(f"index must be (c, h, w), got {index!r}")
    c, h, w = (int(i) for i in index)
    for i, n, name in ((c, image_shape[0], "c"), (h, image_shape[1], "h"), (w, image_shape[2], "w")):
        if not 0 <= i < n:
            raise IndexError(f"{name}={i} out of range for image shape {list(image_shape)}")
    return c, h, w


# ---------------------------------------------------------------------------------------- coupling trace


@dataclass
class CouplingRecord:
    """What one affine coupling did, every tensor in the input's image layout ``(N, C, H, W)``.

    The coupling computes ``output = input * scale + t`` with ``scale = exp(log_s)`` on the positions
    in ``transformed`` and leaves the rest unchanged. Values are in the flow's body space, i.e. after
    the model's ``logit`` preprocessing (the tensor the coupling really sees), not in pixel space.

    - ``input`` / ``output``: the coupling's input and output. Positions factored out at an earlier
      scale hold their actual (final) latent values there.
    - ``log_s`` / ``scale`` / ``t``: NaN wherever the coupling transforms nothing (its conditioning
      positions and positions factored out at earlier scales), never a silent 0 / 1.
    - ``transformed``: bool, the positions the coupling changes.
    - ``region``: bool, the positions present in the coupling's input (not factored out yet).
    - ``log_det``: ``(N,)`` this coupling's log|det|, ``sum(log_s)`` over ``transformed``.
    - ``name``: e.g. ``scale0.pre.2`` (RealNVP checkerboard), ``scale0.post.1`` (RealNVP channel-wise),
      ``scale1.step3.coupling`` (Glow); ``scale_index`` is the scale it belongs to; ``mask`` / ``index``
      are the coupling's mask type and index; ``layer_shape`` its input's shape ``(C', H', W')`` in its
      own (squeezed / split) layout.
    """

    name: str
    scale_index: int
    mask: str
    index: int
    layer_shape: tuple[int, int, int]
    input: Tensor
    log_s: Tensor
    scale: Tensor
    t: Tensor
    output: Tensor
    transformed: Tensor
    region: Tensor
    log_det: Tensor


# A layout is the path from a layer's own layout back to the image layout, outermost first: the
# string "unsqueeze" reverts a squeeze; a tensor is the half factored out before the next scale.
_Layout = tuple


def _embed(x: Tensor, layout: _Layout, fill: float | None) -> Tensor:
    """Map ``x`` from a layer's layout to the image layout; factored parts are ``fill`` or (None) actual values."""
    for op in reversed(layout):
        if isinstance(op, str):
            x = unsqueeze(x)
        else:
            part = op.to(x.dtype) if fill is None else torch.full(op.shape, fill, dtype=x.dtype, device=x.device)
            x = torch.cat([part, x], dim=1)
    return x


def _record(
    layer: AffineCoupling, x: Tensor, layout: _Layout, name: str, scale_index: int, out: list[CouplingRecord]
) -> Tensor:
    log_s, t, trans = layer.scale_shift(x)
    y = x * torch.exp(log_s) + t  # exactly AffineCoupling.forward
    trans_full = (trans != 0).expand_as(x)
    nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    log_s_img = _embed(torch.where(trans_full, log_s, nan), layout, float("nan"))
    out.append(
        CouplingRecord(
            name=name,
            scale_index=scale_index,
            mask=layer.mask,
            index=layer.index,
            layer_shape=tuple(x.shape[1:]),
            input=_embed(x, layout, None).cpu(),
            log_s=log_s_img.cpu(),
            scale=torch.exp(log_s_img).cpu(),
            t=_embed(torch.where(trans_full, t, nan), layout, float("nan")).cpu(),
            output=_embed(y, layout, None).cpu(),
            transformed=(_embed(trans_full.to(x.dtype), layout, 0.0) > 0.5).cpu(),
            region=(_embed(torch.ones_like(x), layout, 0.0) > 0.5).cpu(),
            log_det=log_s.reshape(x.shape[0], -1).sum(1).cpu(),
        )
    )
    return y


def _walk_chain(
    chain: Chain,
    x: Tensor,
    layout: _Layout,
    scale_index: int,
    prefix: str,
    out: list[CouplingRecord],
    nested: bool,
) -> tuple[Tensor, _Layout]:
    n_couplings = sum(isinstance(layer, AffineCoupling) for layer in chain.layers)
    for i, layer in enumerate(chain.layers):
        if isinstance(layer, AffineCoupling):
            name = f"{prefix}.coupling" if nested and n_couplings == 1 else f"{prefix}.{i}"
            x = _record(layer, x, layout, name, scale_index, out)
        elif isinstance(layer, Chain):
            if nested:
                sub = f"{prefix}.{i}"
            elif prefix.endswith(".post"):
                sub = f"{prefix[: -len('.post')]}.step{i}"
            else:
                sub = f"{prefix}.step{i}"
            x, layout = _walk_chain(layer, x, layout, scale_index, sub, out, nested=True)
        elif isinstance(layer, Squeeze):
            x, layout = squeeze(x), layout + ("unsqueeze",)
        elif isinstance(layer, MultiScale):
            raise TypeError(f"{prefix}.{i}: a MultiScale inside a Chain is not supported")
        else:
            y, _ = layer(x)
            if y.shape != x.shape:
                raise TypeError(f"{prefix}.{i}: {type(layer).__name__} changes the shape; cannot map it back")
            x = y
    return x, layout


def _walk_scale(ms: MultiScale, x: Tensor, layout: _Layout, scale_index: int, out: list[CouplingRecord]) -> Tensor:
    """Mirror of ``MultiScale.forward`` that records every coupling; returns this scale's output."""
    x, layout = _walk_chain(ms.pre, x, layout, scale_index, f"scale{scale_index}.pre", out, nested=False)
    if ms.post is None:
        return x
    layout = layout + ("unsqueeze",)
    x, layout = _walk_chain(ms.post, squeeze(x), layout, scale_index, f"scale{scale_index}.post", out, nested=False)
    if ms.next is not None:
        factored, h = x.chunk(2, dim=1)
        h = _walk_scale(ms.next, h, layout + (factored,), scale_index + 1, out)
        x = torch.cat([factored, h], dim=1)
    return unsqueeze(x)


@torch.no_grad()
def coupling_trace(
    model: ImageFlow, v: np.ndarray | Tensor, device: str | torch.device = "cpu"
) -> list[CouplingRecord]:
    """One :class:`CouplingRecord` per affine coupling, in forward order, for images ``v``.

    Walks the model's :class:`~flowcore.flows.models.MultiScale` body generically (``pre`` -> squeeze ->
    ``post`` -> split -> ``next``, nested chains such as Glow steps included) and reads each
    coupling's ``scale_shift``; the last record's ``output`` of a RealNVP (and of a Glow, whose last
    layer is a coupling) equals ``model(v)[0]``. ``v``: a batch or one image, floats in (0, 1) or uint8
    (midpoint-dequantized). Tensors in the records are on the CPU.
    """
    model = _check_model(model)
    dev = _check_device(model, device)
    net = _inference_model(model)
    x = _float_input(net, v, dev)
    y, _ = net.logit(x)
    records: list[CouplingRecord] = []
    _walk_scale(net.body, y, (), 0, records)
    return records


# ----------------------------------------------------------------------------------------------- latents


@torch.no_grad()
def latents(
    model: ImageFlow,
    images_uint8: np.ndarray | Tensor,
    n_draws: int = 40,
    seed: int = 0,
    batchnorm: str = "eval",
    dequantization: str = "uniform",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Latents ``z`` (float64, ``(N, C, H, W)`` image layout) averaged over ``n_draws`` dequantizations.

    The noise of draw ``j`` of image ``i`` is :func:`flowcore.flows.likelihood.per_image_noise`, exactly as in
    :func:`flowcore.flows.likelihood.log_likelihood_nats`, so with the same ``seed`` the latents belong to the
    same dequantized images as the likelihoods. ``dequantization="midpoint"`` makes one deterministic pass.

    ``batchnorm="train"`` normalises inside the st-nets with the statistics of the batch itself
    (Fig. 10, row 4), computed per chunk of ``batch_size`` images, through a private copy: the shared
    model's running statistics, ``num_batches_tracked`` and mode are left untouched, and ActNorm
    (Glow, which has no BatchNorm) stays in eval mode. ``batchnorm="eval"`` uses the running statistics.
    """
    model = _check_model(model)
    if batchnorm not in ("eval", "train"):
        raise ValueError(f"batchnorm must be 'eval' or 'train', got {batchnorm!r}")
    if n_draws < 1:
        raise ValueError("n_draws must be >= 1")
    dev = _check_device(model, device)
    x = to_batch(images_uint8, model.image_shape)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got {x.dtype}")
    net = _inference_model(model, bn_train=batchnorm == "train")
    dtype = _model_dtype(net)
    draws = 1 if dequantization == "midpoint" else int(n_draws)
    out = np.empty(tuple(x.shape), dtype=np.float64)
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        total = torch.zeros(chunk.shape, dtype=torch.float64)
        for j in range(draws):
            noise = per_image_noise(chunk, seed, j, dtype)
            v = dequantize(chunk, dequantization, dtype=dtype, noise=noise).to(dev)
            total += net(v)[0].double().cpu()
        out[start : start + len(chunk)] = (total / draws).numpy()
    return out


# --------------------------------------------------------------------------------------------- Jacobians


def _jacobian_input(net: ImageFlow, x: Tensor, wrt: str) -> Tensor:
    if wrt == "pixels":
        return x
    if wrt == "logit":
        with torch.no_grad():
            return net.logit(x)[0]
    raise ValueError(f"wrt must be 'pixels' or 'logit', got {wrt!r}")


def _jacobian_forward(net: ImageFlow, inp: Tensor, wrt: str) -> Tensor:
    return net(inp)[0] if wrt == "pixels" else net.body(inp)[0]


def jacobian_map(
    model: ImageFlow,
    v: np.ndarray | Tensor,
    index: Sequence[int],
    wrt: str = "pixels",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``d z[c, h, w] / d v`` for one image ``v``: an array shaped like the image ``(C, H, W)``.

    ``index = (c, h, w)`` picks the latent in image layout; one backward pass. ``wrt="pixels"``
    differentiates with respect to the dequantized pixels in (0, 1) (the logit's derivative included),
    ``wrt="logit"`` with respect to the body input ``logit(a + (1 - 2a) v)``. Eval mode always.
    """
    model = _check_model(model)
    dev = _check_device(model, device)
    c, h, w = _check_index(index, model.image_shape)
    net = _inference_model(model)
    base = _jacobian_input(net, _float_input(net, v, dev, single=True), wrt)
    with torch.enable_grad():
        inp = base.detach().clone().requires_grad_(True)
        z = _jacobian_forward(net, inp, wrt)
        (grad,) = torch.autograd.grad(z[0, c, h, w], inp)
    return grad[0].detach().cpu().numpy()


def _positions(indices: np.ndarray | Tensor | Iterable[Sequence[int]] | None, shape: tuple[int, int, int]) -> Tensor:
    if indices is None:
        return torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(-1, 3)
    if isinstance(indices, (np.ndarray, Tensor)) and tuple(indices.shape) == tuple(shape):
        mask = torch.as_tensor(np.asarray(indices) if isinstance(indices, np.ndarray) else indices).bool()
        return mask.nonzero()
    pos = torch.as_tensor([_check_index(i, shape) for i in indices], dtype=torch.long).reshape(-1, 3)
    return pos


def jacobian_footprint(
    model: ImageFlow,
    v: np.ndarray | Tensor,
    indices: np.ndarray | Tensor | Iterable[Sequence[int]] | None = None,
    wrt: str = "pixels",
    max_batch: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Mean ``|d z[c, h, w] / d v|`` over latent positions, as a float64 array shaped like the image.

    ``indices``: ``None`` (all latents), a bool mask shaped ``(C, H, W)``, or ``(c, h, w)`` triples.
    Rows of the Jacobian are computed ``max_batch`` at a time, as one backward pass through a batch of
    copies of ``v`` (exact, since the eval-mode model treats samples independently); memory grows with
    ``max_batch``. ``wrt`` as in :func:`jacobian_map`.
    """
    model = _check_model(model)
    dev = _check_device(model, device)
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    pos = _positions(indices, model.image_shape)
    if len(pos) == 0:
        raise ValueError("no latent positions selected")
    net = _inference_model(model)
    base = _jacobian_input(net, _float_input(net, v, dev, single=True), wrt).detach()
    total = torch.zeros(model.image_shape, dtype=torch.float64)
    for chunk in pos.split(int(max_batch)):
        b = len(chunk)
        with torch.enable_grad():
            inp = base.expand(b, *base.shape[1:]).clone().requires_grad_(True)
            z = _jacobian_forward(net, inp, wrt)
            c, h, w = (chunk[:, k].to(dev) for k in range(3))
            picked = z[torch.arange(b, device=dev), c, h, w]
            (grad,) = torch.autograd.grad(picked.sum(), inp)
        total += grad.detach().abs().sum(0).double().cpu()
    return (total / len(pos)).numpy()


def receptive_field_size(
    model: ImageFlow,
    v: np.ndarray | Tensor,
    index: Sequence[int],
    threshold: float = 1e-3,
    wrt: str = "pixels",
    device: str | torch.device = "cpu",
) -> int:
    """Number of pixels ``(h, w)`` whose largest ``|d z[index] / d v[:, h, w]|`` over channels exceeds
    ``threshold`` times the largest one (0 if the Jacobian row is zero)."""
    jac = np.abs(jacobian_map(model, v, index, wrt=wrt, device=device)).max(axis=0)
    peak = float(jac.max())
    if peak == 0.0 or not math.isfinite(peak):
        return 0
    return int((jac > threshold * peak).sum())


def influence_concentration(
    influence: np.ndarray, position: Sequence[int], mass: float = 0.9, radius: int = 2
) -> tuple[int, float]:
    """How local one latent's influence map ``(H, W)`` (e.g. ``|dz/dv|`` maxed over channels) is.

    Returns the fewest pixels that hold ``mass`` of the total influence, and the share of the total within
    ``radius`` pixels (a ``(2 radius + 1)`` square, clipped at the edges) of ``position`` = ``(row, col)``.
    A map with no influence at all gives ``(0, 0.0)``.
    """
    a = np.abs(np.asarray(influence, dtype=np.float64))
    a = np.where(np.isfinite(a), a, 0.0)
    total = float(a.sum())
    if total == 0.0:
        return 0, 0.0
    ordered = np.sort(a.ravel())[::-1]
    needed = int(np.searchsorted(np.cumsum(ordered), mass * total * (1 - 1e-12)) + 1)
    r, c = (int(v) for v in position)
    near = a[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1].sum()
    return min(needed, a.size), float(near / total)


# ------------------------------------------------------------------------------------ resampling, samples


def default_box(height: int, width: int, fraction: float = 10 / 32) -> Box:
    """The paper's centre patch (10x10 of 32x32) scaled to ``height x width``: ``(top, left, h, w)``.

    Sizes round half up and are at least 1: 32 -> 10 at 11, 28 -> 9 at 9, 8 -> 3 at 2.
    """
    bh = max(1, min(height, math.floor(height * fraction + 0.5)))
    bw = max(1, min(width, math.floor(width * fraction + 0.5)))
    return ((height - bh) // 2, (width - bw) // 2, bh, bw)


def _check_box(box: Sequence[int], height: int, width: int) -> Box:
    if len(box) != 4:
        raise ValueError(f"box must be (top, left, height, width), got {box!r}")
    top, left, bh, bw = (int(b) for b in box)
    if top < 0 or left < 0 or bh < 0 or bw < 0 or top + bh > height or left + bw > width:
        raise ValueError(f"box {box!r} does not fit in a {height}x{width} image")
    return top, left, bh, bw


def _to_unit(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)


@torch.no_grad()
def resample_patch(
    model: ImageFlow,
    v: np.ndarray | Tensor,
    box: Sequence[int] | None = None,
    n: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    clamp: bool = True,
    return_latents: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Redraw the latents of one image inside ``box`` and invert (App. E style patch resampling).

    ``z = model(v)[0]``; for each of ``n`` samples the latents at pixels
    ``[top:top+height, left:left+width]`` (all channels) are replaced by draws from ``N(0, T^2)``, the
    rest kept, and ``model.inverse`` maps back. ``box=None`` is :func:`default_box`; a box of zero
    size keeps ``z``. ``v``: one image, floats in (0, 1) or uint8 (midpoint-dequantized).

    Returns float images ``(n, C, H, W)`` (clamped to [0, 1], NaN -> 0, unless ``clamp=False``) and,
    with ``return_latents``, also the ``(n, C, H, W)`` latents they were inverted from.
    """
    model = _check_model(model)
    if n < 1:
        raise ValueError("n must be >= 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    dev = _check_device(model, device)
    c, height, width = model.image_shape
    top, left, bh, bw = _check_box(default_box(height, width) if box is None else box, height, width)
    net = _inference_model(model)
    x = _float_input(net, v, dev, single=True)
    z0, _ = net(x)
    z = z0.expand(n, -1, -1, -1).clone()
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, c, bh, bw), generator=gen, dtype=z.dtype) * float(temperature)
    z[:, :, top : top + bh, left : left + bw] = noise.to(dev)
    images = net.inverse(z)
    if clamp:
        images = _to_unit(images)
    images_np = images.cpu().numpy()
    return (images_np, z.cpu().numpy()) if return_latents else images_np


def latent_image_correlation(image: np.ndarray, z: np.ndarray) -> float:
    """Pearson correlation of latents ``z`` (C, H, W) with a uint8 image's pixels in the same layout (Fig. 10's
    "z still looks like the image", as a number); 0 when either is constant."""
    x = as_image_tensor(np.asarray(image)[None])[0].numpy().astype(np.float64).ravel()
    zz = np.asarray(z, dtype=np.float64).ravel()
    ok = np.isfinite(zz)
    if ok.sum() < 2 or x[ok].std() == 0 or zz[ok].std() == 0:
        return 0.0
    return float(np.corrcoef(x[ok], zz[ok])[0, 1])


def box_change_shares(
    original: np.ndarray, draws: np.ndarray, box: Sequence[int], threshold: float = 0.05
) -> tuple[float, float]:
    """Share of pixels inside and outside ``box`` that resampling changed by more than ``threshold``.

    ``original`` ``(C, H, W)`` and ``draws`` ``(n, C, H, W)`` in [0, 1] (a uint8 ``original`` is taken at its
    midpoints, as :func:`resample_patch` takes it); a pixel counts as changed in a draw when any of its
    channels moved by more than ``threshold``; shares are over all draws. Fig. 17 of the paper shows the
    outside kept: this measures whether a model does.
    """
    orig = np.asarray(original)
    orig = (orig.astype(np.float64) + 0.5) / 256.0 if orig.dtype == np.uint8 else orig.astype(np.float64)
    d = np.asarray(draws, dtype=np.float64)
    if d.ndim != 4 or d.shape[1:] != orig.shape:
        raise ValueError(f"draws must be (n, {', '.join(map(str, orig.shape))}), got {d.shape}")
    top, left, bh, bw = (int(v) for v in box)
    changed = (np.abs(d - orig[None]) > threshold).any(axis=1)  # (n, H, W)
    inside = np.zeros(changed.shape[1:], dtype=bool)
    inside[top : top + bh, left : left + bw] = True
    share_in = float(changed[:, inside].mean()) if inside.any() else 0.0
    share_out = float(changed[:, ~inside].mean()) if (~inside).any() else 0.0
    return share_in, share_out


@torch.no_grad()
def sample(
    model: ImageFlow,
    n: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples ``model.inverse(z)``, ``z ~ N(0, T^2)`` drawn at once from a generator seeded by ``seed``.

    Returns ``(images, uint8)``: floats ``(n, C, H, W)`` clamped to [0, 1] (NaN -> 0), and the pixels
    ``k = floor(256 v)`` (clipped to 0..255, the inverse of ``v = (k + u) / 256``) as ``(n, H, W)`` for
    one channel, ``(n, H, W, C)`` otherwise.
    """
    model = _check_model(model)
    if n < 0:
        raise ValueError("n must be >= 0")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    dev = _check_device(model, device)
    net = _inference_model(model)
    shape = model.image_shape
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn((n, *shape), generator=gen, dtype=_model_dtype(net)) * float(temperature)
    parts = [_to_unit(net.inverse(chunk.to(dev))).cpu() for chunk in z.split(max(1, int(batch_size)))]
    images = torch.cat(parts) if parts else torch.zeros((0, *shape), dtype=z.dtype)
    k = torch.floor(images * 256).clamp(0, 255).to(torch.uint8)
    return images.numpy(), to_channels_last(k, shape)
