"""Index search: exact faiss vs torch brute force, and approximate indexes' recall vs speed.

    python benchmarks/index.py [--sizes 100000 1000000] [--ann-size 100000] [--repeats 5]
                               [--out benchmarks/results/index.json]

Part 1, exact search: ``KNNIndex`` (faiss ``IndexIDMap2`` over ``IndexFlatIP``), a bare
faiss ``IndexFlatIP`` and a plain torch brute force (``queries @ db.T`` + ``topk`` in
query blocks) on the same L2-normalised float32 vectors, for each database size. Part 2,
approximate search on ``--ann-size`` vectors: ``KNNIndex`` with IVF (nlist x nprobe grid),
IVF-PQ (the ``"auto"`` choice beyond 1M vectors) and HNSW (M x efSearch grid); recall@k
against the exact top-k, queries/s, build time, memory per vector.

Data: ``--data clustered`` (default): points around 1000 random centres on the sphere
(within-cluster cosine ~0.7, like features of similar images), queries drawn the same
way; ``--data uniform``: isotropic Gaussian, the worst case for IVF. Real DINO features
are neither: measure recall on your own features before choosing an approximate index.

The machine may be shared: every configuration is timed in turn within each repeat
(interleaved), and medians with min-max spreads are reported, with ratios to torch
computed from the medians. All methods use the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dinofeat import openblas

openblas.pin_core()  # before faiss loads its OpenBLAS (see dinofeat.openblas)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinofeat.search import BLAS_THRESHOLD, KNNIndex, choose_factory, configure_threads  # noqa: E402
from dinofeat.search import auto as autos  # noqa: E402


# ------------------------------------------------------------------ data
def make_data(n: int, dim: int, kind: str, centers: np.ndarray | None, seed: int,
              chunk: int = 100_000) -> np.ndarray:
    """``n`` L2-normalised float32 vectors, generated in chunks (1M x 384 is 1.5 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = centers[rng.integers(0, len(centers), m)] + noise * (0.65 / np.sqrt(dim))
        else:
            x = noise
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def random_centers(count: int, dim: int, seed: int = 1) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


# ------------------------------------------------------------------ methods
def torch_topk(db: torch.Tensor, q: np.ndarray, k: int, block: int = 128):
    qt = torch.from_numpy(q)
    scores, ids = [], []
    for s in range(0, len(qt), block):
        sim = qt[s:s + block] @ db.T
        v, i = sim.topk(k, dim=1)
        scores.append(v), ids.append(i)
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def summary(times: list[float], nq: int) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "qps": nq / med, "qps_min": nq / max(times), "qps_max": nq / min(times),
            "repeats": len(times)}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


# ------------------------------------------------------------------ parts
def exact_part(n: int, dim: int, args, centers) -> dict:
    print(f"\n== exact search, {n:,} x {dim} ({args.data}), {args.queries} queries, "
          f"k={args.k}", flush=True)
    db = make_data(n, dim, args.data, centers, seed=10)
    q = make_data(args.queries, dim, args.data, centers, seed=11)
    dbt = torch.from_numpy(db)
    raw = faiss.IndexFlatIP(dim)
    t_raw, _ = timed(lambda: raw.add(db))
    index = KNNIndex(dim=dim, factory="Flat")
    t_idx, _ = timed(lambda: index.add(db))
    methods = {
        "torch matmul+topk": lambda: torch_topk(dbt, q, args.k),
        "faiss IndexFlatIP": lambda: raw.search(q, args.k),
        "dinofeat KNNIndex Flat": lambda: index.search(q, args.k),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    results = {}
    for m, fn in methods.items():  # warm-up, and the answers to compare
        results[m] = fn()
    for r in range(args.repeats):
        for m, fn in methods.items():
            t, _ = timed(fn)
            times[m].append(t)
        print(f"  repeat {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods),
              flush=True)
    truth = results["torch matmul+topk"][1]
    out = {"n": n, "dim": dim, "queries": args.queries, "k": args.k, "add_s": {
        "faiss IndexFlatIP": t_raw, "dinofeat KNNIndex Flat": t_idx}, "methods": {}}
    base = statistics.median(times["torch matmul+topk"])
    for m in methods:
        s = summary(times[m], args.queries)
        s["speedup_vs_torch"] = base / s["median_s"]
        s["recall_vs_torch"] = recall_at_k(np.asarray(results[m][1]), truth)
        out["methods"][m] = s
        print(f"  {m:<24} {s['qps']:>9,.0f} q/s  (min-max {s['qps_min']:,.0f}-"
              f"{s['qps_max']:,.0f})  x{s['speedup_vs_torch']:.2f} vs torch  "
              f"agreement {s['recall_vs_torch']:.4f}", flush=True)
    return out


def blas_part(n: int, dim: int, args, centers) -> dict:
    """Small query batches: faiss's default BLAS threshold vs dinofeat's vs torch."""
    print(f"\n== small query batches, {n:,} x {dim}: faiss BLAS threshold "
          f"{FAISS_DEFAULT_BLAS_THRESHOLD} (faiss default) vs {BLAS_THRESHOLD} (dinofeat)",
          flush=True)
    db = make_data(n, dim, args.data, centers, seed=30)
    q = make_data(args.queries, dim, args.data, centers, seed=31)
    dbt = torch.from_numpy(db)
    raw = faiss.IndexFlatIP(dim)
    raw.add(db)

    def faiss_with(threshold: int, batch: int):
        def run():
            faiss.cvar.distance_compute_blas_threshold = threshold
            try:
                for s in range(0, len(q), batch):
                    raw.search(q[s:s + batch], args.k)
            finally:
                faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        return run

    def torch_with(batch: int):
        def run():
            for s in range(0, len(q), batch):
                torch_topk(dbt, q[s:s + batch], args.k)
        return run

    out = {"n": n, "dim": dim, "queries": args.queries, "batches": {}}
    for batch in (16, 64, 256):
        methods = {f"faiss, threshold {FAISS_DEFAULT_BLAS_THRESHOLD}":
                   faiss_with(FAISS_DEFAULT_BLAS_THRESHOLD, batch),
                   f"faiss, threshold {BLAS_THRESHOLD}": faiss_with(BLAS_THRESHOLD, batch),
                   "torch matmul+topk": torch_with(batch)}
        times = {m: [] for m in methods}
        for fn in methods.values():
            fn()
        for _ in range(args.repeats):
            for m, fn in methods.items():
                times[m].append(timed(fn)[0])
        rows = {m: summary(t, args.queries) for m, t in times.items()}
        base = rows["torch matmul+topk"]["median_s"]
        for m, r in rows.items():
            r["speedup_vs_torch"] = base / r["median_s"]
            print(f"  batch {batch:>3}  {m:<26} {r['qps']:>9,.0f} q/s (min-max "
                  f"{r['qps_min']:,.0f}-{r['qps_max']:,.0f})  x{r['speedup_vs_torch']:.2f} "
                  "vs torch", flush=True)
        out["batches"][str(batch)] = rows
    return out


FAISS_DEFAULT_BLAS_THRESHOLD = 128000


def ann_part(n: int, dim: int, args, centers) -> dict:
    print(f"\n== approximate search, {n:,} x {dim} ({args.data}), {args.queries} queries, "
          f"recall@{args.k}", flush=True)
    db = make_data(n, dim, args.data, centers, seed=20)
    q = make_data(args.queries, dim, args.data, centers, seed=21)
    exact = faiss.IndexFlatIP(dim)
    exact.add(db)
    truth = exact.search(q, args.k)[1]
    pq = choose_factory(2_000_000, dim).split(",")[1]  # what "auto" picks beyond 1M
    builds = {"Flat": ("exact", []), "IVF256,Flat": ("nprobe", [1, 4, 16, 64]),
              "IVF1024,Flat": ("nprobe", [1, 4, 16, 64]),
              f"IVF1024,{pq}": ("nprobe", [4, 16, 64]),
              "IVF1024,SQ8": ("nprobe", [4, 16, 64]),
              "HNSW16": ("efSearch", [16, 64, 256]), "HNSW32": ("efSearch", [16, 64, 256])}
    indexes, info = {}, {}
    for factory, (param, _values) in builds.items():
        index = KNNIndex(dim=dim, factory=factory)
        t_build, _ = timed(lambda index=index: index.add(db))
        if not index.is_trained:  # fewer vectors than the default train size wants
            index.train()
        indexes[factory] = index
        info[factory] = {"build_s": t_build, "bytes_per_vector": index.bytes_per_vector,
                         "param": param, "trained_on": index._resolve_train_size()
                         if factory.startswith("IVF") else None}
        print(f"  built {factory:<14} in {t_build:6.1f} s, {index.bytes_per_vector} bytes "
              "per vector", flush=True)
    configs = [(f, p, v) for f, (p, vals) in builds.items() for v in (vals or [None])]
    times: dict[str, list[float]] = {}
    recalls: dict[str, float] = {}

    def key(f, p, v):
        return f if p == "exact" else f"{f} {p}={v}"

    for f, p, v in configs:  # warm-up and recall
        if p != "exact":
            indexes[f].set_search_params(**{p: v})
        recalls[key(f, p, v)] = recall_at_k(indexes[f].search(q, args.k)[1], truth)
        times[key(f, p, v)] = []
    for r in range(args.repeats):
        for f, p, v in configs:
            if p != "exact":
                indexes[f].set_search_params(**{p: v})
            t, _ = timed(lambda f=f: indexes[f].search(q, args.k))
            times[key(f, p, v)].append(t)
        print(f"  repeat {r + 1} done", flush=True)
    base = statistics.median(times["Flat"])
    rows = {}
    for f, p, v in configs:
        kk = key(f, p, v)
        s = summary(times[kk], args.queries)
        s.update(recall=recalls[kk], speedup_vs_exact=base / s["median_s"], factory=f,
                 param=p, value=v, **{k2: info[f][k2] for k2 in ("build_s",
                                                                  "bytes_per_vector")})
        rows[kk] = s
        print(f"  {kk:<28} recall@{args.k} {s['recall']:.3f}  {s['qps']:>9,.0f} q/s "
              f"(min-max {s['qps_min']:,.0f}-{s['qps_max']:,.0f})  x{s['speedup_vs_exact']:.1f}"
              f" vs exact  {s['bytes_per_vector']} B/vector", flush=True)
    return {"n": n, "dim": dim, "queries": args.queries, "k": args.k, "data": args.data,
            "configs": rows, "builds": info}


def render_markdown(res: dict) -> str:
    """The tables of docs/benchmarks.md's "Index search" section, from a results JSON."""
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['faiss_threads']} thread(s) for "
             f"faiss and torch alike; faiss {m['faiss']}, torch {m['torch']}, numpy "
             f"{m['numpy']}, Python {m['python']}; {m['date']}; load average "
             f"{m['load_average_at_start'][0]:.1f} at the start (the machine was shared).", ""]
    for e in res["exact"]:
        lines += [f"Exact search, {e['n']:,} x {e['dim']} vectors, {e['queries']} queries, "
                  f"top {e['k']} (medians of {next(iter(e['methods'].values()))['repeats']} "
                  "interleaved repeats, min-max in brackets):", "",
                  "| method | queries/s | vs torch | same top-k as torch |", "|---|---|---|---|"]
        for name, s in e["methods"].items():
            lines.append(f"| {name} | {s['qps']:,.0f} ({s['qps_min']:,.0f}-{s['qps_max']:,.0f})"
                         f" | x{s['speedup_vs_torch']:.2f} | {s['recall_vs_torch']:.4f} |")
        lines.append("")
    if res.get("blas"):
        b = res["blas"]
        lines += [f"Small query batches, {b['n']:,} vectors (faiss's BLAS threshold):", "",
                  "| batch | method | queries/s | vs torch |", "|---|---|---|---|"]
        for batch, rows in b["batches"].items():
            for name, s in rows.items():
                lines.append(f"| {batch} | {name} | {s['qps']:,.0f} ({s['qps_min']:,.0f}-"
                             f"{s['qps_max']:,.0f}) | x{s['speedup_vs_torch']:.2f} |")
        lines.append("")
    a = res.get("ann")
    if a:
        lines += [f"Approximate search, {a['n']:,} x {a['dim']} {a['data']} vectors, "
                  f"{a['queries']} queries, recall@{a['k']} against exact search:", "",
                  "| index | setting | recall@10 | queries/s | vs exact | bytes/vector | "
                  "build s |", "|---|---|---|---|---|---|---|"]
        for s in a["configs"].values():
            setting = "-" if s["param"] == "exact" else f"{s['param']}={s['value']}"
            lines.append(f"| {s['factory']} | {setting} | {s['recall']:.3f} | {s['qps']:,.0f} "
                         f"({s['qps_min']:,.0f}-{s['qps_max']:,.0f}) | "
                         f"x{s['speedup_vs_exact']:.1f} | {s['bytes_per_vector']} | "
                         f"{s['build_s']:.1f} |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "faiss_threads":
            faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__, "load_average_at_start": load,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "openblas_coretype": os.environ.get(openblas.ENV)}


# ------------------------------------------------------------------ scale: auto vs Flat
def _search_all(index, q: np.ndarray, k: int, block: int = 250):
    ids = []
    for s in range(0, len(q), block):
        ids.append(index.search(q[s:s + block], k)[1])
    return np.concatenate(ids)


def _interleaved(methods: dict, q: np.ndarray, k: int, repeats: int) -> dict:
    """Time every method's search of ``q`` in turn within each repeat (the machine is
    shared), medians with spreads. The process's CPU seconds are kept next to the wall
    seconds: on a shared machine a ``nice``d benchmark gets a small share of the cores, and
    wall / CPU shows how much (CPU seconds are the work itself, all threads summed)."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    loads = []
    for _ in range(repeats):
        for name, index in methods.items():
            c0 = time.process_time()
            t, _ = timed(lambda index=index: _search_all(index, q, k))
            cpu[name].append(time.process_time() - c0)
            times[name].append(t)
        loads.append(os.getloadavg()[0])
    out = {m: {**summary(t, len(q)), "cpu_s": statistics.median(cpu[m]),
               "cpu_share": statistics.median(cpu[m]) / max(statistics.median(t), 1e-9)}
           for m, t in times.items()}
    out["load_averages"] = loads
    return out


def _file_bytes(index: KNNIndex, tmp: Path) -> int:
    folder = index.save(tmp)
    size = sum(p.stat().st_size for p in folder.glob("index.*.faiss"))
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return size


def scale_part(n: int, args, centers, tmp: Path) -> dict:
    """The issue's check: ``factory="auto"`` over ``n`` clustered vectors against exact
    Flat on the same vectors, fresh queries from the same distribution; then every auto
    candidate with its parameter tuned to the recall target on a held-out tuning set,
    each timed interleaved with Flat."""
    dim, k = args.dim, args.k
    print(f"\n== scale: {n:,} x {dim} ({args.data}), auto (recall {args.recall}) vs Flat",
          flush=True)
    db = make_data(n, dim, args.data, centers, seed=11)
    q = make_data(args.queries, dim, args.data, centers, seed=12)
    tune_q = make_data(300, dim, args.data, centers, seed=13)
    res: dict = {"n": n, "dim": dim, "queries": len(q), "k": k, "recall_target": args.recall,
                 "candidates": []}
    t0 = time.perf_counter()
    flat = KNNIndex(dim=dim, factory="Flat")
    flat.add(db)
    res["flat_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = _search_all(flat, q, k)
    tune_truth = _search_all(flat, tune_q, k)
    res["truth_s"] = time.perf_counter() - t0
    print(f"flat built in {res['flat_build_s']:.1f} s, exact answers in {res['truth_s']:.1f} s",
          flush=True)
    only = [o.lower() for o in (args.only or [])]
    previous = _previous_rows(args, n) if only else {}

    def wanted(name: str) -> bool:
        return not only or any(o in name.lower() for o in only)

    centroids = None
    if not wanted("auto"):
        res["auto"] = previous.get("auto")
        _run_candidates(res, n, args, db, q, tune_q, truth, tune_truth, flat, centroids,
                        tmp, wanted, previous)
        res["flat_bytes_per_vector_file"] = _file_bytes(flat, tmp / "flat.idx") / n
        return res
    t0 = time.perf_counter()
    auto = KNNIndex(dim=None, factory="auto", expected_size=n, recall=args.recall,
                    memory=args.memory)
    for s in range(0, n, 200_000):
        auto.add(db[s:s + 200_000])
    auto.train()  # no-op once trained
    res["auto_build_s"] = time.perf_counter() - t0
    auto.tune()  # what save does; add re-measures too, but only every 10% of growth
    found = _search_all(auto, q, k)
    res["auto"] = {"factory": auto.resolved_factory, "params": dict(auto.search_params),
                   "recall_at_k": recall_at_k(found, truth), "header": dict(auto.auto),
                   "bytes_per_vector_file": _file_bytes(auto, tmp / "auto.idx") / n}
    timing = _interleaved({"Flat": flat, "auto": auto}, q, k, args.repeats)
    res["auto"]["timing"] = timing
    res["auto"]["speedup_vs_flat"] = timing["Flat"]["median_s"] / timing["auto"]["median_s"]
    print(f"auto -> {auto.resolved_factory} {auto.search_params}: recall@{k} "
          f"{res['auto']['recall_at_k']:.4f} on {len(q)} fresh queries, "
          f"{res['auto']['speedup_vs_flat']:.1f}x Flat's queries/s "
          f"({timing['auto']['qps']:.0f} vs {timing['Flat']['qps']:.0f}), built in "
          f"{res['auto_build_s']:.0f} s", flush=True)
    if auto.auto.get("factory", "").startswith("IVF"):
        ivf = faiss.extract_index_ivf(auto._index)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    del auto
    res["auto"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
    res["auto"]["build_s"] = res["auto_build_s"]  # kept with the row by later --only runs
    _save_partial(res, args)
    _run_candidates(res, n, args, db, q, tune_q, truth, tune_truth, flat, centroids, tmp,
                    wanted, previous)
    res["flat_bytes_per_vector_file"] = _file_bytes(flat, tmp / "flat.idx") / n
    return res


def _previous_rows(args, n: int) -> dict:
    """Rows of an earlier ``--scale`` run of the same size in ``--out`` (``--only`` keeps
    them for the candidates it does not run): ``{"auto": ..., factory: row}``."""
    try:
        old = json.loads(Path(args.out).read_text())["scale"]
    except (OSError, ValueError, KeyError):
        return {}
    if old.get("n") != n:
        return {}
    rows = {c["factory"]: c for c in old.get("candidates", [])}
    if old.get("auto"):
        rows["auto"] = old["auto"]
    return rows


def _run_candidates(res: dict, n: int, args, db, q, tune_q, truth, tune_truth, flat,
                    centroids, tmp: Path, wanted, previous: dict) -> None:
    """Every auto candidate (HNSW last: the slowest to build), each tuned on the tuning
    queries and timed interleaved with Flat; rows ``--only`` skips come from
    ``previous``."""
    dim, k = args.dim, args.k
    cands = [c for c in autos.candidates(n, dim) if c.factory != "Flat"]
    order = [c.factory for c in cands]
    cands.sort(key=lambda c: c.factory.startswith("HNSW"))
    # the rows kept from the earlier run first, so that a partial save has them all
    res["candidates"] += [previous[c.factory] for c in cands
                          if not wanted(c.factory) and c.factory in previous]
    for cand in cands:
        if not wanted(cand.factory):
            continue
        if cand.factory.startswith("HNSW") and n > args.hnsw_max:
            continue
        print(f"-- {cand.factory}", flush=True)
        t0 = time.perf_counter()
        index = KNNIndex(dim=dim, factory=cand.factory)
        inner = index._index
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and centroids is not None and len(centroids) == ivf.nlist:
            ivf.quantizer.add(centroids)  # the same coarse quantiser as auto's
        if not index.is_trained:
            index.train(db[np.random.default_rng(0).choice(
                n, min(n, 39 * autos.nlist_for(n)), replace=False)])
        progress = []
        for s in range(0, n, 100_000):
            index.add(db[s:s + 100_000])
            progress.append([s + len(db[s:s + 100_000]), round(time.perf_counter() - t0, 1)])
            print(f"   added {progress[-1][0]:,} in {progress[-1][1]:.0f} s (load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
            res["building"] = {"factory": cand.factory, "added_s": progress,
                               "load_average": os.getloadavg()}
            _save_partial(res, args)
        res.pop("building", None)
        build_s = time.perf_counter() - t0
        tq_ids = np.full(len(tune_q), -1, np.int64)  # tuning queries are not in the index
        tuned = autos.tune_parameter(index._index, cand, tune_q, tune_truth, tq_ids,
                                     args.recall, k)
        params, tune_r = tuned.params, tuned.recall
        index.set_search_params(**params)
        found = _search_all(index, q, k)
        timing = _interleaved({"Flat": flat, cand.factory: index}, q, k, args.repeats)
        row = {"factory": cand.factory, "params": params, "tune_recall": tune_r,
               "tune_recall_bound": tuned.bound,
               "recall_at_k": recall_at_k(found, truth), "build_s": build_s,
               "build_progress": progress,
               "bytes_per_vector": cand.bytes_per_vector,
               "bytes_per_vector_file": _file_bytes(index, tmp / "c.idx") / n,
               "timing": timing, "measured_at": time.strftime("%Y-%m-%d %H:%M"),
               "speedup_vs_flat": timing["Flat"]["median_s"] / timing[cand.factory]["median_s"]}
        res["candidates"].append(row)
        print(f"   {params}: recall@{k} {row['recall_at_k']:.4f}, "
              f"{timing[cand.factory]['qps']:.0f} q/s ({row['speedup_vs_flat']:.1f}x Flat), "
              f"built in {build_s:.0f} s, {row['bytes_per_vector_file']:.0f} B/vector on disk",
              flush=True)
        del index
        res["candidates"].sort(key=lambda c: order.index(c["factory"])
                               if c["factory"] in order else len(order))
        _save_partial(res, args)


def _save_partial(res: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "args": vars(args), "scale": res}
    out.write_text(json.dumps(doc, indent=1, default=float))


def render_scale(res: dict) -> str:
    s = res["scale"] if "scale" in res else res
    m = res.get("machine", {})
    a = s.get("auto")

    def load(timing: dict) -> str:
        la = timing.get("load_averages") or []
        return f"{min(la):.1f}-{max(la):.1f}" if la else "?"

    def share(t: dict) -> str:
        return f"{t['cpu_s']:.2f} / {t['cpu_share']:.2f}" if "cpu_s" in t else "-"

    lines = [f"{s['n']:,} clustered {s['dim']}-d vectors, {s['queries']} fresh queries, "
             f"recall@{s['k']} against exact search; {m.get('cpu', '?')}, "
             f"{m.get('faiss_threads', '?')} faiss threads, load average "
             f"{m.get('load_average_at_start')} at the start.", ""]
    if a:
        lines += [f"**auto** (target {s['recall_target']}): {a['factory']} {a['params']}, "
                  f"recall {a['recall_at_k']:.4f}, {a['timing']['auto']['qps']:.0f} queries/s "
                  f"vs Flat's {a['timing']['Flat']['qps']:.1f} ({a['speedup_vs_flat']:.1f}x), "
                  f"built in {a.get('build_s', s.get('auto_build_s', 0)):.0f} s (Flat: "
                  f"{s['flat_build_s']:.0f} s).", ""]
    lines += ["| index | params | recall@10 | queries/s | x Flat (same run) | Flat queries/s |"
              " search CPU s / share | build s | bytes/vector | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = ([("auto: " + a["factory"], a["params"], a["recall_at_k"], a["timing"], "auto",
              a["speedup_vs_flat"], a.get("build_s", s.get("auto_build_s", 0)),
              a["bytes_per_vector_file"])]
            if a else [])
    rows += [(c["factory"], c["params"], c["recall_at_k"], c["timing"], c["factory"],
              c["speedup_vs_flat"], c["build_s"], c["bytes_per_vector_file"])
             for c in s["candidates"]]
    for name, params, rec, timing, key, speed, build, bpv in rows:
        t = timing[key]
        lines.append(f"| {name} | {params} | {rec:.4f} | {t['qps']:,.0f} | {speed:,.0f} | "
                     f"{timing['Flat']['qps']:.1f} | {share(t)} | {build:.0f} | {bpv:.0f} | "
                     f"{load(timing)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--ann-size", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for faiss and torch alike (default: all cores)")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-ann", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/index.json")
    ap.add_argument("--scale", type=int, default=None, metavar="N",
                    help="only the scale part: factory='auto' over N vectors against Flat, "
                         "then each auto candidate (writes --out)")
    ap.add_argument("--recall", type=float, default=0.95, help="auto's target (--scale)")
    ap.add_argument("--memory", default=None, help="auto's memory budget (--scale)")
    ap.add_argument("--hnsw-max", type=int, default=300_000,
                    help="skip HNSW above this many vectors in --scale (slow to build)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="--scale: run only auto and/or the candidates whose factory contains "
                         "one of these (e.g. auto PQ HNSW); the other rows are kept from an "
                         "earlier run of the same size in --out")
    ap.add_argument("--markdown", metavar="JSON", default=None,
                    help="only print the markdown tables of an earlier results file")
    args = ap.parse_args()
    if args.markdown:
        doc = json.loads(Path(args.markdown).read_text())
        print(render_scale(doc) if "scale" in doc else render_markdown(doc))
        return
    threads = args.threads or len(os.sched_getaffinity(0))
    configure_threads(threads)  # also dinofeat's BLAS threshold, see blas_part
    torch.set_num_threads(threads)
    info = machine()
    print(json.dumps(info), flush=True)
    centers = random_centers(1000, args.dim)
    if args.scale:
        import tempfile
        with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
            res = {"machine": info, "args": vars(args),
                   "scale": scale_part(args.scale, args, centers, Path(tmp))}
        res["machine"]["load_average_at_end"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(res, indent=1, default=float))
        print(f"\nwrote {args.out}\n")
        print(render_scale(res))
        return
    res = {"machine": info, "args": vars(args), "exact": [], "ann": None, "blas": None}
    if not args.skip_exact:
        for n in args.sizes:
            res["exact"].append(exact_part(n, args.dim, args, centers))
        res["blas"] = blas_part(min(args.sizes), args.dim, args, centers)
    if not args.skip_ann:
        res["ann"] = ann_part(args.ann_size, args.dim, args, centers)
    try:
        res["machine"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {out}\n")
    print(render_markdown(res))


if __name__ == "__main__":
    sys.exit(main())
