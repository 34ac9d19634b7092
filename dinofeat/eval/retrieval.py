"""Image retrieval on revisited Oxford and Paris (paper section 3.8).

Scoring follows the revisited protocol of Radenovic et al. (CVPR 2018) and the semantics
of its official ``revisitop`` evaluation code, re-written here from the definitions:

* ``ranks`` is ``[n_db, n_queries]``: column ``q`` lists database indices from most to
  least similar to query ``q`` (the revisitop layout; pass ``queries_first=True`` for
  ``[n_queries, n_db]``). A column may be truncated (only the top of the list).
* Each query's ground truth holds ``ok`` (positives) and ``junk`` (ignored) indices.
  Junk images are removed from the ranked list before anything is counted, so the
  position of a positive is its rank among non-junk images.
* **AP** (the Oxford/Holidays convention revisitop uses): with the positives found at
  0-based positions ``r_0 < r_1 < ...`` (after junk removal) and ``n`` positives in the
  ground truth, ``AP = sum_j (1/n) * (P0_j + P1_j) / 2`` where ``P0_j = j / r_j``
  (``1`` when ``r_j = 0``) and ``P1_j = (j + 1) / (r_j + 1)``: the area under the
  precision-recall curve by trapezoids, each positive adding a ``1/n`` step of recall.
  Positives never retrieved add nothing.
* **mP@k**: with ``p`` the 1-based positions of the retrieved positives, ``k' =
  min(k, max(p))`` and ``P@k = |{p <= k'}| / k'`` (revisitop's definition: when all found
  positives come before ``k`` the denominator shrinks to the last one's position).
* Queries with no positive are left out of both means (their AP is NaN).
* Medium protocol: positives = easy + hard, junk = junk. Hard protocol: positives = hard,
  junk = junk + easy. (Easy: positives = easy, junk = junk + hard.)

The datasets' ground truth ships as a Python pickle (``gnd_roxford5k.pkl``). It is read
with :class:`RestrictedUnpickler`, which admits only plain builtins and numpy array
reconstruction and refuses any other global (no code can run), and converted once to a
JSON file next to it (``gnd_roxford5k.json``) that later runs read instead.
"""

from __future__ import annotations

import io
import json
import os
import pickle  # only for RestrictedUnpickler below: the one place dinofeat unpickles
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from ..utils import atomic_write_json, get_logger, resolve_inside

__all__ = [
    "average_precision",
    "compute_map",
    "MapResult",
    "protocol_gnd",
    "revisited_map",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "restricted_loads",
    "read_gnd",
    "RevisitedDataset",
    "load_revisited",
    "evaluate_retrieval",
    "DATASETS",
]

log = get_logger(__name__)

DATASETS = ("roxford5k", "rparis6k")


# --------------------------------------------------------------------------- scoring
def average_precision(positive_positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """AP of one query from the sorted 0-based positions (junk already removed) of the
    positives that were retrieved and the number of positives in the ground truth.
    Trapezoidal rule of the Oxford/Holidays packages (see the module docstring)."""
    if n_positives <= 0:
        raise ValueError("n_positives must be > 0")
    pos = np.asarray(positive_positions, dtype=np.float64)
    if pos.size == 0:
        return 0.0
    if np.any(np.diff(pos) <= 0) or pos[0] < 0:
        raise ValueError("positive positions must be increasing and >= 0")
    j = np.arange(pos.size, dtype=np.float64)
    p0 = np.where(pos == 0, 1.0, j / np.where(pos == 0, 1.0, pos))
    p1 = (j + 1) / (pos + 1)
    return float(((p0 + p1) / 2.0).sum() / n_positives)


class MapResult(NamedTuple):
    """What :func:`compute_map` returns, in revisitop's order (``map, aps, pr, prs``).

    ``map``: mean AP over queries with positives (a fraction, not percent); ``aps``:
    per-query AP ``[n_queries]`` (NaN where a query has no positive); ``pr``: mean
    precision at each kappa ``[len(kappas)]``; ``prs``: per-query precisions
    ``[n_queries, len(kappas)]``."""

    map: float
    aps: np.ndarray
    pr: np.ndarray
    prs: np.ndarray


def _ids(x: Any) -> np.ndarray:
    if x is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(x, dtype=np.int64).reshape(-1)


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """Turn revisited ground truth (``easy``/``hard``/``junk`` per query) into the
    ``ok``/``junk`` lists of a protocol: ``"easy"``, ``"medium"`` or ``"hard"``."""
    out = []
    for i, g in enumerate(gnd):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            raise ValueError(f"ground truth of query {i} lacks {', '.join(missing)}; "
                             f"it has {', '.join(map(str, g))}")
        easy, hard, junk = _ids(g["easy"]), _ids(g["hard"]), _ids(g["junk"])
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif protocol == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise ValueError(f"protocol must be 'easy', 'medium' or 'hard', got {protocol!r}")
    return out


def compute_map(ranks: np.ndarray | torch.Tensor, gnd: Sequence[Mapping[str, Any]],
                kappas: Sequence[int] = (1, 5, 10), *, protocol: str | None = None,
                queries_first: bool = False) -> MapResult:
    """Mean average precision and mean precision at ``kappas`` (revisitop semantics).

    Args:
        ranks: ``[n_db, n_queries]`` database indices, best first, per query column
            (``[n_queries, n_db]`` with ``queries_first=True``). Columns may be truncated.
        gnd: one mapping per query with ``ok`` and optional ``junk`` index lists, or the
            revisited ``easy``/``hard``/``junk`` lists together with ``protocol``.
        kappas: the ``k`` of mP@k.
        protocol: ``"medium"``/``"hard"``/``"easy"`` when ``gnd`` holds easy/hard/junk.
        queries_first: ``ranks`` is ``[n_queries, n_db]``.

    Returns:
        :class:`MapResult` ``(map, aps, pr, prs)`` as fractions (multiply by 100 for the
        paper's tables).
    """
    ranks = ranks.cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D, got shape {ranks.shape}")
    if queries_first:
        ranks = ranks.T
    if protocol is not None:
        gnd = protocol_gnd(gnd, protocol)
    elif len(gnd) and "ok" not in gnd[0]:
        raise ValueError("gnd entries have no 'ok' list: pass protocol='medium' or 'hard' for "
                         "revisited easy/hard/junk ground truth")
    n_q = ranks.shape[1]
    if len(gnd) != n_q:
        raise ValueError(f"ranks has {n_q} query columns but gnd has {len(gnd)} entries "
                         "(is the layout [n_db, n_queries]? see queries_first)")
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(kappas)), np.nan)
    for q in range(n_q):
        ok = _ids(gnd[q]["ok"])
        if ok.size == 0:
            continue
        junk = _ids(gnd[q].get("junk"))
        col = ranks[:, q]
        keep = ~np.isin(col, junk)  # junk images leave the list before counting
        is_pos = np.isin(col[keep], ok)
        pos = np.flatnonzero(is_pos)  # 0-based positions among non-junk images
        aps[q] = average_precision(pos, ok.size)
        if pos.size == 0:
            prs[q] = 0.0
            continue
        p1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(p1.max()), k)
            prs[q, j] = (p1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return MapResult(float("nan"), aps, np.full(len(kappas), np.nan), prs)
    return MapResult(float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs)


def revisited_map(ranks: np.ndarray | torch.Tensor, gnd: Sequence[Mapping[str, Any]],
                  kappas: Sequence[int] = (1, 5, 10), *, queries_first: bool = False,
                  protocols: Sequence[str] = ("easy", "medium", "hard")) -> dict[str, dict]:
    """:func:`compute_map` under each protocol, as percentages:
    ``{"medium": {"mAP": 41.8, "mP@1": ..., "mP@5": ..., "mP@10": ...}, "hard": ...}``."""
    out = {}
    for p in protocols:
        r = compute_map(ranks, gnd, kappas, protocol=p, queries_first=queries_first)
        out[p] = {"mAP": 100.0 * r.map,
                  **{f"mP@{k}": 100.0 * float(v) for k, v in zip(kappas, r.pr)}}
    return out


# ------------------------------------------------------------- restricted unpickling
class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for an object outside :class:`RestrictedUnpickler`'s allow-list."""


# Plain builtins a data pickle may name as globals (containers and numbers only).
_SAFE_BUILTINS = frozenset({"set", "frozenset", "list", "dict", "tuple", "bytearray",
                            "bytes", "str", "int", "float", "complex", "bool", "slice",
                            "range"})
# Exactly the callables numpy uses to rebuild arrays, dtypes and scalars (numpy 1 and 2
# module names), and the latin-1 decoder pickles use for byte strings made under Python 2.
_SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: builtin containers/numbers, numpy arrays, dtypes and
    scalars. Any other global (``os.system``, ``subprocess.Popen``, ``builtins.eval``,
    classes of any library...) raises :class:`UnsafePickleError` before anything is
    called, so a malicious file cannot run code."""

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        # "__builtin__" is how protocol-2 pickles (and Python 2) name the builtins module.
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refused to unpickle '{module}.{name}': only plain data (lists, "
            "dicts, numbers, strings, numpy arrays) is allowed, and this file asks for an "
            "object that could run code. If the file is yours, convert it to JSON.")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in data pickles")


def restricted_loads(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 byte strings are
    decoded as latin-1, as the revisited ground-truth files need)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt file
        raise ValueError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


def _plain(obj: Any) -> Any:
    """numpy arrays/scalars -> lists/numbers, recursively (JSON-able)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("latin1")
    return obj


def _check_gnd(cfg: Any, source: str) -> dict:
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{source}: expected a dict with imlist/qimlist/gnd, got "
                         f"{type(cfg).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(f"{source}: ground truth lacks {', '.join(missing)} (has "
                         f"{', '.join(map(str, cfg))})")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{source}: {len(cfg['qimlist'])} queries but {len(cfg['gnd'])} "
                         "ground-truth entries")
    n_db = len(cfg["imlist"])
    for i, g in enumerate(cfg["gnd"]):
        for key in ("easy", "hard", "junk"):
            ids = _ids(g.get(key, []))
            if ids.size and (ids.min() < 0 or ids.max() >= n_db):
                raise ValueError(f"{source}: query {i} '{key}' holds index {int(ids.max())} "
                                 f"outside the {n_db} database images")
        bbx = g.get("bbx")
        if bbx is not None and len(bbx) != 4:
            raise ValueError(f"{source}: query {i} bbx must be [x1, y1, x2, y2], got {bbx}")
    return dict(cfg)


def read_gnd(path: str | os.PathLike, *, write_json: bool = True) -> dict:
    """Read revisited ground truth: ``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx",
    "easy", "hard", "junk"}, ...]}`` with plain Python values.

    ``path`` may be the ``.pkl`` file (read with :class:`RestrictedUnpickler`) or its
    ``.json`` conversion. When given the pickle and a JSON file with the same stem exists
    next to it, the JSON is read; otherwise the pickle is read and, with ``write_json``,
    converted once (atomically) so that later runs read JSON.
    """
    path = Path(path)
    json_path = path.with_suffix(".json")
    if path.suffix == ".json" or (json_path.is_file() and
                                  (not path.exists() or
                                   json_path.stat().st_mtime >= path.stat().st_mtime)):
        src = path if path.suffix == ".json" else json_path
        try:
            cfg = json.loads(src.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{src}: not a readable JSON ground-truth file: {e}") from None
        return _check_gnd(cfg, str(src))
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    cfg = _check_gnd(_plain(restricted_loads(path.read_bytes(), str(path))), str(path))
    if write_json:
        try:
            atomic_write_json(json_path, cfg, indent=None)
            log.info("converted %s to %s", path.name, json_path)
        except OSError as e:
            log.warning("could not write %s (%s); the pickle will be read again next time",
                        json_path, e)
    return cfg


# ------------------------------------------------------------------------- datasets
@dataclass
class RevisitedDataset:
    """A revisited Oxford/Paris dataset on disk: ``<root>/<name>/jpg/*.jpg`` and
    ``<root>/<name>/gnd_<name>.pkl`` (the layout revisitop's download script makes)."""

    name: str
    root: Path
    images: list[Path]
    queries: list[Path]
    bboxes: list[tuple[float, float, float, float]]
    gnd: list[dict]

    @property
    def n_db(self) -> int:
        return len(self.images)

    @property
    def n_queries(self) -> int:
        return len(self.queries)


def load_revisited(name: str, data_root: str | os.PathLike, *, ext: str = ".jpg"
                   ) -> RevisitedDataset:
    """Read the ground truth of ``roxford5k``/``rparis6k`` under ``data_root`` and check
    that every database and query image exists (the first few missing ones are named)."""
    if name not in DATASETS:
        raise ValueError(f"unknown retrieval dataset {name!r}; choose {' or '.join(DATASETS)}")
    base = Path(data_root) / name
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: --data-root must hold a folder '{name}' "
                                "(see docs/evaluation.md for the download)")
    gnd_path = base / f"gnd_{name}.pkl"
    if not gnd_path.exists() and not gnd_path.with_suffix(".json").exists():
        raise FileNotFoundError(f"ground truth {gnd_path} not found")
    cfg = read_gnd(gnd_path)
    jpg = base / "jpg"
    src = str(gnd_path)
    images = [resolve_inside(jpg, f"{n}{ext}", source=src, key="imlist") for n in cfg["imlist"]]
    queries = [resolve_inside(jpg, f"{n}{ext}", source=src, key="qimlist")
               for n in cfg["qimlist"]]
    missing = [str(p) for p in images + queries if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {name} missing, e.g. "
                                f"{', '.join(missing[:3])}")
    bboxes = []
    for i, g in enumerate(cfg["gnd"]):
        if g.get("bbx") is None:
            raise ValueError(f"{gnd_path}: query {i} has no bounding box 'bbx'")
        bboxes.append(tuple(float(v) for v in g["bbx"]))
    gnd = [{k: _ids(g.get(k)) for k in ("easy", "hard", "junk")} for g in cfg["gnd"]]
    return RevisitedDataset(name, base, images, queries, bboxes, gnd)


def _query_crops(ds: RevisitedDataset) -> list:
    """Query images cropped to their bounding box (the protocol's queries)."""
    from ..images import open_image
    crops = []
    for p, box in zip(ds.queries, ds.bboxes):
        img = open_image(p)
        # Pillow rounds each coordinate (round half to even), as the original protocol
        # code that called img.crop(bbx) did.
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        w, h = img.size
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"{p}: bounding box {box} is empty inside the {w}x{h} image")
        crops.append(img.crop((x1, y1, x2, y2)))
    return crops


def evaluate_retrieval(model, dataset: str, data_root: str | os.PathLike, *,
                       imsize: int = 224, multiscale: bool = False,
                       kappas: Sequence[int] = (1, 5, 10), batch_size: int = 16,
                       num_workers: int | None = None, precision: str = "fp32",
                       query_crop: bool = True, progress: bool = True) -> dict:
    """Revisited Oxford/Paris with [CLS] features of ``model`` (section 3.8).

    Database images are resized so that their long side is ``imsize`` (preprocessing
    ``"whole"``, sides rounded down to the patch size), queries are cropped to their
    bounding box first (the revisited protocol; ``query_crop=False`` embeds the whole
    query images, as the release's evaluation script did for the paper's numbers); with ``multiscale`` the features of scales 1, 1/sqrt(2), 1/2 are
    averaged. Features are L2-normalised, ranked by cosine similarity, and scored with
    :func:`revisited_map`. Returns a JSON-able dict with the Medium/Hard (and Easy) mAP
    and mP@k in percent.
    """
    from .features import embed_images
    ds = load_revisited(dataset, data_root)
    kw = dict(preprocessing="whole", size=imsize, multiscale=multiscale, pool="cls",
              batch_size=batch_size, num_workers=num_workers, precision=precision,
              progress=progress)
    log.info("%s: embedding %d database images", dataset, ds.n_db)
    db = embed_images(model, ds.images, **kw)
    log.info("%s: embedding %d %s queries", dataset, ds.n_queries,
             "cropped" if query_crop else "whole")
    q = embed_images(model, _query_crops(ds) if query_crop else list(ds.queries), **kw)
    db = torch.nn.functional.normalize(db.float(), dim=1)
    q = torch.nn.functional.normalize(q.float(), dim=1)
    sim = db @ q.T  # [n_db, n_q]
    ranks = torch.argsort(sim, dim=0, descending=True).numpy()
    scores = revisited_map(ranks, ds.gnd, kappas)
    return {"task": "retrieval", "dataset": dataset, "imsize": imsize,
            "multiscale": multiscale, "query_crop": query_crop, "n_db": ds.n_db, "n_queries": ds.n_queries,
            "kappas": list(kappas), "results": scores}
