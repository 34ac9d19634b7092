"""Running one training on several processes (``torchrun``) or on a single one.

``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per GPU on one or several machines;
:func:`init_distributed` joins them through ``env://`` with NCCL on GPUs and gloo on CPUs.
Without those variables the same code runs as a single process on the CPU or one GPU.

Only rank 0 writes files and logs (:attr:`DistContext.is_main`). The student is wrapped
in ``DistributedDataParallel`` (:func:`wrap_ddp`), BatchNorm layers become
``SyncBatchNorm`` (:func:`convert_sync_batchnorm`), and the DINO centre is averaged over
all processes with :func:`all_reduce_mean`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import runtime
from ..utils import get_logger

__all__ = ["DistContext", "init_distributed", "is_distributed", "get_world_size", "get_rank",
           "all_reduce_mean", "all_reduce_sum", "all_gather_objects", "gather_objects",
           "broadcast_object", "broadcast_tensors",
           "barrier", "has_batchnorm", "convert_sync_batchnorm", "wrap_ddp", "unwrap",
           "cleanup"]

log = get_logger("dinofeat.train")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    ``rank``/``world_size`` count processes over all machines, ``local_rank`` the
    processes of this machine (it picks the GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" | "gloo" | None (single process)
    owns_group: bool = False  # init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None,
                     backend: str | None = None,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or run alone.

    Args:
        device: ``"cuda"``/``"cpu"`` (default: CUDA when available). Under a launcher
            each process takes its own GPU (``LOCAL_RANK``, or ``RANK % device_count()``
            when the launcher does not set ``LOCAL_RANK``).
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL on GPU, gloo on CPU).
        timeout_minutes: how long collective operations wait for a slow process.

    Returns the :class:`DistContext`. A process group that is already initialised (for
    instance by the caller) is reused as it is.
    """
    dev = runtime.resolve_device(device)
    rank, world, owns = runtime.init_process_group(
        dev, backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dev.type == "cuda" and world > 1:  # each process its own GPU, whatever was asked
        dev = torch.device("cuda", runtime.local_device_index(rank))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_rank = dev.index if dev.type == "cuda" else (runtime.launcher_ranks()[2] or 0)
    used_backend = dist.get_backend() if (dist.is_available() and dist.is_initialized()) \
        else None
    if owns:
        log.info("process %d of %d joined (%s, %s)", rank, world, used_backend, dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank or 0, device=dev,
                       backend=used_backend if world > 1 else None, owns_group=owns)


is_distributed = runtime.is_distributed


def get_world_size() -> int:
    return runtime.get_world_size() if runtime.is_distributed() else 1


def get_rank() -> int:
    return runtime.get_rank() if runtime.is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes (in place; ``t`` itself when alone)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes (in place; ``t`` itself when alone)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when alone). Only for our own
    processes' small plain objects (RNG states, counters)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst``, ``None`` on the others
    (``[obj]`` when alone). Only for our own processes' small plain objects."""
    if not is_distributed():
        return [obj]
    box: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, box, dst=dst)
    return box


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Any, src: int = 0) -> None:
    """Overwrite ``tensors`` (an iterable of tensors, in the same order on every rank) with
    rank ``src``'s values, in place."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when several processes share the batch."""
    if ctx.distributed and has_batchnorm(model):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` under torchrun, ``model`` otherwise."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(
                model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
