"""FlowConfig: the plain dataclass that `build()` speaks and `config.json` stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["FlowConfig", "as_config", "describe_architecture"]

ARCHS = ("realnvp", "glow", "realnvp_tabular")
MASKS = ("checkerboard", "horizontal", "cycle")
NETS = ("resnet", "glow")


@dataclass
class FlowConfig:
    """Everything needed to rebuild a flow's architecture (weights live in safetensors).

    - ``arch``: ``realnvp`` (multi-scale with checkerboard masks, single-scale with
      horizontal/cycle masks), ``glow`` or ``realnvp_tabular``.
    - ``image_shape``: ``[C, H, W]`` for image flows; ``dim`` for the tabular flow.
    - ``scales``: number of scales of the multi-scale models.
    - ``hidden`` / ``blocks``: st-network width and number of residual blocks.
    - ``steps``: Glow's K (flow steps per scale).
    - ``couplings``: number of couplings of the single-scale RealNVP (horizontal/cycle masks)
      and of the tabular model.
    - ``bottleneck``: ``None`` or the width ``l`` of the linear layer in the middle of the st-net.
    - ``logit_alpha``: ``a`` in ``y = logit(a + (1 - 2a) v)``.
    """

    arch: str = "realnvp"
    image_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    dim: int | None = None
    mask: str = "checkerboard"
    scales: int = 2
    hidden: int = 32
    blocks: int = 2
    steps: int = 4
    couplings: int = 8
    bottleneck: int | None = None
    net: str | None = None  # default: resnet for realnvp, glow block for glow
    logit_alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; expected one of {MASKS}")
        if self.net is None:
            self.net = "glow" if self.arch == "glow" else "resnet"
        if self.net not in NETS:
            raise ValueError(f"unknown net {self.net!r}; expected one of {NETS}")
        if self.arch == "realnvp_tabular":
            if not self.dim or self.dim < 2:
                raise ValueError("realnvp_tabular needs dim >= 2")
        else:
            self.image_shape = [int(v) for v in self.image_shape]
            if len(self.image_shape) != 3:
                raise ValueError(f"image_shape must be [C, H, W], got {self.image_shape}")
            c, h, w = self.image_shape
            multi = self.arch == "glow" or self.mask == "checkerboard"
            if multi:
                # every scale but RealNVP's last squeezes by 2
                squeezes = self.scales if self.arch == "glow" else self.scales - 1
                if h % (2**squeezes) or w % (2**squeezes):
                    raise ValueError(f"image {h}x{w} cannot be squeezed {squeezes} times; use fewer scales")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError("logit_alpha must be in [0, 0.5)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


def as_config(config: FlowConfig | dict[str, Any]) -> FlowConfig:
    if isinstance(config, FlowConfig):
        return config
    return FlowConfig.from_dict(dict(config))


def describe_architecture(model_cfg: dict[str, Any]) -> str:
    """One line describing the architecture in ``config.json``'s ``model`` section."""
    arch = model_cfg.get("arch", "?")
    shape = "x".join(str(v) for v in model_cfg.get("image_shape") or [])
    hidden, blocks = model_cfg.get("hidden"), model_cfg.get("blocks")
    if arch == "glow":
        text = f"Glow, {model_cfg.get('scales')} scales x {model_cfg.get('steps')} steps, st-net width {hidden}"
    elif arch == "realnvp":
        mask = model_cfg.get("mask", "checkerboard")
        if mask == "checkerboard":
            text = f"RealNVP, {model_cfg.get('scales')} scales, checkerboard + channel masks"
        else:
            text = f"RealNVP, single scale, {model_cfg.get('couplings')} {mask} couplings"
        text += f", ResNet st-net {hidden} ch x {blocks} blocks"
    else:
        text = str(arch)
    if model_cfg.get("bottleneck"):
        text += f", bottleneck {model_cfg['bottleneck']}"
    return f"{text}; input {shape}" if shape else text
