"""FlowConfig: the plain dataclass that `build()` speaks and `config.json` stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["FlowConfig", "as_config", "describe_architecture", "check_int", "check_number"]

ARCHS = ("realnvp", "glow", "realnvp_tabular")
MASKS = ("checkerboard", "horizontal", "cycle")
NETS = ("resnet", "glow", "highway")
# A rough upper bound on the st-networks' weights (see ``_weight_estimate``): the paper's largest model has
# 69M parameters; 250M float32 weights already take 1 GB before a single activation.
MAX_SIDE = 256
MAX_WEIGHTS = 250_000_000


def check_int(name: str, value: Any, lo: int, hi: int | None = None, optional: bool = False) -> None:
    """Refuse anything but a whole number in ``[lo, hi]`` (``None`` too when ``optional``), with one line."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {value}")


def check_number(name: str, value: Any, lo: float, hi: float | None = None, *, optional: bool = False,
                 open_low: bool = False) -> None:
    """Refuse anything but a finite number in ``[lo, hi]`` (``(lo, hi]`` when ``open_low``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (open_low and value == lo) or (hi is not None and value > hi):
        low = "(" if open_low else "["
        raise ValueError(f"{name} must be in {low}{lo:g}, {hi if hi is not None else 'inf'}], got {value}")


@dataclass
class FlowConfig:
    """Everything needed to rebuild a flow's architecture (weights live in safetensors).

    - ``arch``: ``realnvp`` (multi-scale with checkerboard masks, single-scale with
      horizontal/cycle masks), ``glow`` or ``realnvp_tabular``.
    - ``image_shape``: ``[C, H, W]`` for image flows; ``dim`` for the tabular flow.
    - ``scales``: number of scales of the multi-scale models.
    - ``hidden`` / ``blocks``: st-network width and number of residual blocks (``net="resnet"``) or of
      highway layers (``net="highway"``, the paper's Glow st-net, App. C).
    - ``steps``: Glow's K (flow steps per scale).
    - ``couplings``: number of couplings of the single-scale RealNVP (horizontal/cycle masks, or
      checkerboard with ``scales`` 1: the same-size control of Sec. 7, Fig. 15) and of the tabular model.
    - ``bottleneck``: ``None`` or the width ``l`` of the linear layer in the middle of the st-net.
    - ``bottleneck_channels``: ``None`` (the bottleneck reads the whole ``hidden x H x W`` feature map, as the
      paper's) or ``k``: a 1x1 convolution first reduces the map to ``k`` channels, so a wide ``l`` stays small
      on disk (all information still passes through ``l`` numbers).
    - ``logit_alpha``: ``a`` in ``y = logit(a + (1 - 2a) v)``.
    - ``whiten`` (tabular): the first layer rotates onto the principal axes of the training vectors and divides by
      their Ledoit-Wolf shrunk deviations (``Whiten``) instead of standardising each feature alone.
    - ``flow_dims`` (tabular, with ``whiten``): the couplings act on the leading ``flow_dims`` principal axes only;
      the others keep the shrunk Gaussian. ``None``: all axes.
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
    bottleneck_channels: int | None = None
    net: str | None = None  # default: resnet for realnvp, glow block for glow; or highway
    logit_alpha: float = 0.05
    whiten: bool = False
    flow_dims: int | None = None

    def __post_init__(self) -> None:
        # sizes first, before anything is allocated: an absurd config is refused in microseconds
        for key in ("arch", "mask"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        check_int("scales", self.scales, 1, 6)
        check_int("hidden", self.hidden, 1, 2048)
        check_int("blocks", self.blocks, 1, 64)
        check_int("steps", self.steps, 1, 128)
        check_int("couplings", self.couplings, 1, 128)
        check_int("bottleneck", self.bottleneck, 1, 4096, optional=True)
        check_int("bottleneck_channels", self.bottleneck_channels, 1, 2048, optional=True)
        if self.bottleneck_channels and not self.bottleneck:
            raise ValueError("bottleneck_channels needs a bottleneck")
        check_number("logit_alpha", self.logit_alpha, 0.0, 0.5)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; expected one of {MASKS}")
        if self.net is None:
            self.net = "glow" if self.arch == "glow" else "resnet"
        if self.net not in NETS:
            raise ValueError(f"unknown net {self.net!r}; expected one of {NETS}")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be true or false, got {self.whiten!r}")
        if self.arch != "realnvp_tabular" and (self.whiten or self.flow_dims is not None):
            raise ValueError("whiten and flow_dims are options of the tabular flow (arch realnvp_tabular)")
        if self.arch == "realnvp_tabular":
            check_int("dim", self.dim, 2, 100_000)
            check_int("flow_dims", self.flow_dims, 2, self.dim, optional=True)
            if self.flow_dims is not None and not self.whiten:
                raise ValueError("flow_dims needs whiten: the axes it keeps are the principal ones")
        else:
            shape = self.image_shape
            if not isinstance(shape, (list, tuple)) or len(shape) != 3:
                raise ValueError(f"image_shape must be [C, H, W], got {shape!r}")
            # 256 pixels a side: a 1024 x 1024 flow passed this check and then asked for 58.6 GiB in its first
            # step; image flows here are for 28-64 pixel images on a CPU (the paper's largest are 64 x 64)
            for axis, v, hi in zip("CHW", shape, (4, MAX_SIDE, MAX_SIDE), strict=True):
                check_int(f"image_shape {axis}", v, 1, hi)
            self.image_shape = list(shape)
            c, h, w = self.image_shape
            multi = self.arch == "glow" or self.mask == "checkerboard"
            if multi:
                # every scale but RealNVP's last squeezes by 2
                squeezes = self.scales if self.arch == "glow" else self.scales - 1
                if h % (2**squeezes) or w % (2**squeezes):
                    raise ValueError(f"image {h}x{w} cannot be squeezed {squeezes} times; use fewer scales")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError("logit_alpha must be in [0, 0.5)")
        weights = self._weight_estimate()
        if weights > MAX_WEIGHTS:
            raise ValueError(
                f"this config would need about {weights / 1e6:,.0f}M st-network weights (limit "
                f"{MAX_WEIGHTS / 1e6:,.0f}M): lower hidden, blocks, steps, couplings or scales"
            )

    def _weight_estimate(self) -> int:
        """Order-of-magnitude count of st-network weights, from the sizes alone (nothing is built)."""
        if self.arch == "realnvp_tabular":
            return self.couplings * (2 * (self.flow_dims or self.dim) * self.hidden + self.blocks * self.hidden**2)
        channels = self.image_shape[0] * 4**self.scales  # generous: the widest squeezed input
        if self.net == "glow":
            per_net = 9 * channels * self.hidden + self.hidden**2 + 18 * channels * self.hidden
        else:  # resnet blocks and highway layers: two 3x3 convolutions of width hidden each
            per_net = 18 * self.blocks * self.hidden**2 + 18 * channels * self.hidden
        if self.arch == "glow":
            nets = self.scales * self.steps
        else:
            nets = self.scales * 6 + 4 if self.mask == "checkerboard" and self.scales > 1 else self.couplings
        if self.bottleneck:
            width = self.bottleneck_channels or self.hidden
            per_net += 2 * self.bottleneck * width * self.image_shape[1] * self.image_shape[2]
        return int(nets * per_net)

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
    if arch == "realnvp_tabular":
        text = (f"tabular RealNVP, {model_cfg.get('couplings')} half-mask couplings, MLP st-nets of {blocks} x "
                f"{hidden} units")
        if model_cfg.get("whiten"):
            kept = model_cfg.get("flow_dims")
            text += (f" on the leading {kept} of the whitened (Ledoit-Wolf) principal axes, a Gaussian on the rest"
                     if kept else " after whitening (Ledoit-Wolf principal axes)")
        return f"{text}; input {model_cfg.get('dim')}-d vectors"
    if arch == "glow":
        text = f"Glow, {model_cfg.get('scales')} scales x {model_cfg.get('steps')} steps, st-net width {hidden}"
        if model_cfg.get("net") == "highway":
            text += f" (highway, {blocks} layers)"
    elif arch == "realnvp":
        mask = model_cfg.get("mask", "checkerboard")
        if mask == "checkerboard" and model_cfg.get("scales") == 1:
            text = f"RealNVP, single scale, {model_cfg.get('couplings')} checkerboard couplings"
        elif mask == "checkerboard":
            text = f"RealNVP, {model_cfg.get('scales')} scales, checkerboard + channel masks"
        else:
            text = f"RealNVP, single scale, {model_cfg.get('couplings')} {mask} couplings"
        text += f", ResNet st-net {hidden} ch x {blocks} blocks"
    else:
        text = str(arch)
    if model_cfg.get("bottleneck"):
        text += f", bottleneck {model_cfg['bottleneck']}"
        if model_cfg.get("bottleneck_channels"):
            text += f" (after a 1x1 conv to {model_cfg['bottleneck_channels']} ch)"
    return f"{text}; input {shape}" if shape else text
