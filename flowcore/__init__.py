"""flowcore: exact, inspectable normalizing flows (RealNVP, Glow) for OOD-detection research."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .flows.config import FlowConfig
from .flows.likelihood import bits_per_dim, dequantize, log_likelihood_nats, nats_to_bpd
from .flows.models import build
from .inspection.probes import coupling_trace, jacobian_footprint, jacobian_map, latents, resample_patch, sample
from .zoo.checkpoints import CheckpointError, list_checkpoints, load, save

try:  # one place for the version: pyproject.toml
    __version__ = _version("flowcore")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

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
