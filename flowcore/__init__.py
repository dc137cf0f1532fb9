"""flowcore: exact, inspectable normalizing flows (RealNVP, Glow) for OOD-detection research."""

from .checkpoints import CheckpointError, list_checkpoints, load, save
from .config import FlowConfig
from .inspection import coupling_trace, jacobian_footprint, jacobian_map, latents, resample_patch, sample
from .likelihood import bits_per_dim, dequantize, log_likelihood_nats, nats_to_bpd
from .models import build

__version__ = "0.1.0"

__all__ = [
    "FlowConfig",
    "build",
    "load",
    "save",
    "list_checkpoints",
    "CheckpointError",
    "log_likelihood_nats",
    "bits_per_dim",
    "nats_to_bpd",
    "dequantize",
    "coupling_trace",
    "latents",
    "jacobian_map",
    "jacobian_footprint",
    "resample_patch",
    "sample",
]
