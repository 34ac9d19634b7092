"""Cost of the DINO-specific training components at the release's sizes.

    python benchmarks/bench_train_components.py [--device cpu] [--batch 16] [--out-dim 65536]

Prints milliseconds per call (best of several) for: the DINO loss forward + backward
(``ncrops = 10``, ``K = out_dim``) with each collapse mode; the projection head forward +
backward on ``ncrops * batch`` ViT-S features; per-parameter gradient clipping and the EMA
teacher update over a ViT-S/16 + head; the multi-crop augmentation of one 500 x 375 photo
(2 x 224 + 8 x 96). Numbers depend on the machine and its load: report them with the printed
machine line.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch


def _best_ms(fn, repeat: int = 5, warmup: int = 1, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    from dinofeat.backbones import build_backbone
    from dinofeat.training import (DINOHead, DINOLoss, MultiCropAugmentation, MultiCropNetwork,
                                clip_gradients, ema_update)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--ncrops", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}, "
          f"load {os.getloadavg()[0]:.1f}")
    b, k, n = args.batch, args.out_dim, args.ncrops

    for collapse in ("center", "batch_softmax", "sinkhorn"):
        loss_fn = DINOLoss(k, n, 0.04, 0.04, 0, 100, collapse=collapse).to(dev)
        s = torch.randn(n * b, k, device=dev, requires_grad=True)
        t = torch.randn(2 * b, k, device=dev)
        ms = _best_ms(lambda loss_fn=loss_fn, s=s, t=t: loss_fn(s, t, 0).backward(), sync=sync)
        print(f"DINO loss fwd+bwd, {collapse:13s} ncrops {n}, B {b}, K {k}: {ms:8.1f} ms")

    head = DINOHead(384, k).to(dev)
    feats = torch.randn(n * b, 384, device=dev)
    ms = _best_ms(lambda: head(feats).sum().backward(), sync=sync)
    print(f"head fwd+bwd on {n * b} x 384 -> {k}: {ms:8.1f} ms")

    student = MultiCropNetwork(build_backbone("vit_small", 16), DINOHead(384, k)).to(dev)
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in student.parameters()) / 1e6
    ms = _best_ms(lambda: clip_gradients(student, 3.0), sync=sync)
    print(f"per-parameter clipping, ViT-S/16 + head ({n_params:.1f}M params): {ms:8.1f} ms")
    ms = _best_ms(lambda: ema_update(teacher, student, 0.996), sync=sync)
    print(f"EMA teacher update, ViT-S/16 + head: {ms:8.1f} ms")

    from PIL import Image
    import numpy as np
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8))
    aug = MultiCropAugmentation()
    ms = _best_ms(lambda: aug(photo), repeat=10)
    print(f"multi-crop augmentation 2 x 224 + 8 x 96 of a 500 x 375 photo: {ms:8.1f} ms "
          f"({1e3 / ms:.0f} images/s per process)")


if __name__ == "__main__":
    main()
