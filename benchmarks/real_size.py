"""The main job at real sizes: embedding folders of phone-sized JPEG photos.

    python benchmarks/real_size.py                      # quality + speed, writes the docs
    python benchmarks/real_size.py --only speed --repeats 3 --count 48
    python benchmarks/real_size.py --quick              # small counts, 1 round: debugging

Photo folders are made from the real photos of the Debian wallpaper packages
(``apt-get install mate-backgrounds ukui-wallpapers``): crops of each wallpaper at 4:3,
resized to 4000x3000 (12 MP), 2000x1500 (3 MP) and 512x384 (0.2 MP) and saved as JPEG
quality 92 (4:2:0) with a little sensor-like noise (sigma 3 grey levels), which
brings a 12 MP file to phone-photo sizes. They are kept under ``--data`` between runs.

* ``quality``: features from reduced-size decoding (``decode="reduced"``, the default)
  against full decoding (``decode="full"``): the preprocessed pixels (mean/max absolute
  difference in grey levels, PSNR), the cosine of each image's two features, and whether
  each image's nearest neighbours in its folder stay the same (top-1 agreement, overlap
  of the top 5). Two models: the shipped trained ``vit_t_fmnist`` (grey, 28 px) and a
  ViT-S/16 with the DINO initialisation (no trained ViT-S can be downloaded here); the
  median cosine between *different* photos is given for scale.
* ``speed``: images/s of ``model.embed(folder)`` (API), ``dinofeat embed`` (the CLI,
  in-process), ``model.embed(folder, decode="full")`` and the model alone on a
  preprocessed float batch (``model.embed(tensor)``), fp32 and bf16, in interleaved
  rounds; medians and the ratio end-to-end / model-only. Wall clock.

Results: ``benchmarks/results/real_size.json`` and the block between the
``<!-- BEGIN real-size -->`` markers of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from dinofeat import accel, images  # noqa: E402
from dinofeat.backbones import build_backbone  # noqa: E402
from dinofeat.model import DinoModel  # noqa: E402

SIZES = {"12MP": (4000, 3000), "3MP": (2000, 1500), "0.2MP": (512, 384)}
WALLPAPER_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
NOISE = 3.0  # grey levels (sigma) of the noise added to each photo
BEGIN, END = "<!-- BEGIN real-size (benchmarks/real_size.py) -->", "<!-- END real-size -->"


def cpu_name() -> dict[str, Any]:
    name, flags = accel._cpu_info()  # noqa: SLF001 - the benchmark names the machine
    return {"cpu": name, "flags": [f for f in flags if f.startswith(("amx", "avx512_bf16",
                                                                      "avx512f", "avx2"))],
            "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def wallpapers() -> list[Path]:
    found = []
    for d in WALLPAPER_DIRS:
        for p in sorted(Path(d).rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.stat().st_size > 100_000:
                found.append(p)
    if not found:
        raise SystemExit("no wallpapers found: apt-get install -y mate-backgrounds "
                         "ukui-wallpapers")
    return found


def make_photos(folder: Path, size: tuple[int, int], count: int) -> dict[str, Any]:
    """``count`` JPEGs of ``size`` from wallpaper crops (kept between runs)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    srcs = wallpapers()
    rng = np.random.default_rng(0)
    W, H = size
    for i in range(count):
        out = folder / f"{i:04d}.jpg"
        if out.exists():
            continue
        with Image.open(srcs[i % len(srcs)]) as im:
            im = images.to_rgb(im)
            sw, sh = im.size
            scale = rng.uniform(0.6, 1.0)  # a crop of 60-100% of the 4:3 window
            cw = int(min(sw, sh * 4 / 3) * scale)
            ch = int(cw * 3 / 4)
            x0 = int(rng.uniform(0, sw - cw + 1))
            y0 = int(rng.uniform(0, sh - ch + 1))
            im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((W, H), Image.Resampling.LANCZOS)
            # sensor-like noise: wallpapers are smoother than photos, and the cost of
            # decoding a JPEG grows with its bytes (a 12 MP phone photo is ~3-5 MB)
            arr = np.asarray(im, dtype=np.float32)
            arr += rng.normal(0, NOISE, arr.shape).astype(np.float32)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
                out, quality=92, subsampling="4:2:0")
    files = sorted(folder.glob("*.jpg"))[:count]
    return {"folder": str(folder), "count": len(files),
            "mean_file_mb": round(sum(f.stat().st_size for f in files) / len(files) / 1e6, 2)}


def vit_s16() -> DinoModel:
    torch.manual_seed(0)
    return DinoModel(build_backbone("vit_small16"), name="vit_s16-dino-init").eval()


# ------------------------------------------------------------------- quality
def neighbours(f: torch.Tensor, k: int = 5) -> torch.Tensor:
    s = f @ f.T
    s.fill_diagonal_(-2)
    return s.topk(k, dim=1).indices


def quality(folders: dict[str, Path], precision: str = "fp32") -> dict[str, Any]:
    import dinofeat
    models = {"vit_t_fmnist (trained)": dinofeat.load("vit_t_fmnist"),
              "vit_s16 (DINO init)": vit_s16()}
    out: dict[str, Any] = {}
    for size, folder in folders.items():
        files = images.list_images(folder)
        row: dict[str, Any] = {}
        t = images.ImageTransform(models["vit_s16 (DINO init)"].preprocessing, 16)
        diffs, psnr = [], []
        for f in files:
            a = t(images.read_image(f)).float()
            b = t(images.read_image(f, reduce_to=t.decode_size)).float()
            diffs.append(((a - b).abs().mean().item(), (a - b).abs().max().item()))
            mse = ((a - b) ** 2).mean().item()
            psnr.append(10 * np.log10(255 ** 2 / max(mse, 1e-12)))
        h0, w0 = SIZES[size][1], SIZES[size][0]
        reduced = images.read_image(files[0], reduce_to=t.decode_size).shape[1:]
        row["decoded_size"] = f"{reduced[1]}x{reduced[0]} (of {w0}x{h0})"
        row["pixels"] = {"mean_abs": round(float(np.mean([d[0] for d in diffs])), 3),
                         "max_abs": float(max(d[1] for d in diffs)),
                         "psnr_db_median": round(float(np.median(psnr)), 1)}
        for name, model in models.items():
            kw = dict(precision=precision, progress=False, batch_size=32)
            full = model.embed(folder, decode="full", **kw)
            red = model.embed(folder, decode="reduced", **kw)
            cos = (full * red).sum(1)
            nf, nr = neighbours(full), neighbours(red)
            overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / nf.shape[1]
                               for a, b in zip(nf, nr)])
            other = full @ full.T
            other = other[~torch.eye(len(full), dtype=torch.bool)]
            row[name] = {"cosine_min": round(cos.min().item(), 6),
                         "cosine_median": round(cos.median().item(), 6),
                         "top1_same": round((nf[:, 0] == nr[:, 0]).float().mean().item(), 4),
                         "top5_overlap": round(float(overlap), 4),
                         "cosine_between_photos_median": round(other.median().item(), 4)}
        out[size] = row
        print(size, json.dumps(row), flush=True)
    return out


# ------------------------------------------------------------------- speed
def speed(folders: dict[str, Path], repeats: int, batch: int, tmp: Path,
          precisions=("fp32", "bf16")) -> dict[str, Any]:
    from dinofeat.cli import main as cli
    from dinofeat.model import save_safetensors
    model = vit_s16()
    weights = tmp / "vit_s16.safetensors"
    save_safetensors(model, weights)
    counts = {s: len(images.list_images(f)) for s, f in folders.items()}
    # as many images as a folder: one batch alone was too short a run to time reliably
    x = torch.randn(max(counts.values()), 3, 224, 224)
    runs = [0]

    def model_only(prec):
        return lambda: model.embed(x, precision=prec, batch_size=batch, progress=False)

    def api(folder, prec, decode):
        return lambda: model.embed(folder, precision=prec, batch_size=batch, progress=False,
                                   decode=decode)

    def cli_run(folder, prec):
        def run():
            runs[0] += 1
            out = tmp / f"f{runs[0]}.npy"
            rc = cli(["embed", str(folder), "--weights", str(weights), "--out", str(out),
                      "--batch-size", str(batch), "--precision", prec, "--no-progress",
                      "--device", "cpu", "--shard-dir", str(tmp / f"s{runs[0]}")])
            if rc != 0:
                raise RuntimeError(f"dinofeat embed exited with {rc}")
            out.unlink(missing_ok=True)
        return run

    variants: dict[str, tuple[Any, int]] = {}
    for prec in precisions:
        variants[f"model only/{prec}"] = (model_only(prec), len(x))
        for size, folder in folders.items():
            variants[f"{size}/api/{prec}"] = (api(folder, prec, "reduced"), counts[size])
            variants[f"{size}/cli/{prec}"] = (cli_run(folder, prec), counts[size])
            if size == "12MP" or len(folders) == 1:  # the gain of reduced decoding
                variants[f"{size}/api full decode/{prec}"] = (api(folder, prec, "full"),
                                                              counts[size])
    names = list(variants)
    for n in names:  # warm-up: probes, page cache, first-call costs
        if n.startswith("model only") or n.startswith("12MP/api/"):
            variants[n][0]()
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = [list(os.getloadavg())]
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            variants[n][0]()
            times[n].append(time.perf_counter() - t0)
        loads.append([round(v, 2) for v in os.getloadavg()])
        print(f"round {r + 1}/{repeats} done, load {loads[-1]}", flush=True)
    rate = {n: round(variants[n][1] / statistics.median(t), 2) for n, t in times.items()}
    plans = {}
    for size, folder in folders.items():
        for prec in precisions:
            st = model.iter_embed(folder, precision=prec, batch_size=batch, progress=False)
            p = st.decode_plan()
            plans[f"{size}/{prec}"] = {"mode": p.mode, "workers": p.workers,
                                       "threads": p.threads,
                                       "decode_ms": round(1e3 * p.decode_s, 1)
                                       if p.decode_s else None,
                                       "model_ms": round(1e3 * p.model_s, 1)
                                       if p.model_s else None}
    ratios = {}
    for prec in precisions:
        m = rate[f"model only/{prec}"]
        for size in folders:
            for kind in ("api", "cli", "api full decode"):
                if f"{size}/{kind}/{prec}" in rate:
                    ratios[f"{size}/{kind}/{prec}"] = round(rate[f"{size}/{kind}/{prec}"] / m,
                                                            3)
    return {"rates": rate, "ratios": ratios, "plans": plans, "batch": batch,
            "repeats": repeats, "load_average": loads, "counts": counts,
            "seconds": {n: [round(v, 3) for v in t] for n, t in times.items()}}


# ------------------------------------------------------------------- docs
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [BEGIN, "",
             f"Measured {res['date']} on {m['cpu']} ({', '.join(m['flags'])}), {m['cores']} "
             f"cores, {m['threads']} threads, torch {m['torch']}; `python "
             f"benchmarks/real_size.py {res['argv']}`. Photo folders: "
             + ", ".join(f"{s} {d['count']} JPEGs of {d['mean_file_mb']} MB"
                         for s, d in res["data"].items()) + ".", ""]
    if "speed" in res:
        sp = res["speed"]
        la = sp["load_average"]
        lines += [f"**Speed** (ViT-S/16, 224 px, batch {sp['batch']}, median of "
                  f"{sp['repeats']} interleaved rounds, wall clock; 1-minute load average "
                  f"{min(x[0] for x in la):.1f}-{max(x[0] for x in la):.1f} on this shared "
                  "machine), images/s and the ratio to the model alone:", "",
                  "| photos | precision | model only | `embed` API | `dinofeat embed` CLI | "
                  "API, full decoding | decoding / model (chosen) |",
                  "|---|---|---|---|---|---|---|"]
        for size in res["data"]:
            for prec in ("fp32", "bf16"):
                r, q = sp["rates"], sp["ratios"]
                if f"{size}/api/{prec}" not in r:
                    continue
                plan = sp["plans"].get(f"{size}/{prec}", {})
                lines.append(
                    f"| {size} | {prec} | {r[f'model only/{prec}']} | "
                    f"{r[f'{size}/api/{prec}']} ({q[f'{size}/api/{prec}']:.0%}) | "
                    f"{r[f'{size}/cli/{prec}']} ({q[f'{size}/cli/{prec}']:.0%}) | "
                    + (f"{r[f'{size}/api full decode/{prec}']} "
                       f"({q[f'{size}/api full decode/{prec}']:.0%}) | "
                       if f"{size}/api full decode/{prec}" in r else "not run | ") +
                    (f"turns: {plan.get('workers')} decoding threads, then the model on "
                     f"{plan.get('threads')} |" if plan.get("mode") == "turns" else
                     f"{plan.get('workers')} processes / {plan.get('threads')} threads "
                     f"(decode {plan.get('decode_ms')} ms, model {plan.get('model_ms')} "
                     "core-ms per image) |"))
        lines.append("")
    if "quality" in res:
        lines += ["**Reduced-size against full decoding** (fp32 features; neighbours "
                  "within each folder):", "",
                  "| photos | decoded at (ViT-S/16) | pixels after preprocessing: mean / max abs, PSNR |"
                  " model | cosine min / median | top-1 neighbour same | top-5 overlap | "
                  "cosine between different photos (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for size, row in res["quality"].items():
            px = row["pixels"]
            for name in [k for k in row if isinstance(row[k], dict) and "cosine_min" in row[k]]:
                q = row[name]
                lines.append(f"| {size} | {row['decoded_size']} | {px['mean_abs']} / "
                             f"{px['max_abs']:.0f}, {px['psnr_db_median']} dB | {name} | "
                             f"{q['cosine_min']:.5f} / {q['cosine_median']:.5f} | "
                             f"{q['top1_same']:.0%} | {q['top5_overlap']:.0%} | "
                             f"{q['cosine_between_photos_median']:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs(text: str, path: Path) -> None:
    doc = path.read_text() if path.exists() else ""
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n## Embedding real photos (benchmarks/real_size.py)\n\n" + \
            text + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("quality", "speed"),
                   default=["quality", "speed"])
    p.add_argument("--count", type=int, default=64, help="photos per folder (default 64)")
    p.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--batch", type=int, default=32, help="embedding batch (default 32)")
    p.add_argument("--quick", action="store_true", help="16 photos, 1 round")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "dinofeat-photos"),
                   help="where the photo folders are made and kept")
    p.add_argument("--out", default=str(HERE / "results" / "real_size.json"))
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.repeats = 16, 1
    data, folders = {}, {}
    for s in args.sizes:
        folder = Path(args.data) / f"{s}-{args.count}"
        data[s] = make_photos(folder, SIZES[s], args.count)
        folders[s] = folder
        print("photos:", s, data[s], flush=True)
    res: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc)
                           .strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
                           "argv": " ".join(sys.argv[1:] if argv is None else argv),
                           "data": data}
    out = Path(args.out)
    if out.exists():  # keep the other section of an earlier run
        with open(out) as f:
            old = json.load(f)
        for k in ("quality", "speed"):
            if k not in args.only and k in old:
                res[k] = old[k]
    if "quality" in args.only:
        res["quality"] = quality(folders)
    if "speed" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            res["speed"] = speed(folders, args.repeats, args.batch, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    print(text)
    if not args.no_docs and not args.quick:
        write_docs(text, Path(args.docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
