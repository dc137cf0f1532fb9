"""Which precision a flow's st-networks run in: ``"fp32"`` (everything float32) or ``"bf16"``.

With ``"bf16"`` each st-network's forward runs under bfloat16 autocast in ``channels_last`` and its output is cast
back to float32; every bijective operation (coupling update, log-det sums, ActNorm, the 1x1 convolution and its LU
log-det, the logit preprocessing, the prior) stays float32, and so do the master weights and the optimizer state.
A coupling's ``(log_s, t)`` may be any function of the half it leaves untouched, so the flow remains exactly
invertible and its log-det exact: bfloat16 changes *which* bijection is trained, never whether it is one.

Only training uses ``"bf16"``. Evaluation, reference statistics and every score run in float32, so a score stays a
function of the image and the checkpoint alone: a loaded model is always float32 (the setting is an attribute of
the couplings, never saved with the weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["PRECISIONS", "set_st_precision", "st_precision", "st_precision_of"]

# config value -> autocast dtype of the st-networks (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def _couplings(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "st_precision")]


def set_st_precision(model: nn.Module, precision: str) -> None:
    """Run every st-network of ``model`` in ``precision`` (``"fp32"`` or ``"bf16"``) from now on.

    ``"bf16"`` also stores the model's 4-d weights in ``channels_last`` (the layout the bfloat16 convolutions
    are fastest in; the values are unchanged and checkpoints are written contiguous)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is not None:
        model.to(memory_format=torch.channels_last)
    for coupling in _couplings(model):
        coupling.st_precision = dtype


def st_precision_of(model: nn.Module) -> str:
    """The precision ``model``'s st-networks run in now (``"fp32"`` for a model without couplings)."""
    dtypes = {coupling.st_precision for coupling in _couplings(model)}
    if len(dtypes) > 1:
        raise ValueError("the couplings of this model run in mixed precisions")
    dtype = dtypes.pop() if dtypes else None
    return next(name for name, d in PRECISIONS.items() if d == dtype)


@contextmanager
def st_precision(model: nn.Module, precision: str) -> Iterator[nn.Module]:
    """Run ``model``'s st-networks in ``precision`` inside the block, then restore what it was."""
    before = st_precision_of(model)
    set_st_precision(model, precision)
    try:
        yield model
    finally:
        for coupling in _couplings(model):
            coupling.st_precision = PRECISIONS[before]
