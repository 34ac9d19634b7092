"""The DINO training loop: :func:`train`.

One optimiser step, in order:

1. write the step's learning rate and weight decay (decayed group only) into the
   optimiser (per-iteration cosine schedules, :mod:`dinofeat.training.schedules`);
2. (``teacher="prev_iter"``) the teacher becomes a copy of the student;
3. for each of ``grad_accum_steps`` micro-batches: the teacher (no gradient) sees the 2
   global crops, the student all crops, under autocast (bf16 / fp16 / fp32);
   :class:`~dinofeat.training.loss.DINOLoss` (which updates the centre, all-reduced over
   processes); a non-finite loss stops the run; backward (fp16: through the
   ``GradScaler``'s loss scaling);
4. unscale (fp16), clip every parameter's gradient norm on its own, drop the head's
   last-layer gradients during the first ``freeze_last_layer`` epochs, optimiser step;
5. (``teacher="momentum"``) EMA teacher update with the step's momentum.

At the end of each epoch (``teacher="prev_epoch"``) the teacher becomes a copy of the
student, the collapse monitor judges the epoch, the optional online k-NN runs, and
``checkpoint.pth`` is written atomically (also every ``save_every_iters`` steps), with a
numbered copy every ``saveckp_freq`` epochs. Running the same configuration again resumes
from ``checkpoint.pth`` exactly (same images, crops, dropped paths and weights as an
uninterrupted run).

Under ``torchrun`` every process runs this same function; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..accel import fast_math
from ..backbones import build_backbone, parse_arch
from ..weights import CheckpointError
from ..utils import atomic_write_json, get_logger
from ..zoo import Preprocessing
from .. import runtime
from . import distributed as D
from .augment import MultiCropAugmentation
from .batch_augment import BatchMultiCropAugmentation
from .checkpoint import (CHECKPOINT_NAME, RELEASE_ARCH_FIELDS, capture_rng_state,
                         load_checkpoint, numbered_checkpoint_name, read_release_checkpoint,
                         restore_rng_state, save_checkpoint)
from .config import TrainConfig
from .data import TrainImages, build_train_loader
from .head import MultiCropNetwork, Predictor, build_head
from .knn import online_knn
from .loss import DINOLoss
from .monitor import CollapseMonitor, max_rss_bytes, rss_bytes, teacher_stats
from .optim import (apply_schedules, build_optimizer, cancel_last_layer_gradients,
                    clip_gradients, ema_update, param_groups)
from .schedules import Schedules, build_schedules

__all__ = ["train", "TrainResult", "TrainState", "NonFiniteLossError", "build_networks",
           "run_metadata", "canonical_arch", "load_network_state", "copy_weights",
           "LOG_NAME", "CONFIG_NAME"]

log = get_logger("dinofeat.train")

LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"

#: Options that fix the networks' shapes: a checkpoint made with other values cannot be
#: resumed.
_SHAPE_FIELDS = ("out_dim", "norm_last_layer", "use_bn_in_head", "head_layers", "hidden_dim",
                 "bottleneck_dim", "predictor", "optimizer")
#: Options that fix where in the data a mid-epoch checkpoint is.
_DATA_FIELDS = ("batch_size_per_gpu", "grad_accum_steps", "seed", "data")
_MAX_BAD_FILES_KEPT = 10_000
#: Backbone families whose convolutions gain from cuDNN's autotuning (``cudnn.benchmark``).
CUDNN_BENCHMARK_FAMILIES = ("resnet", "xcit")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped (the last checkpoint is kept)."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``history`` holds one summary per epoch run (loss, lr, collapse statistics, k-NN
    accuracy, unreadable images...), including the epochs of earlier, resumed runs."""

    run_dir: Path
    epoch: int                      # epochs completed
    iteration: int                  # optimiser steps completed
    history: list[dict[str, Any]]
    checkpoint: Path | None
    collapsed: bool = False
    skipped_images: int = 0
    knn: dict[str, float] | None = None
    resumed_from: str | None = None


@dataclass
class TrainState:
    """What callbacks receive after every optimiser step (``event="step"``) and at the end
    of every epoch (``event="epoch"``, after the checkpoint is written). A callback may
    raise to stop the run (the loop does not catch it)."""

    event: str
    epoch: int
    step: int                       # steps done in this epoch
    iteration: int                  # steps done in the whole run
    loss: float | None
    student: nn.Module
    teacher: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    rank: int
    run_dir: Path
    record: dict[str, Any] | None = None


# ------------------------------------------------------------------ networks
def canonical_arch(cfg: TrainConfig) -> str:
    """An architecture name that carries the patch size (``vit_small8``, ``resnet50``)."""
    family, size, patch = parse_arch(cfg.arch, cfg.patch_size)
    if family == "vit":
        return f"vit_{size}{patch}"
    if family == "resnet":
        return "resnet50"
    return cfg.arch


def build_networks(cfg: TrainConfig) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """``(student, teacher)`` for ``cfg``: the same backbone and head, stochastic depth in
    the student only, the predictor (ablation) in the student only, the teacher a copy of
    the student with ``requires_grad=False``."""
    def backbone(drop_path: float) -> nn.Module:
        return build_backbone(cfg.arch, cfg.patch_size, img_size=cfg.global_crop_size,
                              drop_path_rate=drop_path)

    s_backbone = backbone(cfg.drop_path_rate)
    dim = int(s_backbone.embed_dim)
    predictor = Predictor(cfg.bottleneck_dim, cfg.hidden_dim, use_bn=cfg.use_bn_in_head) \
        if cfg.predictor else None
    student = MultiCropNetwork(s_backbone, build_head(cfg, dim), predictor)
    teacher = MultiCropNetwork(backbone(0.0), build_head(cfg, dim))
    copy_weights(teacher, student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's parameters and buffers into the teacher, by name (student-only
    modules such as the predictor are skipped)."""
    s_params = {_strip(n): p for n, p in student.named_parameters()}
    s_bufs = {_strip(n): b for n, b in student.named_buffers()}
    dst, src = [], []
    for n, p in teacher.named_parameters():
        dst.append(p)
        src.append(s_params[_strip(n)].detach())
    torch._foreach_copy_(dst, src)
    for n, b in teacher.named_buffers():
        b.copy_(s_bufs[_strip(n)])


def network_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a student/teacher with the release's keys (``backbone.*``, ``head.*``;
    no DDP/compile prefixes), on the CPU."""
    return {k: v.detach().cpu() for k, v in D.unwrap(net).state_dict().items()}


def load_network_state(net: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``backbone.*``/``head.*``/``predictor.*`` tensors into a
    :class:`MultiCropNetwork`, part by part (each backbone reads its own key names);
    :class:`CheckpointError` naming ``source`` when they do not fit."""
    net = D.unwrap(net)
    children = dict(net.named_children())
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in children}
    unexpected = []
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in parts:
            parts[head][rest] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"{source}: tensors for modules this network does not have: "
                              f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for name, module in children.items():
        if not parts[name]:
            raise CheckpointError(f"{source}: no {name}.* tensors")
        try:
            module.load_state_dict(parts[name], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{source}: the {name} weights do not fit this "
                                  f"configuration: {str(e).splitlines()[0]} "
                                  f"{' '.join(str(e).split())[:600]}") from None


def run_metadata(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The ``"dinofeat"`` entry of a checkpoint: what :func:`dinofeat.load` needs to
    rebuild the teacher backbone with the run's preprocessing (resize to 256/224 of the
    global crop size, centre crop to the global crop size, the run's mean/std/grayscale)."""
    crop = cfg.global_crop_size
    prep = Preprocessing(mode="dino", resize_size=int(round(crop * 256 / 224)), crop_size=crop,
                         mean=tuple(cfg.mean), std=tuple(cfg.std), grayscale=cfg.grayscale)
    return {"name": name, "arch": canonical_arch(cfg), "preprocessing": prep.to_dict(),
            "pos_embed_interp": "dino"}


# ------------------------------------------------------------------ logging
class _JsonLog:
    """Rank 0's ``log.jsonl``: one JSON object per line, flushed as written."""

    def __init__(self, path: Path | None):
        self.path = path
        self._f = None
        if path is not None:
            # O_NOFOLLOW: a link planted at log.jsonl (dangling or not) is refused, never
            # appended through
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                             0o644)
            except OSError:
                if Path(path).is_symlink():
                    raise OSError(f"{path} is a symbolic link; the training log is not "
                                  "written through links") from None
                raise
            self._f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(_jsonable(record)) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan" / "inf": valid JSON, still readable
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _truncate_log(path: Path, iteration: int, epoch: int) -> None:
    """Drop log lines of steps/epochs after a checkpoint (they will be run again)."""
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            kind = rec.get("type")
            if kind == "step" and rec.get("iteration", 0) >= iteration:
                continue
            if kind == "epoch" and rec.get("epoch", 0) >= epoch:
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    from ..utils import atomic_write_bytes
    atomic_write_bytes(path, "".join(keep).encode())


class _TensorBoard:
    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: "
                                 "pip install 'dinofeat[tensorboard]'") from None
            self.writer = SummaryWriter(str(folder))

    def write(self, record: Mapping[str, Any], step: int, prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (
                    "iteration", "epoch", "step", "time"):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------ the run
class _Run:
    """State of one training run on this process (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, callbacks: Sequence[Callable[[TrainState], Any]]):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.ctx = D.init_distributed(cfg.device)
        self.device = self.ctx.device
        self.out = Path(cfg.output_dir)
        self.is_main = self.ctx.is_main
        self.name = self.out.resolve().name

    # .............................................................. setup
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.batch_augment:  # per image: decode + seed; per batch: the crops
            self.augment = BatchMultiCropAugmentation.from_config(cfg)
            self.dataset = TrainImages(cfg.data, self.augment.prepare)
        else:
            self.augment = MultiCropAugmentation.from_config(cfg)
            self.dataset = TrainImages(cfg.data, self.augment)  # bad --data fails before mkdir
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        family, _, _ = parse_arch(cfg.arch, cfg.patch_size)
        self.channels_last = family == "resnet"
        # IEEE fp32 (no TF32) stated explicitly; cuDNN autotuning pays off for the
        # convolution-heavy backbones, whose input shapes are fixed per crop size
        runtime.configure_cuda(self.device, benchmark=family in CUDNN_BENCHMARK_FAMILIES)
        self.autocast_dtype = cfg.autocast_dtype(self.device.type)
        if cfg.precision == "fp16" and self.autocast_dtype is None:
            log.info("precision fp16 needs CUDA; running in fp32 on %s", self.device)
        if cfg.knn_eval_every > 0:
            for split in ("train", "val"):
                if not (Path(cfg.knn_eval_data) / split).is_dir():
                    raise FileNotFoundError(f"--knn-eval-data {cfg.knn_eval_data} needs "
                                            f"'train' and 'val' class folders; no {split}/")

        # data
        self.loader, self.sampler = build_train_loader(
            self.dataset, batch_size=cfg.batch_size_per_gpu, num_workers=cfg.num_workers,
            seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
            pin_memory=self.device.type == "cuda",
            collate_fn=self.augment.collate if cfg.batch_augment else None)
        micro_per_epoch = len(self.loader)
        ipe = micro_per_epoch // cfg.grad_accum_steps
        if cfg.max_iters_per_epoch is not None:
            ipe = min(ipe, cfg.max_iters_per_epoch)
        if ipe < 1:
            raise ValueError(f"{cfg.data}: {len(self.dataset)} images give "
                             f"{micro_per_epoch} batches per process, fewer than "
                             f"--grad-accum-steps {cfg.grad_accum_steps}")
        self.iters_per_epoch = ipe
        self.total_batch = cfg.total_batch(ctx.world_size)
        self.schedules: Schedules = build_schedules(cfg, ipe, self.total_batch)

        # networks: the same initial weights on every process (seeded alike), then
        # per-process random streams (drop-path, augmentation in the main process)
        torch.manual_seed(cfg.seed)
        student, teacher = build_networks(cfg)
        _seed_everything(cfg.seed + ctx.rank)
        if self.device.type == "cuda":  # SyncBatchNorm exists for GPUs only
            student = D.convert_sync_batchnorm(student, ctx)
            teacher = D.convert_sync_batchnorm(teacher, ctx)
        elif ctx.distributed and D.has_batchnorm(student):
            log.warning("BatchNorm on CPU processes is not synchronised (SyncBatchNorm "
                        "needs GPUs): each process normalises with its own batch statistics")
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.student = student.to(self.device, memory_format=fmt)
        self.teacher = teacher.to(self.device, memory_format=fmt)
        self.dino_loss = DINOLoss.from_config(cfg).to(self.device)
        self.optimizer = build_optimizer(cfg, param_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.uses_loss_scaling(
            self.device.type) else None
        self.monitor = CollapseMonitor(cfg.out_dim)

        # where we start
        self.epoch, self.epoch_step, self.iteration = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.skipped_total = 0
        self.skipped_epoch = 0
        self.epoch_losses: list[float] = []  # this epoch's step losses (kept across resumes)
        self.bad_files: set[str] = set()
        self.last_knn: dict[str, float] | None = None
        self.resumed_from: str | None = None
        self._resume()
        if self.is_main:  # log lines after the starting point will be written again
            _truncate_log(self.out / LOG_NAME, self.iteration, self.epoch)

        # wrappers: DDP after loading (it broadcasts rank 0's weights), then compile
        self.student_ddp = D.wrap_ddp(self.student, ctx)
        self.student_fwd = torch.compile(self.student_ddp) if cfg.compile else self.student_ddp
        self.teacher_fwd = torch.compile(self.teacher) if cfg.compile else self.teacher

        # outputs
        self.ckpt_path = self.out / CHECKPOINT_NAME
        if self.is_main:
            atomic_write_json(self.out / CONFIG_NAME, cfg.to_dict())
        self.jlog = _JsonLog(self.out / LOG_NAME if self.is_main else None)
        self.tb = _TensorBoard(self.out / "tb" if (cfg.tensorboard and self.is_main) else None)
        if self.is_main:
            n_params = sum(p.numel() for p in self.student.parameters())
            def n(k: int, word: str) -> str:  # "1 process", "2 processes"
                return f"{k} {word}" if k == 1 else f"{k} {word}" + (
                    "es" if word.endswith("s") else "s")
            log.info("%s: %s, %s x %s x %d accumulation = batch %d, %s per epoch, %s, "
                     "student %.1fM parameters, %s on %s",
                     self.name, n(len(self.dataset), "image"), n(ctx.world_size, "process"),
                     n(cfg.batch_size_per_gpu, "image"), cfg.grad_accum_steps,
                     self.total_batch, n(ipe, "step"), n(cfg.epochs, "epoch"),
                     n_params / 1e6, canonical_arch(cfg), self.device)

    def _resume(self) -> None:
        cfg = self.cfg
        path = self.out / CHECKPOINT_NAME
        # rank 0 decides, from its own disk (the one that holds the run folder); the other
        # ranks follow, even when their disk shows another file or none
        kind = None
        if self.is_main:
            if cfg.resume and path.is_file():
                kind = "own"
            elif cfg.resume_from:
                kind = "release"
            elif path.is_file():
                log.warning("%s exists but resume is off: starting again from scratch (it "
                            "will be overwritten)", path)
        kind = D.broadcast_object(kind)
        if kind == "own":
            self._resume_own(path)
        elif kind == "release":
            self._resume_release(Path(cfg.resume_from))
        if kind is not None and self.ctx.distributed:
            # every rank continues from rank 0's teacher and centre, bit for bit (the
            # student is broadcast by DistributedDataParallel when it wraps it)
            D.broadcast_tensors(list(self.teacher.parameters()) +
                                list(self.teacher.buffers()) +
                                list(self.dino_loss.buffers()))

    def _read_shared(self, path: Path, reader: Callable[[Path], Any]) -> Any:
        """``reader(path)`` as rank 0 sees it, on every rank: rank 0 reads the file; a rank
        whose disk shows the same file (a shared file system) reads its own copy, any
        other rank receives rank 0's. An error on rank 0 is raised on every rank."""
        value, error, stamp = None, None, None
        if self.is_main:
            try:
                value = reader(path)
                st = path.stat()
                stamp = (st.st_size, st.st_mtime_ns)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if not self.ctx.distributed:
            if error is not None:
                raise error
            return value
        msg, stamp = D.broadcast_object(
            (None if error is None else f"{type(error).__name__}: {error}", stamp))
        if error is not None:
            raise error
        if msg is not None:
            raise RuntimeError(f"rank 0 could not resume from {path}: {msg}")
        if not self.is_main:
            try:
                st = path.stat()
                same = (st.st_size, st.st_mtime_ns) == tuple(stamp)
            except OSError:
                same = False
            if same:
                value = reader(path)
        need = D.all_gather_objects(value is None)
        if any(need):  # someone lacks the file: rank 0 sends its copy to everyone
            got = D.broadcast_object(value if self.is_main else None)
            if value is None:
                value = got
        return value

    def _resume_own(self, path: Path) -> None:
        cfg, ctx = self.cfg, self.ctx
        ckpt = self._read_shared(path, load_checkpoint)
        old = dict(ckpt.get("config") or {})
        bad = [f"{k}: {old.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} now"
               for k in _SHAPE_FIELDS if k in old and old[k] != _plain(getattr(cfg, k))]
        try:
            old_arch = canonical_arch(TrainConfig(arch=old["arch"],
                                                  patch_size=old.get("patch_size", 16)))
        except (KeyError, ValueError, TypeError):
            old_arch = None
        if old_arch is not None and old_arch != canonical_arch(cfg):
            bad.insert(0, f"arch: {old_arch} in the checkpoint, {canonical_arch(cfg)} now")
        if bad:
            raise ValueError(f"{path} was made with different networks ({'; '.join(bad)}); "
                             "use the same options, another --out, or --no-resume")
        load_network_state(self.student, ckpt["student"], f"{path} (student)")
        load_network_state(self.teacher, ckpt["teacher"], f"{path} (teacher)")
        self._load_optimizer_state(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.dino_loss.load_state_dict(ckpt.get("dino_loss") or {}, strict=False)
        self.monitor.load_state_dict(ckpt.get("monitor") or {})
        self.history = list(ckpt.get("history") or [])
        data = dict(ckpt.get("data") or {})
        per_rank = list(data.get("per_rank") or [])
        if ctx.rank < len(per_rank):
            mine = per_rank[ctx.rank]
            self.skipped_total = int(mine.get("skipped_total", 0))
            self.skipped_epoch = int(mine.get("skipped_epoch", 0))
            self.bad_files = set(mine.get("bad_files") or [])
        self.last_knn = ckpt.get("knn")
        self.epoch_losses = [float(v) for v in ckpt.get("epoch_losses") or []]
        self.epoch = int(ckpt["epoch"])
        self.epoch_step = int(ckpt.get("epoch_step", 0))
        self.iteration = int(ckpt["iteration"])
        same_layout = (int(data.get("world_size", ctx.world_size)) == ctx.world_size and
                       int(data.get("iters_per_epoch", self.iters_per_epoch)) ==
                       self.iters_per_epoch and
                       all(old.get(k) == _plain(getattr(cfg, k)) for k in _DATA_FIELDS
                           if k in old))
        if not same_layout:
            if self.epoch_step and self.is_main:
                log.warning("resuming with a different data layout (processes, batch, seed "
                            "or data): epoch %d restarts from its first step", self.epoch)
            self.epoch_step = 0
            self.iteration = self.epoch * self.iters_per_epoch
            self.epoch_losses = []
        rngs = ckpt.get("rng") or []
        if same_layout and ctx.rank < len(rngs):
            restore_rng_state(rngs[ctx.rank])
        elif self.is_main:
            log.warning("no saved random state for this process layout: the rest of the run "
                        "is not bit-identical to an uninterrupted one")
        changed = [k for k in old if k in cfg.to_dict() and old[k] != cfg.to_dict()[k]
                   and k not in ("resume",)]
        self.resumed_from = str(path)
        if self.is_main:
            log.info("resuming from %s: epoch %d, step %d of %d, iteration %d%s", path,
                     self.epoch, self.epoch_step, self.iters_per_epoch, self.iteration,
                     f" (options changed: {', '.join(changed)})" if changed else "")

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """``optimizer.load_state_dict`` keeping our group flags (``decay``,
        ``lars_exclude``): saved groups replace ours whole, and the release's groups do
        not have them (its second group would then get weight decay)."""
        flags = [{k: g[k] for k in ("decay", "lars_exclude") if k in g}
                 for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for g, f in zip(self.optimizer.param_groups, flags):
            for k, v in f.items():
                g.setdefault(k, v)

    def _resume_release(self, path: Path) -> None:
        cfg = self.cfg
        expected = set(D.unwrap(self.student).state_dict())
        rel = self._read_shared(path, lambda p: read_release_checkpoint(
            p, expected_keys=expected))
        args = rel["args"]
        ours = {"arch": canonical_arch(cfg), "patch_size": cfg.patch_size,
                "out_dim": cfg.out_dim, "norm_last_layer": cfg.norm_last_layer,
                "use_bn_in_head": cfg.use_bn_in_head}
        if args:
            theirs = dict(args)
            if "arch" in theirs:
                try:
                    theirs["arch"] = canonical_arch(TrainConfig(
                        arch=str(theirs["arch"]), patch_size=int(theirs.get("patch_size", 16))))
                except ValueError:
                    pass
                if str(theirs["arch"]).startswith("xcit"):  # naming differs; shapes decide
                    theirs.pop("arch")
            bad = [f"{k}={theirs[k]!r} (yours: {ours[k]!r})" for k in RELEASE_ARCH_FIELDS
                   if k in theirs and theirs[k] != ours[k]]
            if bad:
                raise ValueError(f"{path} was trained with {', '.join(bad)}; pass the same "
                                 "options to continue from it")
        load_network_state(self.student, rel["student"], f"{path} (student)")
        load_network_state(self.teacher, rel["teacher"], f"{path} (teacher)")
        if rel["optimizer"] is not None:
            try:
                self._load_optimizer_state(rel["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                log.warning("%s: optimizer state does not fit (%s); starting the optimizer "
                            "afresh", path, e)
        if self.scaler is not None and rel["scaler"]:
            self.scaler.load_state_dict(rel["scaler"])
        if rel["center"] is not None:
            c = rel["center"].float().reshape(1, -1)
            if c.shape != self.dino_loss.center.shape:
                raise CheckpointError(f"{path}: centre has {c.shape[1]} dimensions, "
                                      f"out_dim is {cfg.out_dim}")
            self.dino_loss.center.copy_(c)
        self.epoch = rel["epoch"]
        self.epoch_step = 0
        self.iteration = self.epoch * self.iters_per_epoch
        self.resumed_from = str(path)
        if self.epoch >= cfg.epochs and self.is_main:
            log.warning("%s already has %d epochs; --epochs %d: nothing to do", path,
                        self.epoch, cfg.epochs)
        if self.is_main:
            log.info("continuing the original DINO checkpoint %s from epoch %d", path,
                     self.epoch)

    # .............................................................. checkpoints
    def _checkpoint_state(self, epoch: int, epoch_step: int) -> dict[str, Any] | None:
        """The checkpoint dictionary on rank 0, ``None`` on the other ranks (copying the
        networks and optimizer to the CPU is rank 0's work only). Collective: every rank
        sends its RNG states and unreadable-file counts to rank 0."""
        gathered = D.gather_objects({
            "rng": capture_rng_state(), "skipped_total": self.skipped_total,
            "skipped_epoch": self.skipped_epoch,
            "bad_files": sorted(self.bad_files)[:_MAX_BAD_FILES_KEPT]})
        if not self.is_main:
            return None
        return {
            "student": network_state_dict(self.student),
            "teacher": network_state_dict(self.teacher),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": {k: v.detach().cpu() for k, v in self.dino_loss.state_dict().items()},
            "epoch": epoch,
            "epoch_step": epoch_step,
            "iteration": self.iteration,
            "config": self.cfg.to_dict(),
            "rng": [g.pop("rng") for g in gathered],
            "data": {"seed": self.cfg.seed, "world_size": self.ctx.world_size,
                     "batch_size_per_gpu": self.cfg.batch_size_per_gpu,
                     "iters_per_epoch": self.iters_per_epoch,
                     "num_images": len(self.dataset), "per_rank": gathered},
            "history": self.history,
            "monitor": self.monitor.state_dict(),
            "knn": self.last_knn,
            "epoch_losses": list(self.epoch_losses) if epoch_step else [],
            "dinofeat": run_metadata(self.cfg, self.name),
        }

    def save(self, epoch: int, epoch_step: int, numbered: bool = False) -> None:
        state = self._checkpoint_state(epoch, epoch_step)
        if state is not None:
            save_checkpoint(state, self.ckpt_path)
            if numbered:
                shutil.copyfile(self.ckpt_path, self.out / numbered_checkpoint_name(epoch))

    # .............................................................. one step
    def _note_failures(self, failures: list[str]) -> None:
        # count samples whose own image was unreadable (BatchFailures.replaced), not every
        # failed replacement try: a run of N bad files in a row counts N, not N(N+1)/2
        replaced = getattr(failures, "replaced", len(failures))
        self.skipped_epoch += replaced
        self.skipped_total += replaced
        for f in failures:
            if f not in self.bad_files:
                self.bad_files.add(f)
                if self.is_main:
                    log.warning("unreadable image skipped (a neighbour is used instead): %s", f)

    def _to_device(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [c.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
                for c in crops]

    def train_step(self, batches: Iterable, epoch: int, it: int, want_stats: bool
                   ) -> tuple[float, dict[str, float]]:
        """One optimiser step over ``grad_accum_steps`` micro-batches; returns the loss
        (mean over micro-batches and processes) and, if asked, collapse statistics."""
        cfg = self.cfg
        lr, wd, momentum = self.schedules.at(it)
        apply_schedules(self.optimizer, lr, wd)
        if cfg.teacher == "prev_iter":
            copy_weights(self.teacher, self.student)
        self.optimizer.zero_grad(set_to_none=True)
        accum = cfg.grad_accum_steps
        loss_sum = 0.0
        stats: dict[str, float] = {}
        for micro, (crops, failures) in enumerate(batches):
            self._note_failures(failures)
            crops = self._to_device(crops)
            sync = micro == accum - 1
            no_sync = self.student_ddp.no_sync() if (not sync and self.ctx.distributed) \
                else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    with torch.no_grad():
                        teacher_out = self.teacher_fwd(crops[:2])
                    student_out = self.student_fwd(crops)
                    if want_stats and micro == 0:
                        stats = teacher_stats(teacher_out, self.dino_loss.center,
                                              self.dino_loss.teacher_temperature(epoch))
                    loss = self.dino_loss(student_out, teacher_out, epoch)
                value = D.all_reduce_mean(loss.detach().float().clone())
                if not torch.isfinite(value):
                    raise NonFiniteLossError(
                        f"loss is {value.item()} at iteration {it} (epoch {epoch}, step "
                        f"{it - epoch * self.iters_per_epoch} of {self.iters_per_epoch}); "
                        f"training stopped. The last good checkpoint is kept: "
                        f"{self.ckpt_path if self.ckpt_path.exists() else '(none yet)'}. "
                        "Try a lower --lr, --precision fp32/bf16, or --clip-grad.")
                loss_sum += value.item()
                scaled = loss / accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
        if want_stats:
            stats.update({f"loss_{k}": v for k, v in self.dino_loss.last_stats.items()
                          if k in ("kl", "teacher_max_prob", "teacher_prob_std")})
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad > 0:
            clip_gradients(self.student, cfg.clip_grad)
        cancel_last_layer_gradients(self.student, epoch, cfg.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if cfg.teacher == "momentum":
            ema_update(self.teacher, self.student, momentum)
        return loss_sum / accum, stats

    # .............................................................. epochs
    def _micro_batches(self, data_iter, n: int):
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(data_iter)
            self._data_wait += time.perf_counter() - t0  # the step waited for the loader
            yield batch

    def _callback(self, event: str, epoch: int, step: int, loss: float | None,
                  record: dict | None) -> None:
        if not self.callbacks:
            return
        state = TrainState(event=event, epoch=epoch, step=step, iteration=self.iteration,
                           loss=loss, student=self.student, teacher=self.teacher,
                           dino_loss=self.dino_loss, optimizer=self.optimizer, config=self.cfg,
                           rank=self.ctx.rank, run_dir=self.out, record=record)
        for cb in self.callbacks:
            cb(state)

    def _memory(self) -> dict[str, float]:
        mem = {"rss_mb": rss_bytes() / 2 ** 20, "max_rss_mb": max_rss_bytes() / 2 ** 20}
        if self.device.type == "cuda":
            mem["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return mem

    def run_epoch(self, epoch: int, start_step: int) -> dict[str, Any]:
        cfg = self.cfg
        ipe, accum, bs = self.iters_per_epoch, cfg.grad_accum_steps, cfg.batch_size_per_gpu
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_step * accum * bs)
        if start_step == 0:
            self.skipped_epoch = 0
            self.epoch_losses = []
        data_iter = iter(self.loader)
        images_per_step = self.total_batch
        t_epoch = t_window = time.perf_counter()
        window_steps = 0
        self._data_wait = 0.0
        losses = self.epoch_losses
        steps = range(start_step, ipe)
        bar = None
        if self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=ipe, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", dynamic_ncols=True, leave=False)
        try:
            for step in steps:
                it = epoch * ipe + step
                last = step == ipe - 1
                want_log = (step % cfg.log_every == 0) or last
                loss, stats = self.train_step(self._micro_batches(data_iter, accum), epoch,
                                              it, want_stats=want_log)
                self.iteration = it + 1
                losses.append(loss)
                window_steps += 1
                if stats:
                    self.monitor.update(stats)
                record = None
                if want_log:
                    now = time.perf_counter()
                    lr, wd, momentum = self.schedules.at(it)
                    record = {"type": "step", "iteration": it, "epoch": epoch, "step": step,
                              "loss": loss, "lr": lr, "wd": wd,
                              "momentum": momentum if cfg.teacher == "momentum" else None,
                              "teacher_temp": self.dino_loss.teacher_temperature(epoch),
                              "images_per_s": window_steps * images_per_step /
                              max(now - t_window, 1e-9),
                              # share of the time spent waiting for images: above ~0.05
                              # the loader, not the model, sets the pace (more workers)
                              "data_wait_frac": self._data_wait / max(now - t_window, 1e-9),
                              "time": time.time(), **self._memory(), **stats}
                    t_window, window_steps, self._data_wait = now, 0, 0.0
                    self.jlog.write(record)
                    self.tb.write(record, it, "train")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.schedules.at(it)[0]:.2e}")
                if cfg.save_every_iters and (step + 1) % cfg.save_every_iters == 0 and not last:
                    self.save(epoch, step + 1)
                self._callback("step", epoch, step + 1, loss, record)
        finally:
            if bar is not None:
                bar.close()
            del data_iter
        elapsed = time.perf_counter() - t_epoch
        done_here = ipe - start_step
        return {"loss_sum": sum(losses), "steps": len(losses), "time": elapsed,
                "resumed_at_step": start_step,
                "images_per_s": done_here * images_per_step / max(elapsed, 1e-9)}

    def end_epoch(self, epoch: int, stats: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.teacher == "prev_epoch":
            copy_weights(self.teacher, self.student)
        judged = self.monitor.end_epoch()
        if judged["collapsed"] and self.is_main:
            log.warning("epoch %d: the teacher looks collapsed (%s). See docs/training.md, "
                        "'Collapse'", epoch, judged["collapse_reason"])
        knn = None
        if cfg.knn_eval_every and ((epoch + 1) % cfg.knn_eval_every == 0 or
                                   epoch + 1 == cfg.epochs):
            # every process embeds its share; the same result on all of them
            knn = online_knn(D.unwrap(self.teacher).backbone, cfg.knn_eval_data,
                             Preprocessing(**run_metadata(cfg, self.name)["preprocessing"]),
                             self.device, self.autocast_dtype,
                             batch_size=max(cfg.batch_size_per_gpu, 64),
                             num_workers=min(cfg.num_workers, 4))
            if self.is_main:
                log.info("epoch %d: k-NN top-1 %.2f%%, top-5 %.2f%%", epoch, knn["knn_top1"],
                         knn["knn_top5"])
            self.last_knn = knn
        lr, wd, momentum = self.schedules.at(self.iteration - 1)
        skipped = D.all_reduce_sum(torch.tensor([self.skipped_epoch, self.skipped_total],
                                                dtype=torch.int64, device=self.device))
        skipped_epoch, skipped_total = (int(v) for v in skipped.tolist())
        summary = {"type": "epoch", "epoch": epoch, "iteration": self.iteration,
                   "loss": stats["loss_sum"] / max(stats["steps"], 1),
                   "lr": lr, "wd": wd,
                   "momentum": momentum if cfg.teacher == "momentum" else None,
                   "teacher_temp": self.dino_loss.teacher_temperature(epoch),
                   "epoch_time_s": stats["time"], "images_per_s": stats["images_per_s"],
                   "skipped_images": skipped_epoch, "skipped_total": skipped_total,
                   "time": time.time(), **self._memory(), **judged, **(knn or {})}
        if stats["resumed_at_step"]:
            summary["resumed_at_step"] = stats["resumed_at_step"]
        self.history.append({k: v for k, v in summary.items() if k != "type"})
        self.jlog.write(summary)
        self.tb.write(summary, epoch, "epoch")
        if skipped_epoch and self.is_main:
            log.warning("epoch %d: %d unreadable images skipped (%d in all)", epoch,
                        skipped_epoch, skipped_total)
        if self.is_main:
            log.info("epoch %d/%d: loss %.4f, %.1f images/s%s", epoch + 1, cfg.epochs,
                     summary["loss"], summary["images_per_s"],
                     f", k-NN top-1 {knn['knn_top1']:.2f}%" if knn else "")
        numbered = bool(cfg.saveckp_freq) and (epoch + 1) % cfg.saveckp_freq == 0
        self.save(epoch + 1, 0, numbered=numbered)
        return summary

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.is_main:
            self.jlog.write({"type": "event", "event": "resume" if self.resumed_from else
                             "start", "epoch": self.epoch, "iteration": self.iteration,
                             "from": self.resumed_from, "world_size": self.ctx.world_size,
                             "time": time.time()})
        start_step = self.epoch_step
        # the platform's fastest matmul kernels that keep fp32 accuracy (oneDNN on CPU
        # behind dinofeat.accel's numerical self-check; nothing changes on GPU)
        with fast_math(self.device):
            for epoch in range(self.epoch, cfg.epochs):
                stats = self.run_epoch(epoch, start_step)
                start_step = 0
                summary = self.end_epoch(epoch, stats)
                self.epoch = epoch + 1
                self._callback("epoch", epoch, self.iters_per_epoch, summary["loss"],
                               summary)
        skipped = D.all_reduce_sum(torch.tensor([self.skipped_total], dtype=torch.int64,
                                                device=self.device))
        return TrainResult(run_dir=self.out, epoch=self.epoch, iteration=self.iteration,
                           history=list(self.history),
                           checkpoint=self.ckpt_path if self.ckpt_path.exists() else None,
                           collapsed=self.monitor.collapsed, skipped_images=int(skipped.item()),
                           knn=self.last_knn, resumed_from=self.resumed_from)

    def close(self) -> None:
        for closer in (getattr(self, "jlog", None), getattr(self, "tb", None)):
            if closer is not None:
                closer.close()
        D.cleanup(self.ctx)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def train(config: TrainConfig | None = None, *,
          callbacks: Sequence[Callable[[TrainState], Any]] = (),
          **overrides: Any) -> TrainResult:
    """Pretrain a DINO model; the same options as ``dinofeat train``.

    Args:
        config: a :class:`~dinofeat.training.config.TrainConfig` (default: the release's
            ViT-S/16 recipe); ``overrides`` are applied on top (``data=``,
            ``output_dir=``, ``epochs=``...).
        callbacks: functions called with a :class:`TrainState` after every optimiser step
            and at every epoch end (for monitoring or tests; raising stops the run).

    Returns a :class:`TrainResult` (run folder, epochs and steps done, per-epoch history,
    collapse flag, unreadable-image count, last k-NN accuracy).

    The run folder (``output_dir``) gets ``config.json``, ``log.jsonl``,
    ``checkpoint.pth`` (loadable with ``dinofeat.load(output_dir)``) and numbered copies.
    If it already holds a checkpoint, training resumes from it (``resume=False`` to
    start over). Under ``torchrun`` each process calls this function; rank 0 writes.

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf (the last checkpoint
    stays as it was), ``ValueError``/``FileNotFoundError`` for bad options or data.
    """
    cfg = (config if config is not None else TrainConfig())
    if overrides:
        cfg = cfg.replace(**overrides)
    cfg.validate()
    if not cfg.data:
        raise ValueError("no training data: pass data= (a folder of images or a .txt list)")
    if cfg.resume_from and runtime.launcher_ranks()[0] == 0 and \
            not Path(cfg.resume_from).is_file():  # before building networks; rank 0 reads it
        raise FileNotFoundError(f"--resume-from: no such checkpoint file: {cfg.resume_from}")
    run = _Run(cfg, callbacks)
    try:
        run.setup()
        return run.run()
    finally:
        run.close()
