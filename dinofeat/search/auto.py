"""``factory="auto"``: the faiss index chosen by a memory budget and a recall target.

Exact search (``Flat``) is kept while the collection is small enough to search by brute
force (:data:`dinofeat.search.factory.AUTO_EXACT_LIMIT` vectors) and fits the budget.
Beyond that, candidates are tried in order of fidelity per byte, each only if its memory
for the expected number of vectors fits the budget:

1. ``IVF{nlist},SQ8``: one byte a dimension; ~4x less memory than Flat;
2. ``IVF{nlist},SQfp16``: two bytes a dimension, for targets SQ8's rounding cannot reach;
3. ``IVF{nlist},Flat``: exact vectors inside the lists;
4. ``HNSW32``: a graph over exact vectors (fast searches, more memory, slow to build);
5. ``IVF{nlist},PQ{d/8},RFlat``: product-quantised codes in memory, exact re-ranking of the
   ``k_factor * k`` best from the full vectors, which a memory-mapped load
   (``KNNIndex.load(path, mmap=True)``) leaves on disk.

On a held-out sample of the user's own vectors (the training sample: a few hundred queries
held out, exact top-k by brute force over the rest), each candidate's search parameter
(``nprobe``, ``efSearch``) is raised until recall@k reaches the target with a margin: the
lower bound of a one-sided 95% confidence interval of the mean per-query recall
(:func:`recall_bound`: ``mean - 1.645 * std / sqrt(queries)``) must reach it, so that a
point estimate that only touches the target on these few hundred queries is not taken for
the recall of the user's next queries. The first candidate that reaches it is chosen. After the index is filled, :meth:`KNNIndex.tune` measures again on
the full index (queries from the training sample whose exact neighbours were tracked while
vectors were added) and raises the parameter further if needed. The target, the chosen
parameters and the measured recall are kept in the index header.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from .. import accel
from ..utils import get_logger
from . import factory as factories
from .factory import MIN_POINTS_PER_CENTROID, build_faiss, metric_type, set_search_param

__all__ = ["DEFAULT_RECALL", "AUTO_K", "parse_memory", "free_memory", "format_bytes",
           "Candidate", "candidates", "estimate_memory", "AutoChoice", "select",
           "exact_topk", "drop_self", "recall_at_k", "per_query_recall", "recall_bound",
           "Tuned", "CONFIDENCE", "nlist_for", "HOLDOUT_QUERIES", "tune_parameter",
           "BudgetTooSmallError"]

DEFAULT_RECALL = 0.95
AUTO_K = 10           # recall@10, as the tuning and the header report it
HOLDOUT_QUERIES = 300  # held-out queries of the sample
#: one-sided confidence of the recall bound tuning must bring to the target, and its
#: normal quantile (the mean of a few hundred per-query recalls is close to normal)
CONFIDENCE = 0.95
_Z = 1.6448536269514722
_log = get_logger("dinofeat.index")


class BudgetTooSmallError(ValueError):
    """The memory budget is below what any candidate index needs."""


def parse_memory(value: Any) -> int:
    """Bytes from ``8GB``, ``512MB``, ``1.5G``, ``2e9`` or an int (binary units: 1GB =
    2^30 bytes)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[0-9]+)?)([KMGT]?)(I?B)?", text)
    if not m or (not m.group(2) and m.group(3) and m.group(3) != "B"):
        raise ValueError(f"memory must be a size such as 8GB, 512MB or a number of bytes, "
                         f"not {value!r}")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def free_memory() -> int:
    """The memory this machine can give now (``MemAvailable``), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2 ** 30


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``sqrt(n)`` (1024 for 1M),
    at most ``n / 39`` (each centroid gets faiss's recommended 39 training points), at
    least 1. faiss suggests 4-16 sqrt(n) for the fastest searches; sqrt(n) keeps k-means
    (its cost grows with the square of nlist) to minutes on a few cores, and the recall
    target is reached by probing more lists."""
    nlist = 2 ** int(round(math.log2(max(math.sqrt(max(n, 1)), 1))))
    cap = min(262144, max(1, n // MIN_POINTS_PER_CENTROID))
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


@dataclass
class Candidate:
    """One index type ``auto`` may choose: its factory string, the search parameter it
    tunes and the values tried (in increasing cost), and its memory per vector."""

    factory: str
    param: str | None
    values: list[int]
    bytes_per_vector: float
    fixed_bytes: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # set on every value tried
    #: parameters that grow with ``param``: name -> the value at each of ``values``
    with_param: dict[str, list[int]] = field(default_factory=dict)

    def step(self, i: int) -> dict[str, Any]:
        """The search parameters of the ``i``-th value tried."""
        assert self.param is not None
        return {self.param: self.values[i], **{n: v[i] for n, v in self.with_param.items()}}

    def memory(self, n: int) -> int:
        return int(self.fixed_bytes + n * self.bytes_per_vector)


def candidates(n: int, dim: int) -> list[Candidate]:
    """The ``auto`` candidates for ``n`` vectors of dimension ``dim``, in the order they
    are tried. Memory per vector counts the code, the 8-byte id and faiss's id map."""
    nlist = nlist_for(n)
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
              if p <= nlist]
    if probes[-1] != nlist:
        probes.append(nlist)
    coarse = nlist * dim * 4
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    out = []
    if n <= factories.AUTO_EXACT_LIMIT:
        out.append(Candidate("Flat", None, [], 4 * dim + 8 + 40))
    out += [
        Candidate(f"IVF{nlist},SQ8", "nprobe", probes, dim + 8, coarse + 8 * dim),
        Candidate(f"IVF{nlist},SQfp16", "nprobe", probes, 2 * dim + 8, coarse),
        Candidate(f"IVF{nlist},Flat", "nprobe", probes, 4 * dim + 8, coarse),
        Candidate("HNSW32", "efSearch", [16, 32, 64, 128, 256, 512, 1024],
                  4 * dim + 8 + 40 + 32 * 2 * 4 * 1.1),
        # the full vectors for re-ranking stay on disk when loaded with mmap=True; the
        # re-ranked share grows with the lists probed (k_factor 8 per list up to 256):
        # on near-tied clustered data PQ codes rank the true top 10 far down, and more
        # lists alone do not bring them back (0.56 at every list, k_factor 8, at 1.2M)
        Candidate(f"IVF{nlist},PQ{m},RFlat", "nprobe", probes, m + 8 + 40,
                  coarse + 256 * dim * 4,
                  with_param={"k_factor": [min(256, 8 * p) for p in probes]}),
    ]
    return out


def estimate_memory(factory: str, n: int, dim: int) -> int | None:
    """Memory ``auto`` counts for ``n`` vectors of a candidate factory (``None`` if the
    factory is not one of its candidates)."""
    for c in candidates(n, dim):
        if c.factory == factory:
            return c.memory(n)
    return None


def exact_topk(database: np.ndarray, queries: np.ndarray, k: int, metric: str,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` ``(scores, rows)`` of ``queries`` in ``database``, without the
    row ``exclude[q]`` of each query (the query itself): by the exact-search kernel the
    machine measured faster (:func:`dinofeat.accel.exact_search_kernel`: torch matmul +
    topk, or faiss ``IndexFlat``; on the 2-core Xeon torch was 5-10x faster)."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if exclude is not None else 0
    kk = min(k + extra, len(database))
    if accel.exact_search_kernel(database.shape[1]) == "torch":
        d, i = accel.exact_search(database, queries, kk, "ip" if metric == "cosine" else "l2")
    else:
        flat = faiss.IndexFlat(database.shape[1], metric_type(metric))
        flat.add(database)
        d, i = flat.search(queries, kk)
    if exclude is not None:
        d, i = drop_self(d, i, exclude, k)
    return d, i


def drop_self(d: np.ndarray, i: np.ndarray, exclude: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's results without the id ``exclude[row]``, cut to ``k``."""
    keep = i != np.asarray(exclude)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    i = np.take_along_axis(np.where(keep, i, -1), order, axis=1)[:, :k]
    d = np.take_along_axis(d, order, axis=1)[:, :k]
    return d, i


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Each query's share of its exact top-``k`` found among the first ``k`` results
    (-1 entries of ``truth``, where fewer than ``k`` exist, are not counted; a query with
    no true neighbour is left out)."""
    out = []
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = t[t >= 0]
        if len(t):
            out.append(len(np.intersect1d(f[f >= 0], t)) / len(t))
    return np.asarray(out, dtype=np.float64)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of the share of the exact top-``k`` found among the first ``k``
    results (-1 entries of ``truth``, where fewer than ``k`` exist, are not counted)."""
    per = per_query_recall(found, truth, k)
    return float(per.mean()) if len(per) else 1.0


def recall_bound(per_query: np.ndarray) -> float:
    """The lower bound of a one-sided :data:`CONFIDENCE` (95%) confidence interval of the
    mean recall, from per-query recalls: ``mean - 1.645 * std / sqrt(n)`` (sample
    standard deviation). With n = 300 and a per-query spread of 0.1 the bound is 0.0095
    below the mean; every query at recall 1 gives 1."""
    n = len(per_query)
    if n == 0:
        return 1.0
    if n == 1:
        return 0.0 if per_query[0] < 1 else 1.0  # one query says nothing of the spread
    mean = float(per_query.mean())
    return mean - _Z * float(per_query.std(ddof=1)) / math.sqrt(n)


@dataclass
class Tuned:
    """What :func:`tune_parameter` found: the search parameters, the mean recall@k on the
    held-out queries, its 95% lower bound, and how many queries measured it."""

    params: dict[str, Any]
    recall: float
    bound: float
    queries: int

    def met(self, target: float) -> bool:
        return self.bound >= target


def _measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray,
             query_ids: np.ndarray, k: int) -> tuple[float, float, int]:
    d, i = index.search(queries, k + 1)
    d, i = drop_self(d, i, query_ids, k)
    per = per_query_recall(i, truth, k)
    return (float(per.mean()) if len(per) else 1.0), recall_bound(per), len(per)


def tune_parameter(index: faiss.Index, cand: Candidate, queries: np.ndarray,
                   truth: np.ndarray, query_ids: np.ndarray, target: float, k: int = AUTO_K,
                   start: int | None = None) -> Tuned:
    """The cheapest value of ``cand.param`` whose recall@k on ``queries`` (exact answers
    ``truth``; ``query_ids`` each query's own id, left out of its results, or -1) reaches
    ``target`` with the margin of :func:`recall_bound` (its 95% lower bound reaches it);
    else the largest value."""
    for name, value in cand.params.items():
        set_search_param(index, name, value)
    if cand.param is None:
        return Tuned(dict(cand.params), *_measure(index, queries, truth, query_ids, k))
    steps = [i for i, v in enumerate(cand.values) if start is None or v >= start] or \
        [len(cand.values) - 1]
    best = Tuned({}, -1.0, -1.0, 0)
    for i in steps:
        step = cand.step(i)
        for name, value in step.items():
            set_search_param(index, name, value)
        best = Tuned({**cand.params, **step}, *_measure(index, queries, truth, query_ids, k))
        if best.met(target):
            break
    return best


@dataclass
class AutoChoice:
    """What :func:`select` chose: the factory, its search parameters, the recall measured
    on the held-out sample, the memory counted, and every candidate's outcome."""

    factory: str
    params: dict[str, Any]
    recall: float | None
    memory: int
    met: bool
    tried: list[dict[str, Any]]
    centroids: np.ndarray | None = None
    bound: float | None = None  # the 95% lower bound of ``recall``
    #: rows of the sample held out as queries: never training data (a point k-means or
    #: the codes were fitted on is found more easily than the user's next query)
    holdout: np.ndarray | None = None

    def training_rows(self, n: int) -> np.ndarray:
        """Rows of an ``n``-row sample to train on: all but the held-out queries."""
        if self.holdout is None or n <= len(self.holdout):
            return np.arange(n)
        return np.setdiff1d(np.arange(n), self.holdout)

    def record(self, budget: int, target: float, n: int) -> dict[str, Any]:
        return {"memory_budget": budget, "recall_target": target, "k": AUTO_K,
                "confidence": CONFIDENCE, "expected_vectors": n, "factory": self.factory,
                "params": self.params, "sample_recall": self.recall,
                "sample_recall_bound": self.bound, "memory_estimate": self.memory,
                "target_met": self.met, "candidates": self.tried}


def select(sample: np.ndarray, n: int, metric: str, budget: int, target: float, *,
           k: int = AUTO_K, seed: int = 0) -> AutoChoice:
    """Choose the index for ``n`` vectors from ``sample`` (exact vectors, normalised as the
    index stores them): the first candidate (:func:`candidates`) within ``budget`` bytes
    that reaches recall@k ``target`` on queries held out of the sample; the most accurate
    one tried if none does (``met`` false)."""
    dim = sample.shape[1]
    cands = candidates(n, dim)
    fitting = [c for c in cands if c.memory(n) <= budget]
    if not fitting:
        smallest = min(cands, key=lambda c: c.memory(n))
        raise BudgetTooSmallError(
            f"a memory budget of {format_bytes(budget)} is below what any index of "
            f"{n:,} {dim}-d vectors needs (the smallest, {smallest.factory}, needs about "
            f"{format_bytes(smallest.memory(n))}); raise the budget (memory=, --memory)")
    if fitting[0].factory == "Flat":
        c = fitting[0]
        return AutoChoice("Flat", {}, 1.0, c.memory(n), True,
                          [{"factory": "Flat", "recall": 1.0, "memory": c.memory(n)}],
                          bound=1.0)
    rng = np.random.default_rng(seed)
    nq = min(HOLDOUT_QUERIES, max(1, len(sample) // 10))
    perm = rng.permutation(len(sample))
    q_rows, db_rows = np.sort(perm[:nq]), np.sort(perm[nq:])
    # the queries stay in the database, as they will in the index: each query's own row
    # is left out of both answers
    database = np.ascontiguousarray(sample)
    queries = np.ascontiguousarray(sample[q_rows])
    _, truth = exact_topk(database, queries, k, metric, exclude=q_rows)
    centroids = None
    tried: list[dict[str, Any]] = []
    best: AutoChoice | None = None
    for c in fitting:
        t0 = time.perf_counter()
        index = build_faiss(c.factory, dim, metric)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            if centroids is None or len(centroids) != ivf.nlist:
                centroids = _centroids(database[db_rows], ivf.nlist, metric, seed)
            ivf.quantizer.add(centroids)  # a filled quantizer is not trained again
        index.train(database[db_rows])
        index.add_with_ids(database, np.arange(len(database), dtype=np.int64))
        tuned = tune_parameter(index, c, queries, truth, q_rows, target, k)
        outcome = {"factory": c.factory, "params": tuned.params,
                   "recall": round(tuned.recall, 4), "recall_bound": round(tuned.bound, 4),
                   "memory": c.memory(n), "seconds": round(time.perf_counter() - t0, 2)}
        tried.append(outcome)
        _log.info("auto: %s reaches recall@%d %.3f (95%% lower bound %.3f) with %s on %d "
                  "held-out queries (%s for %s vectors)", c.factory, k, tuned.recall,
                  tuned.bound, tuned.params or "-", tuned.queries,
                  format_bytes(c.memory(n)), f"{n:,}")
        choice = AutoChoice(c.factory, tuned.params, tuned.recall, c.memory(n),
                            tuned.met(target), tried, centroids, tuned.bound, q_rows)
        if choice.met:
            return choice
        if best is None or tuned.bound > (best.bound or 0):
            best = choice
    assert best is not None
    best.tried = tried
    return best


def _centroids(x: np.ndarray, nlist: int, metric: str, seed: int) -> np.ndarray:
    """k-means centroids for the shared coarse quantiser (spherical for cosine)."""
    km = faiss.Kmeans(x.shape[1], nlist, niter=10, seed=seed, spherical=metric == "cosine",
                      max_points_per_centroid=256)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids)
