"""CPU cost of the multi-crop augmentation per image, side by side with the release's.

Three pipelines turn the same decoded 500 x 375 photos into 2 x 224 + N x 96 crops, one
thread, interleaved rounds (the machine is shared: the ratio is the result, not the
absolute times):

* ``release``: the original DINO recipe written with torchvision.transforms v1 on PIL
  images (RandomResizedCrop bicubic, flip, ColorJitter p 0.8, grayscale p 0.2, PIL
  GaussianBlur with sigma U[0.1, 2] at p 1 / 0.1 / 0.5, solarise p 0.2 on the second
  global crop, ToTensor + Normalize);
* ``dinofeat``: :class:`dinofeat.training.MultiCropAugmentation` (what training runs);
* ``tensor_v2`` (with ``--with-tensor-v2``): the earlier dinofeat pipeline on uint8
  tensors with a 13 x 13 convolution blur, for the record.

Photos: Debian's wallpapers (``apt-get install mate-backgrounds ukui-wallpapers``)
centre-cropped to 4:3 and resized to 500 x 375, else generated ones. Writes
``benchmarks/results/augment.json`` and prints a Markdown table.

    python benchmarks/augment.py [--rounds 5] [--images 24] [--local-crops 10] [--docs]

``--docs`` rewrites the "Multi-crop augmentation" section of docs/benchmarks.md from the
results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WALLPAPER_DIRS = ("/usr/share/backgrounds", "/usr/share/mate-background-properties")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def photos(n: int) -> tuple[list[Image.Image], str]:
    """``n`` RGB 500 x 375 photos (decoded) and where they came from."""
    files = []
    for d in WALLPAPER_DIRS:
        if os.path.isdir(d):
            files += sorted(p for p in Path(d).rglob("*")
                            if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (1000, 750))  # JPEG: decode at a reduced size, faster
                im = im.convert("RGB")
        except OSError:
            continue
        w, h = im.size
        if w / h > 4 / 3:
            cw, ch = int(h * 4 / 3), h
        else:
            cw, ch = w, int(w * 3 / 4)
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        out.append(im.resize((500, 375), Image.BICUBIC, box=box))
        if len(out) == n:
            return out, "Debian wallpapers (mate-backgrounds, ukui-wallpapers), 500x375"
    rng = np.random.default_rng(0)
    while len(out) < n:  # smooth random colour fields with edges: photo-like statistics
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        out.append(im.filter(ImageFilter.DETAIL))
    return out, f"{len(out)} images (some generated), 500x375"


# ------------------------------------------------------------------ the release's recipe
def release_pipeline(local_crops: int):
    """The original repository's augmentation, rebuilt from its published recipe with
    torchvision.transforms v1 on PIL images."""
    from torchvision import transforms as T

    class PILBlur:  # the release's blur: PIL's, radius U[0.1, 2], with probability p
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if random.random() > self.p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    class Solarize:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            from PIL import ImageOps
            return ImageOps.solarize(img) if random.random() < self.p else img

    flip_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                      p=0.8),
        T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    g1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    flip_jitter, PILBlur(1.0), norm])
    g2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    flip_jitter, PILBlur(0.1), Solarize(0.2), norm])
    loc = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=T.InterpolationMode.BICUBIC),
                     flip_jitter, PILBlur(0.5), norm])

    def run(img):
        return [g1(img), g2(img)] + [loc(img) for _ in range(local_crops)]
    return run


def tensor_v2_pipeline(local_crops: int):
    """The earlier dinofeat pipeline: torchvision v2 on uint8 tensors, 13 x 13 blur."""
    from torchvision.transforms import InterpolationMode, v2

    def pipe(size, scale, blur_p, sol_p):
        steps = [v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC,
                                      antialias=True),
                 v2.RandomHorizontalFlip(0.5),
                 v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                 v2.RandomGrayscale(0.2)]
        blur = v2.GaussianBlur(13, sigma=(0.1, 2.0))
        steps.append(blur if blur_p >= 1 else v2.RandomApply([blur], p=blur_p))
        if sol_p:
            steps.append(v2.RandomSolarize(128, p=sol_p))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        return v2.Compose(steps)
    g1, g2 = pipe(224, (0.4, 1.0), 1.0, 0), pipe(224, (0.4, 1.0), 0.1, 0.2)
    loc = pipe(96, (0.05, 0.4), 0.5, 0)

    def run(img):
        x = v2.functional.pil_to_tensor(img)
        return [g1(x), g2(x)] + [loc(x) for _ in range(local_crops)]
    return run


def dinofeat_pipeline(local_crops: int):
    from dinofeat.training import MultiCropAugmentation
    return MultiCropAugmentation(local_crops_number=local_crops)


BEGIN = "<!-- augment:begin (generated by benchmarks/augment.py --docs) -->"
END = "<!-- augment:end -->"


def docs_section(r: dict) -> str:
    med = r["ms_per_image"]
    rows = "\n".join(f"| {k} | {med[k]:.1f} | {r['ratio_to_release'][k]:.2f}x |" for k in med)
    loads = r["loadavg_1min"]
    return f"""{BEGIN}
## Multi-crop augmentation: CPU cost per image (benchmarks/augment.py)

What one data-loader worker spends to turn one decoded 500x375 photo into the paper's best
crops (2 x 224 + {r['local_crops']} x 96), one thread, CPU time of the process (median of
{r['rounds']} interleaved rounds of {r['images_per_round']} photos: {r['photos']}). `release` is the original recipe written with
torchvision.transforms v1 on PIL images (PIL Gaussian blur); `dinofeat` is
`dinofeat.training.MultiCropAugmentation`, what `dinofeat train` runs; `tensor_v2` is the
earlier dinofeat pipeline (torchvision v2 on uint8 tensors with a 13x13 convolution blur).

| pipeline | ms per image | vs release |
|---|---|---|
{rows}

{r['cpu']}, torch {r['torch']}, torchvision {r['torchvision']}, Pillow {r['pillow']};
{r['date']}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 shared cores.
Command: `{r['command']}`. On these shared cores the ratio itself moves between runs (short
runs of 3 rounds of 16 photos gave from 0.74x to 1.18x for `dinofeat`): read it with the
rounds in `benchmarks/results/augment.json`, and rerun with more `--rounds` to narrow it.
A worker at this cost feeds about 1000 / (ms per image) images per second: a GPU that
trains at P images/s needs about P x ms / 1000 loader workers.
{END}"""


def write_docs(r: dict, path: Path) -> None:
    text = path.read_text()
    section = docs_section(r)
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken)")
    ap.add_argument("--images", type=int, default=24, help="photos per round")
    ap.add_argument("--local-crops", type=int, default=10, help="local crops (paper: 10)")
    ap.add_argument("--with-tensor-v2", action="store_true",
                    help="also time the earlier tensor pipeline (13x13 convolution blur)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/augment.json"))
    ap.add_argument("--docs", action="store_true",
                    help="rewrite the section of docs/benchmarks.md from the results")
    ap.add_argument("--docs-only", action="store_true",
                    help="only rewrite the docs section from an existing results file")
    args = ap.parse_args(argv)
    if args.docs_only:
        write_docs(json.loads(Path(args.out).read_text()), REPO / "docs" / "benchmarks.md")
        return {}
    torch.set_num_threads(1)
    imgs, source = photos(args.images)
    pipes = {"release": release_pipeline(args.local_crops),
             "dinofeat": dinofeat_pipeline(args.local_crops)}
    if args.with_tensor_v2:
        pipes["tensor_v2"] = tensor_v2_pipeline(args.local_crops)
    for p in pipes.values():  # warm-up
        p(imgs[0])
    times: dict[str, list[float]] = {k: [] for k in pipes}
    loads = [os.getloadavg()[0]]
    torch.manual_seed(0)
    random.seed(0)
    for r in range(args.rounds):
        order = list(pipes) if r % 2 == 0 else list(reversed(pipes))  # interleaved
        for name in order:
            t0 = time.process_time()  # CPU time of this process: robust to other load
            for im in imgs:
                pipes[name](im)
            times[name].append(1000 * (time.process_time() - t0) / len(imgs))
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": f"multi-crop augmentation 2x224 + {args.local_crops}x96 per decoded 500x375 "
                "photo, one thread, CPU time per image (ms), median of interleaved rounds",
        "local_crops": args.local_crops, "cpu": cpu_name(), "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "pillow": Image.__version__, "photos": source, "images_per_round": len(imgs),
        "rounds": args.rounds, "ms_per_image": med, "rounds_ms": times,
        "ratio_to_release": {k: med[k] / med["release"] for k in med},
        "loadavg_1min": loads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/augment.py " + " ".join(argv or sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{result['what']}\nCPU: {result['cpu']}; load {min(loads):.1f}-{max(loads):.1f}")
    print("| pipeline | ms per image | vs release |\n|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:.1f} | {med[k] / med['release']:.2f}x |")
    if args.docs:
        write_docs(result, REPO / "docs" / "benchmarks.md")
    return result


if __name__ == "__main__":
    main()
