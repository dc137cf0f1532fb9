"""RealNVP, Glow and tabular RealNVP, assembled from bijectors.

All image flows are ``Logit`` preprocessing followed by one recursive :class:`MultiScale` body::

    x -> pre couplings -> squeeze -> post couplings -> split: (factored, h)
                                                       h -> next scale
    z = unsqueeze(cat(factored, z_next))            # latents in the input's image layout

so ``z`` has exactly the input's shape, ``z[:, c, h, w]`` is aligned with pixel ``(h, w)``, and
``inverse(z)`` takes that same layout.

- multi-scale RealNVP: per scale 3 checkerboard couplings, squeeze, 3 channel-wise couplings, factor
  out half the channels; last scale: 4 checkerboard couplings.
- single-scale RealNVP (horizontal / cycle masks, or checkerboard with ``scales`` 1): ``couplings`` spatial
  couplings, no squeeze.
- Glow: per scale squeeze, K x [ActNorm, 1x1 conv, affine coupling], split (none after the last).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .bijectors import (
    ActNorm,
    AffineCoupling,
    Bijector,
    Chain,
    InvConv1x1,
    Logit,
    OnLeading,
    Standardize,
    VectorCoupling,
    Whiten,
    squeeze,
    unsqueeze,
)
from .config import FlowConfig, as_config
from .nets import MLP, GlowST, HighwayST, ResNetST

__all__ = [
    "MultiScale",
    "ImageFlow",
    "TabularFlow",
    "build",
    "standard_normal_log_prob",
    "latent_scale_map",
    "count_parameters",
    "log_prob_running_stats",
]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Per-sample log N(z; 0, I) in nats."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(1)


class MultiScale(Bijector):
    """One scale: ``pre`` in the input layout, then (optionally) squeeze, ``post``, split, ``next``."""

    def __init__(self, pre: Chain, post: Chain | None = None, next: MultiScale | None = None) -> None:
        super().__init__()
        self.pre, self.post, self.next = pre, post, next

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.pre(x)
        if self.post is None:
            return x, log_det
        x, ld = self.post(squeeze(x))
        log_det = log_det + ld
        if self.next is not None:
            factored, h = x.chunk(2, dim=1)
            h, ld = self.next(h)
            x, log_det = torch.cat([factored, h], dim=1), log_det + ld
        return unsqueeze(x), log_det

    def inverse(self, z: Tensor) -> Tensor:
        if self.post is None:
            return self.pre.inverse(z)
        x = squeeze(z)
        if self.next is not None:
            factored, h = x.chunk(2, dim=1)
            x = torch.cat([factored, self.next.inverse(h)], dim=1)
        return self.pre.inverse(unsqueeze(self.post.inverse(x)))


class ImageFlow(nn.Module):
    """A flow on images ``v`` in (0, 1)^(C, H, W): logit preprocessing, then a :class:`MultiScale` body."""

    def __init__(self, config: FlowConfig, body: MultiScale) -> None:
        super().__init__()
        self.config = config
        self.logit = Logit(config.logit_alpha)
        self.body = body

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config.image_shape)

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` (same shape as ``v``) and ``log|det dz/dv|`` per sample."""
        y, log_det = self.logit(v)
        z, ld = self.body(y)
        return z, log_det + ld

    def inverse(self, z: Tensor) -> Tensor:
        return self.logit.inverse(self.body.inverse(z))

    def log_prob(self, v: Tensor) -> Tensor:
        """log-density (nats) of dequantized pixels ``v`` in (0, 1)^D under a standard normal prior."""
        z, log_det = self(v)
        return standard_normal_log_prob(z) + log_det


class TabularFlow(nn.Module):
    """RealNVP for vectors: a fixed standardisation or whitening (set from the training data, stored with the
    weights, so the density is of the raw features), then alternating half-mask couplings with MLP st-nets (on the
    leading ``flow_dims`` principal axes only, when set)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        width = config.flow_dims or dim
        couplings = [VectorCoupling(width, i, MLP(width, config.hidden, config.blocks))
                     for i in range(config.couplings)]
        first = Whiten(dim) if config.whiten else Standardize(dim)
        if config.flow_dims is not None:
            self.body = Chain([first, OnLeading(width, Chain(couplings))])
        else:
            self.body = Chain([first, *couplings])

    @property
    def standardize(self) -> Standardize | Whiten:
        """The first layer: call its ``fit`` with the training features before training."""
        return self.body.layers[0]

    def gaussian_log_prob(self, x: Tensor) -> Tensor:
        """log-density (nats) under the first layer alone: for a whitening flow the Ledoit-Wolf Gaussian of the
        training features, the ``embedding_gaussian`` baseline the couplings must beat."""
        if not self.config.whiten:
            raise ValueError("this flow standardises each feature alone; it holds no Gaussian of its features")
        z, log_det = self.body.layers[0](x)
        return standard_normal_log_prob(z) + log_det

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.body.inverse(z)

    def log_prob(self, x: Tensor) -> Tensor:
        z, log_det = self(x)
        return standard_normal_log_prob(z) + log_det


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in a model."""
    return int(sum(p.numel() for p in model.parameters()))


def log_prob_running_stats(model: nn.Module, x: Tensor) -> Tensor:
    """``model.log_prob(x)`` with every BatchNorm normalising by its running statistics, as at evaluation,
    even while the model trains; gradients flow as usual.

    Negative training (App. B) needs this: in training mode an OOD batch would be normalised by its *own*
    statistics (a Fashion-MNIST RealNVP then gives MNIST about -4000 nats instead of the -1100 it reports in
    evaluation, so a threshold never fires) and would leak into the running statistics used at test time.
    Not for a model shared between threads: it flips the modules' mode for the duration of the call.
    """
    flipped = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in flipped:
        m.eval()
    try:
        return model.log_prob(x)
    finally:
        for m in flipped:
            m.train()


def latent_scale_map(model: ImageFlow) -> Tensor:
    """(C, H, W) long tensor: the scale at which each latent of the image layout is factored out."""

    def labels(scale: MultiScale, c: int, h: int, w: int, s: int) -> Tensor:
        if scale.post is None:
            return torch.full((1, c, h, w), s)
        c, h, w = 4 * c, h // 2, w // 2
        if scale.next is None:
            return unsqueeze(torch.full((1, c, h, w), s))
        inner = labels(scale.next, c // 2, h, w, s + 1)
        return unsqueeze(torch.cat([torch.full((1, c // 2, h, w), s), inner], dim=1))

    return labels(model.body, *model.image_shape, 0)[0]


def _st_net(cfg: FlowConfig, in_ch: int, out_ch: int, spatial: tuple[int, int]) -> nn.Module:
    if cfg.net == "glow":
        return GlowST(in_ch, out_ch, cfg.hidden)
    if cfg.net == "highway":
        return HighwayST(in_ch, out_ch, cfg.hidden, cfg.blocks)
    return ResNetST(in_ch, out_ch, cfg.hidden, cfg.blocks, cfg.bottleneck, spatial, cfg.bottleneck_channels)


def _spatial_coupling(cfg: FlowConfig, mask: str, index: int, c: int, h: int, w: int, scale: str) -> AffineCoupling:
    # the st-net sees the masked input plus the mask itself as one extra channel
    return AffineCoupling(mask, index, c, _st_net(cfg, c + 1, c, (h, w)), scale)


def _channel_coupling(cfg: FlowConfig, index: int, c: int, h: int, w: int, scale: str) -> AffineCoupling:
    return AffineCoupling("channel", index, c, _st_net(cfg, c // 2, c // 2, (h, w)), scale)


def _realnvp_scale(cfg: FlowConfig, c: int, h: int, w: int, scale: int) -> MultiScale:
    if scale == cfg.scales - 1:
        return MultiScale(Chain([_spatial_coupling(cfg, "checkerboard", i, c, h, w, "tanh") for i in range(4)]))
    pre = Chain([_spatial_coupling(cfg, "checkerboard", i, c, h, w, "tanh") for i in range(3)])
    post = Chain([_channel_coupling(cfg, i, 4 * c, h // 2, w // 2, "tanh") for i in range(3)])
    return MultiScale(pre, post, _realnvp_scale(cfg, 2 * c, h // 2, w // 2, scale + 1))


def _glow_scale(cfg: FlowConfig, c: int, h: int, w: int, scale: int) -> MultiScale:
    c, h, w = 4 * c, h // 2, w // 2
    steps = []
    for k in range(cfg.steps):
        coupling = _channel_coupling(cfg, k, c, h, w, "sigmoid")
        steps.append(Chain([ActNorm(c), InvConv1x1(c, seed=1000 * scale + k), coupling]))
    last = scale == cfg.scales - 1
    nxt = None if last else _glow_scale(cfg, c // 2, h, w, scale + 1)
    return MultiScale(Chain([]), Chain(steps), nxt)


def build(config: FlowConfig | dict) -> ImageFlow | TabularFlow:
    """Build a flow from a :class:`FlowConfig` or a dict with the same keys."""
    cfg = as_config(config)
    if cfg.arch == "realnvp_tabular":
        return TabularFlow(cfg)
    c, h, w = cfg.image_shape
    if cfg.arch == "glow":
        body = _glow_scale(cfg, c, h, w, 0)
    elif cfg.mask == "checkerboard" and cfg.scales > 1:
        body = _realnvp_scale(cfg, c, h, w, 0)
    else:
        couplings = [_spatial_coupling(cfg, cfg.mask, i, c, h, w, "tanh") for i in range(cfg.couplings)]
        body = MultiScale(Chain(couplings))
    return ImageFlow(cfg, body)
