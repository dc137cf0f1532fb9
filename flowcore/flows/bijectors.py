"""Bijective layers: ``forward(x) -> (y, log_det)`` with ``log_det`` of shape ``(N,)``, ``inverse(y) -> x``.

No layer stores anything during a call: masks are recomputed from the input's shape, so ``inverse``
never needs a prior ``forward`` and one model can be shared between threads.

Affine coupling update order (used by every coupling, RealNVP and Glow alike)::

    y_trans = x_trans * exp(log_s) + t        (scale first, then shift)
    x_trans = (y_trans - t) * exp(-log_s)

with ``(log_s, t) = st_net(x_cond)``. RealNVP: ``log_s = rescale_c * tanh(h)`` with a learnable
per-channel ``rescale``; Glow: ``log_s = log sigmoid(h + 2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Bijector",
    "Logit",
    "Squeeze",
    "ActNorm",
    "InvConv1x1",
    "AffineCoupling",
    "VectorCoupling",
    "Standardize",
    "Whiten",
    "OnLeading",
    "ledoit_wolf",
    "Chain",
    "squeeze",
    "unsqueeze",
    "spatial_masks",
    "run_st_net",
]


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def run_st_net(net: nn.Module, x: Tensor, low_precision: torch.dtype | None) -> Tensor:
    """``net(x)`` in float32, or (``low_precision`` set: training only) under that autocast dtype in
    ``channels_last``, its output cast back to ``x``'s dtype.

    Only st-networks may run in low precision: a coupling's ``(log_s, t)`` may be any function of the untouched
    half, so the flow stays exactly invertible and its log-det exact as long as the coupling update, the log-det
    sums and every other bijective operation stay float32 (``flowcore.flows.precision`` sets ``low_precision``).
    """
    if low_precision is None:
        return net(x)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=low_precision):
        out = net(x)
    return out.to(x.dtype)


class Bijector(nn.Module):
    """Interface: ``forward(x) -> (y, log|det dy/dx|)`` and ``inverse(y) -> x``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Chain(Bijector):
    """Composition ``f_n o ... o f_1``; log-dets add."""

    def __init__(self, layers: list[Bijector]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class Logit(Bijector):
    """``y = logit(a + (1 - 2a) v)`` for ``v`` in (0, 1): the RealNVP preprocessing."""

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1 - 2 * self.alpha) * v
        y = torch.log(p) - torch.log1p(-p)
        log_det = _sum_per_sample(
            torch.log(torch.as_tensor(1 - 2 * self.alpha, dtype=v.dtype)) - torch.log(p) - torch.log1p(-p)
        )
        return y, log_det

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


def squeeze(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2); channel ``4c + 2dy + dx`` holds pixel (2i+dy, 2j+dx)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`."""
    n, c, h, w = x.shape
    x = x.reshape(n, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, h * 2, w * 2)


class Squeeze(Bijector):
    """2x2 space-to-channel; volume preserving."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return unsqueeze(y)


class ActNorm(Bijector):
    """``y = (x + bias) * exp(log_scale)`` per channel, initialised from the first training batch.

    The ``initialized`` flag is a buffer, so it travels with the state_dict: a loaded model never
    re-initialises. Initialisation only happens in training mode.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        hw = x.shape[2] * x.shape[3]
        log_det = (hw * self.log_scale.sum()).expand(x.shape[0])
        return y, log_det

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(Bijector):
    """Invertible 1x1 convolution, LU-parametrised: ``W = P L (U + diag(sign * exp(log_s)))``."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(diag)).float())

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight()
        y = F.conv2d(x, w[:, :, None, None])
        hw = x.shape[2] * x.shape[3]
        return y, (hw * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(y, w_inv[:, :, None, None])


def spatial_masks(
    kind: str, index: int, height: int, width: int, device=None, dtype=torch.float32
) -> tuple[Tensor, Tensor]:
    """Return ``(cond, trans)`` masks of shape (1, 1, H, W) for a spatial coupling.

    ``cond`` marks the pixels the st-net sees; ``trans`` the pixels the layer transforms.

    - checkerboard: ``cond = (h + w + index) % 2 == 0``, ``trans = 1 - cond``.
    - horizontal: top half conditions the bottom half (even index), and the reverse (odd).
    - cycle: quadrants numbered clockwise 0=top-left, 1=top-right, 2=bottom-right, 3=bottom-left;
      layer ``k`` transforms quadrant ``(k + 1) % 4`` using only quadrant ``k % 4`` (paper App. I.1).
    """
    hh = torch.arange(height, device=device).view(height, 1)
    ww = torch.arange(width, device=device).view(1, width)
    if kind == "checkerboard":
        cond = ((hh + ww + index) % 2 == 0).expand(height, width)
        trans = ~cond
    elif kind == "horizontal":
        top = (hh < height // 2).expand(height, width)
        cond = top if index % 2 == 0 else ~top
        trans = ~cond
    elif kind == "cycle":
        top = hh < height // 2
        left = ww < width // 2
        quadrants = [top & left, top & ~left, ~top & ~left, ~top & left]
        cond = quadrants[index % 4]
        trans = quadrants[(index + 1) % 4]
    else:
        raise ValueError(f"unknown spatial mask {kind!r}")
    return cond.to(dtype).view(1, 1, height, width), trans.to(dtype).view(1, 1, height, width)


class AffineCoupling(Bijector):
    """Affine coupling on images with a spatial mask or a channel-wise split.

    ``mask`` is ``checkerboard``, ``horizontal``, ``cycle`` or ``channel``; ``index`` selects the
    parity / half / quadrant. The st-net of a spatial coupling sees ``cat(x * cond, cond)``; that of
    a channel coupling sees the conditioning half. ``scale`` is ``tanh`` (RealNVP) or ``sigmoid`` (Glow).
    """

    def __init__(self, mask: str, index: int, channels: int, net: nn.Module, scale: str = "tanh") -> None:
        super().__init__()
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"unknown coupling scale {scale!r}")
        self.mask, self.index, self.channels, self.scale = mask, int(index), channels, scale
        self.net = net
        self.st_precision: torch.dtype | None = None  # not saved: see run_st_net and flowcore.flows.precision
        out_ch = channels // 2 if mask == "channel" else channels
        if scale == "tanh":
            self.rescale = nn.Parameter(torch.ones(1, out_ch, 1, 1))

    def _log_scale(self, h: Tensor) -> Tensor:
        if self.scale == "tanh":
            return self.rescale * torch.tanh(h)
        return F.logsigmoid(h + 2.0)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        return (a, b) if self.index % 2 == 0 else (b, a)

    def _join(self, cond: Tensor, trans: Tensor) -> Tensor:
        return torch.cat([cond, trans] if self.index % 2 == 0 else [trans, cond], dim=1)

    def masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(cond, trans)`` masks broadcastable to ``x``'s shape."""
        n, c, h, w = x.shape
        if self.mask == "channel":
            half = torch.ones(1, c // 2, 1, 1, device=x.device, dtype=x.dtype)
            cond, trans = self._join(half, 0 * half), self._join(0 * half, half)
            return cond, trans
        return spatial_masks(self.mask, self.index, h, w, x.device, x.dtype)

    def scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_s, t, trans_mask)`` in the layer's own layout, zero where nothing is transformed.

        Computed from the conditioning part only, so it is the same for ``x`` and for the output.
        """
        if self.mask == "channel":
            x_cond, _ = self._split(x)
            log_s, t = run_st_net(self.net, x_cond, self.st_precision).chunk(2, dim=1)
            log_s = self._log_scale(log_s)
            zeros = torch.zeros_like(x_cond)
            _, trans = self.masks(x)
            return self._join(zeros, log_s), self._join(zeros, t), trans
        cond, trans = self.masks(x)
        h = run_st_net(self.net, torch.cat([x * cond, cond.expand(x.shape[0], 1, -1, -1)], dim=1), self.st_precision)
        log_s, t = h.chunk(2, dim=1)
        return self._log_scale(log_s) * trans, t * trans, trans

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t, _ = self.scale_shift(x)
        return x * torch.exp(log_s) + t, _sum_per_sample(log_s)

    def inverse(self, y: Tensor) -> Tensor:
        log_s, t, _ = self.scale_shift(y)
        return (y - t) * torch.exp(-log_s)


class Standardize(Bijector):
    """``y = (x - mean) / scale`` per feature, with ``mean`` and ``scale`` fixed buffers (set from training data
    by :meth:`fit`): keeps a flow on raw features (e.g. an extractor's output) a density of those raw features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor, floor: float = 1e-3) -> None:
        """Set ``mean`` and ``scale`` from data ``(N, D)``; ``floor`` keeps a (nearly) constant feature finite."""
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(floor))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) / self.scale, (-torch.log(self.scale).sum()).expand(len(x))

    def inverse(self, y: Tensor) -> Tensor:
        return y * self.scale + self.mean


def ledoit_wolf(x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of data ``(N, D)``, in float64.

    ``(1 - a) S + a (tr S / D) I`` with ``S`` the maximum-likelihood covariance and ``a`` Ledoit and Wolf's (2004)
    estimate of the optimal shrinkage (the formula of scikit-learn's ``LedoitWolf``, which the tests compare
    against). With 1280 features and a few thousand images ``S`` alone is close to singular; the shrunk estimate
    is well conditioned and the better density for unseen data.
    """
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = torch.trace(cov) / d
    x2 = xc**2
    beta_sum = float((x2.T @ x2).sum())
    delta_sum = float((cov**2).sum())
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2 * float(mu) * float(torch.trace(cov)) + d * float(mu) ** 2) / d
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    shrunk = (1 - shrinkage) * cov + shrinkage * mu * torch.eye(d, dtype=x.dtype)
    return mean, shrunk, shrinkage


class Whiten(Bijector):
    """``y = diag(scale)^-1 V (x - mean)``: rotation onto the principal axes of the training features (``V``'s rows,
    by decreasing variance) and division by each axis's standard deviation under a Ledoit-Wolf shrunk covariance.

    Fixed buffers (set by :meth:`fit`, stored with the weights). Under a standard normal prior this layer alone is
    exactly the log-density of the shrunk Gaussian of the training features (the ``embedding_gaussian``
    baseline); couplings after it model what the Gaussian misses, starting with the leading axes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("axes", torch.eye(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor, floor: float = 1e-6) -> float:
        """Set the buffers from data ``(N, D)``; returns the Ledoit-Wolf shrinkage."""
        mean, cov, shrinkage = ledoit_wolf(x)
        variances, vectors = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(variances, descending=True)
        self.mean.copy_(mean.float())
        self.axes.copy_(vectors[:, order].T.float())
        self.scale.copy_(variances[order].clamp_min(floor).sqrt().float())
        return shrinkage

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) @ self.axes.T / self.scale, (-torch.log(self.scale).sum()).expand(len(x))

    def inverse(self, y: Tensor) -> Tensor:
        return (y * self.scale) @ self.axes + self.mean


class OnLeading(Bijector):
    """``inner`` on the first ``dims`` coordinates of a vector, the identity on the rest (after :class:`Whiten`:
    a flow on the leading principal axes, the shrunk Gaussian on the others)."""

    def __init__(self, dims: int, inner: Bijector) -> None:
        super().__init__()
        self.dims = dims
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        head, log_det = self.inner(x[:, : self.dims])
        return torch.cat([head, x[:, self.dims :]], dim=1), log_det

    def inverse(self, y: Tensor) -> Tensor:
        return torch.cat([self.inner.inverse(y[:, : self.dims]), y[:, self.dims :]], dim=1)


class VectorCoupling(Bijector):
    """Affine coupling on vectors (N, D) with alternating half masks and a tanh scale."""

    def __init__(self, dim: int, index: int, net: nn.Module) -> None:
        super().__init__()
        mask = torch.zeros(dim)
        if index % 2 == 0:
            mask[: dim // 2] = 1
        else:
            mask[dim // 2 :] = 1
        self.register_buffer("cond", mask)
        self.net = net
        self.st_precision: torch.dtype | None = None  # not saved: see run_st_net and flowcore.flows.precision
        self.rescale = nn.Parameter(torch.ones(dim))

    def scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = run_st_net(self.net, x * self.cond, self.st_precision).chunk(2, dim=1)
        trans = 1 - self.cond
        return self.rescale * torch.tanh(log_s) * trans, t * trans

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = self.scale_shift(x)
        return x * torch.exp(log_s) + t, log_s.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        log_s, t = self.scale_shift(y)
        return (y - t) * torch.exp(-log_s)
