"""torch.distributed glue: one process per device under ``torchrun``; nothing changes without it.

A process group is only created when the environment says ``WORLD_SIZE > 1`` (``torchrun`` sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``): backend NCCL when the
process's device is a GPU, gloo on CPU. Without it every helper here is the identity (world size 1,
rank 0), so single-process runs execute exactly the code they always did.

Conventions used by ``train``, ``evaluate`` and ``score``:

- ``--device cuda`` under torchrun means ``cuda:$LOCAL_RANK`` (one GPU per process); an explicit
  ``cuda:N`` is honoured as given (only sensible with one process per machine).
- Work is split in *whole batches*: rank ``r`` of ``W`` takes a contiguous run of batches
  (:func:`batch_range`), so every batch starts at the same image index as in a single-process run and
  the seeded dequantization noise is identical; results are gathered back in the original order.
- Only rank 0 writes files or prints; every rank returns the same result.
- Float32 throughout: likelihoods are sums of thousands of per-dimension log terms and need float32
  or better, so on GPUs TF32 (10-bit mantissa, on by default for cuDNN convolutions) is switched off for
  each training, evaluation and scoring call (:func:`true_float32`, restored after);
  ``FLOWCORE_ALLOW_TF32=1`` keeps torch's TF32 defaults, e.g. for faster training. Every likelihood is
  computed in float32; only a training step's st-networks may run under bfloat16 autocast
  (``"precision": "bf16"``, :mod:`flowcore.flows.precision`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..flows.models import log_prob_running_stats

T = TypeVar("T")

__all__ = [
    "torch_threads",
    "true_float32",
    "float32_work",
    "env_world_size",
    "resolve_device",
    "init",
    "shutdown",
    "world_size",
    "rank",
    "is_main",
    "barrier",
    "batch_range",
    "all_gather_objects",
    "map_batches",
    "all_reduce_sum",
    "all_gather_cat",
    "broadcast_flag",
    "broadcast_state",
    "global_actnorm_init",
    "convert_sync_batchnorm",
    "LogProb",
]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (a config's ``threads``) for the block, then restored: a run's
    setting never leaks into the process that called it (a notebook, the dashboard's scoring)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def true_float32(device: str | torch.device) -> Iterator[None]:
    """On a CUDA ``device``, TF32 matmuls and convolutions off for the block (likelihoods in true float32: TF32's
    10-bit mantissa moves a log-likelihood by far more than float32 rounding), then torch's settings restored, so
    nothing leaks into the calling process. ``FLOWCORE_ALLOW_TF32=1`` keeps torch's settings; no-op elsewhere."""
    try:
        cuda = torch.device(str(device)).type == "cuda"
    except (RuntimeError, TypeError):  # an unknown device is refused where it is resolved
        cuda = False
    if not cuda or os.environ.get("FLOWCORE_ALLOW_TF32", "") == "1":
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def float32_work(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate an entry point of work that takes a ``device`` argument: it runs under :func:`true_float32`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        device = signature.bind_partial(*args, **kwargs).arguments.get("device", "cpu")
        with true_float32(device):
            return fn(*args, **kwargs)

    return wrapper


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_device(device: str | torch.device = "cpu") -> str:
    """Check ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) and return the one this process uses.

    Under torchrun with more than one process, plain ``cuda`` becomes ``cuda:$LOCAL_RANK``. Changes no
    process-wide setting (TF32 is switched off by :func:`true_float32` around the work itself).
    Raises ``ValueError`` with one readable line for an unknown or unavailable device.
    """
    name = str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r} (expected cpu, cuda or cuda:N): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is None and env_world_size() > 1:
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")
    return name


def init(device: str | torch.device = "cpu") -> str:
    """Join the process group described by torchrun's environment (when ``WORLD_SIZE > 1``; idempotent).

    Returns the device this process should use (see :func:`resolve_device`).
    """
    device = resolve_device(device)
    if env_world_size() > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        timeout = timedelta(minutes=float(os.environ.get("FLOWCORE_DIST_TIMEOUT_MIN", "30")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return device


def shutdown() -> None:
    """Leave the process group (if any), after every rank has arrived: a rank tearing the group down while
    another is still finishing its last collective can abort the process ("terminate called without an active
    exception")."""
    if dist.is_available() and dist.is_initialized():
        if _active():
            try:
                if dist.get_backend() == "gloo":  # bounded wait: a rank that died must not hang the others
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except RuntimeError:
                pass  # a rank is gone: leave anyway
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if _active() else None


def barrier() -> None:
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def batch_range(n: int, batch_size: int, world: int | None = None, rank_: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of the items this rank handles: a contiguous run of whole batches.

    The ``ceil(n / batch_size)`` batches are dealt out as evenly as possible, earlier ranks taking
    one more when they do not divide; a rank may get nothing (``start == stop``).
    """
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    n_batches = -(-n // batch_size)
    per, extra = divmod(n_batches, world)
    first = rank_ * per + min(rank_, extra)
    last = first + per + (1 if rank_ < extra else 0)
    return min(n, first * batch_size), min(n, last * batch_size)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a group."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_batches(fn: Callable[[int, int], list], n: int, batch_size: int) -> list:
    """``fn(start, stop)`` on this rank's share of whole batches; all ranks' lists concatenated in order.

    Without a process group this is exactly ``fn(0, n)``.
    """
    if not _active():
        return fn(0, n)
    start, stop = batch_range(n, batch_size)
    part = fn(start, stop) if stop > start else []
    return [item for chunk in all_gather_objects(part) for item in chunk]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (returns a new tensor on ``t``'s device; ``t`` itself without a group)."""
    if not _active():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank (decisions that must agree, e.g. stop on a time budget)."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.broadcast(t, src)
    return bool(t.item())


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters and buffers (or buffers only) into every rank's ``module``."""
    if not _active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for t in tensors:
        buf = t.detach().to(_comm_device(), copy=True)
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device))


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (all ranks' shapes must agree)."""
    if not _active():
        return t
    buf = t.detach().to(_comm_device())
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf.contiguous())
    return torch.cat(parts).to(t.device)


def global_actnorm_init(model: nn.Module) -> list:
    """Make ActNorm's data-dependent initialisation use the *global* batch (all ranks together).

    A forward pre-hook on every :class:`~flowcore.flows.bijectors.ActNorm` gathers the layer's input from
    all ranks (once: at the first training forward, when the layer is not initialised yet) and runs
    the layer's own initialisation on the concatenated global batch. Every rank therefore gets
    exactly the parameters a single process gets from the whole batch, and the per-shard
    initialisation inside ``forward`` never runs. Returns the hook handles.
    """
    from ..flows.bijectors import ActNorm

    def hook(module: ActNorm, args: tuple) -> None:
        if module.training and not bool(module.initialized):
            module._initialize(all_gather_cat(args[0]))

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, ActNorm)]


def convert_sync_batchnorm(model: nn.Module, device: str) -> tuple[nn.Module, str]:
    """BatchNorm policy for multi-process training; returns ``(model, "sync" | "per-rank" | "none")``.

    On GPUs (NCCL) every BatchNorm becomes :class:`torch.nn.SyncBatchNorm`: batch statistics over the
    global batch, as in a single-process run (same parameters and state_dict keys). SyncBatchNorm
    only runs on accelerators (torch raises "expected input tensor to be on GPU" for CPU tensors), so
    on CPU (gloo) each rank normalises with its own shard's statistics; DDP broadcasts rank 0's
    running statistics at every forward, and rank 0's are the ones saved and exported.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, "none"
    if not _active():
        return model, "none"
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), "sync"
    return model, "per-rank"


class LogProb(nn.Module):
    """``forward(v, v_neg=None)`` -> ``model.log_prob(v)`` (and of ``v_neg``): one DDP forward per step.

    DistributedDataParallel hooks ``forward``; the flow's objective is ``log_prob``, and negative
    training needs two densities before a single backward, so both go through one call here.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, v: Tensor, v_neg: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        log_p = self.model.log_prob(v)
        if v_neg is None:
            return log_p
        return log_p, log_prob_running_stats(self.model, v_neg)
