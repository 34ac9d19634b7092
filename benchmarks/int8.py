"""int8 embedding (PyTorch dynamic quantisation of the linear layers) against bf16 and fp32.

    python benchmarks/int8.py                 # full Fashion-MNIST test set, ViT-S/16 speed
    python benchmarks/int8.py --test 2000 --train 12000 --batch 16

The gate for exposing ``precision="int8"``: features with cosine >= 0.999 to fp32 and a
weighted k-NN top-1 (k = 20, T = 0.07) within 0.2 points of fp32's, on the shipped
``vit_t_fmnist`` model (Fashion-MNIST test photos against the training photos). Speed:
images/s of a ViT-S/16 (DINO initialisation) batch at 224, interleaved rounds.
``torch.ao.quantization.quantize_dynamic`` quantises every ``nn.Linear`` to int8 weights
with per-batch int8 activations (x86/oneDNN kernels, VNNI/AMX-INT8 where present);
attention products, LayerNorm and GELU stay fp32. Results: benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import dinofeat  # noqa: E402
from dinofeat import accel  # noqa: E402
from dinofeat.backbones import build_backbone  # noqa: E402
from dinofeat.datasets import load_fashion_mnist  # noqa: E402
from dinofeat.eval.knn import knn_accuracy, knn_classify  # noqa: E402
from dinofeat.model import DinoModel  # noqa: E402


def int8_copy(model: DinoModel) -> DinoModel:
    q = copy.deepcopy(model).eval()
    q.backbone = torch.ao.quantization.quantize_dynamic(q.backbone, {torch.nn.Linear},
                                                        dtype=torch.qint8)
    return q


def feats(model, x: np.ndarray, precision: str, batch: int = 512) -> torch.Tensor:
    t = torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous()
    prec = "fp32" if precision == "int8" else precision
    return model.embed(t, precision=prec, batch_size=batch, progress=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "int8.json"))
    args = p.parse_args(argv)
    res = {"cpu": accel._cpu_info()[0], "threads": torch.get_num_threads(),  # noqa: SLF001
           "torch": torch.__version__, "load_average": [list(os.getloadavg())]}
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr, xte, yte = xtr[:args.train], ytr[:args.train], xte[:args.test], yte[:args.test]
    model = dinofeat.load("vit_t_fmnist")
    models = {"fp32": model, "bf16": model, "int8": int8_copy(model)}
    quality = {}
    ref_test = None
    for prec, m in models.items():
        ftr, fte = feats(m, xtr, prec), feats(m, xte, prec)
        if ref_test is None:
            ref_test = fte
        scores = knn_classify(ftr, torch.from_numpy(ytr), fte, k=20, T=0.07, num_classes=10)
        top1 = knn_accuracy(scores, torch.from_numpy(yte), (1,))[1]
        cos = (fte * ref_test).sum(1)
        quality[prec] = {"knn_top1": round(top1, 2), "cosine_min": round(cos.min().item(), 5),
                         "cosine_median": round(cos.median().item(), 6)}
        print(prec, quality[prec], flush=True)
    res["vit_t_fmnist"] = quality
    torch.manual_seed(0)
    vs = DinoModel(build_backbone("vit_small16"), name="vit_s16").eval()
    vq = int8_copy(vs)
    x = torch.randn(args.batch, 3, 224, 224)
    ref = vs.embed(x, progress=False)
    variants = {"fp32": lambda: vs.embed(x, progress=False),
                "bf16": lambda: vs.embed(x, precision="bf16", progress=False),
                "int8": lambda: vq.embed(x, progress=False)}
    cos_s16 = {k: round((fn() * ref).sum(1).min().item(), 5) for k, fn in variants.items()}
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for k in list(variants)[r % 3:] + list(variants)[:r % 3]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    res["vit_s16_speed"] = {k: {"images_per_s": round(args.batch / statistics.median(t), 2),
                                "min_cosine_to_fp32": cos_s16[k]} for k, t in times.items()}
    res["load_average"].append(list(os.getloadavg()))
    d = quality["int8"]["knn_top1"] - quality["fp32"]["knn_top1"]
    res["gate"] = {"cosine_ok": quality["int8"]["cosine_min"] >= 0.999,
                   "knn_change_points": round(d, 2), "knn_ok": abs(d) <= 0.2}
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
