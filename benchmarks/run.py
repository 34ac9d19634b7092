"""dinofeat performance benchmarks: one command, every row measured in the same run.

    python benchmarks/run.py            # full run (~15 min on 2 cores), writes the docs
    python benchmarks/run.py --quick    # small sizes, few repeats: for building/debugging
    python benchmarks/run.py --only embed attention --repeats 9

Sections (each timed with *interleaved* repeats: every variant once per round, rounds
repeated; medians with min-max spreads; ratios to the plain baseline from medians):

* ``matmul``: the machine's GEMM peak (2048^3) through PyTorch's default fp32 kernel,
  oneDNN fp32 and bf16: the ceilings the achieved GFLOP/s are compared with.
* ``embed``: images/s of ViT-S/16, ViT-B/16, ViT-S/8 at 224 for dinofeat (its default
  fast path, :mod:`dinofeat.accel`), the plain unfused computation (``plain.py``), timm as
  it comes, Hugging Face ``ViTModel`` and an exported ONNX Runtime session, in fp32 and
  bf16 (fp16 on GPU). All load the same random weights; each row's features are compared
  with dinofeat's default-kernel fp32 features (max abs difference / minimum cosine).
* ``e2e``: ``dinofeat embed`` (the CLI, in-process) on a folder of generated 500x375
  JPEGs, against the model-only rate at the same batch size and precision.
* ``attention``: latency of ``attention_maps`` of ViT-S/8 on one 480x480 image against
  computing every block unfused.
* ``train``: one DINO step (2x224 + Nx96 crops) of ViT-Tiny/16 and ViT-S/16, plain
  release step vs ``dinofeat.train`` components with dinofeat's kernels; images/s and peak
  RSS (measured in a child process per variant).
* ``index``: see benchmarks/index.py (its own section of docs/benchmarks.md);
  ``--only index`` runs it with small sizes.

Results go to ``benchmarks/results/perf.json`` (``perf-quick.json`` for ``--quick``) and,
for full runs, into the generated block of ``docs/benchmarks.md`` between the
``<!-- BEGIN perf -->`` / ``<!-- END perf -->`` markers (other sections are left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from plain import (PlainViT, build_plain_dino, plain_train_step,  # noqa: E402
                   vit_flops)

from dinofeat import accel  # noqa: E402
from dinofeat.backbones import VIT_SIZES, build_backbone, parse_arch  # noqa: E402
from dinofeat.model import DinoModel  # noqa: E402

BEGIN, END = "<!-- BEGIN perf (benchmarks/run.py) -->", "<!-- END perf -->"
#: "wall" (perf_counter) or "cpu" (process CPU time: on a shared machine, what the work
#: costs on the cores it got, insensitive to time spent waiting for a core; use with
#: --threads 1, where no thread spins waiting for another)
CLOCK = {"name": "wall", "fn": time.perf_counter}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOW = "fp16" if DEVICE.type == "cuda" else "bf16"  # the reduced precision of the platform
LOW_DTYPE = torch.float16 if LOW == "fp16" else torch.bfloat16


# ------------------------------------------------------------------ helpers
def machine() -> dict[str, Any]:
    cpu = "unknown"
    ident: list[str] = []  # cpu family, model (the name alone can be "AMD EPYC")
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith(("cpu family", "model\t")) and len(ident) < 2:
                ident.append(line.split(":", 1)[1].strip())
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    for mod in ("torchvision", "timm", "onnxruntime", "transformers", "faiss"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    if len(ident) == 2:
        cpu += f" (family {ident[0]}, model {ident[1]})"
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "cpu_flags": sorted(f for f in flags if f in (
                "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")),
            "dispatch_probes": accel.platform_report()["probes"],
            "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else None,
            "versions": versions, "onednn_fp32_check": accel.check_onednn_fp32().to_dict()}
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds of each variant per round; every round runs every variant once, in an
    order rotated by one each round (so that no variant always follows the same one)."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            gc.collect()
            sync()
            t0 = CLOCK["fn"]()
            variants[n]()
            sync()
            times[n].append(CLOCK["fn"]() - t0)
        print(f"  round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    return times


def stats(seconds: list[float], units: float = 1.0) -> dict[str, float]:
    """Rate ``units / s``: median, min and max over repeats (and the seconds)."""
    rates = [units / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "seconds_median": statistics.median(seconds), "n": len(seconds)}


def spread(s: dict[str, float]) -> str:
    return f"{s['min']:.3g}-{s['max']:.3g}"


# ------------------------------------------------------------------ matmul peak
def bench_matmul(repeats: int, n: int = 2048) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, device="cpu").to(DEVICE)
    b = torch.randn(n, n, generator=g, device="cpu").to(DEVICE)
    al, bl = a.to(LOW_DTYPE), b.to(LOW_DTYPE)
    flops = 2.0 * n ** 3
    reps = 3

    def run(x, y):
        for _ in range(reps):
            torch.mm(x, y)

    def onednn():
        with accel._onednn_setting("bf16"):
            run(a, b)

    variants = {"fp32 default kernel": lambda: run(a, b)}
    if DEVICE.type == "cpu" and accel._onednn_switch_exists():
        variants["fp32 oneDNN" + ("" if accel.onednn_fp32_available() else
                                  " (NOT fp32-exact here)")] = onednn
    variants[f"{LOW}"] = lambda: run(al, bl)
    times = interleaved(variants, repeats)
    rows = {k: stats(v, flops * reps / 1e9) for k, v in times.items()}
    fp32_peak = max(v["median"] for k, v in rows.items() if k.startswith("fp32") and
                    "NOT" not in k)
    return {"size": n, "rows": rows, "peak_gflops": {"fp32": fp32_peak,
                                                      LOW: rows[LOW]["median"]}}


# ------------------------------------------------------------------ embedding
EMBED_MODELS = {  # name: (arch, timm name, batch)
    "vit_s16": ("vit_small16", "vit_small_patch16_224", 32),
    "vit_b16": ("vit_base16", "vit_base_patch16_224", 16),
    "vit_s8": ("vit_small8", "vit_small_patch8_224", 8),
}


def hf_vit(sd: dict[str, torch.Tensor], dim: int, depth: int, heads: int, patch: int):
    """Hugging Face ViTModel with the same weights (q/k/v split from the fused qkv)."""
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=4 * dim, image_size=224, patch_size=patch,
                    layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    new = {"embeddings.cls_token": sd["cls_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    names = set(model.state_dict())
    v5 = "layers.0.attention.q_proj.weight" in names  # transformers >= 5 names
    for i in range(depth):
        p = f"blocks.{i}."
        if v5:
            q = f"layers.{i}."
            dst = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                   "proj": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        else:
            q = f"encoder.layer.{i}."
            dst = {"q": "attention.attention.query", "k": "attention.attention.key",
                   "v": "attention.attention.value", "proj": "attention.output.dense",
                   "fc1": "intermediate.dense", "fc2": "output.dense"}
        for t in ("weight", "bias"):
            for name, part in zip("qkv", sd[p + f"attn.qkv.{t}"].chunk(3)):
                new[q + f"{dst[name]}.{t}"] = part
            new[q + f"{dst['proj']}.{t}"] = sd[p + f"attn.proj.{t}"]
            new[q + f"{dst['fc1']}.{t}"] = sd[p + f"mlp.fc1.{t}"]
            new[q + f"{dst['fc2']}.{t}"] = sd[p + f"mlp.fc2.{t}"]
            new[q + f"layernorm_before.{t}"] = sd[p + f"norm1.{t}"]
            new[q + f"layernorm_after.{t}"] = sd[p + f"norm2.{t}"]
    missing, unexpected = model.load_state_dict(new, strict=False)
    if unexpected or [m for m in missing if "mask_token" not in m]:
        raise RuntimeError(f"HF ViT weights: missing {missing}, unexpected {unexpected}")
    return model


def bench_embed(name: str, repeats: int, batch: int | None, tmp: Path,
                with_compile: bool, ablations: bool = True) -> dict[str, Any]:
    import timm
    arch, timm_name, default_batch = EMBED_MODELS[name]
    batch = batch or default_batch
    _, size, patch = parse_arch(arch)
    dim, depth, heads = VIT_SIZES[size]
    torch.manual_seed(0)
    model = DinoModel(build_backbone(arch), name=name).eval().to(DEVICE)
    sd = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    plain = PlainViT(dim, depth, heads, patch).eval()
    plain.load_state_dict(sd)
    tm = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    tm.load_state_dict(sd)
    impls: dict[str, torch.nn.Module] = {"plain": plain.to(DEVICE), "timm": tm.to(DEVICE)}
    try:
        impls["Hugging Face ViTModel"] = hf_vit(sd, dim, depth, heads, patch).to(DEVICE)
    except ImportError:
        print("  transformers not installed: no Hugging Face row", file=sys.stderr)

    def feats(mod_name: str, m, inp):
        out = m(pixel_values=inp) if mod_name.startswith("Hugging") else m(inp)
        return out.last_hidden_state[:, 0] if hasattr(out, "last_hidden_state") else out

    with torch.inference_mode(), accel._onednn_setting("none"):
        reference = model.backbone(x).float().cpu()

    def fwd(mod_name, m, precision):
        def run():
            with torch.inference_mode():
                if precision == "fp32":
                    return feats(mod_name, m, x)
                with torch.autocast(DEVICE.type, dtype=LOW_DTYPE):
                    return feats(mod_name, m, x)
        return run

    def dinofeat_run(precision, fused_low=False):
        def run():
            with torch.inference_mode():
                if fused_low:  # ablation: the fused SDPA kernel kept in low precision
                    with accel.fast_math(DEVICE), torch.autocast(DEVICE.type, LOW_DTYPE):
                        return model.backbone(x)
                with accel.fast_inference(model, precision, DEVICE):
                    return model.backbone(x)
        return run

    def default_kernels():
        with torch.inference_mode(), accel._onednn_setting("none"):
            return model.backbone(x)

    variants: dict[str, Callable] = {}
    for prec in ("fp32", LOW):
        variants[f"dinofeat {prec}"] = dinofeat_run(prec)
        for k, m in impls.items():
            variants[f"{k} {prec}"] = fwd(k, m, prec)
    if ablations:
        variants["dinofeat fp32, default kernels (ablation)"] = default_kernels
    if DEVICE.type == "cpu" and ablations:
        variants[f"dinofeat {LOW}, fused SDPA (ablation)"] = dinofeat_run(LOW, fused_low=True)
    if DEVICE.type == "cpu":
        with contextlib.suppress(ImportError):
            import onnxruntime as ort

            from dinofeat.export import export_onnx
            path = tmp / f"{name}.onnx"
            export_onnx(model.cpu(), path, check_sizes=[224])
            model.to(DEVICE)
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            xn = x.cpu().numpy()
            variants["ONNX Runtime fp32"] = lambda: torch.from_numpy(
                sess.run(["cls"], {"input": xn})[0])
    if with_compile:
        import copy
        cm = accel.compile_model(copy.deepcopy(model))

        def compiled(precision):
            def run():
                with torch.inference_mode(), accel.fast_inference(cm, precision, DEVICE):
                    return cm.backbone(x)
            return run
        tc = torch.compile(copy.deepcopy(tm))  # the peer: timm as it comes, compiled
        for prec in ("fp32", LOW):
            t0 = time.perf_counter()
            compiled(prec)()
            print(f"  torch.compile {prec}: first call {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
            variants[f"dinofeat {prec} + torch.compile"] = compiled(prec)
            t0 = time.perf_counter()
            fwd("timm", tc, prec)()
            print(f"  timm + torch.compile {prec}: first call "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            variants[f"timm {prec} + torch.compile"] = fwd("timm", tc, prec)

    # accuracy of every variant against the default-kernel fp32 features
    accuracy = {}
    for k, fn in variants.items():
        out = fn().float().cpu()
        cos = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
        accuracy[k] = {"max_abs_diff": float((out - reference).abs().max()),
                       "min_cosine": float(cos.min())}
    flops = vit_flops(dim, depth, patch, 224, 224)
    times = interleaved(variants, repeats)
    rows = {}
    for k, t in times.items():
        s = stats(t, batch)
        s.update(accuracy[k])
        s["gflops"] = s["median"] * flops / 1e9
        rows[k] = s
    return {"model": name, "batch": batch, "image": 224, "gflop_per_image": flops / 1e9,
            "rows": rows, "baseline": "plain fp32"}


# ------------------------------------------------------------------ end to end
def make_jpegs(folder: Path, count: int, size=(500, 375)) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0.5, 2.0, 3)
        img = np.stack([127 + 60 * np.sin(a * xx / 37 + i), 127 + 60 * np.cos(b * yy / 29),
                        127 + 60 * np.sin(c * (xx + yy) / 53)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90)


def bench_e2e(repeats: int, count: int, batch: int, tmp: Path,
              precisions: tuple[str, ...]) -> dict[str, Any]:
    from dinofeat.cli import main as cli
    from dinofeat.model import save_safetensors
    folder = tmp / "jpegs"
    make_jpegs(folder, count)
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_small16"), name="vit_s16-random").eval()
    weights = tmp / "vit_s16.safetensors"
    save_safetensors(model, weights)
    x = torch.randn(batch, 3, 224, 224)
    runs = [0]

    def model_only(prec):
        def run():
            with torch.inference_mode(), accel.fast_inference(model, prec, "cpu"):
                model.backbone(x)
        return run

    def e2e(prec):
        def run():
            runs[0] += 1
            out = tmp / f"feats{runs[0]}.npy"
            rc = cli(["embed", str(folder), "--weights", str(weights), "--out", str(out),
                      "--batch-size", str(batch), "--precision", prec, "--no-progress",
                      "--device", "cpu", "--shard-dir", str(tmp / f"shards{runs[0]}")])
            if rc != 0:
                raise RuntimeError(f"dinofeat embed failed with exit code {rc}")
        return run

    variants = {}
    for prec in precisions:
        variants[f"model only {prec}"] = model_only(prec)
        variants[f"dinofeat embed {prec}"] = e2e(prec)
    saved = dict(CLOCK)  # decoding runs in worker processes: only wall time is fair here
    CLOCK.update(name="wall", fn=time.perf_counter)
    try:
        times = interleaved(variants, repeats)
    finally:
        CLOCK.update(saved)
    rows = {}
    for k, t in times.items():
        rows[k] = stats(t, batch if k.startswith("model only") else count)
    ratios = {p: rows[f"dinofeat embed {p}"]["median"] / rows[f"model only {p}"]["median"]
              for p in precisions}
    return {"images": count, "image_size": "500x375 JPEG", "batch": batch, "rows": rows,
            "clock": "wall", "threads": torch.get_num_threads(),
            "e2e_over_model_only": ratios,
            "workers": __import__("dinofeat.images", fromlist=["x"]).default_num_workers(
                count, batch)}


# ------------------------------------------------------------------ attention maps
def bench_attention(repeats: int, size: int) -> dict[str, Any]:
    from PIL import Image
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_small8"), name="vit_s8-random").eval()
    plain = PlainViT(384, 12, 6, 8).eval()
    plain.load_state_dict(model.backbone.state_dict())
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    from dinofeat import images as I
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    xn = I.normalize_batch(u8[None], model.preprocessing.mean, model.preprocessing.std)

    def plain_run():
        with torch.inference_mode():
            return plain.last_self_attention(xn)[:, :, 0]

    variants = {"plain (every block unfused, full attention)": plain_run,
                "dinofeat attention_maps fp32": lambda: model.attention_maps(img),
                f"dinofeat attention_maps {LOW}": lambda: model.attention_maps(img,
                                                                               precision=LOW)}
    with torch.inference_mode():
        ref = plain_run()[0, :, 1:].numpy()
    got = model.attention_maps(img).grid.reshape(ref.shape[0], -1)
    times = interleaved(variants, repeats)
    rows = {k: {**stats(t, 1.0), "latency_s": statistics.median(t),
                "latency_min": min(t), "latency_max": max(t)} for k, t in times.items()}
    return {"model": "vit_s8", "image": f"{size}x{size}", "rows": rows,
            "max_abs_diff_maps": float(np.abs(got - ref).max())}


# ------------------------------------------------------------------ training step
TRAIN_ARCHS = {"vit_tiny16": ("vit_tiny", 192, 12, 3), "vit_small16": ("vit_small", 384, 12, 6)}


def _train_setup(arch: str, variant: str, batch: int, locals_: int, out_dim: int):
    """``(step function, crops)`` for one variant: 'plain fp32', 'dinofeat fp32',
    'dinofeat bf16'."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 96, 96, generator=g) for _ in range(locals_)]
    torch.manual_seed(0)
    size, dim, depth, heads = TRAIN_ARCHS[arch]
    if variant.startswith("plain"):
        student, teacher = build_plain_dino(dim, depth, heads, 16, out_dim)
        student.train()
        opt = torch.optim.AdamW([
            {"params": [p for n, p in student.named_parameters()
                        if not n.endswith(".bias") and p.ndim > 1], "weight_decay": 0.04},
            {"params": [p for n, p in student.named_parameters()
                        if n.endswith(".bias") or p.ndim <= 1], "weight_decay": 0.0}],
            lr=1e-4)
        center = torch.zeros(1, out_dim)
        return (lambda: plain_train_step(student, teacher, opt, center, crops)), crops
    from dinofeat.training.config import TrainConfig
    from dinofeat.training.loop import build_networks
    from dinofeat.training.loss import DINOLoss
    from dinofeat.training.optim import (build_optimizer, cancel_last_layer_gradients,
                                      clip_gradients, ema_update, param_groups)
    cfg = TrainConfig(arch=size, patch_size=16, out_dim=out_dim, local_crops_number=locals_,
                      batch_size_per_gpu=batch, epochs=10)
    student, teacher = build_networks(cfg)
    student.train()
    loss_fn = DINOLoss.from_config(cfg)
    opt = build_optimizer(cfg, param_groups(student))
    dtype = torch.bfloat16 if variant.endswith("bf16") else None

    def step():
        with accel.fast_math("cpu"):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                with torch.no_grad():
                    t_out = teacher(crops[:2])
                s_out = student(crops)
                loss = loss_fn(s_out, t_out, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(student, 3.0)
            cancel_last_layer_gradients(student, 1, 1)
            opt.step()
            ema_update(teacher, student, 0.996)
        return float(loss.detach())
    return step, crops


TRAIN_VARIANTS = ("plain fp32", "dinofeat fp32", "dinofeat bf16")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def train_memory_child(arch: str, variant: str, batch: int, locals_: int, out_dim: int) -> None:
    """Child process: peak RSS of two steps of one variant (printed as JSON)."""
    step, _ = _train_setup(arch, variant, batch, locals_, out_dim)
    gc.collect()
    base = _rss_kb("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
    step()
    step()
    peak = _rss_kb("VmHWM")
    print(json.dumps({"base_rss_mb": base / 1024, "peak_rss_mb": peak / 1024,
                      "step_mb": (peak - base) / 1024}))


def bench_train(repeats: int, batch: int, locals_: int, out_dim: int,
                archs: tuple[str, ...]) -> dict[str, Any]:
    out = {"batch": batch, "crops": f"2x224 + {locals_}x96", "out_dim": out_dim, "archs": {}}
    for arch in archs:
        print(f" train {arch}", file=sys.stderr)
        variants = {v: _train_setup(arch, v, batch, locals_, out_dim)[0]
                    for v in TRAIN_VARIANTS}
        times = interleaved(variants, repeats)
        rows = {k: stats(t, batch) for k, t in times.items()}
        for v in TRAIN_VARIANTS:
            res = subprocess.run(
                [sys.executable, __file__, "--_train-memory", arch, v, str(batch),
                 str(locals_), str(out_dim)], capture_output=True, text=True, check=True)
            rows[v].update(json.loads(res.stdout.strip().splitlines()[-1]))
        out["archs"][arch] = {"rows": rows}
        del variants
        gc.collect()
    return out


# ------------------------------------------------------------------ report
def best_peer_ratios(rows: dict[str, dict]) -> dict[str, tuple[str, float]]:
    """Per precision: the fastest peer (timm, Hugging Face, ONNX Runtime, torch.compile
    of timm; not dinofeat's own rows nor the plain baseline) and dinofeat's default
    row's speed over it (medians)."""
    out = {}
    for prec in ("fp32", LOW):
        ours = rows.get(f"dinofeat {prec}")
        peers = {k: r for k, r in rows.items() if prec in k
                 and not k.startswith(("dinofeat", "plain"))}
        if ours and peers:
            name = max(peers, key=lambda k: peers[k]["median"])
            out[prec] = (name, ours["median"] / peers[name]["median"])
    return out


def _ratio(rows: dict, key: str, base: str) -> str:
    return f"{rows[key]['median'] / rows[base]['median']:.2f}x"


def _run_line(section: dict[str, Any]) -> list[str]:
    r = section.get("run")
    if not r:
        return []
    return [f"*Measured {r['date']}, {r['repeats']} rounds, {r['minutes']} min; load "
            f"average {r['load_before']} before, {r['load_after']} after.*", ""]


def markers(tag: str) -> tuple[str, str]:
    if tag in ("perf", "perf-quick"):
        return BEGIN, END
    return f"<!-- BEGIN {tag} (benchmarks/run.py) -->", f"<!-- END {tag} -->"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    begin, end = markers(res.get("tag", "perf"))
    clock = res.get("clock", "wall")
    unit = " per CPU-s" if clock == "cpu" else "/s"
    v = m["versions"]
    title = "Performance" if clock == "wall" else \
        f"Performance per CPU-second, {m['threads']} thread(s)"
    lines = [begin, "", f"## {title} (benchmarks/run.py, results/{res.get('tag', 'perf')}.json)",
             "",
             f"Generated by `python benchmarks/run.py{' --quick' if res['quick'] else ''}` on "
             f"{res['date']}. Machine: **{m['cpu']}**, {m['cores']} cores, "
             f"{m['threads']} threads, CPU flags {', '.join(m['cpu_flags']) or '-'}"
             f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}. Software: " +
             ", ".join(f"{k} {val}" for k, val in v.items()) + ". "
             "Every number is a median over interleaved rounds (each round runs every "
             "variant once), with the min-max range; ratios are of medians. The machine is "
             "shared: each section gives the load average (1-minute, 5-minute, 15-minute) "
             "before and after it, and spreads show the noise. Random weights (speed does "
             "not depend on them).", ""]
    if clock == "cpu":
        lines += ["**Clock: process CPU time** (`--clock cpu`): rates are work per CPU-second "
                  "the process was given, so time spent waiting for a core on the shared "
                  "machine does not count; with one thread per implementation no thread "
                  "spins waiting for another. A rate per CPU-second is the rate of one idle "
                  "core.", ""]
    oc = m["onednn_fp32_check"]
    lines += [f"oneDNN fp32 self-check (dinofeat.accel): linear error {oc['linear_error']:.2g}, "
              f"batched matmul {oc['bmm_error']:.2g} relative to |A||B| (default kernel "
              f"{oc['default_error']:.2g}): {oc['reason']}.", ""]
    if "matmul" in res:
        mm = res["matmul"]
        lines += [f"### Matmul peak ({mm['size']}^3 GEMM)", ""] + _run_line(mm) + [
            f"| kernel | GFLOP{unit} | range |", "|---|---|---|"]
        for k, s in mm["rows"].items():
            lines.append(f"| {k} | {s['median']:.0f} | {spread(s)} |")
        lines.append("")
    for e in res.get("embed", []):
        base = e["rows"]["plain fp32"]
        peak = res.get("matmul", {}).get("peak_gflops", {})
        lines += [f"### Embedding throughput: {e['model']}, {e['image']}x{e['image']}, batch "
                  f"{e['batch']} ({e['gflop_per_image']:.1f} GFLOP/image)", ""] + \
            _run_line(e) + [
                  f"| implementation | images{unit} | range | vs plain fp32 | GFLOP{unit} | % of peak "
                  "| max abs diff | min cosine |", "|---|---|---|---|---|---|---|---|"]
        for k, s in sorted(e["rows"].items(), key=lambda kv: -kv[1]["median"]):
            prec = "fp32" if "fp32" in k else LOW
            pk = peak.get(prec)
            pct = f"{100 * s['gflops'] / pk:.0f}%" if pk else "-"
            lines.append(f"| {k} | {s['median']:.2f} | {spread(s)} | "
                         f"{s['median'] / base['median']:.2f}x | {s['gflops']:.0f} | {pct} | "
                         f"{s['max_abs_diff']:.1e} | {s['min_cosine']:.6f} |")
        lines += ["", "max abs diff / min cosine: features against dinofeat's fp32 features "
                  "computed with PyTorch's default kernels (same weights, same batch).", ""]
        for prec, (peer, ratio) in best_peer_ratios(e["rows"]).items():
            lines.append(f"- **{prec}: dinofeat {ratio:.2f}x the best peer** ({peer}).")
        lines.append("")
    if "e2e" in res:
        e = res["e2e"]
        lines += [f"### `dinofeat embed` end to end: {e['images']} generated {e['image_size']} "
                  f"files, batch {e['batch']}, {e['workers']} decoding worker(s), "
                  f"{e.get('threads', m['threads'])} model thread(s), wall clock", ""] + \
            _run_line(e) + [
                  "| run | images/s | range |", "|---|---|---|"]
        for k, s in e["rows"].items():
            lines.append(f"| {k} | {s['median']:.2f} | {spread(s)} |")
        lines += ["", "End-to-end rate (decode + preprocess + model, the CLI including model "
                  "loading and writing the file) as a share of the model-only rate: " +
                  ", ".join(f"{p} {100 * r:.0f}%" for p, r in e["e2e_over_model_only"].items())
                  + ".", ""]
    if "attention" in res:
        a = res["attention"]
        rows = a["rows"]
        base = rows["plain (every block unfused, full attention)"]["latency_s"]
        lines += [f"### Attention maps: {a['model']}, one {a['image']} image", ""] + \
            _run_line(a) + [
                  f"| computation | latency ({'CPU-s' if clock == 'cpu' else 's'}) | range | "
                  "speed-up |", "|---|---|---|---|"]
        for k, s in rows.items():
            lines.append(f"| {k} | {s['latency_s']:.2f} | {s['latency_min']:.2f}-"
                         f"{s['latency_max']:.2f} | {base / s['latency_s']:.2f}x |")
        lines += ["", f"fp32 maps equal the plain computation's within "
                  f"{a['max_abs_diff_maps']:.1e} (max abs).", ""]
    if "train" in res:
        t = res["train"]
        lines += [f"### One DINO training step: batch {t['batch']}, crops {t['crops']}, head "
                  f"out_dim {t['out_dim']}", ""] + _run_line(t) + [
                  f"| model | step | images{unit} | range | vs plain | peak RSS (MB) | step memory "
                  "(MB) |", "|---|---|---|---|---|---|---|"]
        for arch, r in t["archs"].items():
            rows = r["rows"]
            for k, s in rows.items():
                lines.append(f"| {arch} | {k} | {s['median']:.2f} | {spread(s)} | "
                             f"{_ratio(rows, k, 'plain fp32')} | {s.get('peak_rss_mb', 0):.0f} "
                             f"| {s.get('step_mb', 0):.0f} |")
        lines += ["", "plain: the release's step written plainly (benchmarks/plain.py: unfused "
                  "ViT, default kernels); dinofeat: dinofeat.train's networks, loss, optimiser, "
                  "clipping and EMA under dinofeat.accel.fast_math (oneDNN fp32 matmuls), bf16 "
                  "with autocast. Step memory: peak RSS of two steps minus the RSS before them "
                  "(child process per variant).", ""]
    lines += ["### Index search", "", "See the *Index search* section (benchmarks/index.py).",
              "", end]
    return "\n".join(lines)


def write_docs(text: str, path: Path, tag: str) -> None:
    from dinofeat.utils import atomic_write_bytes
    begin, end = markers(tag)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write_bytes(path, new.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and 2 repeats")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--only", nargs="+", default=None,
                   choices=("matmul", "embed", "e2e", "attention", "train", "index"))
    p.add_argument("--models", nargs="+", default=None, choices=tuple(EMBED_MODELS))
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (slow "
                   "cold compiles)")
    p.add_argument("--docs", default=None, help="markdown file to update (default "
                   "docs/benchmarks.md for full runs, none for --quick)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--train-batch", type=int, default=8, help="images per training step")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for every implementation (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (shared machines; with --threads 1)")
    p.add_argument("--merge", action="store_true", help="keep the other sections of an "
                   "existing results file (run sections one at a time)")
    p.add_argument("--batch", type=int, default=None, help="embedding batch (default: "
                   "32 for vit_s16, 16 for vit_b16, 8 for vit_s8)")
    p.add_argument("--_train-memory", nargs=5, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._train_memory:
        arch, variant, b, n, k = args._train_memory
        train_memory_child(arch, variant, int(b), int(n), int(k))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK.update(name="cpu", fn=time.process_time)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 7)
    sections = args.only or ["matmul", "embed", "e2e", "attention", "train"]
    out = Path(args.out or HERE / "results" / ("perf-quick.json" if quick else "perf.json"))
    res: dict[str, Any] = {}
    if args.merge and out.is_file():  # keep the sections not run this time
        res = json.loads(out.read_text())
    res.update({"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "quick": quick,
                "repeats": repeats, "machine": machine(), "clock": CLOCK["name"],
                "tag": out.stem})
    print(json.dumps(res["machine"], indent=1), file=sys.stderr)
    from dinofeat.utils import atomic_write_json

    def section(name: str, fn: Callable[[], Any]) -> None:
        print(name, file=sys.stderr, flush=True)
        load0, t0 = load_average(), time.time()
        result = fn()
        info = {"load_before": load0, "load_after": load_average(),
                "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "minutes": round((time.time() - t0) / 60, 1), "repeats": repeats}
        if isinstance(result, dict):
            result["run"] = info
        else:  # a list of per-model results: merged by model with earlier runs' ones
            for r in result:
                r["run"] = info
            new_models = {r["model"] for r in result}
            result = [r for r in res.get(name, []) if r["model"] not in new_models] + result
        res[name] = result
        atomic_write_json(out, res)  # each section is kept as soon as it is done

    with tempfile.TemporaryDirectory(prefix="dinofeat-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "matmul" in sections:
            section("matmul", lambda: bench_matmul(repeats))
        if "embed" in sections:
            models = args.models or (["vit_s16"] if quick else list(EMBED_MODELS))
            section("embed", lambda: [
                bench_embed(name, repeats, 4 if quick else args.batch, tmp, args.compile,
                            ablations=(name == "vit_s16")) for name in models])
        if "e2e" in sections and DEVICE.type == "cpu":
            section("e2e", lambda: bench_e2e(repeats, 48 if quick else 256,
                                             16 if quick else 32, tmp, ("fp32", "bf16")))
        if "attention" in sections:
            section("attention", lambda: bench_attention(repeats, 240 if quick else 480))
        if "train" in sections and DEVICE.type == "cpu":
            section("train", lambda: bench_train(
                repeats, 2 if quick else args.train_batch, 2 if quick else 4, 4096,
                ("vit_tiny16",) if quick else tuple(TRAIN_ARCHS)))
        if "index" in sections:
            subprocess.run([sys.executable, str(HERE / "index.py"), "--sizes", "20000",
                            "--ann-size", "20000", "--repeats", "3"], check=True)
    text = markdown(res)
    print(text)
    docs = args.docs or (None if quick else str(ROOT / "docs" / "benchmarks.md"))
    if docs:
        write_docs(text, Path(docs), out.stem)
        print(f"updated {docs}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
