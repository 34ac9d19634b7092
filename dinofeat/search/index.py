"""KNNIndex: a faiss-backed nearest-neighbour index over DINO features.

``KNNIndex`` keeps vectors in a faiss index and everything else a person needs next to them:
the user's int64 ids, optional labels (ints or strings), source paths, content hashes and
per-item metadata, and the identity of the model that made the features (name, weights
hash, preprocessing, pooling), so that features from another model are refused::

    index = KNNIndex(metric="cosine")                 # exact (faiss "Flat") by default
    index.add(feats, labels=labels, meta=paths)       # feats: numpy or torch [N, D]
    scores, ids = index.search(queries, k=10)         # numpy [Q, k] each
    class_scores = index.classify(queries, k=20, T=0.07)   # DINO's weighted vote, [Q, C]
    index.save("photos.idx"); index = KNNIndex.load("photos.idx")

Metrics: ``"cosine"`` (default) L2-normalises vectors in ``add`` and ``search`` and uses
inner product, so scores are cosine similarities (larger is nearer); ``"l2"`` keeps vectors
as they are and scores are *squared* Euclidean distances (smaller is nearer). Where fewer
than ``k`` vectors exist, missing neighbours have id ``-1`` and score ``-inf`` (cosine) or
``+inf`` (l2).

Index types: any faiss factory string (``"Flat"``, ``"IVF1024,Flat"``, ``"IVF4096,PQ48"``,
``"HNSW32"``, ``"PCA128,IVF256,SQ8"`` ...) or ``"auto"`` (see :mod:`dinofeat.search.factory`).
User ids are kept by faiss itself (IVF indexes natively, everything else inside an
``IndexIDMap2``). An index that needs training (IVF, PQ, ...) is trained automatically:
vectors added before it is trained wait in an exact flat buffer (searchable, saved with the
index) until ``train_size`` of them have arrived - by default faiss's recommended 39
training points per centroid - and are then used as the training sample and moved into the
index. :meth:`KNNIndex.train` trains earlier on demand.

The folder format is :mod:`dinofeat.search.storage`'s; building from image files is
:mod:`dinofeat.search.build`'s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import faiss as _faiss
import numpy as np

from .. import accel, runtime
from ..utils import get_logger
from . import auto as autos
from . import build as builder
from . import factory as factories
from . import storage
from .factory import (build_faiss, bytes_per_vector, default_train_size, gpu_available,
                      metric_type, min_train_size, set_search_param)
from . import identity, ondisk
from .identity import (IncompatibleFeaturesError, as_info, check_compatible, describe,
                       embedding_identity)
from .storage import IndexFormatError

__all__ = ["KNNIndex", "as_float_matrix"]

#: faiss 1.15's stub (faiss/__init__.pyi) lacks DirectMap, SearchParametersHNSW and the
#: attributes of the id-map and IVF classes used here: faiss objects are typed as Any
faiss: Any = _faiss

_ADD_CHUNK = 65536

_log = get_logger("dinofeat.index")


def as_float_matrix(x: Any, what: str) -> np.ndarray:
    """``x`` (numpy, torch, nested lists; one vector or ``[N, D]``) as a C-contiguous
    float32 ``[N, D]`` matrix; NaN or infinite values are refused, naming ``what``."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a [N, D] matrix, got shape {tuple(arr.shape)}")
    if arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))[:5].tolist()
        raise ValueError(f"{what} contain NaN or infinite values (rows {bad}...)")
    return np.ascontiguousarray(arr)


def _to_label(v: Any) -> int | str:
    if isinstance(v, (str, np.str_)):
        return str(v)
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if hasattr(v, "item"):
        return _to_label(v.item())
    raise TypeError(f"labels must be ints or strings, got {type(v).__name__} {v!r}")


# ------------------------------------------------------------------ the index
def _hnsw_of(index: Any) -> Any:
    """The ``IndexHNSW`` inside ``index`` (through an id map), or ``None``."""
    inner = (faiss.downcast_index(index.index)
             if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _flat_arrays(index: faiss.Index) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(vectors [N, D] (a view, no copy), ids [N], "ip" | "l2")`` of an id-mapped
    exact ``IndexFlat``; ``None`` for any other index."""
    if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return None
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlat) or inner.ntotal == 0:
        return None
    xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal,
                                                                           inner.d)
    metric = "ip" if inner.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    return xb, faiss.vector_to_array(index.id_map), metric


class KNNIndex:
    """A nearest-neighbour index over feature vectors, with ids, labels and provenance.

    Args:
        dim: vector dimension; taken from the first ``add`` when ``None``.
        metric: ``"cosine"`` (L2-normalise, inner product) or ``"l2"``.
        factory: a faiss index factory string (``"Flat"`` exact, ``"IVF1024,Flat"``,
            ``"IVF4096,PQ48"``, ``"HNSW32"`` ...) or ``"auto"``.
        model_info: identity of the feature space (a :class:`DinoModel` or
            :func:`features_info` dict); queries with another identity are refused.
        expected_size: for ``"auto"``: the number of vectors you plan to add.
        train_size: vectors to collect before training an index that needs training
            (default: what the factory wants, see :func:`_default_train_size`).
        search_params: faiss search parameters, e.g. ``{"nprobe": 32}`` (IVF),
            ``{"efSearch": 128}`` (HNSW); IVF defaults to ``nprobe = 16``.
        device: ``"auto"`` (a GPU copy for search when faiss-gpu and a GPU are present),
            ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, dim: int | None = None, metric: str = "cosine", factory: str = "Flat",
                 model_info: Any = None, *, expected_size: int | None = None,
                 train_size: int | None = None, search_params: Mapping[str, Any] | None = None,
                 device: str = "auto", memory: int | str | None = None,
                 recall: float | None = None):
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', not {metric!r}")
        if not isinstance(factory, str) or not factory.strip():
            raise ValueError("factory must be a faiss factory string or 'auto'")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
        if (memory is not None or recall is not None) and factory.strip() != "auto":
            raise ValueError("memory= and recall= choose the index of factory='auto'; a "
                             f"{factory!r} index is what it is (tune it with search_params=)")
        if recall is not None and not 0 < float(recall) <= 1:
            raise ValueError(f"recall is a target recall@10 in (0, 1], got {recall}")
        if device == "cuda" and not gpu_available():
            raise ValueError("device='cuda' needs faiss-gpu and a CUDA device; neither is "
                             "available here (install faiss-gpu or use device='cpu')")
        if not factories.threads_configured():
            factories.configure_threads()
        self.dim = int(dim) if dim is not None else None
        self.metric = metric
        self.factory = factory.strip()
        self.model_info = as_info(model_info)
        self.expected_size = expected_size
        self.train_size = train_size
        self.search_params: dict[str, Any] = dict(search_params or {})
        self.device = device
        self.memory = autos.parse_memory(memory) if memory is not None else None
        self.recall_target = float(recall) if recall is not None else None
        #: what "auto" chose and measured (header key "auto")
        self.auto: dict[str, Any] = {}
        self._probe: dict[str, Any] | None = None  # held-out queries and their exact answers
        self._tuned_at: int | None = None
        self.build_state: dict[str, Any] = {}  # free-form progress of from_images builds
        self.folder: Path | None = None  # where it was last loaded from or saved to
        self.resolved_factory: str | None = None
        self._index: Any = None  # the faiss index
        self._pending: Any = None  # exact buffer (faiss) while the index is untrained
        self._gpu_index: Any = None
        self._gpu_failed = False
        self._mapped = False  # faiss data memory-mapped from a generation file (read-only)
        self._grower: ondisk.ListsGrower | None = None  # vectors added to a mapped IVF index
        self._gpu_res: Any = None  # faiss.StandardGpuResources of the GPU copy
        self._tombstones: set[int] = set()  # removed ids an index cannot delete (HNSW)
        # per-item records, row-aligned
        self._ids: list[int] = []
        self._labels: list[int | str | None] = []
        self._paths: list[str | None] = []
        self._hashes: list[str | None] = []
        self._extra: list[dict | None] = []
        self._row: dict[int, int] = {}
        self._hash_set: set[str] = set()
        self._next_id = 0
        self._cache: dict[str, Any] = {}
        if self.dim is not None:
            self._ensure_index(self.expected_size or 0)

    # ------------------------------------------------------------ facts
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"KNNIndex(n={len(self)}, dim={self.dim}, metric={self.metric!r}, "
                f"factory={self.resolved_factory or self.factory!r}, trained={self.is_trained})")

    @property
    def ids(self) -> np.ndarray:
        """The ids of the live items, in insertion order (int64)."""
        return np.asarray(self._ids, dtype=np.int64)

    @property
    def _d(self) -> int:
        """The dimension, once known (every caller runs after the first vectors)."""
        assert self.dim is not None, "the index has no dimension yet"
        return self.dim

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    @property
    def has_labels(self) -> bool:
        return bool(self._labels) and self._labels[0] is not None

    @property
    def classes(self) -> list:
        """The distinct labels, sorted: the columns of :meth:`classify`."""
        if "classes" not in self._cache:
            self._cache["classes"] = sorted({lab for lab in self._labels if lab is not None})
        return list(self._cache["classes"])

    @property
    def hashes(self) -> set[str]:
        """Content hashes (sha256) of the indexed source files."""
        return set(self._hash_set)

    @property
    def bytes_per_vector(self) -> int | None:
        if self._index is None or self.dim is None:
            return None
        return bytes_per_vector(self._index, self.dim, self.resolved_factory or "")

    def contains(self, ids: Iterable[int]) -> np.ndarray:
        """Whether each id is in the index (bool array)."""
        return np.array([int(i) in self._row for i in ids], dtype=bool)

    def lookup(self, ids: Iterable[int]) -> list[dict[str, Any] | None]:
        """Records of ids: ``{"id", "label", "path", "sha256", "meta"}`` (``None`` for an
        unknown id or ``-1``)."""
        out: list[dict[str, Any] | None] = []
        for i in ids:
            r = self._row.get(int(i))
            if r is None:
                out.append(None)
                continue
            out.append({"id": self._ids[r], "label": self._labels[r], "path": self._paths[r],
                        "sha256": self._hashes[r], "meta": self._extra[r]})
        return out

    def paths(self) -> list[str | None]:
        return list(self._paths)

    def vectors(self, ids: Iterable[int] | None = None) -> np.ndarray:
        """The stored vectors ``float32 [len(ids), dim]`` of ``ids`` (default: every item,
        in :attr:`ids` order): exact for flat storage, decoded for PQ/SQ codes."""
        arr = self.ids if ids is None else np.asarray(list(ids), dtype=np.int64)
        if len(arr) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.ascontiguousarray(self._reconstruct(arr), dtype=np.float32)

    # ------------------------------------------------------------ building
    def _ensure_index(self, size_hint: int) -> None:
        if self._index is not None:
            return
        assert self.dim is not None
        factory = self.factory
        if factory == "auto":
            n = max(size_hint, self.expected_size or 0, 1)
            cands = autos.candidates(n, self.dim)
            budget = self._budget()
            fitting = [c for c in cands if c.memory(n) <= budget]
            if not fitting:  # refused before any work, with the same words as select()
                autos.select(np.zeros((0, self.dim), np.float32), n, self.metric, budget,
                             self._target())
            # Flat needs no sample; any other choice waits for the training sample in the
            # exact buffer (the first candidate stands in, untrained, until then)
            factory = fitting[0].factory
        self._index = build_faiss(factory, self.dim, self.metric)
        self.resolved_factory = factory
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            self.search_params.setdefault("nprobe", min(16, int(ivf.nlist)))
        self._apply_search_params()
        if self.factory == "auto" and factory == "Flat":
            self.auto = {"memory_budget": self._budget(), "recall_target": self._target(),
                         "k": autos.AUTO_K, "factory": "Flat", "params": {},
                         "recall": 1.0, "measured_on": "exact search"}
            _log.info("index factory auto -> Flat (%s vectors expected, dim %d): exact, about "
                      "%d bytes per vector", f"{self.expected_size:,}" if self.expected_size
                      else "size unknown", self.dim,
                      bytes_per_vector(self._index, self.dim, factory))
        if not self._index.is_trained:
            self._pending = faiss.IndexIDMap2(faiss.IndexFlat(
                self.dim, metric_type(self.metric)))

    def _apply_search_params(self) -> None:
        if self._index is None:
            return
        for name, value in self.search_params.items():
            try:
                set_search_param(self._index, name, value)
            except RuntimeError as e:
                raise ValueError(f"search parameter {name}={value!r} does not apply to a "
                                 f"{self.resolved_factory} index: "
                                 f"{str(e).strip().splitlines()[-1]}") from None
        self._gpu_index = None

    def set_search_params(self, **params: Any) -> None:
        """Set faiss search parameters (``nprobe`` for IVF, ``efSearch`` for HNSW ...);
        they are saved with the index."""
        old = dict(self.search_params)
        self.search_params.update(params)
        try:
            self._apply_search_params()
        except ValueError:
            self.search_params = old
            self._apply_search_params()
            raise

    def _resolve_train_size(self) -> int:
        assert self.dim is not None and self.resolved_factory is not None
        if self.train_size:
            return max(int(self.train_size), min_train_size(self._index))
        return default_train_size(self.resolved_factory, self.dim)

    def _prepare(self, feats: Any, what: str) -> np.ndarray:
        x = as_float_matrix(feats, what)
        if self.dim is None:
            if x.shape[0] == 0:
                return x
            self.dim = int(x.shape[1])
        if x.shape[1] != self.dim:
            raise IncompatibleFeaturesError(
                f"{what} have dimension {x.shape[1]} but this index holds {self.dim}-d "
                f"vectors{' of ' + describe(self.model_info) if self.model_info else ''}")
        if self.metric == "cosine" and x.shape[0]:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                bad = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
                raise ValueError(f"{what} rows {bad} are zero vectors: no cosine similarity "
                                 "is defined for them")
            x = x / norms
        return np.ascontiguousarray(x, dtype=np.float32)

    def add(self, feats: Any, ids: Sequence[int] | np.ndarray | None = None,
            labels: Sequence[Any] | None = None, meta: Sequence[Any] | None = None, *,
            model_info: Any = None) -> np.ndarray:
        """Add ``feats`` ``[N, D]`` (numpy or torch) and return their int64 ids.

        Args:
            ids: the user's ids (unique, not already present); default: consecutive
                integers after the largest id so far.
            labels: one int or string label per vector (all items of an index have labels
                or none has).
            meta: one entry per vector: a source path (str / PathLike), or a dict whose
                ``"path"`` and ``"sha256"`` keys fill the path and content hash and whose
                other keys are kept as free metadata (JSON types only).
            model_info: identity of the features, checked against the index's.
        """
        check_compatible(self.model_info, as_info(model_info), "features to add")
        if self.model_info is None and model_info is not None:
            self.model_info = as_info(model_info)
        x = self._prepare(feats, "features to add")
        n = x.shape[0]
        id_arr = self._new_ids(n, ids)
        lab = self._check_labels(n, labels)
        paths, hashes, extra = self._split_meta(n, meta)
        if n == 0:
            return id_arr
        grow = self._mapped and self.is_trained and self._pending is None and \
            ondisk.can_grow(self._index)
        if not grow:
            self._own_memory()
        elif self._grower is None:
            _log.info("adding to the memory-mapped %s index without reading its lists: the "
                      "new vectors are searched next to them and merged into a new lists "
                      "file at the next save", self.resolved_factory)
            self._grower = ondisk.ListsGrower(ondisk.ivf_of(self._index))
        self._ensure_index(len(self) + n)
        target = self._index if self._index.is_trained else self._pending
        for s in range(0, n, _ADD_CHUNK):
            if self._grower is not None and grow:
                self._grower.add(x[s:s + _ADD_CHUNK], id_arr[s:s + _ADD_CHUNK])
            else:
                target.add_with_ids(x[s:s + _ADD_CHUNK], id_arr[s:s + _ADD_CHUNK])
        start = len(self._ids)
        self._ids.extend(int(i) for i in id_arr)
        self._labels.extend(lab)
        self._paths.extend(paths)
        self._hashes.extend(hashes)
        self._extra.extend(extra)
        for r, i in enumerate(id_arr.tolist(), start):
            self._row[i] = r
        self._hash_set.update(h for h in hashes if h)
        self._next_id = max(self._next_id, int(id_arr.max()) + 1)
        self._invalidate()
        if self._pending is not None and self._pending.ntotal >= self._resolve_train_size():
            self.train()
        elif self.factory == "auto" and self.resolved_factory == "Flat" and (
                len(self) > factories.AUTO_EXACT_LIMIT or
                (autos.estimate_memory("Flat", len(self), self._d) or 0) > self._budget()):
            _log.info("index outgrew exact search (%d vectors; exact search is kept up to %d "
                      "and within %s): choosing another index", len(self),
                      factories.AUTO_EXACT_LIMIT, autos.format_bytes(self._budget()))
            self._convert_auto()
        elif self._probe is not None and self._pending is None:
            self._probe_add(x, id_arr)
            # recall falls as the index grows past the sample it was tuned on: measure
            # again (a few hundred IVF searches) each time it has grown by a tenth, so
            # that searches between saves run with parameters measured at about this size
            if self._tuned_at is None or len(self) >= 1.1 * self._tuned_at:
                self.tune()
        return id_arr

    def _new_ids(self, n: int, ids: Any) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.shape != (n,):
            raise ValueError(f"ids must be {n} integers (one per vector), got shape {arr.shape}")
        if n and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ids must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
        if n and (arr < 0).any():
            raise ValueError("ids must be >= 0 (faiss uses -1 for 'no result')")
        if len(np.unique(arr)) != n:
            raise ValueError("ids contain duplicates")
        taken = [int(i) for i in arr if int(i) in self._row or int(i) in self._tombstones]
        if taken:
            raise ValueError(f"ids already in the index: {taken[:10]}"
                             f"{' ...' if len(taken) > 10 else ''}")
        return arr

    def _check_labels(self, n: int, labels: Any) -> list:
        if labels is None:
            if self.has_labels and n:
                raise ValueError("this index has labels: pass labels= for the new vectors")
            return [None] * n
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu().numpy()
        labels = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} vectors")
        out = [_to_label(v) for v in labels]
        if self._ids and not self.has_labels and n:
            raise ValueError("this index has no labels: cannot add labelled vectors to it")
        kinds = {type(v) for v in out} | ({type(self._labels[0])} if self.has_labels else set())
        if len(kinds) > 1:
            raise TypeError("labels must be all ints or all strings, not a mix")
        return out

    @staticmethod
    def _split_meta(n: int, meta: Any) -> tuple[list, list, list]:
        if meta is None:
            return [None] * n, [None] * n, [None] * n
        meta = list(meta)
        if len(meta) != n:
            raise ValueError(f"got {len(meta)} meta entries for {n} vectors")
        paths: list[str | None] = []
        hashes: list[str | None] = []
        extra: list[dict | None] = []
        for m in meta:
            if m is None:
                paths.append(None)
                hashes.append(None)
                extra.append(None)
            elif isinstance(m, (str, os.PathLike)):
                paths.append(str(m))
                hashes.append(None)
                extra.append(None)
            elif isinstance(m, Mapping):
                d = dict(m)
                p = d.pop("path", None)
                h = d.pop("sha256", None)
                try:
                    json.dumps(d)
                except TypeError as e:
                    raise TypeError(f"meta must hold JSON types only: {e}") from None
                paths.append(str(p) if p is not None else None)
                hashes.append(str(h) if h is not None else None)
                extra.append(d or None)
            else:
                raise TypeError(f"meta entries must be paths or dicts, not {type(m).__name__}")
        return paths, hashes, extra

    def _own_memory(self) -> None:
        """A mapped index is read-only (faiss aborts on writing a mapped array): copy it
        into memory before the first change."""
        if not self._mapped or self._index is None:
            return
        _log.info("copying the memory-mapped index into memory to change it (%s vectors)",
                  f"{int(self._index.ntotal):,}")
        self._index = ondisk.in_memory_copy(self._index)
        self._mapped = False
        self._grower = None
        self._apply_search_params()

    def _invalidate(self) -> None:
        self._cache.clear()
        self._gpu_index = None

    def train(self, sample: Any = None) -> None:
        """Train the index now: on ``sample`` ``[M, D]`` if given, else on the vectors
        waiting in the exact buffer (at least ``nlist`` of them for IVF); then move the
        buffered vectors into the index. A no-op for an index that is already trained."""
        if self._index is None:
            if sample is None:
                raise ValueError("nothing to train on: the index is empty; pass sample=")
            x = self._prepare(sample, "training sample")
            self._ensure_index(len(x))
        if self._index.is_trained:
            return
        self._own_memory()
        if sample is not None:
            x = self._prepare(sample, "training sample")
        else:
            n = self._pending.ntotal
            x = self._pending.index.reconstruct_n(0, n) if n else np.zeros((0, self._d),
                                                                          np.float32)
        train_x = x
        if self.factory == "auto" and sample is None and self._pending is not None:
            pending_ids = faiss.vector_to_array(self._pending.id_map).astype(np.int64)
            choice = self._choose_auto(x, pending_ids)
            self._probe_add(x, pending_ids)  # the sample is the whole index so far
            train_x = x[choice.training_rows(len(x))]
        need = min_train_size(self._index)
        if len(x) < need:
            raise ValueError(f"{self.resolved_factory} needs at least {need} training vectors, "
                             f"got {len(x)}")
        t0 = time.perf_counter()
        self._index.train(train_x if len(train_x) >= need else x)
        _log.info("trained %s on %d vectors in %.1f s", self.resolved_factory, len(train_x),
                  time.perf_counter() - t0)
        pending, self._pending = self._pending, None
        if pending is not None and pending.ntotal:
            ids = faiss.vector_to_array(pending.id_map).astype(np.int64)
            for s in range(0, len(ids), _ADD_CHUNK):
                vec = pending.index.reconstruct_n(s, min(_ADD_CHUNK, len(ids) - s))
                self._index.add_with_ids(vec, ids[s:s + _ADD_CHUNK])
        self._apply_search_params()
        self._invalidate()
        if self._probe is not None:
            self.tune()

    # ------------------------------------------------------------ auto
    def _budget(self) -> int:
        return self.memory if self.memory is not None else autos.free_memory()

    def _target(self) -> float:
        return self.recall_target if self.recall_target is not None else autos.DEFAULT_RECALL

    def _choose_auto(self, sample: np.ndarray, ids: np.ndarray | None) -> "autos.AutoChoice":
        """Choose the index on the exact training sample (see :mod:`dinofeat.search.auto`)
        and make it this index's (untrained, its coarse quantiser filled)."""
        n = max(len(self), self.expected_size or 0, len(sample))
        budget, target = self._budget(), self._target()
        choice = autos.select(sample, n, self.metric, budget, target)
        new = build_faiss(choice.factory, self._d, self.metric)
        ivf = faiss.try_extract_index_ivf(new)
        if ivf is not None and choice.centroids is not None and \
                len(choice.centroids) == ivf.nlist:
            ivf.quantizer.add(choice.centroids)
        self._index = new
        self.resolved_factory = choice.factory
        self.search_params = {k: v for k, v in choice.params.items()}
        self.auto = choice.record(budget, target, n)
        if ids is not None and choice.factory != "Flat":
            self._start_probe(sample, ids, choice.holdout)
        if choice.met:
            _log.info("index factory auto -> %s with %s: recall@%d %.3f (95%% lower bound "
                      "%.3f >= %.2f) on a held-out sample, about %s for %s vectors",
                      choice.factory, choice.params or "-", autos.AUTO_K, choice.recall,
                      choice.bound, target, autos.format_bytes(choice.memory), f"{n:,}")
        else:
            _log.warning("index factory auto: recall@%d %.2f cannot be met within %s for %s "
                         "%d-d vectors (best: %s with %s, recall %.3f, 95%% lower bound "
                         "%.3f); raise --memory/memory= or lower the target", autos.AUTO_K,
                         target, autos.format_bytes(budget), f"{n:,}", self.dim,
                         choice.factory, choice.params, choice.recall, choice.bound)
        return choice

    def _convert_auto(self) -> None:
        """An exact auto index that outgrew exact search: choose on a sample of its (exact)
        vectors and rebuild into the choice."""
        live = self.ids
        size = min(len(live), autos.MIN_POINTS_PER_CENTROID * autos.nlist_for(len(live)))
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(len(live), size=size, replace=False))
        sample_ids = live[rows]
        sample = self._reconstruct(sample_ids)
        old = self._index  # exact: its vectors are the originals
        choice = self._choose_auto(sample, sample_ids)
        new = self._index
        t0 = time.perf_counter()
        new.train(sample[choice.training_rows(len(sample))])
        _log.info("trained %s on %d vectors in %.1f s", self.resolved_factory, len(sample),
                  time.perf_counter() - t0)
        for s in range(0, len(live), _ADD_CHUNK):
            chunk = live[s:s + _ADD_CHUNK]
            vecs = old.reconstruct_batch(chunk)
            new.add_with_ids(vecs, chunk)
            if self._probe is not None:
                self._probe_add(vecs, chunk)
        self._pending = None
        self._tombstones.clear()
        self._apply_search_params()
        self._invalidate()
        if self._probe is not None:
            self.tune()

    def _start_probe(self, sample: np.ndarray, ids: np.ndarray,
                     rows: np.ndarray | None = None) -> None:
        """Keep a few hundred held-out queries of the sample (``rows``: those the choice
        held out, which the index is not trained on) and their exact neighbours so far,
        updated as vectors are added, to measure recall on the full index."""
        if rows is None or not len(rows):
            rng = np.random.default_rng(1)
            nq = min(autos.HOLDOUT_QUERIES, len(sample))
            rows = np.sort(rng.choice(len(sample), size=nq, replace=False))
        nq = len(rows)
        k = autos.AUTO_K + 1
        q = np.ascontiguousarray(sample[rows])
        self._probe = {"queries": q, "ids": ids[rows],
                       "scores": np.full((nq, k), -np.inf if self.metric == "cosine" else
                                         np.inf, np.float32),
                       "topk": np.full((nq, k), -1, np.int64)}

    def _probe_add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Merge a batch of exact vectors into the held-out queries' exact top-k."""
        p = self._probe
        if p is None or len(x) == 0:
            return
        q = p["queries"]
        if self.metric == "cosine":
            sc = q @ x.T
            order_sign = -1.0
        else:
            sc = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
            order_sign = 1.0
        allsc = np.concatenate([p["scores"], sc.astype(np.float32)], axis=1)
        allid = np.concatenate([p["topk"], np.broadcast_to(ids[None, :], sc.shape)], axis=1)
        k = p["scores"].shape[1]
        top = np.argsort(order_sign * allsc, axis=1, kind="stable")[:, :k]
        p["scores"] = np.take_along_axis(allsc, top, axis=1)
        p["topk"] = np.take_along_axis(allid, top, axis=1)

    def tune(self, recall: float | None = None) -> dict[str, Any]:
        """Raise the search parameter (``nprobe``, ``efSearch``) of an ``auto`` index
        until recall@10 on its held-out queries, measured against their exact neighbours
        among every vector added in this session, reaches ``recall`` (default: the
        index's target). Returns the ``auto`` record (also in the header)."""
        if recall is not None:
            self.recall_target = float(recall)
        p = self._probe
        if p is None or self._index is None or not self._index.is_trained or \
                self.factory != "auto" or self.resolved_factory == "Flat":
            return dict(self.auto)
        # the candidate as chosen: its list count follows the size planned at the choice,
        # which the index may not have reached yet (or may have outgrown)
        sizes = {int(self.auto.get("expected_vectors") or 0), len(self)} - {0}
        cand = next((c for n in sorted(sizes, reverse=True)
                     for c in autos.candidates(n, self._d)
                     if c.factory == self.resolved_factory), None)
        if cand is None or cand.param is None:
            return dict(self.auto)
        if self._tombstones or any(i >= 0 and i not in self._row
                                   for i in p["topk"].ravel().tolist()):
            _log.info("auto: items were removed since the held-out answers were computed; "
                      "recall not measured again")
            return dict(self.auto)
        names = {cand.param, *cand.with_param}
        cand.params = {k: v for k, v in self.search_params.items() if k not in names}
        k = autos.AUTO_K
        truth = autos.drop_self(p["scores"], p["topk"], p["ids"], k)[1]
        t0 = time.perf_counter()
        tuned = autos.tune_parameter(self._index, cand, p["queries"], truth, p["ids"],
                                     self._target(), k)
        self.search_params.update(tuned.params)
        self._apply_search_params()
        self.auto.update(params=dict(self.search_params), recall=round(tuned.recall, 4),
                         recall_bound=round(tuned.bound, 4), confidence=autos.CONFIDENCE,
                         measured_on=len(self), queries=tuned.queries,
                         target_met=tuned.met(self._target()))
        _log.info("auto: recall@%d %.3f (95%% lower bound %.3f) with %s on %d held-out "
                  "queries over %d vectors (%.1f s)", k, tuned.recall, tuned.bound,
                  tuned.params, tuned.queries, len(self), time.perf_counter() - t0)
        if not tuned.met(self._target()):
            _log.warning("auto: recall@%d %.3f (95%% lower bound %.3f) does not reach the "
                         "target %.2f even with %s; rebuild with a larger memory budget "
                         "(memory=, --memory) or a lower target", k, tuned.recall,
                         tuned.bound, self._target(), tuned.params)
        self._tuned_at = len(self)
        return dict(self.auto)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (exact for flat storage, decoded for PQ/SQ)."""
        if self._pending is not None:
            return self._pending.reconstruct_batch(ids)
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None and ivf.direct_map.type != faiss.DirectMap.Hashtable:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return self._index.reconstruct_batch(ids)
        except RuntimeError as e:
            raise ValueError(f"a {self.resolved_factory} index cannot give its vectors back: "
                             f"{str(e).strip().splitlines()[-1]}") from None

    def rebuild(self, factory: str | None = None, train_size: int | None = None) -> None:
        """Re-create the faiss index (another ``factory``, or the same one to drop removed
        vectors that an HNSW index keeps as tombstones) from the stored vectors. Vectors
        of a PQ/SQ index come back approximately (decoded), so rebuild from an exact
        index when you can."""
        if factory and self.factory != "auto":
            self.factory = factory
        if self._index is None:
            return
        new_factory = factory or self.resolved_factory or self.factory
        self._own_memory()
        live = self.ids
        new = build_faiss(new_factory, self._d, self.metric)
        if not new.is_trained:
            need = min_train_size(new)
            if len(live) < need:
                raise ValueError(f"{new_factory} needs at least {need} vectors to train; "
                                 f"the index has {len(live)}")
            size = int(train_size or self.train_size or
                       default_train_size(new_factory, self._d))
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(live, size=min(max(size, need), len(live)),
                                        replace=False))
            t0 = time.perf_counter()
            new.train(self._reconstruct(sample))
            _log.info("trained %s on %d vectors in %.1f s", new_factory, len(sample),
                      time.perf_counter() - t0)
        for s in range(0, len(live), _ADD_CHUNK):
            chunk = live[s:s + _ADD_CHUNK]
            new.add_with_ids(self._reconstruct(chunk), chunk)
        self._index, self._pending = new, None
        self.resolved_factory = new_factory
        self._tombstones.clear()
        old_params, self.search_params = self.search_params, {}
        for name, value in old_params.items():  # keep the parameters that still apply
            try:
                set_search_param(new, name, value)
                self.search_params[name] = value
            except RuntimeError:
                pass
        ivf = faiss.try_extract_index_ivf(new)
        if ivf is not None:
            self.search_params.setdefault("nprobe", min(16, int(ivf.nlist)))
        self._apply_search_params()
        self._invalidate()
        _log.info("rebuilt as %s: %d vectors, about %d bytes per vector", new_factory,
                  len(live), bytes_per_vector(new, self._d, new_factory))

    def remove(self, ids: Iterable[int]) -> int:
        """Remove items by id; unknown ids are ignored. Returns how many were removed.

        Indexes that cannot delete vectors (HNSW) keep them as tombstones that searches
        skip; :meth:`rebuild` drops them."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        arr = np.unique(np.asarray(list(np.asarray(ids).ravel()), dtype=np.int64))
        present = np.array([i for i in arr.tolist() if i in self._row], dtype=np.int64)
        if len(present) == 0:
            return 0
        self._own_memory()
        sel = faiss.IDSelectorBatch(present)
        if self._pending is not None:
            self._pending.remove_ids(sel)
        else:
            try:
                self._index.remove_ids(sel)
            except RuntimeError:
                self._tombstones.update(present.tolist())
        drop = set(present.tolist())
        keep = [r for r, i in enumerate(self._ids) if i not in drop]
        self._ids = [self._ids[r] for r in keep]
        self._labels = [self._labels[r] for r in keep]
        self._paths = [self._paths[r] for r in keep]
        self._hashes = [self._hashes[r] for r in keep]
        self._extra = [self._extra[r] for r in keep]
        self._row = {i: r for r, i in enumerate(self._ids)}
        self._hash_set = {h for h in self._hashes if h}
        self._invalidate()
        return len(present)

    # ------------------------------------------------------------ searching
    def _search_index(self) -> faiss.Index | None:
        if self._pending is not None:
            return self._pending
        if self._index is None:
            return None
        if self.device != "cpu" and not self._gpu_failed and gpu_available():
            if self._gpu_index is None:
                try:
                    # this process's GPU only (its local rank's under torchrun), not a
                    # copy on every visible GPU
                    self._gpu_res = faiss.StandardGpuResources()
                    self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, _gpu_device(),
                                                             self._index)
                except RuntimeError as e:  # e.g. HNSW has no GPU version
                    self._gpu_failed = True
                    _log.info("searching on CPU: faiss-gpu cannot hold a %s index (%s)",
                              self.resolved_factory, str(e).strip().splitlines()[-1])
            if self._gpu_index is not None:
                return self._gpu_index
        return self._index

    def search(self, queries: Any, k: int = 10, *, model_info: Any = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query ``[Q, D]`` (numpy or torch).

        Returns ``(scores, ids)``, numpy ``[Q, k]`` each, nearest first: cosine similarity
        (cosine metric) or squared L2 distance (l2 metric), and the user's int64 ids
        (``-1`` where fewer than ``k`` items exist). ``model_info`` (a DinoModel or
        :func:`features_info` dict) is checked against the index's feature space."""
        check_compatible(self.model_info, as_info(model_info), "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._prepare(queries, "queries")
        nq = q.shape[0]
        empty_score = -np.inf if self.metric == "cosine" else np.inf
        index = self._search_index()
        if index is None or nq == 0 or index.ntotal == 0:
            return (np.full((nq, k), empty_score, np.float32), np.full((nq, k), -1, np.int64))
        extra = len(self._tombstones)
        kk = min(k + extra, int(index.ntotal))
        flat = _flat_arrays(index) if index is not self._gpu_index else None
        if flat is not None and accel.exact_search_kernel(q.shape[1]) == "torch":
            # exact search by torch matmul + topk where a probe found it faster here
            xb, id_map, metric = flat
            scores, rows = accel.exact_search(xb, q, kk, metric)
            ids = id_map[rows]
        else:
            try:
                scores, ids = index.search(q, kk)
            except RuntimeError as e:  # a faiss-gpu failure (out of memory...): the CPU copy
                if index is not self._gpu_index or self._gpu_index is None:
                    raise
                self._gpu_failed, self._gpu_index = True, None
                _log.warning("faiss GPU search failed (%s); searching on the CPU from now on",
                             str(e).strip().splitlines()[-1] if str(e).strip()
                             else type(e).__name__)
                scores, ids = self._index.search(q, kk)
        scores, ids = self._complete_hnsw_rows(index, q, kk, scores, ids)
        if extra:
            dead = np.isin(ids, np.fromiter(self._tombstones, np.int64, extra))
            ids = np.where(dead, -1, ids)
            scores = np.where(dead, empty_score, scores).astype(np.float32)
            order = np.argsort(ids < 0, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=empty_score)
        ids = ids[:, :k].astype(np.int64)
        scores = scores[:, :k].astype(np.float32)
        scores[ids < 0] = empty_score
        return scores, ids

    def _complete_hnsw_rows(self, index: Any, q: np.ndarray, kk: int, scores: np.ndarray,
                            ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HNSW's greedy walk can come back with fewer than ``kk`` hits although the
        index holds more (a sparse graph, many tombstones): search those queries again
        with a wider beam (``efSearch``) up to the whole index, so that a search returns
        ``min(k, live items)`` results as every other index type does."""
        hnsw = _hnsw_of(index)
        want = min(kk, int(index.ntotal))
        short = np.flatnonzero((ids >= 0).sum(1) < want)
        if hnsw is None or not len(short):
            return scores, ids
        ef = max(int(hnsw.hnsw.efSearch), kk)
        while len(short) and ef < int(index.ntotal):
            ef = min(4 * ef, int(index.ntotal))
            params = faiss.SearchParametersHNSW(efSearch=ef)
            s2, i2 = index.search(q[short], kk, params=params)
            scores[short], ids[short] = s2, i2
            short = short[(i2 >= 0).sum(1) < want]
        if len(short):
            # a graph that does not reach every node (tiny M, many tombstones): the
            # vectors HNSW stores, searched exactly, for these few queries
            storage = faiss.downcast_index(hnsw.storage)
            s2, rows = storage.search(q[short], kk)
            if index is not hnsw:  # through the id map
                id_map = faiss.vector_to_array(index.id_map)
                rows = np.where(rows >= 0, id_map[np.clip(rows, 0, None)], -1)
            scores[short], ids[short] = s2, rows
        return scores, ids

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (``-1`` for ``-1``)."""
        if "sorted" not in self._cache:
            arr = np.asarray(self._ids, dtype=np.int64)
            order = np.argsort(arr)
            self._cache["sorted"] = (arr[order], order)
        sorted_ids, order = self._cache["sorted"]
        if len(sorted_ids) == 0:
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        rows = order[pos]
        ok = (ids >= 0) & (sorted_ids[pos] == ids)
        return np.where(ok, rows, -1)

    def classify(self, queries: Any, k: int = 20, T: float = 0.07, *,
                 classes: Sequence[Any] | None = None, model_info: Any = None) -> np.ndarray:
        """DINO's weighted k-NN vote (paper section 3.7) as class scores ``[Q, C]``.

        Each query's ``k`` nearest items by cosine similarity ``s_i`` vote for their label
        with weight ``exp(s_i / T)``; the votes are summed per class. Columns follow
        ``classes`` (default :attr:`classes`, the sorted distinct labels; pass e.g.
        ``range(10)`` to get columns for classes absent from the index). The prediction is
        ``classes[scores.argmax(1)]`` (:meth:`predict`)."""
        if self.metric != "cosine":
            raise ValueError("classify uses cosine similarities: build the index with "
                             "metric='cosine'")
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if len(self) and not self.has_labels:
            raise ValueError("this index has no labels: add vectors with labels= to classify")
        cols = list(classes) if classes is not None else self.classes
        col_of = {c: j for j, c in enumerate(cols)}
        scores, ids = self.search(queries, k, model_info=model_info)
        out = np.zeros((ids.shape[0], len(cols)), dtype=np.float64)
        rows = self._rows(ids)
        valid = rows >= 0
        if valid.any():
            if "label_col" not in self._cache or self._cache["label_col"][0] != cols:
                codes = np.array([col_of.get(lab, -1) for lab in self._labels], dtype=np.int64)
                self._cache["label_col"] = (cols, codes)
            codes = self._cache["label_col"][1]
            cls = np.where(valid, codes[np.where(valid, rows, 0)], -1)
            if (cls[valid] < 0).any():
                missing = {self._labels[r] for r in rows[valid & (cls < 0)].tolist()}
                raise ValueError(f"neighbours have labels {sorted(missing)[:10]} that are not "
                                 "among classes=")
            import torch

            from ..eval.knn import weighted_vote  # the one implementation of the vote
            out = weighted_vote(torch.from_numpy(scores.astype(np.float64)),
                                torch.from_numpy(np.where(valid, cls, -1)), T,
                                len(cols)).numpy()
        return out

    def predict(self, queries: Any, k: int = 20, T: float = 0.07, **kw: Any) -> list:
        """The winning label of :meth:`classify` for each query."""
        cols = list(kw.get("classes") or self.classes)
        scores = self.classify(queries, k, T, **kw)
        return [cols[j] for j in scores.argmax(1)] if cols else [None] * len(scores)

    # ------------------------------------------------------------ saving
    def _header(self, generation: int, files: dict[str, str | None]) -> dict[str, Any]:
        from ..version import __version__
        return {
            "format": storage.FORMAT_NAME, "format_version": storage.FORMAT_VERSION,
            "generation": generation, **files,
            "count": len(self),
            "ntotal": int(self._index.ntotal) if self._index is not None else 0,
            "pending": int(self._pending.ntotal) if self._pending is not None else 0,
            "tombstones": len(self._tombstones),
            "dim": self.dim, "metric": self.metric,
            "normalization": "l2" if self.metric == "cosine" else "none",
            "factory": self.factory, "resolved_factory": self.resolved_factory,
            "trained": self.is_trained, "train_size": self.train_size,
            "expected_size": self.expected_size,
            "bytes_per_vector": self.bytes_per_vector,
            "search_params": self.search_params,
            "memory_budget": self.memory, "recall_target": self.recall_target,
            "auto": self.auto or None,
            "model": self.model_info,
            "has_labels": self.has_labels, "classes": self.classes,
            "next_id": self._next_id,
            "build": self.build_state,
            "faiss_version": faiss.__version__, "dinofeat_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder ``path`` (created if needed), atomically: readers
        see the previous complete index until the new ``index.json`` is in place."""
        items = {"ids": self._ids,
                 "labels": self._labels if self.has_labels else None,
                 "paths": self._paths if any(p is not None for p in self._paths) else None,
                 "sha256": self._hashes if self._hash_set else None,
                 "meta": self._extra if any(e is not None for e in self._extra) else None,
                 "tombstones": sorted(self._tombstones)}
        if self._probe is not None and self._tuned_at != len(self):
            self.tune()
        out = storage.write_generation(path, index=self._index, pending=self._pending,
                                       items=items, header=self._header)
        self.folder = out
        if ondisk.has_ondisk_lists(self._index):
            # the lists just written hold everything: map them, and let the vectors added
            # since the load (in memory) go
            self._index = storage.read_index_file(out)
            self._grower = None
            self._mapped = True
            self._apply_search_params()
            self._invalidate()
        return out

    @staticmethod
    def read_header(path: str | os.PathLike) -> dict[str, Any]:
        """The header (``index.json``) of a saved index, without loading any vectors."""
        return storage.read_header(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", *, mmap: bool = False
             ) -> "KNNIndex":
        """Read an index folder written by :meth:`save`, checking that its files agree
        (generation, counts, dimension, metric, ids).

        ``mmap=True`` maps the faiss data instead of reading it (an index larger than
        memory is searched with the OS paging in what searches touch; an IVF index touches
        only the ``nprobe`` lists a query probes). Vectors added to a mapped IVF index are
        kept in memory next to the mapped lists (searched together) and merged into a new
        on-disk lists file at the next save (:mod:`dinofeat.search.ondisk`), so an index
        larger than memory can grow; other index types, and removing vectors, first copy
        the index into memory, once, and say so."""
        path = Path(path)
        stored = storage.read_generation(path, mmap=mmap)
        header, items = stored.header, stored.items
        items_name = str(header.get("items_file"))

        def bad(msg: str) -> IndexFormatError:
            return IndexFormatError(f"{path}: {msg}")

        self = cls(None, metric=header["metric"], factory=header["factory"],
                   model_info=header.get("model"), expected_size=header.get("expected_size"),
                   train_size=header.get("train_size"),
                   search_params=header.get("search_params") or {}, device=device,
                   **({"memory": header.get("memory_budget"),
                       "recall": header.get("recall_target")}
                      if header["factory"] == "auto" else {}))
        self.auto = dict(header.get("auto") or {})
        self.dim = header["dim"]
        self.folder = path
        self.resolved_factory = header.get("resolved_factory")
        self.build_state = dict(header.get("build") or {})
        self._next_id = int(header.get("next_id", 0))
        self._index, self._pending = stored.index, stored.pending
        # on-disk lists are always mapped (by faiss): never written in place
        self._mapped = stored.index is not None and (
            bool(mmap) or ondisk.has_ondisk_lists(stored.index))
        ids = [int(i) for i in items.get("ids", [])]
        n = len(ids)
        if n != header.get("count"):
            raise bad(f"{items_name} lists {n} items, the header says {header.get('count')}")
        for key in ("labels", "paths", "sha256", "meta"):
            col = items.get(key)
            if col is not None and len(col) != n:
                raise bad(f"{items_name}: {key} has {len(col)} entries for {n} ids")
        self._ids = ids
        self._labels = items.get("labels") or [None] * n
        self._paths = items.get("paths") or [None] * n
        self._hashes = items.get("sha256") or [None] * n
        self._extra = items.get("meta") or [None] * n
        self._row = {i: r for r, i in enumerate(ids)}
        if len(self._row) != n:
            raise bad(f"{items_name} has duplicate ids")
        self._hash_set = {h for h in self._hashes if h}
        self._tombstones = {int(i) for i in items.get("tombstones", [])}
        stored_n = sum(int(ix.ntotal) for ix in (self._index, self._pending) if ix is not None)
        if stored_n != n + len(self._tombstones):
            raise bad(f"faiss holds {stored_n} vectors but the metadata lists {n} items and "
                      f"{len(self._tombstones)} removed ones: the files do not belong together")
        mt = metric_type(self.metric)
        for ix in (self._index, self._pending):
            if ix is None:
                continue
            if ix.d != self.dim:
                raise bad(f"faiss index has dimension {ix.d}, the header says {self.dim}")
            if ix.metric_type != mt:
                raise bad(f"faiss index metric does not match the header's {self.metric!r}")
            if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
                ix_ids = faiss.vector_to_array(ix.id_map)
                expected = set(self._ids) | self._tombstones
                if len(ix_ids) and not set(ix_ids.tolist()) <= expected:
                    raise bad("faiss index holds ids the metadata does not list")
        self._apply_search_params()
        return self

    # ------------------------------------------------------------ images
    def plan_images(self, images: Any, *, progress: bool | None = None,
                    hash_threads: int = 4) -> "builder.ImagePlan":
        """Hash the image files of ``images`` (a folder, a file, or a list of them) and
        sort them into new files and files whose content (sha256) the index already
        holds, or that repeat another new file byte for byte. Files unchanged since they
        were indexed (same path, size and mtime) are not read again."""
        return builder.plan_images(self, images, progress=progress, hash_threads=hash_threads)

    def add_images(self, images: Any, model: Any, *, pool: str | None = None,
                   labels: Any = None, checkpoint: str | os.PathLike | None = None,
                   checkpoint_every: int = 5000, batch_size: int = 64,
                   num_workers: int | None = None, progress: bool | None = None,
                   plan: "builder.ImagePlan | None" = None, **embed_kw: Any
                   ) -> "builder.AddReport":
        """Embed image files with ``model`` and add them, streaming batch by batch.

        Files whose content (sha256 of the bytes) is already in the index are skipped, so
        running it twice adds nothing the second time; unreadable files are skipped and
        reported. With ``checkpoint`` (an index folder) the partial index is saved there
        atomically every ``checkpoint_every`` images and at the end, so an interrupted run
        loses at most that many images and a rerun continues where it stopped.

        Args:
            images: a folder (recursive), an image file, or a list of them.
            model: a :class:`DinoModel`; its identity (weights hash, preprocessing) and
                ``pool`` must match the index's, if the index has one.
            pool: ``"cls"``, ``"cls+gem"`` ... (default: the index's, else ``"cls"``).
            labels: ``None``, ``"folder"`` (the parent folder's name, ImageFolder style), a
                callable ``path -> label`` or a mapping from path to label.
            embed_kw: more :meth:`DinoModel.iter_embed` options (``size``,
                ``preprocessing``, ``precision``, ``multiscale``, ``device`` ...).
        """
        return builder.add_images(self, images, model, pool=pool, labels=labels,
                                  checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                  batch_size=batch_size, num_workers=num_workers,
                                  progress=progress, plan=plan, **embed_kw)

    def add_images_distributed(self, images: Any, model: Any, *, checkpoint: str | os.PathLike,
                               pool: str | None = None, labels: Any = None,
                               shard_size: int = 2000, batch_size: int = 64,
                               num_workers: int | None = None, progress: bool | None = None,
                               checkpoint_every: int | None = None,
                               **embed_kw: Any) -> "builder.AddReport":
        """:meth:`add_images` across the processes ``torchrun`` started (gloo on CPU,
        NCCL on CUDA), through :mod:`dinofeat.extract`'s shards.

        Rank 0 hashes the files and writes the list of new ones to
        ``<checkpoint>.shards/plan.json``; every rank embeds its shards of that list
        (:func:`dinofeat.extract.extract_to_shards`, ``shard_size`` images each, complete
        shards of an interrupted run are reused); rank 0 then reads the shards one at a
        time, in path order, adds them (skipping content already indexed), checkpoints
        after each and deletes what the build wrote. The result is the index a single
        process builds. ``checkpoint`` (the index folder) must be on storage every process
        sees. ``checkpoint_every`` is not used: the index is checkpointed after every shard.
        Returns the report on rank 0 (other ranks: an empty one)."""
        return builder.add_images_distributed(
            self, images, model, checkpoint=checkpoint, pool=pool, labels=labels,
            shard_size=shard_size, batch_size=batch_size, num_workers=num_workers,
            progress=progress, checkpoint_every=checkpoint_every, **embed_kw)

    @classmethod
    def from_images(cls, images: Any, model: Any, out: str | os.PathLike | None = None, *,
                    metric: str = "cosine", factory: str = "Flat", pool: str = "cls",
                    memory: int | str | None = None, recall: float | None = None,
                    **kw: Any) -> "KNNIndex":
        """Build an index of the image files under ``images`` (see :meth:`add_images`).

        With ``out`` the index is checkpointed there while it grows and saved at the end;
        if ``out`` already holds an index (an interrupted or earlier build with the same
        model and pooling) it is loaded and only the files it lacks are embedded. Under
        ``torchrun`` every process embeds a share of the new files and rank 0 adds them
        (see :mod:`dinofeat.extract`)."""
        return builder.from_images(cls, images, model, out, metric=metric, factory=factory,
                                   pool=pool, memory=memory, recall=recall, **kw)

    def embed_options(self) -> dict[str, Any]:
        """The :meth:`DinoModel.embed` options that make features of this index's kind
        (pooling, the exact preprocessing, multi-scale), from its model identity."""
        return identity.embed_options(self.model_info)

    def load_model(self, weights: str | os.PathLike | None = None, device: Any = None):
        """Load the model this index was built with: ``weights`` if given, else its zoo
        name, else the weights file recorded at build time if it lies inside the index
        folder (a file elsewhere must be passed as ``weights``); its weights hash must
        match the index's."""
        return identity.load_model(self.model_info, weights, device, folder=self.folder)

    def search_images(self, images: Any, model: Any, k: int = 10, **embed_kw: Any
                      ) -> tuple[np.ndarray, np.ndarray, list]:
        """Embed ``images`` with ``model`` (with :meth:`embed_options`; the model must be
        the index's) and search: ``(scores, ids, keys)`` with ``keys`` the query paths (or
        positions) of the rows; unreadable query files raise."""
        opts = {**self.embed_options(), **embed_kw}
        ident = embedding_identity(model, **opts)
        check_compatible(self.model_info, ident, "query images")
        feats, keys = model.embed(images, return_keys=True, **opts)
        scores, ids = self.search(feats, k)
        return scores, ids, keys

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: counts, dims, metric, factory, model, memory."""
        h = self._header(0, {})
        for k in ("generation", "build", "saved_at", "next_id"):
            h.pop(k, None)
        return h


def _gpu_device() -> int:
    """The GPU faiss uses in this process: the one :mod:`dinofeat.runtime` gives it."""
    dev = runtime.default_device()
    return (dev.index or 0) if dev.type == "cuda" else 0
