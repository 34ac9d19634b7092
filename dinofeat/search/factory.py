"""faiss index types: factory strings, what they need to be trained, what they cost, and
the ``"auto"`` choice.

Everything here is about a bare ``faiss.Index``; ids, records and files live in
:mod:`dinofeat.search.index` and :mod:`dinofeat.search.storage`.
"""

from __future__ import annotations

import math
import os
import re

from typing import Any

import faiss

__all__ = ["AUTO_EXACT_LIMIT", "MIN_POINTS_PER_CENTROID", "BLAS_THRESHOLD", "choose_factory",
           "default_train_size", "min_train_size", "bytes_per_vector", "build_faiss",
           "metric_type", "set_search_param", "configure_threads", "threads_configured", "gpu_available"]

AUTO_EXACT_LIMIT = 1_000_000  # "auto" keeps exact search up to this many vectors
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per centroid

#: faiss's exact search computes distances with BLAS (sgemm) from this many queries in a
#: batch. faiss 1.15's own default (128000, compared with the query batch times its
#: dimension) kept batches of up to ~330 384-d queries on its one-query-at-a-time SIMD
#: kernel, which measured 4-9x slower than sgemm for 16-300 queries on 100k vectors.
BLAS_THRESHOLD = 20
#: Blocks of faiss's BLAS exact search: queries x database rows per sgemm (128 MiB of
#: fp32 scores, the same bound as torch's chunked search). faiss 1.15's 4096 x 1024 made 250
#: queries over 600k 384-d vectors take 6.8 s on the 2-core Xeon; 2048 x 16384 took 2.6 s
#: (fewer, larger sgemm calls and top-k merges), same results.
BLAS_QUERY_BLOCK = 2048
BLAS_DATABASE_BLOCK = 16384

_threads_configured = False


def configure_threads(n: int | None = None) -> int:
    """Set faiss's OpenMP thread count (and its BLAS threshold, :data:`BLAS_THRESHOLD`)
    and return the thread count.

    ``n=None``: respect ``OMP_NUM_THREADS`` if set; otherwise use the CPUs this process may
    run on divided by the processes torchrun started on this machine
    (``LOCAL_WORLD_SIZE``), at least 1, so that ranks do not oversubscribe the cores."""
    global _threads_configured
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env and env.isdigit() and int(env) > 0:
            n = int(env)
        else:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - macOS
                cpus = os.cpu_count() or 1
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            n = max(1, cpus // max(1, local))
    faiss.omp_set_num_threads(int(n))
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    faiss.cvar.distance_compute_blas_query_bs = BLAS_QUERY_BLOCK
    faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
    _threads_configured = True
    return int(n)


def threads_configured() -> bool:
    """Whether :func:`configure_threads` has run in this process."""
    return _threads_configured


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def metric_type(metric: str) -> int:
    """faiss's metric constant for ``"cosine"`` (inner product of unit vectors) or ``"l2"``."""
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def choose_factory(n: int, dim: int) -> str:
    """The size rule of ``"auto"`` when no memory budget or recall target is given: exact
    ``"Flat"`` up to :data:`AUTO_EXACT_LIMIT` vectors; beyond, ``IVF{nlist},PQ{m}``:
    ``nlist`` the power of two nearest ``4 sqrt(n)`` (4096 for 1M vectors, 16384 for 10M;
    at most 262144 and at most ``n / 39`` so that every centroid gets its 39 training
    points) and ``m`` 8-bit sub-quantisers, one per 8 dimensions (``m`` divides ``dim``):
    384-d vectors take 48 bytes instead of 1536."""
    if n <= AUTO_EXACT_LIMIT:
        return "Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(n))))
    cap = min(262144, max(1, n // MIN_POINTS_PER_CENTROID))
    while nlist > cap:
        nlist //= 2
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


def default_train_size(factory: str, dim: int) -> int:
    """Training points a factory string wants: faiss's recommended 39 per centroid for the
    coarse quantiser (``IVFn``, ``IMI2xb``) and for product quantisers (``2**nbits``
    centroids each), at least ``dim`` for PCA/OPQ/ITQ transforms, else 1."""
    need = 1
    for m in re.finditer(r"IVF(\d+)", factory):
        need = max(need, MIN_POINTS_PER_CENTROID * int(m.group(1)))
    for m in re.finditer(r"IMI(\d+)x(\d+)", factory):
        need = max(need, MIN_POINTS_PER_CENTROID * 2 ** int(m.group(2)))
    for m in re.finditer(r"PQ(\d+)(?:x(\d+))?", factory):
        need = max(need, MIN_POINTS_PER_CENTROID * 2 ** int(m.group(2) or 8))
    if re.search(r"(PCA|OPQ|ITQ)", factory):
        need = max(need, dim)
    return need


def min_train_size(index: faiss.Index) -> int:
    """The fewest training vectors faiss accepts for ``index`` (``nlist`` for IVF)."""
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def bytes_per_vector(index: faiss.Index, dim: int, factory: str) -> int:
    """Memory one stored vector takes: its code plus the 8-byte id."""
    try:
        code = int(index.sa_code_size())
    except RuntimeError:
        code = 4 * dim  # HNSW and others: flat storage, plus the graph links
        m = re.search(r"HNSW(\d+)", factory)
        if m:
            code += 2 * int(m.group(1)) * 4  # ~2M neighbour ids of 4 bytes on level 0
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and code > 0:
        code -= int(ivf.coarse_code_size()) if hasattr(ivf, "coarse_code_size") else 0
    return code + 8


def set_search_param(index: faiss.Index, name: str, value: Any) -> None:
    """``faiss.ParameterSpace().set_index_parameter``, plus ``k_factor`` (how many times
    ``k`` candidates a re-ranking index re-scores exactly) through an id map, which faiss's
    parameter space does not reach."""
    try:
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        return
    except RuntimeError:
        if name != "k_factor":
            raise
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, faiss.IndexRefine):
        raise RuntimeError("k_factor applies to re-ranking (Refine) indexes only")
    inner.k_factor = float(value)


def build_faiss(factory: str, dim: int, metric: str) -> faiss.Index:
    """``faiss.index_factory`` with the user's ids kept by faiss itself: IVF indexes hold
    ids natively, everything else is wrapped in an ``IndexIDMap2``."""
    mt = metric_type(metric)
    try:
        index = faiss.index_factory(dim, factory, mt)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(f"faiss cannot build index factory {factory!r} for dimension {dim}: "
                         f"{msg}") from None
    # re-ranking (Refine) looks its exact vectors up by the base index's labels, which must
    # then be positions, not the user's ids: wrap it too
    refine = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    if (faiss.try_extract_index_ivf(index) is None or refine) and \
            not factory.startswith("IDMap"):
        index = faiss.index_factory(dim, "IDMap2," + factory, mt)
    return index
