"""Throughput of the features path: decoding, preprocessing, embedding.

    python benchmarks/bench_features.py [--images 64] [--arch vit_small16] [--device cpu]

Generates JPEG photos (500 x 375, like ImageNet's typical size) in a temporary folder and
prints images/s for: torchvision decoding vs Pillow decoding; the "dino" preprocessing on
tensors vs the paper's Pillow resize + crop; and ``DinoModel.embed`` end to end (random
weights; the speed does not depend on them). Numbers depend on the machine and its load:
report them with the printed machine line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _rate(fn, items, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main() -> None:
    from dinofeat import images as I
    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--arch", default="vit_small16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        y, x = np.mgrid[0:375, 0:500]
        for i in range(args.images):
            base = np.stack([(x * rng.uniform(0.2, 0.6) + 30 * np.sin(y / rng.uniform(5, 20)))
                             for _ in range(3)], -1) + rng.normal(0, 8, (375, 500, 3))
            p = Path(tmp) / f"{i:04d}.jpg"
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(p, quality=90)
            paths.append(p)

        res: dict[str, float | str] = {
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
                       f"torch threads {torch.get_num_threads()} (decode/preprocess: 1)",
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        res["decode_torchvision_img_s"] = _rate(I.read_image, paths)
        res["decode_pillow_img_s"] = _rate(lambda p: I.pil_to_tensor(I.open_image(p)), paths)

        tf = I.ImageTransform(Preprocessing())
        tensors = [I.read_image(p) for p in paths]
        pils = [I.open_image(p) for p in paths]

        def pil_dino(img: Image.Image):
            w, h = img.size
            s = 256 / min(w, h)
            r = img.resize((int(w * s), 256) if h <= w else (256, int(h * s)), Image.BICUBIC)
            left, top = (r.width - 224) // 2, (r.height - 224) // 2
            return r.crop((left, top, left + 224, top + 224))

        res["preprocess_tensor_img_s"] = _rate(tf, tensors)
        res["preprocess_pillow_img_s"] = _rate(pil_dino, pils)
        torch.set_num_threads(threads)

        torch.manual_seed(0)
        model = DinoModel(build_backbone(args.arch), name=args.arch).eval().to(args.device)
        model.embed(paths[: args.batch_size], batch_size=args.batch_size, num_workers=0)  # warm
        for workers in (0, max(1, min(8, (os.cpu_count() or 2) - 1))):
            t0 = time.perf_counter()
            f = model.embed(paths, batch_size=args.batch_size, num_workers=workers,
                            progress=False)
            res[f"embed_{args.arch}_{args.device}_workers{workers}_img_s"] = \
                len(paths) / (time.perf_counter() - t0)
        assert f.shape[0] == len(paths)
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()},
                     indent=1))


if __name__ == "__main__":
    main()
