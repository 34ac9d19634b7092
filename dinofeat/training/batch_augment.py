"""DINO's multi-crop augmentation applied to a whole batch of small images at once.

:class:`~dinofeat.training.augment.MultiCropAugmentation` runs ~30 torchvision operations
per image (6 crops x resize, flip, jitter, grayscale, blur, solarise, normalise). On 28-px
photos each operation costs its fixed overhead, not its pixels: about a quarter of a
training step's time on one CPU core (``benchmarks/fashion_mnist_step.py``; batched: ~4x
less). Here the same
random recipe is drawn per image, and the pixel work runs as a few tensor operations over
the whole batch:

* random resized crop + horizontal flip: one ``affine_grid`` / ``grid_sample`` (bicubic)
  per view, the crop box drawn per image exactly as torchvision draws it (10 tries of scale
  and log-ratio, then the central fallback);
* colour jitter (p 0.8; brightness, contrast, saturation and hue factors drawn as
  torchvision draws them, in a random order per image), grayscale (p 0.2), Gaussian blur
  (separable, one kernel per image, reflect padding; the same probabilities per view as
  the release), solarisation (second global view, p 0.2) and normalisation.

Differences from the per-image pipeline, all small at these sizes: the crop is resampled by
bicubic ``grid_sample`` without antialiasing (the crops are enlarged or shrunk by at most
~1.3x here), its taps may read the pixels just outside the crop box, and the pixels stay
floats between the steps (the per-image pipeline rounds to uint8 after each).

Randomness: every image's parameters come from one seed drawn, per sample, from torch's
global RNG by :meth:`BatchMultiCropAugmentation.prepare` (which the dataset calls under its
per-sample seed), so an interrupted run resumes with the same crops.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..zoo import IMAGENET_MEAN, IMAGENET_STD
from .augment import (VIEW_PROBABILITIES, blur_kernel_size, check_crops_number,
                      recipe_from_config, to_uint8_rgb)
from .data import BatchFailures

__all__ = ["BatchMultiCropAugmentation"]

# uniforms drawn per view and image (see _draw)
_TRIES = 10
_N_UNIFORM = 2 * _TRIES + 13
_PERMUTATIONS = np.array([list(p) for p in __import__("itertools").permutations(range(4))])
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, 1, H, W]`` luma, as torchvision computes it."""
    return x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2]


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * x + (1 - ratio) * other).clamp_(0, 1)


class _View:
    """The random recipe of one view (global 1, global 2 or a local crop)."""

    def __init__(self, size: int, scale: Sequence[float], blur_p: float, solarize_p: float,
                 sigma: tuple[float, float]):
        self.size, self.scale = size, (float(scale[0]), float(scale[1]))
        self.blur_p, self.solarize_p, self.sigma = blur_p, solarize_p, sigma
        self.kernel = blur_kernel_size(sigma[1], size)


class BatchMultiCropAugmentation:
    """The multi-crop recipe of :class:`~dinofeat.training.augment.MultiCropAugmentation`
    (same arguments) for batches of equal-size images.

    Use: the dataset's per-image transform is :meth:`prepare` (``image -> [uint8 [3, H, W],
    seed]``), the data loader's ``collate_fn`` is :meth:`collate` (``[(prepared,
    failures)] -> (crops per view [B, 3, h, w], failures)``, what the training loop takes).
    ``augment(images, seeds)`` does the work on a uint8 batch ``[B, 3, H, W]``.
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4),
                 local_crops_number: int = 8, global_crop_size: int = 224,
                 local_crop_size: int = 96,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 grayscale: bool = False, blur_sigma: Sequence[float] = (0.1, 2.0)):
        check_crops_number(local_crops_number)
        sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.local_crops_number = local_crops_number
        self.grayscale = grayscale
        p = VIEW_PROBABILITIES
        self.views = [_View(global_crop_size, global_crops_scale, *p["global1"], sigma),
                      _View(global_crop_size, global_crops_scale, *p["global2"], sigma)] + \
            [_View(local_crop_size, local_crops_scale, *p["local"], sigma)
             for _ in range(local_crops_number)]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, cfg) -> "BatchMultiCropAugmentation":
        """The augmentation a :class:`~dinofeat.training.config.TrainConfig` describes."""
        return cls(**recipe_from_config(cfg))

    @property
    def ncrops(self) -> int:
        return len(self.views)

    # ---------------------------------------------------------------- data loader hooks
    def prepare(self, img: Any) -> list[torch.Tensor]:
        """Per image (in the dataset): ``[uint8 [3, H, W], seed]``; the seed is drawn
        from torch's global RNG, which the dataset seeds per sample."""
        return [to_uint8_rgb(img, self.grayscale),
                torch.randint(0, 2 ** 62, (), dtype=torch.int64)]

    def collate(self, batch: list[tuple[list[torch.Tensor], list[str]]]
                ) -> tuple[list[torch.Tensor], BatchFailures]:
        """``collate_fn`` of the data loader: augment the prepared images of a batch."""
        images = [item[0][0] for item in batch]
        seeds = [int(item[0][1]) for item in batch]
        if all(im.shape == images[0].shape for im in images):
            crops = self.augment(torch.stack(images), seeds)
        else:  # images of several sizes: one at a time, the same recipe
            parts = [self.augment(im[None], [s]) for im, s in zip(images, seeds)]
            crops = [torch.cat([p[v] for p in parts]) for v in range(self.ncrops)]
        failures = BatchFailures(f for item in batch for f in item[1])
        failures.replaced = sum(1 for item in batch if item[1])
        return crops, failures

    # ---------------------------------------------------------------- the work
    def _draw(self, seeds: Sequence[int], H: int, W: int) -> dict[str, np.ndarray]:
        """Every random parameter, ``[B, views]`` arrays (float64 unless said)."""
        u = np.stack([np.random.default_rng(s).random((self.ncrops, _N_UNIFORM))
                      for s in seeds])  # [B, V, U]
        B, V = u.shape[:2]
        lo = np.array([v.scale[0] for v in self.views])[None, :, None]
        hi = np.array([v.scale[1] for v in self.views])[None, :, None]
        area = H * W * (lo + (hi - lo) * u[..., 0:_TRIES])
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[..., _TRIES:2 * _TRIES]
        ratio = np.exp(log_r)
        w = np.rint(np.sqrt(area * ratio))
        h = np.rint(np.sqrt(area / ratio))
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.argmax(-1)[..., None]
        found = ok.any(-1)
        w = np.take_along_axis(w, first, -1)[..., 0]
        h = np.take_along_axis(h, first, -1)[..., 0]
        # torchvision's fallback: the central crop of the largest allowed ratio
        in_ratio = W / H
        fw, fh = (W, round(W / (3 / 4))) if in_ratio < 3 / 4 else \
            ((round(H * 4 / 3), H) if in_ratio > 4 / 3 else (W, H))
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        k = 2 * _TRIES
        top = np.where(found, np.floor(u[..., k] * (H - h + 1)), (H - h) // 2)
        left = np.where(found, np.floor(u[..., k + 1] * (W - w + 1)), (W - w) // 2)
        p = {"w": w, "h": h, "top": top, "left": left, "flip": u[..., k + 2] < 0.5,
             "jitter": u[..., k + 3] < 0.8,
             "brightness": 0.6 + 0.8 * u[..., k + 4], "contrast": 0.6 + 0.8 * u[..., k + 5],
             "saturation": 0.8 + 0.4 * u[..., k + 6], "hue": -0.1 + 0.2 * u[..., k + 7],
             "order": _PERMUTATIONS[np.minimum((u[..., k + 8] * 24).astype(int), 23)],
             "gray": u[..., k + 9] < 0.2}
        blur_p = np.array([v.blur_p for v in self.views])[None]
        sol_p = np.array([v.solarize_p for v in self.views])[None]
        lo_s, hi_s = self.views[0].sigma
        p["blur"] = u[..., k + 10] < blur_p
        p["sigma"] = lo_s + (hi_s - lo_s) * u[..., k + 11]
        p["solarize"] = u[..., k + 12] < sol_p
        return p

    def augment(self, images: torch.Tensor, seeds: Sequence[int]) -> list[torch.Tensor]:
        """uint8 ``[B, 3, H, W]`` and one seed per image -> ``[global1, global2, local_1
        ... local_N]``, float ``[B, 3, size, size]`` each, normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchMultiCropAugmentation: expected uint8 [B, 3, H, W], got "
                             f"{images.dtype} {tuple(images.shape)}")
        B, _, H, W = images.shape
        if len(seeds) != B:
            raise ValueError(f"BatchMultiCropAugmentation: {len(seeds)} seeds for {B} images")
        x = images.float().div_(255)
        p = self._draw(seeds, H, W)
        return [self._view(x, v, {k: a[:, i] for k, a in p.items()})
                for i, v in enumerate(self.views)]

    def _view(self, x: torch.Tensor, view: _View, p: dict[str, np.ndarray]) -> torch.Tensor:
        B, _, H, W = x.shape
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        w, h, top, left = t(p["w"]), t(p["h"]), t(p["top"]), t(p["left"])
        sx = torch.where(torch.as_tensor(p["flip"]), -w / W, w / W)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / W - 1
        theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
        S = view.size
        grid = F.affine_grid(theta, [B, 3, S, S], align_corners=False)
        y = F.grid_sample(x, grid, mode="bicubic", padding_mode="border",
                          align_corners=False).clamp_(0, 1)
        y = self._jitter(y, p)
        gray = torch.as_tensor(p["gray"]).view(B, 1, 1, 1)
        y = torch.where(gray, _gray(y).expand_as(y), y)
        y = self._blur(y, view, p)
        sol = torch.as_tensor(p["solarize"]).view(B, 1, 1, 1)
        if bool(sol.any()):
            y = torch.where(sol & (y >= 128 / 255), 1 - y, y)
        return (y - self.mean) / self.std

    def _jitter(self, y: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
        B = y.shape[0]
        on = torch.as_tensor(p["jitter"])
        if not bool(on.any()):
            return y
        f = {k: torch.where(on, torch.as_tensor(p[k], dtype=torch.float32),
                            torch.tensor(0.0 if k == "hue" else 1.0))
             for k in ("brightness", "contrast", "saturation", "hue")}
        order = torch.as_tensor(p["order"])  # [B, 4]: op id at each position
        for pos in range(4):
            at = order[:, pos]
            for op, name in enumerate(("brightness", "contrast", "saturation", "hue")):
                sel = on & (at == op)
                if not bool(sel.any()):
                    continue
                if name == "hue":
                    y = self._hue(y, sel, f["hue"])
                    continue
                r = torch.where(sel, f[name], torch.tensor(1.0)).view(B, 1, 1, 1)
                if name == "brightness":
                    y = (y * r).clamp_(0, 1)
                elif name == "contrast":
                    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
                    y = _blend(y, m, r)
                else:
                    y = _blend(y, _gray(y), r)
        return y

    @staticmethod
    def _hue(y: torch.Tensor, sel: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        # a grey image (three equal channels) has no hue to rotate: skip those
        colour = sel & (y.amax(1) - y.amin(1)).flatten(1).amax(1).gt(0)
        if not bool(colour.any()):
            return y
        y = y.clone()
        for i in torch.nonzero(colour).flatten().tolist():
            y[i] = TF.adjust_hue(y[i], float(factor[i]))
        return y

    def _blur(self, y: torch.Tensor, view: _View, p: dict[str, np.ndarray]) -> torch.Tensor:
        on = torch.as_tensor(p["blur"])
        if view.blur_p <= 0 or not bool(on.any()):
            return y
        B, C, S, _ = y.shape
        k = view.kernel
        r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        sigma = torch.as_tensor(p["sigma"], dtype=torch.float32).view(B, 1)
        kern = torch.exp(-0.5 * (r / sigma) ** 2)
        kern = kern / kern.sum(1, keepdim=True)
        delta = (r == 0).float().expand(B, k)
        kern = torch.where(on.view(B, 1), kern, delta)
        kern = kern.repeat_interleave(C, 0)  # [B*C, k]
        z = y.reshape(1, B * C, S, S)
        z = F.pad(z, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        z = F.conv2d(z, kern.view(B * C, 1, 1, k), groups=B * C)
        z = F.conv2d(z, kern.view(B * C, 1, k, 1), groups=B * C)
        return z.view(B, C, S, S)

    def __repr__(self) -> str:
        v = self.views
        return (f"{type(self).__name__}(2 x {v[0].size}px global + {self.local_crops_number}"
                f" x {v[-1].size if self.local_crops_number else '-'}px local, batched)")
