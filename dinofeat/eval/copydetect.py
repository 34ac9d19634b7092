"""Copy detection on Copydays (paper section 3.8) and PCA-whitening.

Features: the output [CLS] token concatenated with GeM-pooled (p = 4) output patch tokens
(``embed(pool="cls+gem")``), of images resized to a square ``imsize x imsize`` (bicubic),
as in the release. A PCA-whitening learnt on distractor images (20k YFCC100M images in
the paper) is applied, features are L2-normalised, and every query is ranked against the
originals (plus optional distractors) by cosine similarity.

Whitening (:func:`learn_whitening`): with ``mu`` the mean of the learning features and
``M`` a second-moment matrix, eigen-decompose ``M = V diag(d) V^T``, floor eigenvalues
below ``1e-5 x max(d)`` at that value, keep the ``dim`` largest, and map
``x -> diag(d ** -power) V^T (x - mu)`` (``power = 0.5``: full whitening). ``M`` is the
covariance of the centred features (``centered=True``, textbook PCA) or, as the release
computes it, ``X^T X / N`` of the *uncentred* features (``centered=False``); the
features to whiten are centred by ``mu`` either way. ``dinofeat eval copydetect`` uses
the release's rule by default so that its numbers are comparable with the paper's.

Scoring (release/Holidays convention): the ranked list of each query is cut at
``topk = 20``; AP is :func:`dinofeat.eval.retrieval.average_precision` (trapezoids)
over the positives in that list. Positives of a "strong" query are the originals whose
file name shares its first 4 characters (Copydays names images by series, e.g.
``2000xx``); for the other blocks (``jpegqual/*``, ``crops/*``) the original with the
same file name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import atomic_path, atomic_write_json, get_logger
from .retrieval import average_precision

__all__ = ["Whitening", "learn_whitening", "square_resize", "copydays_blocks",
           "copy_detection_map", "evaluate_copydetect"]

log = get_logger(__name__)

WHITENING_FORMAT = "dinofeat-whitening/1"
BLOCK_NAMES = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
               + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])


@dataclass
class Whitening:
    """A learnt PCA-whitening: ``apply(x) = normalize(diag(d ** -power) V^T (x - mean))``.

    Attributes: ``mean [D_in]``, ``projection [D_out, D_in]`` (``diag(d ** -power) V^T``),
    ``eigenvalues [D_out]`` (descending, after flooring), ``power``, ``centered`` (how the
    matrix was computed), ``energy`` (fraction of the total eigenvalue mass kept) and
    ``info`` (how the input features were made: model, pooling, image size...)."""

    mean: torch.Tensor
    projection: torch.Tensor
    eigenvalues: torch.Tensor
    power: float = 0.5
    centered: bool = True
    energy: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, x: torch.Tensor | np.ndarray, normalize: bool = True) -> torch.Tensor:
        """Whiten features ``[N, D_in]`` -> ``[N, D_out]`` (float32, on ``x``'s device),
        L2-normalised unless ``normalize=False``. ``x`` must be made the way the learning
        features were (``info``: un-normalised [CLS]+GeM for copy detection)."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"whitening expects features [N, {self.in_dim}], got "
                             f"{tuple(x.shape)}")
        mean = self.mean.to(x.device, torch.float32)
        proj = self.projection.to(x.device, torch.float32)
        y = (x.float() - mean) @ proj.T
        return F.normalize(y, dim=1) if normalize else y

    def describe(self) -> dict[str, Any]:
        return {"format": WHITENING_FORMAT, "in_dim": self.in_dim, "dim": self.dim,
                "power": self.power, "centered": self.centered, "energy": self.energy,
                "info": self.info}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whitening atomically: ``.json`` -> a JSON file with lists; anything
        else -> safetensors (``mean``, ``projection``, ``eigenvalues``) with the
        description as JSON in its metadata."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_json(path, {**self.describe(), "mean": self.mean.tolist(),
                                     "projection": self.projection.tolist(),
                                     "eigenvalues": self.eigenvalues.tolist()}, indent=None)
            return path
        from safetensors.torch import save_file
        tensors = {"mean": self.mean.float().contiguous(),
                   "projection": self.projection.float().contiguous(),
                   "eigenvalues": self.eigenvalues.float().contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp),
                      metadata={"dinofeat_whitening": json.dumps(self.describe(), default=str)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Whitening":
        """Read a whitening written by :meth:`save` (safetensors or JSON)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such whitening file: {path}")
        try:
            if path.suffix == ".json":
                d = json.loads(path.read_text())
                t = {k: torch.tensor(d[k], dtype=torch.float32)
                     for k in ("mean", "projection", "eigenvalues")}
            else:
                from safetensors import safe_open
                with safe_open(str(path), framework="pt") as f:
                    d = json.loads((f.metadata() or {}).get("dinofeat_whitening", "{}"))
                    t = {k: f.get_tensor(k) for k in ("mean", "projection", "eigenvalues")}
        except Exception as e:  # noqa: BLE001 - safetensors/JSON errors of any kind
            raise ValueError(f"{path}: not a dinofeat whitening file ({type(e).__name__}: "
                             f"{e})") from None
        if d.get("format") != WHITENING_FORMAT:
            raise ValueError(f"{path}: unknown whitening format {d.get('format')!r} "
                             f"(expected {WHITENING_FORMAT})")
        proj = t["projection"]
        if proj.ndim != 2 or t["mean"].shape != (proj.shape[1],) or \
                t["eigenvalues"].shape != (proj.shape[0],):
            raise ValueError(f"{path}: inconsistent shapes mean {tuple(t['mean'].shape)}, "
                             f"projection {tuple(proj.shape)}")
        return cls(t["mean"], proj, t["eigenvalues"], float(d.get("power", 0.5)),
                   bool(d.get("centered", True)), float(d.get("energy", 1.0)),
                   dict(d.get("info") or {}))


def learn_whitening(feats: torch.Tensor | np.ndarray, dim: int | None = None, *,
                    power: float = 0.5, centered: bool = True, eps_ratio: float = 1e-5,
                    info: dict | None = None) -> Whitening:
    """Learn a PCA-whitening from features ``[N, D]`` (see the module docstring).

    Args:
        dim: output dimension (default ``D``; at most ``D``).
        power: eigenvalue exponent (0.5 whitens fully, 0 is plain PCA rotation).
        centered: covariance of centred features (True) or the release's uncentred
            second-moment matrix (False).
        eps_ratio: eigenvalues below ``eps_ratio x max`` are raised to it (rank-deficient
            inputs, e.g. fewer samples than dimensions, stay finite).
        info: stored with the whitening (how the features were made).
    """
    x = torch.as_tensor(feats).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D] to learn a whitening, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("whitening features contain NaN or infinite values")
    n, d_in = x.shape
    dim = d_in if dim is None else int(dim)
    if not 1 <= dim <= d_in:
        raise ValueError(f"whitening dim must be in [1, {d_in}], got {dim}")
    mean = x.mean(dim=0)
    xc = x - mean if centered else x
    cov = xc.T @ xc / n
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    eps = float(evals.max()) * eps_ratio
    if eps <= 0:
        raise ValueError("whitening features have no variance (all identical?)")
    evals = evals.clamp(min=eps)
    order = torch.argsort(evals, descending=True)[:dim]
    energy = float(evals[order].sum() / evals.sum())
    evals, evecs = evals[order], evecs[:, order]
    proj = evecs.T / evals.pow(power)[:, None]  # diag(d^-power) V^T
    log.info("whitening: %d -> %d dims from %d features, %.2f%% of the energy kept",
             d_in, dim, n, 100 * energy)
    return Whitening(mean.float(), proj.float(), evals.float(), power, centered, energy,
                     dict(info or {}))


# -------------------------------------------------------------------- Copydays
def square_resize(imsize: int):
    """Transform ``uint8 [3, H, W]`` -> ``[3, imsize, imsize]`` (bicubic, antialiased):
    the release's copy-detection preprocessing ignores the aspect ratio."""
    import torchvision.transforms.v2.functional as TF

    def resize(img: torch.Tensor) -> torch.Tensor:
        return TF.resize(img, [imsize, imsize], interpolation=TF.InterpolationMode.BICUBIC,
                         antialias=True)
    return resize


def copydays_blocks(root: str | os.PathLike) -> dict[str, list[Path]]:
    """The Copydays blocks present under ``root`` (``original`` and ``strong`` required;
    ``jpegqual/<q>`` and ``crops/<pct>`` when there): ``{name: sorted .jpg paths}``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such Copydays folder: {root}")
    blocks = {}
    for name in BLOCK_NAMES:
        d = root / name
        if d.is_dir():
            blocks[name] = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")
                                  and not p.name.startswith("."))
    for need in ("original", "strong"):
        if not blocks.get(need):
            raise FileNotFoundError(f"{root}/{need}: missing or without .jpg files (Copydays "
                                    "layout: original/, strong/, optional jpegqual/, crops/)")
    return blocks


def _positives(block: str, queries: Sequence[Path], originals: Sequence[Path],
               prefix: int) -> list[list[int]]:
    if block == "strong":
        out = [[j for j, o in enumerate(originals) if o.name[:prefix] == q.name[:prefix]]
               for q in queries]
    else:
        by_name = {o.name: j for j, o in enumerate(originals)}
        out = [[by_name[q.name]] if q.name in by_name else [] for q in queries]
    lonely = [q.name for q, p in zip(queries, out) if not p]
    if lonely:
        raise ValueError(f"{block}: no original matches {len(lonely)} query file(s), e.g. "
                         f"{lonely[0]}")
    return out


def copy_detection_map(ranked: torch.Tensor | np.ndarray, positives: Sequence[Sequence[int]]
                       ) -> tuple[float, np.ndarray]:
    """Mean AP (fraction) and per-query APs from ``ranked [n_queries, L]`` database
    indices (best first, possibly cut at ``L``) and each query's positive indices."""
    ranked = ranked.cpu().numpy() if isinstance(ranked, torch.Tensor) else np.asarray(ranked)
    if ranked.shape[0] != len(positives):
        raise ValueError(f"{ranked.shape[0]} ranked lists for {len(positives)} queries")
    aps = np.array([average_precision(np.flatnonzero(np.isin(row, pos)), len(pos))
                    for row, pos in zip(ranked, positives)])
    return float(aps.mean()) if len(aps) else float("nan"), aps


def evaluate_copydetect(model, data_root: str | os.PathLike, *, imsize: int = 224,
                        distractors: str | os.PathLike | None = None,
                        whitening: "Whitening | str | os.PathLike | None" = None,
                        whitening_data: str | os.PathLike | None = None,
                        whitening_dim: int | None = None, centered: bool = False,
                        save_whitening: str | os.PathLike | None = None, topk: int = 20,
                        match_prefix: int = 4, batch_size: int = 32,
                        num_workers: int | None = None, precision: str = "fp32",
                        progress: bool = True) -> dict:
    """Copydays copy detection (see the module docstring).

    Args:
        data_root: Copydays folder (``original/``, ``strong/``, optional ``jpegqual/``,
            ``crops/``).
        distractors: folder of images added to the database.
        whitening: a learnt :class:`Whitening` (or its file) to apply; otherwise one is
            learnt on ``whitening_data`` (default: the ``distractors`` folder) when given.
        whitening_dim, centered: :func:`learn_whitening` options (``centered=False`` is
            the release's rule).
        save_whitening: write the learnt whitening there (reusable by ``dinofeat dedup
            --whitening`` and the index).
        topk: length of each ranked list (20 in the release).
    """
    from ..images import list_images
    from .features import extract_with_transform
    blocks = copydays_blocks(data_root)
    tf = square_resize(imsize)

    def feature_fn(x):
        return model.embed(x, pool="cls+gem", normalize=False, progress=False,
                           precision=precision)

    def feats_of(paths, desc):
        f, kept, skipped = extract_with_transform(model, paths, tf, feature_fn,
                                                  batch_size=batch_size,
                                                  num_workers=num_workers, desc=desc,
                                                  progress=progress)
        return f, kept, skipped

    info = {"model": model.describe(), "pool": "cls+gem", "gem_p": 4, "normalized_input": False,
            "imsize": imsize, "resize": "square bicubic"}
    originals = blocks["original"]
    db, kept, skipped = feats_of(originals, "originals")
    if len(kept) != len(originals):
        raise ValueError(f"unreadable original images: {'; '.join(skipped[:3])}")
    n_distractors = 0
    if distractors is not None:
        dfeats, _, _ = feats_of(list_images(distractors), "distractors")
        n_distractors = len(dfeats)
        db = torch.cat([db, dfeats])
    wh: Whitening | None = None
    if whitening is not None:
        wh = whitening if isinstance(whitening, Whitening) else Whitening.load(whitening)
        if wh.info.get("imsize") not in (None, imsize) or wh.info.get("pool") not in (
                None, "cls+gem"):
            log.warning("whitening was learnt with %s; features here: cls+gem at %d",
                        {k: wh.info.get(k) for k in ("pool", "imsize")}, imsize)
    else:
        source = whitening_data if whitening_data is not None else distractors
        if source is not None:
            wfeats, _, _ = feats_of(list_images(source), "whitening set")
            wh = learn_whitening(wfeats, whitening_dim, centered=centered,
                                 info={**info, "source": str(source), "n_images": len(wfeats)})
            if save_whitening is not None:
                wh.save(save_whitening)
                log.info("whitening saved to %s", save_whitening)
    db = wh.apply(db) if wh is not None else F.normalize(db, dim=1)
    results = {}
    for name, paths in blocks.items():
        if name == "original":
            continue
        q, kept, skipped = feats_of(paths, name)
        paths = [paths[i] for i in kept]
        q = wh.apply(q) if wh is not None else F.normalize(q, dim=1)
        pos = _positives(name, paths, originals, match_prefix)
        ranked = (q @ db.T).topk(min(topk, db.shape[0]), dim=1).indices
        m, _ = copy_detection_map(ranked, pos)
        results[name] = {"mAP": 100.0 * m, "n_queries": len(paths), "skipped": len(skipped)}
        log.info("copy detection %s: mAP %.2f on %d queries", name, 100 * m, len(paths))
    return {"task": "copydetect", "model": model.describe(), "imsize": imsize, "topk": topk,
            "n_originals": len(originals), "n_distractors": n_distractors,
            "whitening": wh.describe() if wh is not None else None, "results": results}
