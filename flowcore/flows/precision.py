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

__all__ = ["PRECISIONS", "bf16_is_native", "check_precision_runs_natively", "set_st_precision", "st_precision",
           "st_precision_of"]

# config value -> autocast dtype of the st-networks (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def bf16_is_native(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 in hardware. A CPU needs what oneDNN's bfloat16 kernels need (AVX-512
    or AMX); on an AVX2-only CPU bfloat16 is emulated, and a training step with bfloat16 st-nets measured 0.09x
    the float32 step's speed (``benchmarks/throughput.py --variants`` on such a machine; the README's table).
    A GPU needs native bfloat16 (compute capability 8.0 or later). Other devices are not checked (True)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return True


def check_precision_runs_natively(precision: str, device: str | torch.device, allow_emulated: bool = False) -> None:
    """Refuse ``"bf16"`` st-nets on a device that would emulate bfloat16 (many times slower than float32, not
    faster), unless ``allow_emulated``: one line that says what to do instead."""
    if precision == "bf16" and not allow_emulated and not bf16_is_native(device):
        where = "this CPU has no AVX-512 or AMX" if torch.device(device).type == "cpu" else f"{device} has none"
        raise ValueError(f'"precision": "bf16" needs native bfloat16 and {where}: it would emulate bfloat16, many '
                         'times slower than float32 (benchmarks/throughput.py --variants measures it here); set '
                         '"precision": "fp32" in the config, or pass --allow-emulated-bf16 to train in bfloat16 anyway')


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
