"""st-networks: they map the conditioning part of a coupling to ``(raw log-scale, shift)``.

Every network zero-initialises its last layer, so a freshly built flow is the identity map
(after the logit preprocessing): the image-layout tests rely on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ResNetST", "GlowST", "HighwayST", "MLP"]


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus skip (pre-activation, as RealNVP's st-net)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Bottleneck(nn.Module):
    """Flatten -> Linear(l) -> Linear(back) -> reshape: all information passes through ``l`` numbers.

    With ``channels`` k, a 1x1 convolution first reduces the feature map to k channels (and another restores
    it): the dense layers then hold ``2 l k H W`` weights instead of ``2 l width H W``, so l = 100 fits a
    checkpoint of a few MB. The paper's bottleneck is the dense one (``channels`` None)."""

    def __init__(self, width: int, height: int, breadth: int, size: int, channels: int | None = None) -> None:
        super().__init__()
        inner = channels or width
        self.shape = (inner, height, breadth)
        self.reduce = nn.Conv2d(width, inner, 1) if channels else nn.Identity()
        self.down = nn.Linear(inner * height * breadth, size)
        self.up = nn.Linear(size, inner * height * breadth)
        self.restore = nn.Conv2d(inner, width, 1) if channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(self.down(self.reduce(x).flatten(1)))
        return self.restore(h.view(x.shape[0], *self.shape))


class ResNetST(nn.Module):
    """RealNVP's ResNet st-net with BatchNorm; optional linear bottleneck of width ``l`` in the middle."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        blocks: int,
        bottleneck: int | None = None,
        spatial: tuple[int, int] | None = None,
        bottleneck_channels: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        half = blocks // 2
        for i in range(blocks):
            if bottleneck and i == half:
                layers.append(Bottleneck(hidden, spatial[0], spatial[1], bottleneck, bottleneck_channels))
            layers.append(ResidualBlock(hidden))
        if bottleneck and blocks == 0:
            layers.append(Bottleneck(hidden, spatial[0], spatial[1], bottleneck, bottleneck_channels))
        layers += [nn.BatchNorm2d(hidden), nn.ReLU(), _zero(nn.Conv2d(hidden, 2 * out_channels, 3, padding=1))]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GlowST(nn.Module):
    """Glow's 3-conv block: conv3x3 - ReLU - conv1x1 - ReLU - zero-initialised conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            _zero(nn.Conv2d(hidden, 2 * out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class HighwayLayer(nn.Module):
    """``x + t * (h - x)`` with ``h = ReLU(conv3x3(x))`` and the gate ``t = sigmoid(conv3x3(x))``: each unit
    chooses between a new feature and carrying its input through (Srivastava et al. 2015)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.transform = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Conv2d(width, width, 3, padding=1)
        nn.init.constant_(self.gate.bias, -1.0)  # start by mostly carrying: a deep stack trains from the start

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.transform(x))
        t = torch.sigmoid(self.gate(x))
        return x + t * (h - x)


class HighwayST(nn.Module):
    """The st-net of the paper's Glow (App. C, after Nalisnick et al.): conv3x3 into ``hidden`` channels,
    ``layers`` highway layers, zero-initialised conv3x3 out."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            *[HighwayLayer(hidden) for _ in range(layers)],
            _zero(nn.Conv2d(hidden, 2 * out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MLP(nn.Module):
    """Tabular st-net: ``layers`` hidden ReLU layers, zero-initialised output of size ``2 * dim``."""

    def __init__(self, dim: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        width = dim
        for _ in range(max(1, layers)):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        mods.append(_zero(nn.Linear(width, 2 * dim)))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
