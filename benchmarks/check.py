"""dinofeat against its peers, as ratios measured in one run on the machine at hand.

    python benchmarks/check.py                  # ViT-S/16 batch 32, 200k x 384 search
    python benchmarks/check.py --repeats 5 --batch 64 --vectors 200000

Rows, every one in each interleaved round (best and median of the rounds):

* embedding, ViT-S/16 at 224 on a random batch: dinofeat (``model.embed`` of a float
  batch: its kernels chosen on this machine, the [CLS]-only last block) against timm's
  ``VisionTransformer`` with the same weights, in fp32 and in bf16 autocast;
* exact search of ``--queries`` queries among ``--vectors`` normalised 384-d vectors, top
  20: ``KNNIndex`` (flat, cosine) against faiss ``IndexFlatIP`` and against torch
  ``matmul`` + ``topk`` in chunks of 250 queries.

The ratios are dinofeat's speed over the peer's (above 1: dinofeat is faster). Results
go to ``benchmarks/results/check.json`` and the block between the ``<!-- BEGIN check``
markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from dinofeat import accel  # noqa: E402
from dinofeat.backbones import build_backbone  # noqa: E402
from dinofeat.model import DinoModel  # noqa: E402

BEGIN, END = "<!-- BEGIN check (benchmarks/check.py) -->", "<!-- END check -->"


def rounds(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def embedding(batch: int, repeats: int) -> dict[str, Any]:
    import timm
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_small16"), name="vit_s16").eval()
    tm = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(model.backbone.state_dict())
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def timm_run(prec):
        def run():
            with torch.inference_mode():
                if prec == "fp32":
                    return tm(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return tm(x).float()
        return run

    variants = {}
    for prec in ("fp32", "bf16"):
        variants[f"dinofeat {prec}"] = (lambda p: lambda: model.embed(
            x, precision=p, batch_size=batch, progress=False, normalize=False))(prec)
        variants[f"timm {prec}"] = timm_run(prec)
    with torch.inference_mode():
        ref = tm(x)
    agree = {k: float(torch.nn.functional.cosine_similarity(fn().float(), ref).min())
             for k, fn in variants.items()}
    times = rounds(variants, repeats)
    rows = {k: {"images_per_s_median": round(batch / statistics.median(t), 2),
                "images_per_s_best": round(batch / min(t), 2), "min_cosine_to_timm_fp32":
                round(agree[k], 6)} for k, t in times.items()}
    ratios = {p: round(rows[f"dinofeat {p}"]["images_per_s_median"]
                       / rows[f"timm {p}"]["images_per_s_median"], 3) for p in ("fp32", "bf16")}
    return {"batch": batch, "rows": rows, "dinofeat_over_timm": ratios}


def search(n: int, nq: int, repeats: int, k: int = 20) -> dict[str, Any]:
    import faiss

    from dinofeat import KNNIndex
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, 384), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((nq, 384), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    ix = KNNIndex(metric="cosine")
    ix.add(xb)
    flat = faiss.IndexFlatIP(384)
    flat.add(xb)
    tb = torch.from_numpy(xb)

    def torch_topk():
        out = []
        for lo in range(0, nq, 250):
            out.append((torch.from_numpy(xq[lo:lo + 250]) @ tb.T).topk(k, dim=1))
        return out

    variants = {"KNNIndex": lambda: ix.search(xq, k), "faiss IndexFlatIP":
                lambda: flat.search(xq, k), "torch matmul+topk": torch_topk}
    _, ids = ix.search(xq, k)
    _, ref = flat.search(xq, k)
    times = rounds(variants, repeats)
    rows = {name: {"seconds_median": round(statistics.median(t), 3),
                   "seconds_best": round(min(t), 3)} for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"vectors": n, "queries": nq, "k": k, "rows": rows,
            "kernel_chosen": accel.exact_search_kernel(384),
            "same_ids_as_faiss": float((ids == ref).mean()),
            "knnindex_over_torch": round(med["torch matmul+topk"] / med["KNNIndex"], 3),
            "knnindex_over_faiss": round(med["faiss IndexFlatIP"] / med["KNNIndex"], 3),
            "knnindex_over_faster": round(min(med["torch matmul+topk"],
                                              med["faiss IndexFlatIP"]) / med["KNNIndex"], 3)}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    e, s = res["embedding"], res["search"]
    la = res["load_average"]
    lines = [BEGIN, "",
             f"Measured {res['date']} on {m['cpu']} ({', '.join(m['flags'])}), "
             f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']}; "
             f"`python benchmarks/check.py {res['argv']}`, {res['repeats']} interleaved "
             f"rounds, medians; 1-minute load average {la[0][0]}-{la[1][0]} (a shared "
             "machine: the ratios are what to read).", "",
             "| check | dinofeat | peer | ratio (dinofeat speed / peer speed) |",
             "|---|---|---|---|"]
    for p in ("bf16", "fp32"):
        d, t = e["rows"][f"dinofeat {p}"], e["rows"][f"timm {p}"]
        lines.append(f"| ViT-S/16 embedding {p}, batch {e['batch']} | "
                     f"{d['images_per_s_median']} img/s | timm {t['images_per_s_median']} "
                     f"img/s | **{e['dinofeat_over_timm'][p]:.2f}x** |")
    r = s["rows"]
    lines.append(f"| exact search {s['vectors']:,} x 384, {s['queries']} queries, top "
                 f"{s['k']} (kernel chosen: {s['kernel_chosen']}) | "
                 f"{r['KNNIndex']['seconds_median']} s | torch matmul+topk "
                 f"{r['torch matmul+topk']['seconds_median']} s | "
                 f"**{s['knnindex_over_torch']:.2f}x** |")
    lines.append(f"| the same | | faiss IndexFlatIP {r['faiss IndexFlatIP']['seconds_median']}"
                 f" s | {s['knnindex_over_faiss']:.2f}x |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--out", default=str(HERE / "results" / "check.json"))
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    name, flags = accel._cpu_info()  # noqa: SLF001 - the benchmark names the machine
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": " ".join(sys.argv[1:] if argv is None else argv), "repeats": args.repeats,
        "machine": {"cpu": name, "flags": [f for f in flags if f.startswith(("amx", "avx512"))
                                           and f in ("amx_bf16", "amx_int8", "avx512_bf16",
                                                     "avx512f", "avx512_vnni")],
                    "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "load_average": [[round(v, 2) for v in os.getloadavg()]]}
    res["embedding"] = embedding(args.batch, args.repeats)
    print(json.dumps(res["embedding"]), flush=True)
    res["search"] = search(args.vectors, args.queries, args.repeats)
    print(json.dumps(res["search"]), flush=True)
    res["load_average"].append([round(v, 2) for v in os.getloadavg()])
    res["probes"] = accel.platform_report()["probes"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    text = markdown(res)
    print(text)
    if not args.no_docs:
        path = Path(args.docs)
        doc = path.read_text()
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip() + "\n\n## dinofeat against its peers (benchmarks/check.py)\n\n" \
                + text + "\n"
        path.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
