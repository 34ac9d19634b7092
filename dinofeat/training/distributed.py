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
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..utils import get_logger

__all__ = ["DistContext", "init_distributed", "is_distributed", "get_world_size", "get_rank",
           "all_reduce_mean", "all_reduce_sum", "all_gather_objects", "broadcast_object",
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


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(device: str | torch.device | None = None,
                     backend: str | None = None,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or run alone.

    Args:
        device: ``"cuda"``/``"cpu"`` (default: CUDA when available). Under torchrun each
            process takes GPU ``LOCAL_RANK``.
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL on GPU, gloo on CPU).
        timeout_minutes: how long collective operations wait for a slow process.

    Returns the :class:`DistContext`. A process group that is already initialised (for
    instance by the caller) is reused as it is.
    """
    want_cuda = (torch.device(device).type == "cuda") if device is not None \
        else torch.cuda.is_available()
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") or 0
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    elif rank is not None and world is not None and world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"RANK/WORLD_SIZE are set but {var} is not; start the job "
                                 "with torchrun (it sets all of them)")
        backend = backend or ("nccl" if want_cuda else "gloo")
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
        log.info("process %d of %d joined (%s, local rank %d)", rank, world, backend,
                 local_rank)
    else:
        rank, world, backend = 0, 1, None
    if want_cuda:
        index = local_rank if world > 1 else (torch.device(device).index or 0
                                              if device is not None else 0)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                       backend=backend, owns_group=owns)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
