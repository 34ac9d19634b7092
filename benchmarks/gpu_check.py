"""One prepared GPU check of dinofeat: about 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py              # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run    # every part on the CPU, tiny sizes (< 1 min)
    python benchmarks/gpu_check.py --parts train,embed --budget 300

Parts, in this order, each in a child process with its own time box (a part that runs
out of time is killed and keeps what it had recorded); the results file
(``benchmarks/results/gpu_check.json``, naming the device) is rewritten after every part:

``train``       ViT-S/16 DINO step, 2x224 + 10x96 crops, batch 64, out_dim 65536, crops
                already on the GPU: a release-style step (the original's computation in
                plain PyTorch from benchmarks/plain.py: explicit attention, fp16 autocast
                with GradScaler, per-parameter clipping with a host sync per parameter,
                foreach AdamW) next to dinofeat's step in fp16 (GradScaler) and bf16:
                images/s and peak memory (the release publishes 15.4 GB).
``loader``      the same recipe through ``dinofeat.train`` from 500x375 JPEG photos with
                the real data loader: images/s, peak memory and the share of step time
                spent waiting for the loader (``data_wait_frac``).
``resume``      exact resume on CUDA: stopped mid-epoch and resumed, the teacher must be
                bit-identical to an uninterrupted run (and a second uninterrupted run shows
                the GPU's own run-to-run determinism).
``nccl_accum``  a single-rank NCCL process group (created with ``device_id``) around a
                training run with gradient accumulation (2 x 4 images against 1 x 8).
``compile``     ``dinofeat.train(..., compile=True)`` for 5 steps.
``embed``       ``embed`` at fp32/fp16/bf16 (cosine to fp32, images/s) and the backbone
                against timm's ViT-S/16 with the same weights (images/s, cosine).
``attention``   ``attention_maps`` of a ViT-S/8 at 480 px.
``fashion_mnist`` DINO on Fashion-MNIST on the GPU (the ``ship`` recipe of
                ``dinofeat.demo``), k-NN top-1 of the 10,000 test photos against the
                60,000 training photos; the goal is 90 %.

Weights are random (nothing is downloaded); speed and memory do not depend on them.
``--dry-run`` runs every part in this process on the CPU with tiny sizes (``compile`` then
uses the ``eager`` backend, no C++ compiler), so CI checks that the script still works.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

PARTS = ("train", "loader", "resume", "nccl_accum", "compile", "embed", "attention",
         "fashion_mnist")


@dataclass(frozen=True)
class Sizes:
    arch: str = "vit_small"
    patch: int = 16
    global_size: int = 224
    local_size: int = 96
    nlocal: int = 10
    batch: int = 64
    out_dim: int = 65536
    hidden: int = 2048           # projection head MLP width and bottleneck (the release's)
    bottleneck: int = 256
    warmup: int = 3
    steps: int = 10
    photos: int = 64             # distinct 500x375 photos made for the loader parts
    loader_steps: int = 12
    workers: int = 0             # 0: all cores but two
    small_arch: str = "vit_tiny"  # resume / accumulation / compile runs
    small_crop: int = 64
    small_local: int = 32
    small_out_dim: int = 4096
    compile_batch: int = 16
    embed_images: int = 512
    embed_batch: int = 128
    bench_batch: int = 256
    attn_arch: str = "vit_small"
    attn_patch: int = 8
    attn_size: int = 480
    fmnist_steps: int = 3000
    fmnist_bank: int = 60000
    fmnist_test: int = 10000


FULL = Sizes()
DRY = Sizes(arch="vit_tiny", global_size=32, local_size=16, nlocal=2, batch=4, out_dim=256,
            hidden=64, bottleneck=32, warmup=1, steps=1, photos=8, loader_steps=2, workers=1, small_crop=32,
            small_local=16, small_out_dim=128, compile_batch=4, embed_images=8,
            embed_batch=4, bench_batch=4, attn_arch="vit_tiny", attn_size=64,
            fmnist_steps=2, fmnist_bank=200, fmnist_test=100)

#: Seconds each part may take on the GPU (the whole check: 8 minutes at most).
BUDGET = {"train": 60, "loader": 50, "resume": 40, "nccl_accum": 25, "compile": 110,
          "embed": 40, "attention": 20, "fashion_mnist": 130}
RELEASE_PEAK_GB = 15.4  # published: ViT-S/16, 2x224 + 10x96, batch 64 per GPU


# ------------------------------------------------------------------ helpers
class Part:
    """What a part records; ``save()`` writes it at once (a killed part keeps it)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def update(self, d: dict[str, Any]) -> None:
        self.data.update(d)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None


def mixed_dtype(dev: torch.device) -> torch.dtype:
    """fp16 on GPUs (the release's); bf16 in the CPU dry run (CPU fp16 kernels crawl)."""
    return torch.float16 if dev.type == "cuda" else torch.bfloat16


def workers(S: Sizes) -> int:
    return S.workers or max(1, (os.cpu_count() or 2) - 2)


def make_photos(folder: Path, n: int) -> list[Path]:
    """``n`` 500x375 JPEG photos (Debian wallpapers when installed, else generated)."""
    from augment import photos
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo{i:04d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    imgs, _ = photos(n)
    for p, im in zip(paths, imgs):
        im.save(p, quality=90)
    return paths


def image_list(folder: Path, paths: list[Path], count: int) -> Path:
    """A .txt list naming ``paths`` over and over, ``count`` lines."""
    f = folder / f"list_{count}.txt"
    f.write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(count)))
    return f


def read_log(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


# ------------------------------------------------------------------ train
def release_step(S: Sizes, dev: torch.device) -> Callable[[list[torch.Tensor]], float]:
    """The original's training step in plain PyTorch (benchmarks/plain.py's modules)."""
    from plain import PlainHead, build_plain_dino, dino_loss
    dims = {"vit_small": (384, 12, 6), "vit_tiny": (192, 12, 3)}[S.arch]
    student, teacher = build_plain_dino(*dims, S.patch, S.out_dim)
    if (S.hidden, S.bottleneck) != (2048, 256):  # the dry run's small head
        student.head = PlainHead(dims[0], S.out_dim, S.hidden, S.bottleneck)
        teacher.head = PlainHead(dims[0], S.out_dim, S.hidden, S.bottleneck)
        teacher.head.load_state_dict(student.head.state_dict())
        teacher.head.requires_grad_(False)
    student.to(dev).train()
    teacher.to(dev)
    decay = [p for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1]
    no_decay = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, weight_decay=0.04)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    center = torch.zeros(1, S.out_dim, device=dev)

    def step(crops):
        with torch.autocast(dev.type, dtype=mixed_dtype(dev)):
            t_out = teacher(crops[:2])
            s_out = student(crops)
            loss = dino_loss(s_out, t_out, center, len(crops))
        if not math.isfinite(loss.item()):
            raise FloatingPointError("release-style step: non-finite loss")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in student.parameters():  # the release's clipping: one host sync per tensor
            if p.grad is not None:
                factor = 3.0 / (p.grad.norm(2) + 1e-6)
                if factor < 1:
                    p.grad.mul_(factor)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.996).add_((1 - 0.996) * ps.detach())
            center.mul_(0.9).add_(t_out.float().mean(dim=0, keepdim=True) * 0.1)
        return loss
    return step


def dinofeat_step(S: Sizes, dev: torch.device, precision: str):
    """dinofeat's training step (the loop's, from its public pieces) on device crops."""
    from dinofeat import runtime
    from dinofeat.training import TrainConfig
    from dinofeat.training.loop import build_networks
    from dinofeat.training.loss import DINOLoss
    from dinofeat.training.optim import (build_optimizer, cancel_last_layer_gradients,
                                         clip_gradients, ema_update, param_groups)
    cfg = TrainConfig(arch=S.arch, patch_size=S.patch, out_dim=S.out_dim,
                      hidden_dim=S.hidden, bottleneck_dim=S.bottleneck,
                      global_crop_size=S.global_size, local_crop_size=S.local_size,
                      local_crops_number=S.nlocal, batch_size_per_gpu=S.batch,
                      precision=precision, epochs=100)
    runtime.configure_cuda(dev)
    student, teacher = build_networks(cfg)
    student, teacher = student.to(dev).train(), teacher.to(dev)
    loss_fn = DINOLoss.from_config(cfg).to(dev)
    opt = build_optimizer(cfg, param_groups(student))
    scaler = torch.amp.GradScaler("cuda") if cfg.uses_loss_scaling(dev.type) else None
    dtype = cfg.autocast_dtype(dev.type)

    def step(crops):
        with runtime.autocast(dev, dtype=dtype):
            with torch.no_grad():
                t_out = teacher(crops[:2])
            s_out = student(crops)
            loss = loss_fn(s_out, t_out, 1)
        if not torch.isfinite(loss).item():  # the loop's one sync per step
            raise FloatingPointError("dinofeat step: non-finite loss")
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        clip_gradients(student, 3.0)
        cancel_last_layer_gradients(student, 1, 1)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ema_update(teacher, student, 0.996)
        return loss
    return step


def part_train(S: Sizes, dev: torch.device, rec: Part, deadline: float) -> None:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(S.batch, 3, S.global_size, S.global_size, generator=g)
             for _ in range(2)]
    crops += [torch.randn(S.batch, 3, S.local_size, S.local_size, generator=g)
              for _ in range(S.nlocal)]
    crops = [c.to(dev) for c in crops]
    rec.update({"recipe": f"{S.arch}/{S.patch}, 2x{S.global_size} + {S.nlocal}x{S.local_size}, "
                          f"batch {S.batch}, out_dim {S.out_dim}", "rows": {}})
    makers = {"release_fp16": lambda: release_step(S, dev),
              "dinofeat_fp16": lambda: dinofeat_step(S, dev, "fp16"),
              "dinofeat_bf16": lambda: dinofeat_step(S, dev, "bf16")}
    rows: dict[str, Any] = {}
    for name, make in makers.items():
        if time.perf_counter() > deadline:
            rows[name] = {"skipped": "out of time"}
            continue
        reset_peak(dev)
        step = make()
        for _ in range(S.warmup):
            step(crops)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(S.steps):
            loss = step(crops)
        sync(dev)
        dt = time.perf_counter() - t0
        rows[name] = {"images_per_s": S.batch * S.steps / dt, "step_ms": 1000 * dt / S.steps,
                      "peak_memory_gb": peak_gb(dev), "loss": float(loss)}
        rec["rows"] = rows
        del step
    base = rows.get("release_fp16", {}).get("images_per_s")
    if base:
        speed = {k: v["images_per_s"] / base for k, v in rows.items() if "images_per_s" in v}
        rec["speedup_vs_release_style"] = speed
        mem = rows["release_fp16"].get("peak_memory_gb")
        if mem:
            rec["memory_vs_release_style"] = {k: v["peak_memory_gb"] / mem for k, v in rows.items()
                                              if v.get("peak_memory_gb")}
        best = max(speed.get("dinofeat_fp16", 0), speed.get("dinofeat_bf16", 0))
        rec["goal_2x_release_style_met"] = bool(best >= 2.0)
    rec["release_published_peak_gb"] = RELEASE_PEAK_GB


# ------------------------------------------------------------------ loader
def part_loader(S: Sizes, dev: torch.device, rec: Part, deadline: float, work: Path) -> None:
    import dinofeat
    from augment import photos
    from dinofeat.training import MultiCropAugmentation
    paths = make_photos(work / "photos", S.photos)
    # one worker's cost per image (one thread), to size --num-workers
    torch.set_num_threads(1)
    aug = MultiCropAugmentation(local_crops_number=S.nlocal, global_crop_size=S.global_size,
                                local_crop_size=S.local_size)
    imgs, _ = photos(min(8, S.photos))
    aug(imgs[0])
    t0 = time.process_time()
    for im in imgs:
        aug(im)
    ms = 1000 * (time.process_time() - t0) / len(imgs)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    nw = workers(S)
    rec.update({"augment_ms_per_image_one_thread": ms, "num_workers": nw,
                "loader_images_per_s_ceiling": nw * 1000 / ms})
    data = image_list(work, paths, S.batch * S.loader_steps)
    res = dinofeat.train(arch=S.arch, patch_size=S.patch, out_dim=S.out_dim,
                         hidden_dim=S.hidden, bottleneck_dim=S.bottleneck,
                         global_crop_size=S.global_size, local_crop_size=S.local_size,
                         local_crops_number=S.nlocal, batch_size_per_gpu=S.batch,
                         precision="fp16", epochs=1, warmup_epochs=0, num_workers=nw,
                         log_every=1,
                         saveckp_freq=0, data=str(data), output_dir=str(work / "loader_run"),
                         device=str(dev), resume=False)
    steps = [r for r in read_log(res.run_dir) if r.get("type") == "step"]
    steps = steps[2:] or steps[-1:]  # the first two (warm-up) off when there are more
    if steps:
        rec.update({
            "images_per_s": statistics.median(r["images_per_s"] for r in steps),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steps),
            "peak_memory_gb": max(r.get("cuda_max_allocated_mb", 0) for r in steps) * 2 ** 20
            / 1e9 if dev.type == "cuda" else None,
            "steps_measured": len(steps)})


# ------------------------------------------------------------------ small runs
def small_config(S: Sizes, data: Path, out: Path, **kw):
    from dinofeat.training import TrainConfig
    base = dict(arch=S.small_arch, patch_size=16, out_dim=S.small_out_dim,
                hidden_dim=S.hidden, bottleneck_dim=S.bottleneck, global_crop_size=S.small_crop, local_crop_size=S.small_local,
                local_crops_number=2, batch_size_per_gpu=8, epochs=2, warmup_epochs=1,
                num_workers=min(2, workers(S)), log_every=1, saveckp_freq=0,
                data=str(data), output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def teachers_equal(a: Path, b: Path) -> dict[str, Any]:
    from dinofeat.training.checkpoint import load_checkpoint
    ta = load_checkpoint(a / "checkpoint.pth")["teacher"]
    tb = load_checkpoint(b / "checkpoint.pth")["teacher"]
    same = sum(torch.equal(ta[k], tb[k]) for k in ta)
    diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    return {"identical_tensors": int(same), "tensors": len(ta), "bit_identical": same == len(ta),
            "max_abs_diff": diff}


def part_resume(S: Sizes, dev: torch.device, rec: Part, deadline: float, work: Path) -> None:
    import dinofeat
    torch.use_deterministic_algorithms(True, warn_only=True)
    paths = make_photos(work / "photos", S.photos)
    data = image_list(work, paths, 16)
    kw = dict(save_every_iters=1, precision="fp16", device=str(dev), resume=True)

    class Stop(Exception):
        pass

    def stop_at_3(state):
        if state.event == "step" and state.iteration == 3:
            raise Stop

    root = work / "resume"
    dinofeat.train(small_config(S, data, root / "a", **kw))
    with contextlib.suppress(Stop):
        dinofeat.train(small_config(S, data, root / "b", **kw), callbacks=[stop_at_3])
    rec["stopped_at_iteration"] = 3
    res = dinofeat.train(small_config(S, data, root / "b", **kw))
    rec.update({"resumed_from": res.resumed_from, "iterations": res.iteration,
                "resumed_vs_uninterrupted": teachers_equal(root / "a", root / "b")})
    if dev.type == "cuda":  # the GPU's own run-to-run determinism, for reading the above
        dinofeat.train(small_config(S, data, root / "a2", **kw))
        rec["uninterrupted_twice"] = teachers_equal(root / "a", root / "a2")


def part_nccl_accum(S: Sizes, dev: torch.device, rec: Part, deadline: float,
                    work: Path) -> None:
    import torch.distributed as dist

    import dinofeat
    from dinofeat.training.checkpoint import load_checkpoint
    paths = make_photos(work / "photos", S.photos)
    data = image_list(work, paths, 16)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    with socket_port() as port:
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, **kwargs)
    try:
        t = torch.arange(4.0, device=dev)
        dist.all_reduce(t)
        rec.update({"backend": dist.get_backend(), "all_reduce_ok": t.tolist() == [0, 1, 2, 3]})
        # one SGD step, frozen centre, no drop-path: 2 x 4 accumulated must equal 1 x 8
        kw = dict(precision="fp32", device=str(dev), epochs=1, warmup_epochs=0,
                  max_iters_per_epoch=1, optimizer="sgd", lr=0.5, center_momentum=1.0,
                  drop_path_rate=0.0, freeze_last_layer=0, weight_decay=0.0,
                  weight_decay_end=0.0, warmup_teacher_temp_epochs=0, resume=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the frozen centre is warned about
            r2 = dinofeat.train(small_config(S, data, work / "accum2", batch_size_per_gpu=4,
                                             grad_accum_steps=2, **kw))
            r1 = dinofeat.train(small_config(S, data, work / "accum1", batch_size_per_gpu=8,
                                             grad_accum_steps=1, **kw))
        a = load_checkpoint(work / "accum2" / "checkpoint.pth")["student"]
        b = load_checkpoint(work / "accum1" / "checkpoint.pth")["student"]
        close = sum(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
        rec.update({"iterations": [r2.iteration, r1.iteration],
                    "loss": [r2.history[-1]["loss"], r1.history[-1]["loss"]],
                    "student_tensors_close_2x4_vs_1x8": [int(close), len(a)],
                    "accumulation_matches": close == len(a),
                    "max_abs_difference": max(float((a[k].float() - b[k].float()).abs().max())
                                              for k in a)})
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def socket_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


def part_compile(S: Sizes, dev: torch.device, rec: Part, deadline: float, work: Path,
                 dry: bool) -> None:
    import functools

    import dinofeat
    paths = make_photos(work / "photos", S.photos)
    data = image_list(work, paths, S.compile_batch * 5)
    if dry:  # no C++ compiler needed: dynamo tracing with the eager backend
        torch.compile = functools.partial(torch.compile, backend="eager")
    t0 = time.perf_counter()

    def progress(state):  # kept if the time box ends the part
        if state.event == "step":
            rec.update({"steps_done": state.iteration,
                        "seconds_to_step": time.perf_counter() - t0})
    res = dinofeat.train(small_config(S, data, work / "compile_run", epochs=1, warmup_epochs=0,
                                      batch_size_per_gpu=S.compile_batch, precision="bf16",
                                      num_workers=workers(S), compile=True, device=str(dev),
                                      resume=False), callbacks=[progress])
    steps = [r for r in read_log(res.run_dir) if r.get("type") == "step"]
    rec.update({"steps": res.iteration, "seconds_total": time.perf_counter() - t0,
                "loss": [r["loss"] for r in steps],
                "images_per_s_last_step": steps[-1]["images_per_s"] if steps else None})


# ------------------------------------------------------------------ inference
def part_embed(S: Sizes, dev: torch.device, rec: Part, deadline: float, work: Path) -> None:
    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    paths = make_photos(work / "photos", S.photos)
    paths = [paths[i % len(paths)] for i in range(S.embed_images)]
    torch.manual_seed(0)
    model = DinoModel(build_backbone(S.arch, S.patch, img_size=S.global_size),
                      name=f"{S.arch}{S.patch} random")
    model = model.to(dev).eval()
    feats, rows = {}, {}
    for prec in ("fp32", "fp16", "bf16"):
        model.embed(paths[:S.embed_batch], precision=prec, batch_size=S.embed_batch,
                    num_workers=0, progress=False)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        feats[prec] = model.embed(paths, precision=prec, batch_size=S.embed_batch,
                                  num_workers=workers(S), progress=False)
        dt = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(feats[prec], feats["fp32"])
        rows[prec] = {"images_per_s_from_jpeg": len(paths) / dt, "cosine_min": float(cos.min()),
                      "cosine_mean": float(cos.mean())}
        rec["embed"] = rows
    rec["cosine_goal_0.9999_met"] = all(r["cosine_min"] >= 0.9999 for r in rows.values())
    # the backbone alone against timm, same weights, same device batch
    import timm
    name = {"vit_small": "vit_small_patch16_224", "vit_tiny": "vit_tiny_patch16_224"}[S.arch]
    tm = timm.create_model(name, pretrained=False, num_classes=0, img_size=S.global_size)
    missing = tm.load_state_dict(model.backbone.state_dict(), strict=False)
    tm = tm.to(dev).eval()
    x = torch.randn(S.bench_batch, 3, S.global_size, S.global_size, device=dev)
    bench = {}
    for prec in ("fp32", "fp16", "bf16"):
        from dinofeat import runtime
        out = {}
        for who, net in (("dinofeat", model), ("timm", tm)):
            with torch.inference_mode(), runtime.autocast(dev, prec):
                net(x)
                sync(dev)
                t0 = time.perf_counter()
                reps = 3
                for _ in range(reps):
                    y = net(x)
                sync(dev)
            out[who] = {"images_per_s": reps * S.bench_batch / (time.perf_counter() - t0),
                        "features": y.float()}
        cos = torch.nn.functional.cosine_similarity(out["dinofeat"]["features"],
                                                    out["timm"]["features"])
        bench[prec] = {"dinofeat_images_per_s": out["dinofeat"]["images_per_s"],
                       "timm_images_per_s": out["timm"]["images_per_s"],
                       "ratio": out["dinofeat"]["images_per_s"] / out["timm"]["images_per_s"],
                       "cosine_min_to_timm": float(cos.min())}
        rec["backbone_vs_timm"] = bench
    rec["timm_unloaded_keys"] = list(missing.missing_keys)[:5]


def part_attention(S: Sizes, dev: torch.device, rec: Part, deadline: float, work: Path) -> None:
    from PIL import Image

    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    torch.manual_seed(0)
    model = DinoModel(build_backbone(S.attn_arch, S.attn_patch), name="attn").to(dev).eval()
    img = Image.open(make_photos(work / "photos", S.photos)[0]).convert("RGB")
    model.attention_maps(img, size=S.attn_size)  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    maps = model.attention_maps(img, size=S.attn_size)
    sync(dev)
    rec.update({"model": f"{S.attn_arch}/{S.attn_patch}", "short_side": S.attn_size,
                "seconds": time.perf_counter() - t0, "heads_shape": list(maps.heads.shape),
                "finite": bool(torch.isfinite(torch.as_tensor(maps.heads)).all())})


def part_fashion_mnist(S: Sizes, dev: torch.device, rec: Part, deadline: float,
                       work: Path) -> None:
    import dataclasses

    import dinofeat
    from dinofeat import demo
    from dinofeat.datasets import load_fashion_mnist
    from dinofeat.model import save_safetensors
    root = os.environ.get("GPU_CHECK_FASHION_MNIST") or None
    xtr, ytr = load_fashion_mnist("train", root)
    xte, yte = load_fashion_mnist("test", root)
    mean, std = demo.fashion_mnist_stats(xtr)
    folder = demo.export_training_images(xtr[:S.fmnist_bank] if S is DRY else xtr,
                                         work / "fmnist_png")
    recipe = dataclasses.replace(demo.RECIPES["ship"], steps=S.fmnist_steps,
                                 chunks=min(demo.RECIPES["ship"].chunks, S.fmnist_steps))
    cfg = demo.recipe_config(recipe, data=folder, output_dir=work / "fmnist_run", mean=mean,
                             std=std, device=str(dev), num_workers=workers(S), resume=False)
    rec.update({"recipe": "ship", "steps": recipe.steps, "batch": cfg.batch_size_per_gpu,
                "arch": cfg.arch})
    t0 = time.perf_counter()
    res = dinofeat.train(cfg)
    rec.update({"train_seconds": time.perf_counter() - t0, "collapsed": res.collapsed,
                "final_loss": res.history[-1]["loss"]})
    model = dinofeat.load(res.run_dir, device=dev)
    # kept outside the scratch folder (runs/ is not committed): the file to ship if it wins
    weights = (work if S is DRY else ROOT / "runs" / "gpu_check") / "vit_t_fmnist_gpu.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, weights)
    rec["weights_file"] = str(weights)
    knn = demo.knn_evaluation(model, xtr[:S.fmnist_bank], ytr[:S.fmnist_bank],
                              xte[:S.fmnist_test], yte[:S.fmnist_test])
    shipped = None
    with contextlib.suppress(OSError, KeyError, ValueError):
        shipped = json.loads((HERE / "results" / "fashion_mnist_ship.json").read_text()
                             )["knn"]["dino"]["top1"]
    rec.update({"knn": knn, "goal_90_met": bool(knn["top1"] >= 90.0),
                "shipped_vit_t_fmnist_top1": shipped,
                "beats_shipped": shipped is not None and knn["top1"] > shipped
                and S is not DRY})


# ------------------------------------------------------------------ driver
def run_part(name: str, S: Sizes, dev: torch.device, rec: Part, budget: float, work: Path,
             dry: bool) -> None:
    # time left for optional work inside a part (the dry run does everything)
    deadline = time.perf_counter() + budget * 0.8 if not dry else math.inf
    fn = {"train": lambda: part_train(S, dev, rec, deadline),
          "loader": lambda: part_loader(S, dev, rec, deadline, work),
          "resume": lambda: part_resume(S, dev, rec, deadline, work),
          "nccl_accum": lambda: part_nccl_accum(S, dev, rec, deadline, work),
          "compile": lambda: part_compile(S, dev, rec, deadline, work, dry),
          "embed": lambda: part_embed(S, dev, rec, deadline, work),
          "attention": lambda: part_attention(S, dev, rec, deadline, work),
          "fashion_mnist": lambda: part_fashion_mnist(S, dev, rec, deadline, work)}[name]
    fn()


def device_info(dev: torch.device) -> dict[str, Any]:
    info = {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu(), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update({"gpu": p.name, "gpu_memory_gb": p.total_memory / 1e9,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    else:
        info["gpu"] = None
    return info


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def summary_lines(results: dict[str, Any]) -> list[str]:
    p = results["parts"]
    out = [f"dinofeat GPU check on {results['machine'].get('gpu') or 'CPU (dry run)'}"]
    for name, r in p.items():
        status = r.get("status")
        line = f"  {name:13s} {status:8s} {r.get('seconds', 0):6.1f}s"
        if name == "train" and r.get("rows"):
            line += "  " + ", ".join(
                f"{k} {v['images_per_s']:.0f} img/s"
                + (f" {v['peak_memory_gb']:.1f} GB" if v.get("peak_memory_gb") else "")
                for k, v in r["rows"].items() if "images_per_s" in v)
        elif name == "loader" and "images_per_s" in r:
            line += (f"  {r['images_per_s']:.0f} img/s, waiting for data "
                     f"{100 * r['data_wait_frac']:.0f}% ({r['num_workers']} workers, "
                     f"{r['augment_ms_per_image_one_thread']:.1f} ms/image each)")
        elif name == "resume" and "resumed_vs_uninterrupted" in r:
            line += f"  teacher bit-identical: {r['resumed_vs_uninterrupted']['bit_identical']}"
        elif name == "embed" and "embed" in r:
            line += "  " + ", ".join(f"{k} cos {v['cosine_min']:.6f}"
                                     for k, v in r["embed"].items())
        elif name == "fashion_mnist" and "knn" in r:
            line += f"  k-NN top-1 {r['knn']['top1']:.2f}%"
        if status != "ok":
            line += f"  {r.get('error', '')[:200]}"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Parts: " + ", ".join(PARTS))
    ap.add_argument("--dry-run", action="store_true",
                    help="every part on the CPU with tiny sizes, in this process (CI)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for the whole check (default 470); a part gets at most "
                         "what is left, and is skipped under 10 s")
    ap.add_argument("--out", default=None, help="results JSON (default "
                    "benchmarks/results/gpu_check.json, gpu_check_dry_run.json with --dry-run)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--fashion-mnist", default=None, metavar="DIR",
                    help="folder of the Fashion-MNIST .gz files (default: the Debian package's "
                         "/usr/share/datasets/fashion-mnist, else data/fashion-mnist here)")
    ap.add_argument("--_child", nargs=3, metavar=("PART", "RESULT", "WORK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    S = DRY if dry else FULL

    if args._child:  # one part, in a fresh process
        name, result, work = args._child
        dev = torch.device("cuda", 0) if not dry else torch.device("cpu")
        rec = Part(Path(result))
        run_part(name, S, dev, rec, BUDGET[name], Path(work), dry)
        return rec.data

    fm = args.fashion_mnist
    if fm is None and (ROOT / "data" / "fashion-mnist").is_dir() and \
            not Path("/usr/share/datasets/fashion-mnist").is_dir():
        fm = str(ROOT / "data" / "fashion-mnist")
    if fm:
        os.environ["GPU_CHECK_FASHION_MNIST"] = fm  # read by the child processes too
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --dry-run to check the script on the CPU")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    dev = torch.device("cuda", 0) if not dry else torch.device("cpu")
    out = Path(args.out or HERE / "results" / ("gpu_check_dry_run.json" if dry
                                               else "gpu_check.json"))
    results: dict[str, Any] = {
        "what": "benchmarks/gpu_check.py" + (" --dry-run" if dry else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": device_info(dev), "sizes": asdict(S), "parts": {}}
    write_json(out, results)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        work.mkdir(parents=True, exist_ok=True)
        for name in parts:
            left = args.budget - (time.perf_counter() - t_start)
            box = min(BUDGET[name], left - 5)
            if box < 10 and not dry:
                results["parts"][name] = {"status": "skipped", "error": "out of time"}
                write_json(out, results)
                continue
            print(f"[gpu_check] {name} (up to {box:.0f} s)", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            part_file = work / f"part_{name}.json"
            status, error = "ok", ""
            if dry:
                rec = Part(part_file)
                try:
                    run_part(name, S, dev, rec, box, work, dry)
                except Exception:  # noqa: BLE001 - recorded, the other parts still run
                    status, error = "error", traceback.format_exc()[-1500:]
            else:
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--_child", name, str(part_file),
                         str(work)], timeout=box, capture_output=True, text=True,
                        env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
                        if name == "resume" else None)
                    if proc.returncode != 0:
                        status, error = "error", proc.stderr[-1500:]
                except subprocess.TimeoutExpired:
                    status, error = "timeout", f"killed after {box:.0f} s (partial results kept)"
            data = json.loads(part_file.read_text()) if part_file.exists() else {}
            data.update({"status": status, "seconds": time.perf_counter() - t0})
            if error:
                data["error"] = error
            results["parts"][name] = data
            results["total_seconds"] = time.perf_counter() - t_start
            write_json(out, results)
    lines = summary_lines(results)
    results["summary"] = lines
    write_json(out, results)
    print("\n".join(lines))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
