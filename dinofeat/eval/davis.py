"""Video object segmentation on DAVIS-2017 by label propagation (paper section 3.8).

No training: the objects of the first frame are carried through the video with nearest
neighbours between output patch features.

* **Frames** are resized (bilinear) so that the short side is 480 and the long side is
  rounded *down* to a multiple of 64 (the release's rule: 854 x 480 -> 832 x 480),
  normalised with the model's mean/std (the release used std 0.228 for red, a typo of
  0.229 with no visible effect), and turned into output patch tokens ``[h, w, D]``.
* **Propagation** (:func:`propagate_labels`): for each patch of the target frame, the
  affinity to a patch of a context frame is ``exp(cos / T)`` (``T = 0.1``), zero outside a
  ``(2r + 1)^2`` square neighbourhood (``r = 12`` patches); over the keys of *all* context
  frames together, all but the ``topk = 5`` largest affinities are zeroed (ties at the
  5th value are kept, as in the release), the rest normalised to sum 1, and the target's
  soft labels are the weighted sum of the keys' labels. The context is the first frame
  (its one-hot ground truth) plus the 7 previous frames (their soft predictions).
* **Output**: soft labels are upsampled by the patch size (bilinear), each channel
  min-max normalised, arg-maxed, resized to the original size (nearest) and written as
  indexed PNGs with the DAVIS palette (:func:`davis_palette`, generated in code).
* **Scores** follow the DAVIS-2017 semi-supervised protocol: per object and frame,
  region similarity J (IoU; 1 when both masks are empty) and boundary F-measure F
  (one-pixel boundaries, matched within ``ceil(0.008 x image diagonal)`` pixels through a
  disk-shaped dilation, :func:`boundary_f_measure`), leaving out the first and last
  frames; per-object means over frames, then means over every object of every
  sequence; J&F is their average.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..utils import atomic_path, get_logger, resolve_inside

__all__ = [
    "davis_palette",
    "write_indexed_png",
    "neighborhood_mask",
    "propagate_labels",
    "segment_video",
    "frame_size",
    "region_jaccard",
    "boundary_map",
    "boundary_f_measure",
    "evaluate_sequence",
    "evaluate_davis",
]

log = get_logger(__name__)


# --------------------------------------------------------------------- palette
def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map ``uint8 [n, 3]``: colour ``i`` spreads the bits
    of ``i`` over the channels, most significant first (0 black, 1 dark red, 2 dark green,
    3 olive, 4 dark blue...)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def write_indexed_png(path: str | os.PathLike, labels: np.ndarray,
                      palette: np.ndarray | None = None) -> Path:
    """Write a label map ``uint8 [H, W]`` as a palette PNG (atomically)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"an indexed PNG needs a 2-D label map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 for an indexed PNG")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette((davis_palette() if palette is None else palette).astype(np.uint8).ravel()
                   .tolist())
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------- propagation
def neighborhood_mask(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """``bool [h*w, h*w]``: ``mask[q, k]`` is True when patch ``k`` lies within
    ``radius`` patches of patch ``q`` along both axes (a square window)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & \
           ((xs[:, None] - xs[None, :]).abs() <= radius)


@torch.no_grad()
def propagate_labels(target_feats: torch.Tensor, context_feats: torch.Tensor,
                     context_labels: torch.Tensor, *, grid: tuple[int, int] | None = None,
                     topk: int = 5, temperature: float = 0.1, radius: int | None = 12,
                     chunk_size: int = 4096) -> torch.Tensor:
    """Soft labels of a target frame from context frames (see the module docstring).

    Args:
        target_feats: ``[N, D]`` patch features of the target frame (``N = h*w``,
            row-major), or ``[h, w, D]``.
        context_feats: ``[T, N, D]`` (or ``[T, h, w, D]``) features of the context frames.
        context_labels: ``[T, C, N]`` (or ``[T, C, h, w]``) their soft or one-hot labels.
        grid: ``(h, w)``; needed with ``radius`` when features are flattened.
        topk, temperature: neighbours kept per target patch, affinity temperature.
        radius: neighbourhood half-size in patches (``None`` or ``<= 0``: no restriction).
        chunk_size: target patches per step (bounds memory at ``T*N*chunk`` floats).

    Returns:
        ``[C, N]`` soft labels (``[C, h, w]`` when the inputs had a grid); each column
        sums to 1 when the context labels do.
    """
    if target_feats.ndim == 3:
        grid = grid or tuple(target_feats.shape[:2])
        target_feats = target_feats.reshape(-1, target_feats.shape[-1])
    if context_feats.ndim == 4:
        grid = grid or tuple(context_feats.shape[1:3])
        context_feats = context_feats.reshape(context_feats.shape[0], -1,
                                              context_feats.shape[-1])
    spatial_out = context_labels.ndim == 4
    if spatial_out:
        grid = grid or tuple(context_labels.shape[2:])
        context_labels = context_labels.reshape(*context_labels.shape[:2], -1)
    T, N, D = context_feats.shape
    if target_feats.shape != (N, D) or context_labels.shape[0] != T or \
            context_labels.shape[2] != N:
        raise ValueError(f"shapes do not agree: target {tuple(target_feats.shape)}, context "
                         f"{tuple(context_feats.shape)}, labels {tuple(context_labels.shape)}")
    if topk < 1 or temperature <= 0:
        raise ValueError("topk must be >= 1 and temperature > 0")
    C = context_labels.shape[1]
    dev = target_feats.device
    tgt = F.normalize(target_feats.float(), dim=1)
    ctx = F.normalize(context_feats.float().to(dev), dim=2)
    labels = context_labels.float().to(dev).permute(1, 0, 2).reshape(C, T * N)  # [C, T*N]
    mask = None
    if radius is not None and radius > 0:
        if grid is None or grid[0] * grid[1] != N:
            raise ValueError(f"a neighbourhood needs the patch grid (h, w) with h*w = {N}")
        mask = neighborhood_mask(grid[0], grid[1], radius, device=dev)
    out = torch.empty(C, N, device=dev)
    k = min(topk, T * N)
    for q0 in range(0, N, chunk_size):
        q = tgt[q0:q0 + chunk_size]  # [n, D]
        aff = torch.exp(torch.einsum("nd,tkd->ntk", q, ctx) / temperature)  # [n, T, N]
        if mask is not None:
            aff = aff * mask[q0:q0 + q.shape[0]].unsqueeze(1)
        aff = aff.reshape(q.shape[0], T * N)
        kth = aff.topk(k, dim=1).values[:, -1:]
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=1, keepdim=True)
        out[:, q0:q0 + q.shape[0]] = labels @ aff.T
    if spatial_out and grid is not None:
        return out.reshape(C, *grid)
    return out


def _norm_channels(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each channel of ``[C, H, W]`` whose maximum is > 0 (release)."""
    x = x.clone()
    for c in range(x.shape[0]):
        if x[c].max() > 0:
            x[c] = x[c] - x[c].min()
            x[c] = x[c] / x[c].max()
    return x


def frame_size(height: int, width: int, short_side: int = 480, multiple: int = 64
               ) -> tuple[int, int]:
    """``(h, w)`` a frame is resized to: short side ``short_side``, long side rounded down
    to a multiple of ``multiple`` (release rule)."""
    if height > width:
        return int((short_side * height / width) // multiple * multiple), short_side
    return short_side, int((short_side * width / height) // multiple * multiple)


def _read_frame(path: Path, size: tuple[int, int], mean, std) -> torch.Tensor:
    from ..images import read_image
    img = read_image(path).float().unsqueeze(0)
    img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=False)
    img = img.round().clamp(0, 255) / 255.0  # an 8-bit resized image, as the release has
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (img - m) / s


def _read_labels(path: Path) -> np.ndarray:
    from ..images import open_label_image
    img = open_label_image(path)
    if img.mode not in ("P", "L"):
        raise ValueError(f"{path}: annotations must be indexed (palette) or greyscale PNGs, "
                         f"got mode {img.mode}")
    return np.asarray(img).copy()


def segment_video(frames: Sequence[str | os.PathLike], first_labels: np.ndarray,
                  patch_features: Callable[[torch.Tensor], torch.Tensor], patch_size: int, *,
                  n_last_frames: int = 7, topk: int = 5, temperature: float = 0.1,
                  radius: int = 12, short_side: int = 480,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                  out_dir: str | os.PathLike | None = None, device=None,
                  progress: bool = False) -> list[np.ndarray]:
    """Propagate ``first_labels`` (``uint8 [H, W]``, 0 = background, objects 1..n) through
    ``frames`` (image files). ``patch_features(x [1, 3, h, w]) -> [1, h/p, w/p, D]``.
    Returns one label map per frame at the original size (the first is ``first_labels``);
    with ``out_dir`` each is also written as ``<frame stem>.png``."""
    frames = [Path(f) for f in frames]
    if not frames:
        raise ValueError("no frames")
    first_labels = np.asarray(first_labels)
    H, W = first_labels.shape
    th, tw = frame_size(H, W, short_side)
    if th % patch_size or tw % patch_size:
        raise ValueError(f"frame size {th}x{tw} is not a multiple of the patch {patch_size}")
    gh, gw = th // patch_size, tw // patch_size
    n_cls = int(first_labels.max()) + 1
    small = np.asarray(Image.fromarray(first_labels.astype(np.uint8)).resize(
        (gw, gh), Image.Resampling.NEAREST))
    first_onehot = F.one_hot(torch.from_numpy(small.astype(np.int64)), n_cls).permute(2, 0, 1)
    first_onehot = first_onehot.float().to(device)

    def feats(path: Path) -> torch.Tensor:
        x = _read_frame(path, (th, tw), mean, std).to(device)
        with torch.no_grad():
            f = patch_features(x)
        f = f.reshape(gh, gw, -1) if f.ndim == 4 else f
        if f.shape[:2] != (gh, gw):
            raise ValueError(f"{path}: patch features {tuple(f.shape)} do not match the "
                             f"{gh}x{gw} grid")
        return f.to(device).float()

    out = Path(out_dir) if out_dir is not None else None
    results = [first_labels.astype(np.uint8)]
    if out is not None:
        write_indexed_png(out / f"{frames[0].stem}.png", results[0])
    first_feat = feats(frames[0])
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    it = range(1, len(frames))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=frames[0].parent.name, unit="frame", leave=False)
    for i in it:
        f = feats(frames[i])
        ctx_f = torch.stack([first_feat] + [q[0] for q in queue])
        ctx_l = torch.stack([first_onehot] + [q[1] for q in queue])
        soft = propagate_labels(f, ctx_f, ctx_l, topk=topk, temperature=temperature,
                                radius=radius)  # [C, gh, gw]
        if len(queue) == n_last_frames:
            queue.pop(0)
        if n_last_frames > 0:
            queue.append((f, soft))
        up = F.interpolate(soft[None], scale_factor=patch_size, mode="bilinear",
                           align_corners=False)[0]
        lab = _norm_channels(up).argmax(dim=0).to(torch.uint8).cpu().numpy()
        lab = np.asarray(Image.fromarray(lab).resize((W, H), Image.Resampling.NEAREST))
        results.append(lab)
        if out is not None:
            write_indexed_png(out / f"{frames[i].stem}.png", lab)
    return results


# -------------------------------------------------------------------- metrics
def region_jaccard(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: ``|pred & gt| / |pred | gt|`` over non-void pixels; 1 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    valid = ~np.asarray(void, bool) if void is not None else np.ones_like(gt)
    union = np.sum((pred | gt) & valid)
    if union == 0:
        return 1.0
    return float(np.sum(pred & gt & valid) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a binary mask (DAVIS convention): a pixel is on the
    boundary when it differs from its right, bottom or bottom-right neighbour (outside
    the image counts as background only for the last row/column rules)."""
    seg = np.asarray(mask, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> torch.Tensor:
    r = int(radius)
    y, x = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    return ((x * x + y * y) <= r * r).float()


def _dilate(b: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels (``x^2 + y^2 <= r^2``)."""
    if radius <= 0:
        return b.copy()
    k = _disk(radius)[None, None]
    t = torch.from_numpy(b.astype(np.float32))[None, None]
    out = F.conv2d(t, k, padding=int(radius))
    return (out[0, 0] > 0.5).numpy()


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                       bound_th: float = 0.008) -> float:
    """F: boundary F-measure of DAVIS. Boundaries of both masks (:func:`boundary_map`,
    void pixels removed first) are matched within ``ceil(bound_th x diagonal)`` pixels
    (``bound_th >= 1`` is taken as pixels): precision = predicted boundary pixels near a
    true one / predicted ones, recall the other way round; ``F = 2PR / (P + R)``. Both
    boundaries empty -> 1; only one empty -> 0."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape)))
    if void is not None:
        keep = ~np.asarray(void, bool)
        pred, gt = pred & keep, gt & keep
    fg_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0
    precision = float((fg_b & _dilate(gt_b, radius)).sum()) / n_fg
    recall = float((gt_b & _dilate(fg_b, radius)).sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def evaluate_sequence(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                      n_objects: int | None = None, void_label: int | None = None
                      ) -> dict[str, list[float]]:
    """J and F per object of one video, averaged over its frames except the first and the
    last (DAVIS-2017 semi-supervised). ``n_objects`` defaults to the largest label of the
    first ground-truth frame. Returns ``{"J": [per object], "F": [per object]}``.
    ``void_label`` (e.g. 255) marks pixels left out of both scores."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted frames for {len(gts)} annotated ones")
    if n_objects is None:
        first = np.asarray(gts[0])
        n_objects = int(first[first != void_label].max()) if void_label is not None \
            else int(first.max())
    frames = range(1, len(gts) - 1) if len(gts) > 2 else range(len(gts))
    J = np.zeros((n_objects, len(frames)))
    Fm = np.zeros_like(J)
    for j, t in enumerate(frames):
        gt, pr = np.asarray(gts[t]), np.asarray(preds[t])
        void = (gt == void_label) if void_label is not None else None
        for o in range(1, n_objects + 1):
            J[o - 1, j] = region_jaccard(pr == o, gt == o, void)
            Fm[o - 1, j] = boundary_f_measure(pr == o, gt == o, void)
    return {"J": J.mean(axis=1).tolist(), "F": Fm.mean(axis=1).tolist()}


# ----------------------------------------------------------------- whole dataset
@dataclass
class _Video:
    name: str
    frames: list[Path]
    annotations: list[Path]


def _davis_videos(root: Path, resolution: str, split: str, sequences: Sequence[str] | None
                  ) -> list[_Video]:
    jpeg = root / "JPEGImages" / resolution
    ann = root / "Annotations" / resolution
    for d in (jpeg, ann):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found (DAVIS layout: JPEGImages/{resolution}/"
                                    f"<video>/*.jpg, Annotations/{resolution}/<video>/*.png)")
    if sequences is None:
        listing = root / "ImageSets" / "2017" / f"{split}.txt"
        if listing.is_file():
            sequences = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
        else:
            sequences = sorted(d.name for d in jpeg.iterdir() if d.is_dir())
            log.warning("%s not found: evaluating every video under %s", listing, jpeg)
    videos = []
    for name in sequences:
        # names come from a listing file: they must stay inside the dataset's folders
        resolve_inside(jpeg, name, source=str(root / "ImageSets"), key="sequence")
        resolve_inside(ann, name, source=str(root / "ImageSets"), key="sequence")
        frames = sorted((jpeg / name).glob("*.jpg"))
        if not frames:
            raise FileNotFoundError(f"video {name}: no .jpg frames in {jpeg / name}")
        first_ann = ann / name / f"{frames[0].stem}.png"
        if not first_ann.is_file():
            raise FileNotFoundError(f"video {name}: first-frame annotation {first_ann} missing")
        videos.append(_Video(name, frames, [ann / name / f"{f.stem}.png" for f in frames]))
    return videos


def evaluate_davis(model, data_root: str | os.PathLike, output_dir: str | os.PathLike, *,
                   sequences: Sequence[str] | None = None, split: str = "val",
                   resolution: str = "480p", n_last_frames: int = 7, topk: int = 5,
                   temperature: float = 0.1, radius: int = 12, short_side: int = 480,
                   precision: str = "fp32", progress: bool = True) -> dict:
    """Segment every video of a DAVIS split with ``model``'s output patch features,
    write the masks under ``output_dir/<video>/``, and score them when the ground truth
    of every frame is present (the val split). Returns a JSON-able dict with J, F and J&F
    (percent) overall and per video (``None`` where ground truth is missing)."""
    if not getattr(model, "is_vit", False):
        raise TypeError(f"DAVIS propagation needs a ViT's patch tokens; {model.name} has none")
    root, out = Path(data_root), Path(output_dir)
    videos = _davis_videos(root, resolution, split, sequences)
    pp = model.preprocessing
    device = model.device

    def patch_features(x: torch.Tensor) -> torch.Tensor:
        return model.patch_features(x, progress=False, precision=precision).to(device)

    per_video, all_j, all_f = {}, [], []
    t0 = time.time()
    for vi, v in enumerate(videos):
        log.info("[%d/%d] %s: %d frames", vi + 1, len(videos), v.name, len(v.frames))
        first = _read_labels(v.annotations[0])
        preds = segment_video(v.frames, first, patch_features, model.patch_size,
                              n_last_frames=n_last_frames, topk=topk, temperature=temperature,
                              radius=radius, short_side=short_side, mean=pp.mean, std=pp.std,
                              out_dir=resolve_inside(out, v.name, key="video"),
                              device=device, progress=progress)
        if all(a.is_file() for a in v.annotations):
            gts = [_read_labels(a) for a in v.annotations]
            scores = evaluate_sequence(preds, gts, void_label=255)
            all_j += scores["J"]
            all_f += scores["F"]
            per_video[v.name] = {"J": 100 * float(np.mean(scores["J"])),
                                 "F": 100 * float(np.mean(scores["F"])),
                                 "objects": len(scores["J"])}
        else:
            per_video[v.name] = None
    summary = None
    if all_j:
        jm, fm = 100 * float(np.mean(all_j)), 100 * float(np.mean(all_f))
        summary = {"J&F": (jm + fm) / 2, "J": jm, "F": fm, "objects": len(all_j)}
    return {"task": "davis", "model": model.describe(), "split": split,
            "resolution": resolution, "n_last_frames": n_last_frames, "topk": topk,
            "temperature": temperature, "radius": radius, "short_side": short_side,
            "output_dir": str(out), "seconds": round(time.time() - t0, 1),
            "results": summary, "videos": per_video}
