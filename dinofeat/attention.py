"""Attention maps of the last block's [CLS] query, their masks and pictures.

:func:`attention_maps` follows the paper's visualisation of the last block's
self-attention: the image at its own resolution (optionally resized so that its short side is ``size``) is cropped at the
bottom/right to a multiple of the patch size, the last block's attention of the [CLS]
query over the patch tokens is taken for every head, and the patch grid is upsampled to
pixels by repetition (nearest). Only the [CLS] row is computed
(``backbone.last_cls_attention``); every other block keeps timm's fused attention.

The values are the **raw softmax weights** of the [CLS] query on the patch tokens, as in
the original code: the [CLS]->[CLS] entry is dropped and the rest is *not* renormalised,
so a head's map sums to ``1 - attn(CLS, CLS)``. Masks are computed on the patch grid from
each head's mass over the patch tokens: the fewest patches whose attention adds up to at
least ``threshold`` (0.6) of that head's patch mass (highest first; ties broken by grid
order), then upsampled like the maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import images as _images
from .utils import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import FeatureModel

__all__ = ["AttentionMaps", "attention_maps", "mass_masks", "colorize", "overlay"]

# Colour map anchors (value, r, g, b) for heatmaps: black -> violet -> red -> orange ->
# pale yellow, monotonic in brightness so that it also reads in grey.
_HEAT_ANCHORS = np.array([
    [0.00, 0.00, 0.00, 0.02],
    [0.25, 0.30, 0.05, 0.45],
    [0.50, 0.80, 0.15, 0.30],
    [0.75, 0.98, 0.55, 0.08],
    [1.00, 1.00, 0.98, 0.75],
])


def mass_masks(grid: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """Per map of ``grid`` (``[..., h, w]``, non-negative), the fewest cells holding at
    least ``threshold`` of the map's total: bool ``[..., h, w]``. Cells are taken from the
    largest down; at least one cell is always kept."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    g = np.asarray(grid, dtype=np.float64)
    flat = g.reshape(-1, g.shape[-2] * g.shape[-1])
    order = np.argsort(-flat, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(flat, order, axis=1), axis=1)
    need = threshold * cum[:, -1:]
    count = np.minimum((cum < need).sum(axis=1) + 1, flat.shape[1])
    keep = np.arange(flat.shape[1])[None, :] < count[:, None]
    masks = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(masks, order, keep, axis=1)
    return masks.reshape(g.shape)


def colorize(values: np.ndarray) -> np.ndarray:
    """A ``[H, W]`` map -> ``uint8 [H, W, 3]`` heatmap, scaled to its own min..max."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgb = np.stack([np.interp(t, _HEAT_ANCHORS[:, 0], _HEAT_ANCHORS[:, c]) for c in (1, 2, 3)],
                   axis=-1)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the heatmap of ``values`` ``[H, W]`` over ``image`` ``uint8 [H, W, 3]``."""
    heat = colorize(values).astype(np.float64)
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _mask_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image where the mask is on, darkened to a quarter where it is off."""
    out = image.astype(np.float64)
    out[~mask] *= 0.25
    return np.rint(out).astype(np.uint8)


@dataclass
class AttentionMaps:
    """Attention of the last block's [CLS] query, at pixel resolution.

    Attributes:
        heads: ``float32 [heads, H, W]``, raw softmax weight of each patch (repeated over
            its ``patch x patch`` pixels).
        mean: ``float32 [H, W]``, the mean over heads.
        masks: ``bool [heads, H, W]``, per head the fewest patches holding ``threshold``
            of its patch mass.
        image: ``uint8 [H, W, 3]``, the image the maps belong to (resized and cropped).
        grid: ``float32 [heads, h, w]``, the maps on the patch grid.
        patch_size, threshold: how they were made.
    """

    heads: np.ndarray
    mean: np.ndarray
    masks: np.ndarray
    image: np.ndarray
    grid: np.ndarray
    patch_size: int
    threshold: float

    @property
    def num_heads(self) -> int:
        return int(self.heads.shape[0])

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write PNGs into ``directory`` (created if needed) and return their paths:
        ``image.png``; ``mean_heatmap.png`` and ``mean_overlay.png``; for every head
        ``headNN_heatmap.png`` (its map in colour), ``headNN_overlay.png`` (over the image)
        and ``headNN_mask.png`` (the image, darkened outside the mask); and
        ``masks.png``, every head's mask side by side in white on black."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        pictures: list[tuple[str, np.ndarray]] = [
            ("image.png", self.image),
            ("mean_heatmap.png", colorize(self.mean)),
            ("mean_overlay.png", overlay(self.image, self.mean)),
        ]
        for i in range(self.num_heads):
            pictures += [(f"head{i:02d}_heatmap.png", colorize(self.heads[i])),
                         (f"head{i:02d}_overlay.png", overlay(self.image, self.heads[i])),
                         (f"head{i:02d}_mask.png", _mask_picture(self.image, self.masks[i]))]
        pictures.append(("masks.png", _mask_strip(self.masks)))
        written = []
        for name, arr in pictures:
            path = out / name
            with atomic_path(path) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")
            written.append(path)
        return written


def _mask_strip(masks: np.ndarray) -> np.ndarray:
    """Every head's mask side by side, white on black, each under a band naming its head
    (``head 0`` ... as in the ``headNN_*`` files), with a grey gap between heads."""
    from PIL import ImageDraw
    heads, h, w = masks.shape
    band, gap = 14, 2
    strip = Image.new("L", (heads * w + (heads - 1) * gap, band + h), 128)
    draw = ImageDraw.Draw(strip)
    for i, m in enumerate(masks):
        x = i * (w + gap)
        draw.rectangle([x, 0, x + w - 1, band - 1], fill=0)
        draw.text((x + 2, 1), f"head {i}", fill=255)
        strip.paste(Image.fromarray(m.astype(np.uint8) * 255), (x, band))
    return np.asarray(strip)


def _single_image(img: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(uint8 [3, H, W], None)`` for an image, ``(None, float [1, 3, H, W])`` for a
    normalised tensor."""
    resolved = _images.resolve_images(img)
    if len(resolved) != 1:
        raise ValueError(f"attention_maps takes one image, got {len(resolved)}; loop over them")
    if resolved.tensor is not None:
        return None, resolved.tensor
    return _images.load_source(resolved.sources[0]), None


def attention_maps(model: "FeatureModel", img: Any, *, size: int | None = None,
                   threshold: float = 0.6, device: str | torch.device | None = None,
                   precision: str = "fp32") -> AttentionMaps:
    """The [CLS] attention maps of ``model``'s last block for one image.

    ``img``: a path, ``PIL.Image``, ``uint8`` array or tensor (or a normalised float
    tensor ``[1, 3, H, W]``, shown un-normalised). ``size``: resize the short side to
    this first (bicubic); default: the image's own resolution. The model's preprocessing
    gives mean/std and the grey-scale flag; its crop is not applied. Raises ``TypeError``
    for models without self-attention (ResNet, XCiT).
    """
    from .accel import fast_inference
    if not model.is_vit:
        raise TypeError(f"attention_maps needs a ViT; {model.name} has no self-attention "
                        "blocks")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer, got {size!r}")
    pre = model.preprocessing
    p = int(model.patch_size)
    dev = torch.device(device) if device is not None else model.device
    if model.device != dev:
        model.to(dev)
    u8, x = _single_image(img)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    if u8 is not None:
        if pre.grayscale:
            u8 = _images.rgb_to_gray3(u8)
        if size is not None and min(u8.shape[-2:]) != size:
            import torchvision.transforms.v2.functional as TF
            u8 = TF.resize(u8, [size], interpolation=TF.InterpolationMode.BICUBIC,
                           antialias=True)
    else:
        x = x.float()
        if size is not None:
            import torch.nn.functional as F
            s = size / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
    src = u8 if u8 is not None else x
    H, W = src.shape[-2] // p * p, src.shape[-1] // p * p
    if H == 0 or W == 0:
        raise ValueError(f"the image ({src.shape[-1]}x{src.shape[-2]}) is smaller than one "
                         f"{p}x{p} patch; pass size= to enlarge it")
    if u8 is not None:
        u8 = u8[:, :H, :W]
        x = _images.normalize_batch(u8[None], pre.mean, pre.std, device=dev)
        shown = u8.permute(1, 2, 0).numpy()
    else:
        x = x[..., :H, :W].to(dev)
        rgb = (x[0].cpu() * std[0] + mean[0]).clamp(0, 1)
        shown = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    module = model if isinstance(model, torch.nn.Module) else None
    with torch.inference_mode(), fast_inference(module, precision, dev):
        cls_attn = model.last_cls_attention(x)  # [1, heads, 1 + h*w]
    h, w = H // p, W // p
    grid = cls_attn[0, :, 1:].float().reshape(-1, h, w).cpu().numpy()
    masks_grid = mass_masks(grid, threshold)
    up = lambda a: np.repeat(np.repeat(a, p, axis=-2), p, axis=-1)  # noqa: E731
    heads = up(grid).astype(np.float32)
    return AttentionMaps(heads=heads, mean=heads.mean(axis=0), masks=up(masks_grid),
                         image=np.ascontiguousarray(shown), grid=grid.astype(np.float32),
                         patch_size=p, threshold=float(threshold))
