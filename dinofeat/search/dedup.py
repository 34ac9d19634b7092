"""Near-duplicate and copy detection inside a collection of images.

Two images are *linked* when the cosine similarity of their features is at least
``threshold``. People delete what a dedup tool groups, so a group is never a chain: each
group has one image to keep, and every other member is linked to that image directly
(similarity to it ``>= threshold``). Groups are formed greedily (:func:`group_pairs`): the
most preferred image not yet grouped (for files: the most pixels, then the oldest, then the
largest file; for bare features: the most links) is kept, and takes every ungrouped image
linked to it. An edit chain A -> B -> C where A and C are below the threshold is split
rather than merged. The features are DINO's copy-detection representation (paper section
3.8): the [CLS] token concatenated with GeM-pooled (p = 4) output patch tokens
(``pool="cls+gem"``), optionally PCA-whitened with a
:class:`dinofeat.eval.copydetect.Whitening` learnt on distractor images
(``dinofeat eval copydetect`` writes one), then L2-normalised::

    groups = find_duplicates(feats, threshold=0.9)          # [[7, 0], [3, 12, 40], ...]
    result = dedup_folder("photos/", model, threshold=0.9)
    result.save("groups.json"); result.save("groups.csv"); result.save_html("report.html")

Pairs are found exactly with faiss range search (all pairs above the threshold; the cost
grows with the square of the collection: about a minute for 100k 768-d vectors on two
CPU cores), or approximately among each image's ``k`` nearest neighbours in any
:class:`~dinofeat.KNNIndex` factory (``k=``, ``factory=``) for larger collections; the
similarity of every pair found is recomputed exactly from the features, so a compressed
index can miss pairs but never lists one below the threshold.

The threshold depends on the model, the pooling and the whitening: :data:`DEFAULT_THRESHOLD`
is a starting point, not a calibrated value; the HTML report shows a histogram of each
image's similarity to its nearest other image, to choose one.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from ..utils import atomic_path, atomic_write_json, get_logger
from .build import image_files
from .identity import embedding_identity
from .index import KNNIndex, as_float_matrix

__all__ = ["DEFAULT_THRESHOLD", "find_duplicate_pairs", "find_duplicates", "duplicate_groups",
           "group_pairs", "RowGroup", "keep_order", "nearest_similarity", "connected_groups",
           "DuplicateGroup", "DedupResult", "dedup_folder", "load_whitening", "whitening_id"]

DEFAULT_THRESHOLD = 0.9  # cosine similarity; uncalibrated starting point, see module doc
_BLOCK = 4096

_log = get_logger("dinofeat.dedup")


def _normalised(feats: Any) -> np.ndarray:
    x = as_float_matrix(feats, "features")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if len(x) and (norms == 0).any():
        raise ValueError("features contain zero vectors: no cosine similarity for them")
    return np.ascontiguousarray(x / np.maximum(norms, 1e-30), dtype=np.float32)


def find_duplicate_pairs(feats: Any, threshold: float = DEFAULT_THRESHOLD, *,
                         k: int | None = None, factory: str = "Flat"
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of rows of ``feats`` ``[N, D]`` whose cosine similarity is at
    least ``threshold``: ``(i, j, similarity)`` arrays sorted by ``(i, j)``.

    ``k=None``: exact (faiss range search over all pairs). ``k=n``: only among each row's
    ``n`` nearest neighbours, searched in a :class:`~dinofeat.KNNIndex` built with
    ``factory`` (e.g. ``"IVF4096,Flat"``): approximate, for very large collections."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    x = _normalised(feats)
    n = len(x)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    rows, cols, sims = [], [], []
    if k is None:
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        # faiss keeps scores strictly above the radius: step just below the threshold
        radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
        for s in range(0, n, _BLOCK):
            lims, d, nbr = flat.range_search(x[s:s + _BLOCK], radius)
            counts = np.diff(lims).astype(np.int64)
            q = np.repeat(np.arange(s, s + len(counts)), counts)
            rows.append(q), cols.append(nbr.astype(np.int64)), sims.append(d)
    else:
        index = KNNIndex(metric="cosine", factory=factory)
        index.add(x)
        kk = min(int(k) + 1, n)
        for s in range(0, n, _BLOCK):
            d, nbr = index.search(x[s:s + _BLOCK], kk)
            q = np.repeat(np.arange(s, s + len(d))[:, None], kk, axis=1)
            rows.append(q.ravel()), cols.append(nbr.ravel()), sims.append(d.ravel())
    i, j = np.concatenate(rows), np.concatenate(cols)
    keep = (j >= 0) & (i != j)
    a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    if len(a) == 0:
        return empty
    key, first = np.unique(a * n + b, return_index=True)
    a, b = a[first], b[first]
    # The similarity the caller sees (and filters on) is recomputed in one way for every
    # pair, so an approximate index or a rounding difference never lists a pair below it.
    sim = np.einsum("ij,ij->i", x[a], x[b]).astype(np.float32)
    ok = sim.astype(np.float64) >= float(threshold)
    return a[ok], b[ok], sim[ok]


def connected_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components (of two or more members) of the graph on ``n`` nodes with
    edges ``(i[e], j[e])``: lists of node numbers, ascending; largest group first, ties
    by first member. Components chain (A~B and B~C put A and C together however far
    apart they are): use them to look at clusters, and :func:`group_pairs` for groups
    to delete from."""
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for a in range(n):
        groups.setdefault(find(a), []).append(a)
    out = [g for g in groups.values() if len(g) > 1]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out


@dataclass
class RowGroup:
    """One duplicate group of rows: ``rows[0]`` is the one to keep; ``similarity[m]`` is
    the cosine similarity of ``rows[m]`` to it (1 for itself), each ``>= threshold``."""

    rows: list[int]
    similarity: list[float]

    @property
    def keep(self) -> int:
        return self.rows[0]


def group_pairs(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray, *,
                priority: Sequence[Any] | None = None) -> list[RowGroup]:
    """Duplicate groups of ``n`` items from their linked pairs ``(i[e], j[e], sim[e])``
    (as :func:`find_duplicate_pairs` returns them), with no chaining: every member of a
    group is linked directly to the group's kept item.

    Greedy, in order of preference: the most preferred item not yet in a group is kept and
    takes every ungrouped item linked to it. ``priority``: a sort key per item, smaller
    preferred (default: more links first, then lower row). Groups come largest first, ties
    by the kept row; members after the kept one by decreasing similarity to it."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    sim = np.asarray(sim, dtype=np.float64)
    if len(i) == 0:
        return []
    links: dict[int, dict[int, float]] = {}
    for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist()):
        links.setdefault(a, {})[b] = s
        links.setdefault(b, {})[a] = s
    nodes = list(links)
    if priority is None:
        order = sorted(nodes, key=lambda a: (-len(links[a]), a))
    else:
        if len(priority) != n:
            raise ValueError(f"priority has {len(priority)} entries for {n} items")
        order = sorted(nodes, key=lambda a: (priority[a], a))
    grouped: set[int] = set()
    out: list[RowGroup] = []
    for a in order:
        if a in grouped:
            continue
        members = sorted(((s, b) for b, s in links[a].items() if b not in grouped),
                         key=lambda t: (-t[0], t[1]))
        if not members:
            continue
        grouped.add(a)
        grouped.update(b for _, b in members)
        out.append(RowGroup([a] + [b for _, b in members], [1.0] + [s for s, _ in members]))
    out.sort(key=lambda g: (-len(g.rows), g.keep))
    return out


def duplicate_groups(feats: Any, threshold: float = DEFAULT_THRESHOLD, *,
                     paths: Sequence[str] | None = None, priority: Sequence[Any] | None = None,
                     k: int | None = None, factory: str = "Flat") -> list[RowGroup]:
    """Near-duplicate groups of the rows of ``feats`` ``[N, D]`` (numpy or torch): every
    member at cosine similarity ``>= threshold`` to its group's kept row
    (:func:`group_pairs` over :func:`find_duplicate_pairs`).

    The kept row is chosen by ``priority`` (a sort key per row, smaller preferred), else,
    with ``paths`` (the image file of each row), by :func:`keep_order` (most pixels, then
    oldest, then largest file), else by the number of links. This is the rule of
    ``dinofeat dedup`` and of every other caller that groups duplicates."""
    x = _normalised(feats)
    i, j, sim = find_duplicate_pairs(x, threshold, k=k, factory=factory)
    if priority is None and paths is not None:
        if len(paths) != len(x):
            raise ValueError(f"got {len(paths)} paths for {len(x)} feature rows")
        priority = keep_order(paths, rows=np.union1d(i, j).tolist())
    return group_pairs(len(x), i, j, sim, priority=priority)


def find_duplicates(feats: Any, threshold: float = DEFAULT_THRESHOLD, *,
                    k: int | None = None, factory: str = "Flat",
                    priority: Sequence[Any] | None = None) -> list[list[int]]:
    """Groups of near-duplicate rows of ``feats`` ``[N, D]`` as lists of row numbers, the
    kept row first and every other member at cosine similarity ``>= threshold`` to it
    (:func:`duplicate_groups`), largest group first."""
    return [g.rows for g in duplicate_groups(feats, threshold, k=k, factory=factory,
                                             priority=priority)]


def keep_order(paths: Sequence[str], rows: Sequence[int] | None = None) -> list[tuple]:
    """A sort key per image file (smaller = rather keep it): the most pixels, then the
    oldest file, then the largest, then the path: a heuristic for "the original". Only
    the files of ``rows`` are opened (the others get a key that sorts last)."""
    wanted = range(len(paths)) if rows is None else rows
    return _keys_from_facts(paths, {r: _image_facts(paths[r]) for r in wanted})


def _keys_from_facts(paths: Sequence[str], facts: dict[int, tuple]) -> list[tuple]:
    keys: list[tuple] = [(1, 0, 0, 0, "")] * len(paths)
    for r, ((w, h), size, mtime) in facts.items():
        keys[r] = (0, -w * h, mtime, -size, str(paths[r]))
    return keys


def nearest_similarity(feats: Any, *, factory: str = "Flat") -> np.ndarray:
    """Each row's cosine similarity to its nearest other row (``[N]``; ``nan`` for a
    single row): what a histogram needs to choose a dedup threshold."""
    x = _normalised(feats)
    n = len(x)
    out = np.full(n, np.nan, np.float32)
    if n < 2:
        return out
    index = KNNIndex(metric="cosine", factory=factory)
    index.add(x)
    for s in range(0, n, _BLOCK):
        d, nbr = index.search(x[s:s + _BLOCK], 2)
        rows = np.arange(s, s + len(d))
        # the first hit is normally the row itself; an exact twin can come first instead
        out[s:s + len(d)] = np.where(nbr[:, 0] == rows, d[:, 1], d[:, 0])
    return out


# ------------------------------------------------------------------ folders
@dataclass
class DuplicateGroup:
    """One group of near-duplicates. ``paths[0]`` is the suggested one to keep (the most
    pixels, then the oldest file, then the largest, then the first path: a heuristic for
    "the original"); ``similarity[m]`` is the cosine similarity of member ``m`` to it (1
    for itself), at least the threshold for every member; ``sizes`` are
    ``(width, height)``."""

    paths: list[str]
    similarity: list[float]
    sizes: list[tuple[int, int]]
    file_bytes: list[int]

    @property
    def keep(self) -> str:
        return self.paths[0]

    def as_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "members": [
            {"path": p, "similarity_to_keep": round(float(s), 6), "width": w, "height": h,
             "bytes": b}
            for p, s, (w, h), b in zip(self.paths, self.similarity, self.sizes,
                                       self.file_bytes)]}


@dataclass
class DedupResult:
    """Duplicate groups of a collection, with what is needed to review and reproduce
    them: every scanned path, the unreadable files, the threshold and the model."""

    groups: list[DuplicateGroup]
    paths: list[str]
    threshold: float
    model: dict[str, Any] | None = None
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    pairs: int = 0
    seconds: float = 0.0
    #: each image's similarity to its nearest other image (for the histogram)
    nearest: Any = None

    @property
    def duplicates(self) -> list[str]:
        """Every member of every group except its suggested keeper."""
        return [p for g in self.groups for p in g.paths[1:]]

    def as_dict(self) -> dict[str, Any]:
        return {"format": "dinofeat.dedup/1", "threshold": self.threshold,
                "images": len(self.paths), "groups_count": len(self.groups),
                "duplicates_count": len(self.duplicates), "pairs": self.pairs,
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "model": self.model, "seconds": round(self.seconds, 3),
                "rule": "every member's similarity to the kept image >= threshold",
                "nearest_histogram": self.histogram(),
                "groups": [g.as_dict() for g in self.groups]}

    def histogram(self, bins: int = 40) -> dict[str, list] | None:
        """Counts of each image's similarity to its nearest other image, in ``bins``
        equal bins from the lowest value seen to 1: ``{"edges": [...], "counts": [...]}``."""
        if self.nearest is None:
            return None
        v = np.asarray(self.nearest, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return None
        lo = float(min(np.floor(v.min() * 100) / 100, self.threshold - 0.01))
        counts, edges = np.histogram(np.clip(v, lo, 1.0), bins=bins, range=(lo, 1.0))
        return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}

    def __str__(self) -> str:
        return (f"{len(self.groups)} duplicate groups ({len(self.duplicates)} images that "
                f"duplicate another) among {len(self.paths)} images, every member at "
                f"similarity >= {self.threshold} to the image kept; "
                f"{len(self.unreadable)} unreadable")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the groups atomically: ``.csv`` -> one row per member (group, keep,
        path, similarity_to_keep, width, height, bytes); anything else -> JSON."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["group", "keep", "path", "similarity_to_keep", "width", "height",
                        "bytes"])
            for n, g in enumerate(self.groups):
                for m, (p, s, (wd, ht), b) in enumerate(zip(g.paths, g.similarity, g.sizes,
                                                            g.file_bytes)):
                    w.writerow([n, int(m == 0), p, f"{s:.6f}", wd, ht, b])
            with atomic_path(path) as tmp:  # names that are not UTF-8 keep their bytes
                tmp.write_text(buf.getvalue(), encoding="utf-8", errors="surrogateescape")
        else:
            atomic_write_json(path, self.as_dict())
        return path

    def save_html(self, path: str | os.PathLike, *, thumb_size: int = 160,
                  max_groups: int | None = None) -> Path:
        """A self-contained HTML page (thumbnails embedded as small base64 JPEGs, each a
        link to the full-size file) showing each group side by side, the suggested keeper
        first, with similarities, pixel sizes and full paths, and a histogram of each
        image's similarity to its nearest other image with the threshold marked, for a
        person to review in a browser and choose a threshold."""
        path = Path(path)
        groups = self.groups if max_groups is None else self.groups[:max_groups]
        parts = [_HTML_HEAD.format(title=html.escape(f"dinofeat dedup: {len(self.groups)} "
                                                     "groups")),
                 f"<h1>Near-duplicate groups</h1><p>{html.escape(str(self))}. "
                 f"Model: {html.escape(_model_text(self.model))}.</p>"]
        hist = self.histogram()
        if hist is not None:
            parts.append(_histogram_svg(hist, self.threshold))
        if max_groups is not None and len(self.groups) > max_groups:
            parts.append(f"<p>Showing the first {max_groups} groups.</p>")
        for n, g in enumerate(groups):
            parts.append(f'<section><h2>Group {n + 1} &middot; {len(g.paths)} images</h2>'
                         '<div class="row">')
            for m, (p, s, (wd, ht), b) in enumerate(zip(g.paths, g.similarity, g.sizes,
                                                        g.file_bytes)):
                src = _thumbnail_uri(p, thumb_size)
                img = (f'<img src="{src}" alt="{html.escape(Path(p).name)}">' if src else
                       '<div class="missing">cannot show</div>')
                img = f'<a href="{html.escape(_file_uri(p))}" target="_blank">{img}</a>'
                badge = '<span class="keep">keep</span>' if m == 0 else \
                    f'<span class="sim">{s:.3f}</span>'
                parts.append(f'<figure>{img}<figcaption>{badge} '
                             f'<span title="{html.escape(p)}">{html.escape(Path(p).name)}'
                             f'</span><br>{wd}&times;{ht}, {_human_bytes(b)}'
                             f'<br><small>{html.escape(str(Path(p).parent))}</small>'
                             '</figcaption></figure>')
            parts.append("</div></section>")
        if self.unreadable:
            parts.append("<h2>Unreadable files</h2><ul>" + "".join(
                f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in self.unreadable)
                + "</ul>")
        parts.append("</body></html>")
        with atomic_path(path) as tmp:  # a name that is not UTF-8 shows U+FFFD for its bytes
            tmp.write_bytes("\n".join(parts).encode("utf-8", "surrogateescape").decode(
                "utf-8", "replace").encode("utf-8"))
        return path


_HTML_HEAD = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
section {{ border-top: 1px solid #ccc; padding: .5em 0; }}
h2 {{ font-size: 1em; margin: .3em 0; }}
.row {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 180px; font-size: 12px; word-break: break-all; }}
img {{ max-width: 170px; max-height: 170px; border: 1px solid #999; display: block; }}
.keep {{ background: #2a7; color: #fff; padding: 0 4px; border-radius: 3px; }}
.sim {{ background: #eee; padding: 0 4px; border-radius: 3px; }}
.missing {{ width: 160px; height: 100px; background: #fdd; text-align: center; }}
small {{ color: #777; }}
</style></head><body>"""


def _file_uri(path: str) -> str:
    """A ``file://`` link to an image (absolute; relative paths against the current folder)."""
    try:
        return Path(os.path.abspath(path)).as_uri()
    except ValueError:  # pragma: no cover - an unusual path: a plain relative link
        return path


def _histogram_svg(hist: dict[str, list], threshold: float) -> str:
    """An inline SVG bar chart of the nearest-neighbour similarities, threshold marked."""
    edges, counts = hist["edges"], hist["counts"]
    width, height, pad = 640, 160, 30
    top = max(counts) or 1
    lo, hi = edges[0], edges[-1]
    bw = (width - 2 * pad) / len(counts)

    def xpos(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (width - 2 * pad) if hi > lo else pad

    bars = []
    for b, c in enumerate(counts):
        h = (height - 2 * pad) * c / top
        colour = "#c44" if edges[b] >= threshold else "#69c"
        bars.append(f'<rect x="{pad + b * bw:.1f}" y="{height - pad - h:.1f}" '
                    f'width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                    f'<title>{edges[b]:.3f}-{edges[b + 1]:.3f}: {c} images</title></rect>')
    tx = xpos(threshold)
    return (f'<h2>Similarity of each image to its nearest other image</h2>'
            f'<svg width="{width}" height="{height}" role="img" '
            f'aria-label="histogram of nearest-neighbour similarities">'
            + "".join(bars) +
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{pad - 10}" y2="{height - pad}" '
            f'stroke="#000" stroke-dasharray="4"/>'
            f'<text x="{tx + 3:.1f}" y="{pad - 12}" font-size="11">threshold {threshold}</text>'
            f'<text x="{pad}" y="{height - 8}" font-size="11">{lo:.2f}</text>'
            f'<text x="{width - pad - 20}" y="{height - 8}" font-size="11">{hi:.2f}</text>'
            f'<text x="{pad}" y="{pad - 12}" font-size="11">max {top} images</text></svg>'
            '<p><small>Red bars are at or above the threshold: those images have a '
            'near-duplicate. Images whose nearest neighbour falls just below it are worth a '
            'look before choosing a lower threshold.</small></p>')


def _model_text(model: dict | None) -> str:
    if not model:
        return "unknown"
    text = f"{model.get('name', '?')} (weights {model.get('weights_hash', '?')}, pooling " \
           f"{model.get('pooling', '?')}"
    if model.get("whitening"):
        text += f", whitening {model['whitening']}"
    return text + ")"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _thumbnail_uri(path: str, size: int) -> str | None:
    from ..images import open_image
    try:
        img = open_image(path)
    except (OSError, ValueError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_facts(path: str) -> tuple[tuple[int, int], int, int]:
    """``((width, height), file bytes, mtime_ns)`` of an image file (zeros if unknown)."""
    from PIL import Image
    try:
        st = os.stat(path)
        size, mtime = int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        size, mtime = 0, 0
    try:
        with Image.open(path) as im:
            return (int(im.size[0]), int(im.size[1])), size, mtime
    except Exception:  # noqa: BLE001 - a size we cannot read sorts last
        return (0, 0), size, mtime


def whitening_id(white: Any) -> str:
    """A short identity of a whitening: dims and a hash of its numbers."""
    import hashlib
    h = hashlib.sha256()
    for t in (white.mean, white.projection):
        h.update(np.ascontiguousarray(np.asarray(t, dtype=np.float32)).tobytes())
    return f"{white.in_dim}->{white.dim}:{h.hexdigest()[:12]}"


def _feature_dim(model: Any, pool: str) -> int:
    from ..embedding import feature_dim
    return feature_dim(model, pool)


def load_whitening(whitening: Any):
    """A :class:`dinofeat.eval.copydetect.Whitening` from a file path (or the object)."""
    if whitening is None or hasattr(whitening, "apply"):
        return whitening
    from ..eval.copydetect import Whitening
    return Whitening.load(whitening)


def dedup_folder(images: Any, model: Any, threshold: float = DEFAULT_THRESHOLD, *,
                 pool: str = "cls+gem", whitening: Any = None, k: int | None = None,
                 factory: str = "Flat", batch_size: int = 64, num_workers: int | None = None,
                 progress: bool | None = None, out: str | os.PathLike | None = None,
                 html_path: str | os.PathLike | None = None, **embed_kw: Any) -> DedupResult:
    """Find near-duplicate groups among the image files of ``images`` (a folder,
    recursive, or a list of files and folders).

    Features: ``model.embed(..., pool=pool)`` ([CLS] + GeM by default), whitened with
    ``whitening`` (a Whitening or its file; features are then taken un-normalised, as it
    was learnt on) and L2-normalised. Unreadable files are skipped and listed. ``out``
    (``.json`` or ``.csv``) and ``html_path`` write the groups and the review page.
    ``embed_kw`` go to :meth:`DinoModel.iter_embed` (``size``, ``preprocessing``,
    ``precision``, ``device`` ...)."""
    t0 = time.perf_counter()
    white = load_whitening(whitening)
    files = image_files(images)
    if not files:
        raise FileNotFoundError(f"no image files in {images}")
    info = embedding_identity(model, pool=pool, **embed_kw)
    if white is not None:
        info["whitening"] = whitening_id(white)
        winfo = white.info if isinstance(white.info, dict) else {}
        want = (winfo.get("model") or {}).get("weights_hash") or winfo.get("weights_hash")
        if want and want != info.get("weights_hash"):
            raise ValueError(f"the whitening was learnt on features of weights {want}, but "
                             f"the model's weights are {info.get('weights_hash')}")
        if winfo.get("pool") not in (None, pool):
            raise ValueError(f"the whitening was learnt on pool={winfo['pool']!r} features, "
                             f"not pool={pool!r}")
        if white.in_dim != _feature_dim(model, pool):
            raise ValueError(f"the whitening takes {white.in_dim}-d features; "
                             f"{model.name} with pool={pool!r} gives "
                             f"{_feature_dim(model, pool)}")
    stream = model.iter_embed(files, pool=pool, normalize=white is None,
                              batch_size=batch_size, num_workers=num_workers,
                              progress=progress, skip_unreadable=True, **embed_kw)
    paths: list[str] = []
    chunks = []
    for keys, feats in stream:
        paths.extend(str(k) for k in keys)
        chunks.append(white.apply(feats).numpy() if white is not None else feats.numpy())
    unreadable = [(str(s.key), s.reason) for s in stream.skipped]
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    i, j, sim = find_duplicate_pairs(feats, threshold, k=k, factory=factory)
    facts = {r: _image_facts(paths[r]) for r in np.union1d(i, j).tolist()}
    groups = []
    for g in group_pairs(len(paths), i, j, sim, priority=_keys_from_facts(paths, facts)):
        groups.append(DuplicateGroup([paths[m] for m in g.rows],
                                     [min(1.0, float(v)) for v in g.similarity],
                                     [facts[m][0] for m in g.rows],
                                     [facts[m][1] for m in g.rows]))
    nearest = nearest_similarity(feats, factory=factory) if len(feats) > 1 else \
        np.zeros(0, np.float32)
    result = DedupResult(groups, paths, float(threshold), info, unreadable, int(len(i)),
                         time.perf_counter() - t0, nearest=nearest)
    _log.info("%s (%.1f s)", result, result.seconds)
    if out is not None:
        result.save(out)
    if html_path is not None:
        result.save_html(html_path)
    return result
