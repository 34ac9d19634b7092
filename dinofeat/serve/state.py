"""What the server holds: the index (reloaded when a new generation is saved), the model,
and the duplicate groups of each generation.

The index on disk is a folder whose ``index.json`` names the current generation of data
files (:meth:`dinofeat.index.KNNIndex.save`). :class:`ServedIndex` notices a new
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
from PIL import Image

from ..dedup import find_duplicates
from ..index import HEADER_NAME, KNNIndex
from ..utils import get_logger

__all__ = ["ServedIndex", "DuplicateView", "duplicate_view", "similarity_histogram"]

_log = get_logger("dinofeat.serve")

#: Each item's nearest neighbours whose similarities make the page's histogram.
HISTOGRAM_NEIGHBOURS = 10
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


def _pixels_and_mtime(path: str | None) -> tuple[int, int, int]:
    """(pixels, mtime_ns, bytes) of a file for choosing the keeper; zeros if unreadable.
    Only the image header is read."""
    if not path:
        return 0, 0, 0
    try:
        st = Path(path).stat()
        with Image.open(path) as im:
            w, h = im.size
        return w * h, st.st_mtime_ns, st.st_size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 0, 0


def duplicate_view(index: KNNIndex, vectors: np.ndarray, threshold: float) -> DuplicateView:
    """Groups of near-duplicate items of ``index`` (``vectors``: its stored vectors in
    ``index.ids`` order), grouped by :func:`dinofeat.dedup.find_duplicates` as
    ``dinofeat dedup`` groups files; the keeper is chosen as dedup chooses it (most pixels,
    then the oldest file, then the largest, then the path) and every member carries its
    cosine similarity to the keeper."""
    t0 = time.perf_counter()
    ids = index.ids
    groups = []
    if len(ids) >= 2:
        x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        for members in find_duplicates(x, threshold):
            recs = index.lookup(ids[members])
            facts = [_pixels_and_mtime(r["path"]) for r in recs]
            order = sorted(range(len(members)), key=lambda t: (
                -facts[t][0], facts[t][1], -facts[t][2], recs[t]["path"] or "",
                int(ids[members[t]])))
            rows = [members[t] for t in order]
            sims = (x[rows] @ x[rows[0]]).clip(-1, 1)
            out = []
            for t, s in zip(order, sims):
                r = recs[t]
                out.append({"id": int(r["id"]), "path": r["path"],
                            "similarity": round(float(s), 6),
                            **({"label": r["label"]} if r["label"] is not None else {})})
            groups.append({"keep": out[0]["id"], "members": out})
    return DuplicateView(float(threshold), groups, len(ids), time.perf_counter() - t0)


def similarity_histogram(index: KNNIndex, vectors: np.ndarray, *,
                         neighbours: int = HISTOGRAM_NEIGHBOURS, bins: int = HISTOGRAM_BINS
                         ) -> dict[str, Any]:
    """Histogram of the cosine similarities of the pairs (each item with its
    ``neighbours`` nearest others, each pair counted once), on ``bins`` equal bins over
    [-1, 1]: where duplicates stand out from the rest, to choose a threshold."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    ids = index.ids
    if len(ids) < 2:
        return {"edges": edges.round(6).tolist(), "counts": [0] * bins, "pairs": 0,
                "neighbours": neighbours}
    x = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
         ).astype(np.float32)
    exact = KNNIndex(metric="cosine")
    exact.add(x)
    kk = min(neighbours + 1, len(ids))
    sims, nbr = exact.search(x, kk)
    rows = np.repeat(np.arange(len(ids))[:, None], kk, axis=1)
    keep = (nbr >= 0) & (nbr != rows)
    a, b = np.minimum(rows, nbr)[keep], np.maximum(rows, nbr)[keep]
    _, first = np.unique(a * len(ids) + b, return_index=True)
    s = np.clip(sims[keep][first], -1, 1)
    counts, _ = np.histogram(s, bins=edges)
    return {"edges": edges.round(6).tolist(), "counts": counts.astype(int).tolist(),
            "pairs": int(len(s)), "neighbours": neighbours}

