"""Where dinofeat runs: the device, the processes of a distributed job, numeric precision.

This module is the one place that decides these things; every other module asks it.

**Device.** :func:`default_device` is CUDA when available, else the CPU. Under a launcher
that starts one process per GPU (``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; ``srun``/``mpirun`` wrappers often set only ``RANK``/``WORLD_SIZE``) each
process takes GPU ``LOCAL_RANK``, or ``RANK % device_count()`` when ``LOCAL_RANK`` is
missing. :func:`resolve_device` turns a user's ``"cuda"`` (no index) into that GPU too, so
that ranks never pile up on ``cuda:0``.

**Processes.** :func:`init_process_group` joins the job the environment describes (NCCL on
GPUs with ``device_id`` bound, gloo on CPUs) or does nothing when the process is alone;
:func:`get_rank`/:func:`get_world_size` answer for both cases.

**Precision.** ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:data:`PRECISIONS`): fp32 means IEEE
fp32 matmuls and convolutions on CUDA (TF32 off, set explicitly by :func:`configure_cuda`);
bf16/fp16 mean autocast (:func:`autocast`), with the outputs returned in fp32 by callers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["PRECISIONS", "AUTOCAST_DTYPES", "check_precision", "autocast_dtype", "autocast",
           "needs_loss_scaling", "env_int", "launcher_ranks", "local_device_index",
           "default_device", "resolve_device", "is_distributed", "get_rank", "get_world_size",
           "init_process_group", "configure_cuda", "ieee_fp32", "device_scope"]

#: Autocast dtype of each precision name (``None``: no autocast, plain fp32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The precision names every interface accepts.
PRECISIONS = tuple(AUTOCAST_DTYPES)


# ------------------------------------------------------------------ precision
def check_precision(precision: str) -> str:
    """``precision`` itself; ``ValueError`` naming the valid ones when it is not one."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    return precision


def autocast_dtype(precision: str, device: str | torch.device = "cpu", *,
                   cpu_fp16: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: no autocast).

    ``cpu_fp16=False`` turns fp16 into plain fp32 off CUDA (training does this: fp16 with
    loss scaling is a CUDA recipe, and CPU fp16 kernels are slow or missing)."""
    dtype = AUTOCAST_DTYPES[check_precision(precision)]
    if dtype is torch.float16 and not cpu_fp16 and torch.device(device).type != "cuda":
        return None
    return dtype


def needs_loss_scaling(precision: str, device: str | torch.device) -> bool:
    """Whether training at ``precision`` on ``device`` needs a ``GradScaler`` (fp16 on
    CUDA: small fp16 gradients would underflow to zero without it)."""
    return check_precision(precision) == "fp16" and torch.device(device).type == "cuda"


def autocast(device: str | torch.device, precision: str | None = None, *,
             dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` (or an explicit ``dtype``) on ``device``; a
    no-op context for fp32."""
    if dtype is None and precision is not None:
        dtype = AUTOCAST_DTYPES[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ------------------------------------------------------------------ launcher and device
def env_int(name: str) -> int | None:
    """The integer value of environment variable ``name`` (``None`` when unset or empty);
    ``ValueError`` naming it when it is not an integer."""
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def launcher_ranks() -> tuple[int, int, int | None]:
    """``(rank, world_size, local_rank)`` as the launcher describes this process:
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (``local_rank`` is ``None`` when
    ``LOCAL_RANK`` is not set). ``(0, 1, None)`` for a process started alone."""
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    if rank is None or world is None or world < 1:
        return 0, 1, env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"environment: RANK={rank} is not in 0..WORLD_SIZE-1 "
                         f"(WORLD_SIZE={world})")
    return rank, world, env_int("LOCAL_RANK")


def local_device_index(rank: int | None = None, local_rank: int | None = None) -> int:
    """The GPU this process owns: ``LOCAL_RANK``, else ``RANK % device_count()``
    (launchers such as ``srun`` or ``mpirun`` may not set ``LOCAL_RANK``), else 0."""
    env_rank, world, env_local = launcher_ranks()
    local = local_rank if local_rank is not None else env_local
    if local is None:
        r = rank if rank is not None else (dist.get_rank() if _initialized() else env_rank)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 1
        local = r % max(count, 1)
    return int(local)


def default_device() -> torch.device:
    """CUDA when available (this process's GPU under a launcher), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    _, world, local = launcher_ranks()
    if world > 1 or local is not None or _initialized():
        return torch.device("cuda", local_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``: ``None`` is :func:`default_device`; ``"cuda"``
    without an index is this process's GPU under a launcher (the current GPU otherwise);
    ``ValueError`` when CUDA is asked for and not available."""
    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; "
                             "use 'cpu'")
        if dev.index is None:
            return default_device()
    return dev


# ------------------------------------------------------------------ process group
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return _initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def init_process_group(device: str | torch.device | None = None, *,
                       backend: str | None = None,
                       timeout: datetime.timedelta = datetime.timedelta(minutes=30)
                       ) -> tuple[int, int, bool]:
    """Join the job the environment describes; ``(rank, world_size, created)``.

    A group that already exists is used as it is (``created`` False); a process started
    alone (no ``WORLD_SIZE`` > 1) gets ``(0, 1, False)``. Otherwise ``MASTER_ADDR`` and
    ``MASTER_PORT`` must be set (``torchrun`` sets them); the backend is NCCL when
    ``device`` (default: :func:`default_device`) is CUDA, gloo otherwise. On CUDA the
    process's GPU becomes the current device and is bound to the group (``device_id``),
    so NCCL never guesses it.
    """
    if _initialized():
        return dist.get_rank(), dist.get_world_size(), False
    rank, world, _ = launcher_ranks()
    if world <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ValueError(f"RANK/WORLD_SIZE are set but {var} is not; start the job with "
                             "torchrun (it sets all of them)")
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        dev = torch.device("cuda", local_device_index(rank))
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                            world_size=world, timeout=timeout, **kwargs)
    return rank, world, True


# ------------------------------------------------------------------ CUDA settings
def configure_cuda(device: str | torch.device, *, benchmark: bool = False) -> None:
    """Make ``device`` the current GPU and state the numeric settings explicitly:
    fp32 matmuls and convolutions in IEEE fp32 (cuDNN's own default is TF32, which would
    break dinofeat's fp32 promise), and ``cudnn.benchmark`` as asked (worth it for
    networks of fixed input shapes with convolutions: ResNet, XCiT). No-op off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if dev.index is not None:
        torch.cuda.set_device(dev)
    _set_ieee_fp32()
    torch.backends.cudnn.benchmark = bool(benchmark)


def _set_ieee_fp32() -> None:
    # The new-style flags only: mixing them with allow_tf32 makes torch raise.
    # torch creates cudnn.conv/rnn and their fp32_precision at import; its stubs lack them
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # type: ignore[attr-defined]
        torch.backends.cudnn.rnn.fp32_precision = "ieee"  # type: ignore[attr-defined]
    else:  # older torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


_FP32_FLAGS = ((torch.backends.cuda.matmul, "fp32_precision"),
               (torch.backends.cudnn.conv, "fp32_precision"),  # type: ignore[attr-defined]
               (torch.backends.cudnn.rnn, "fp32_precision")) \
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") else ()


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Inside: CUDA matmuls and cuDNN convolutions in IEEE fp32 (no TF32); the previous
    settings are put back on leaving (for library calls that must not change a user's
    global settings)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _FP32_FLAGS]
    _set_ieee_fp32()
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@contextlib.contextmanager
def device_scope(device: str | torch.device) -> Iterator[None]:
    """Inside: ``device`` is the current CUDA device (no-op off CUDA)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        with torch.cuda.device(dev):
            yield
    else:
        yield
