"""What the server holds: the index (reloaded when a new generation is saved), the model,
and the duplicate groups of each generation.

The index on disk is a folder whose ``index.json`` names the current generation of data
files (:meth:`dinofeat.search.KNNIndex.save`). :class:`ServedIndex` notices a new
generation from the header and loads it in the background while requests keep using the
previous one; a request holds the index object it started with, so it sees the old or
the new index, never a mix.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..search import KNNIndex, duplicate_groups
from ..search.dedup import nearest_similarity
from ..search.storage import HEADER_NAME
from ..utils import get_logger

__all__ = ["DuplicateView", "ServedIndex", "duplicate_view", "similarity_histogram"]

_log = get_logger("dinofeat.serve")

HISTOGRAM_BINS = 50


class ServedIndex:
    """The current generation of an index folder, reloaded when it changes on disk.

    ``get()`` is cheap (one ``stat`` of ``index.json``); when the header changed it starts
    one background reload and keeps returning the loaded generation until the new one is
    complete. A new generation made with another model is refused (logged) and the old
    one stays served."""

    def __init__(self, path: str | Path, *, check_every: float = 0.25):
        self.path = Path(path)
        self.check_every = check_every
        self._lock = threading.Lock()
        self._reloading = False
        self._checked = 0.0
        self._stamp = self._header_stamp()
        self.index = KNNIndex.load(self.path)
        self.generation = int(KNNIndex.read_header(self.path).get("generation", 0))
        self.reload_error: str | None = None
        self._cache: dict[Any, Any] = {}

    def _header_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = (self.path / HEADER_NAME).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def get(self) -> KNNIndex:
        """The index to answer one request with."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[KNNIndex, int]:
        """The index to answer one request with and its generation number."""
        now = time.monotonic()
        if now - self._checked >= self.check_every:
            self._checked = now
            stamp = self._header_stamp()
            if stamp is not None and stamp != self._stamp:
                with self._lock:
                    start = not self._reloading
                    self._reloading = True
                if start:
                    threading.Thread(target=self._reload, args=(stamp,), daemon=True,
                                     name="dinofeat-serve-reload").start()
        with self._lock:
            return self.index, self.generation

    def _reload(self, stamp) -> None:
        try:
            header = KNNIndex.read_header(self.path)
            generation = int(header.get("generation", 0))
            if generation != self.generation:
                index = KNNIndex.load(self.path)
                old = (self.index.model_info or {}).get("weights_hash")
                new = (index.model_info or {}).get("weights_hash")
                if old and new and old != new:
                    raise ValueError(f"generation {generation} was built with weights {new}, "
                                     f"the server's model has {old}; restart the server")
                with self._lock:
                    self.index, self.generation = index, generation
                    self._cache.clear()
                _log.info("serving generation %d of %s: %d items", generation, self.path,
                          len(index))
            self._stamp = stamp
            self.reload_error = None
        except Exception as e:  # noqa: BLE001 - keep serving the loaded generation
            self.reload_error = f"{type(e).__name__}: {e}"
            self._stamp = stamp  # retried when the header changes again
            _log.warning("keeping generation %d of %s: %s", self.generation, self.path, e)
        finally:
            with self._lock:
                self._reloading = False

    def cached(self, index: KNNIndex, key: Any, make) -> Any:
        """``make()`` computed once per index generation (``index`` is the object a request
        holds, so a value computed for an old generation is not kept for the new one)."""
        with self._lock:
            if index is self.index and key in self._cache:
                return self._cache[key]
        value = make()
        with self._lock:
            if index is self.index:
                self._cache[key] = value
                if len(self._cache) > 64:  # thresholds the slider visited: keep the latest
                    self._cache.pop(next(iter(self._cache)))
        return value


@dataclass
class DuplicateView:
    """Duplicate groups of an index at one threshold, as the API returns them."""

    threshold: float
    groups: list[dict[str, Any]]
    items: int
    seconds: float

    def as_dict(self, limit: int) -> dict[str, Any]:
        return {"threshold": self.threshold, "items": self.items,
                "groups_count": len(self.groups),
                "duplicates_count": sum(len(g["members"]) - 1 for g in self.groups),
                "groups": self.groups[:limit], "seconds": round(self.seconds, 3)}


def duplicate_view(index: KNNIndex, vectors: np.ndarray, threshold: float) -> DuplicateView:
    """Groups of near-duplicate items of ``index`` (``vectors``: its stored vectors in
    ``index.ids`` order) by the rule of ``dinofeat dedup``
    (:func:`dinofeat.search.duplicate_groups` with the indexed files choosing the keeper):
    every member at similarity ``>= threshold`` to the kept item."""
    t0 = time.perf_counter()
    ids = index.ids
    recs = [r for r in index.lookup(ids) if r is not None]  # every id is live
    paths = [r["path"] for r in recs]
    groups = []
    if len(ids) >= 2:
        # the files choose the keeper; an index of bare vectors falls back to most links
        files = paths if all(paths) else None
        for g in duplicate_groups(vectors, threshold, paths=files):
            members = []
            for row, s in zip(g.rows, g.similarity):
                r = recs[row]
                members.append({"id": int(r["id"]), "path": r["path"],
                                "similarity": round(float(min(max(s, -1.0), 1.0)), 6),
                                **({"label": r["label"]} if r["label"] is not None else {})})
            groups.append({"keep": members[0]["id"], "members": members})
    return DuplicateView(float(threshold), groups, len(ids), time.perf_counter() - t0)


def similarity_histogram(vectors: np.ndarray, *, bins: int = HISTOGRAM_BINS
                         ) -> dict[str, Any]:
    """Histogram of each item's cosine similarity to its nearest other item
    (:func:`dinofeat.search.dedup.nearest_similarity`, as the ``dinofeat dedup`` report
    draws it), on ``bins`` equal bins over [-1, 1]: duplicates stand out on the right."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    sims = nearest_similarity(vectors) if len(vectors) >= 2 else np.zeros(0, np.float32)
    counts, _ = np.histogram(np.clip(sims[np.isfinite(sims)], -1, 1), bins=edges)
    return {"edges": edges.round(6).tolist(), "counts": counts.astype(int).tolist(),
            "items": len(sims)}
