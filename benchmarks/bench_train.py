"""Throughput of DINO training: the multi-crop data pipeline and the training step.

    python benchmarks/bench_train.py [--arch vit_small16] [--device cpu] [--batch 16]
        [--global-size 224] [--local-size 96] [--locals 8] [--steps 6] [--precision fp32]

Generates JPEG photos (500 x 375) in a temporary folder and prints:

* multi-crop samples/s of one process, plain and with the per-sample seeding that makes a
  resumed run exact (its cost is what exact resumption costs the data pipeline);
* training images/s of ``dinofeat.train`` end to end (data loading, teacher, student, loss,
  backward, optimiser, EMA), from the run's own ``log.jsonl``, the first step left out.

Random weights; numbers depend on the machine and its load: report them with the printed
machine line.
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


def main() -> None:
    from dinofeat.training.augment import MultiCropAugmentation
    from dinofeat.training.config import TrainConfig
    from dinofeat.training.data import TrainImages
    from dinofeat.training.loop import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_small16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--locals", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    n_images = args.batch * args.steps
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        y, x = np.mgrid[0:375, 0:500]
        for i in range(n_images):
            base = np.stack([(x * rng.uniform(0.2, 0.6) + 30 * np.sin(y / rng.uniform(5, 20)))
                             for _ in range(3)], -1) + rng.normal(0, 8, (375, 500, 3))
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(
                Path(tmp) / f"{i:04d}.jpg", quality=90)
        cfg = TrainConfig(arch=args.arch, global_crop_size=args.global_size,
                          local_crop_size=args.local_size, local_crops_number=args.locals,
                          batch_size_per_gpu=args.batch, epochs=1, warmup_epochs=0,
                          num_workers=args.workers, log_every=1, precision=args.precision,
                          device=args.device, data=tmp, output_dir=str(Path(tmp) / "run"))
        ds = TrainImages(tmp, MultiCropAugmentation.from_config(cfg))
        n = min(len(ds), 32)
        rates = {"plain": 0.0, "seeded": 0.0}
        for _ in range(3):  # alternate, keep the best of each (warm file cache)
            for name, key in (("plain", lambda i: i), ("seeded", lambda i: (i, 1000 + i))):
                t0 = time.perf_counter()
                for i in range(n):
                    ds[key(i)]
                rates[name] = max(rates[name], n / (time.perf_counter() - t0))

        train(cfg)
        with open(Path(cfg.output_dir) / "log.jsonl") as f:
            steps = [r for r in map(json.loads, f) if r.get("type") == "step"]
        train_rate = float(np.mean([r["images_per_s"] for r in steps[1:]])) if len(steps) > 1 \
            else steps[0]["images_per_s"]
        mem = steps[-1].get("cuda_max_allocated_mb") or steps[-1]["max_rss_mb"]

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
               f"{torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"machine: {machine}")
    print(f"crops: 2 x {args.global_size} + {args.locals} x {args.local_size}, {args.arch}, "
          f"batch {args.batch}, {args.precision}")
    print(f"multi-crop samples/s (1 process): plain {rates['plain']:.1f}, seeded "
          f"{rates['seeded']:.1f} ({100 * (1 - rates['seeded'] / rates['plain']):+.1f}% cost)")
    print(f"training images/s: {train_rate:.1f} ({args.workers} workers); peak memory "
          f"{mem:.0f} MB")


if __name__ == "__main__":
    main()
