"""DINO's multi-crop data augmentation, on PIL images in the loader workers.

One image becomes 2 global crops and N local crops, each independently augmented:

============================  =============  =============  =============
step                          global 1       global 2       local (each)
============================  =============  =============  =============
random resized crop, bicubic  scale (.4, 1)  scale (.4, 1)  scale (.05, .4)
horizontal flip               p 0.5          p 0.5          p 0.5
colour jitter (.4,.4,.2,.1)   p 0.8          p 0.8          p 0.8
grayscale                     p 0.2          p 0.2          p 0.2
Gaussian blur, sigma U[.1,2]  p 1.0          p 0.1          p 0.5
solarise (threshold 128)      --             p 0.2          --
normalise mean/std            yes            yes            yes
============================  =============  =============  =============

Cost: every step but the last runs on 8-bit PIL images (torchvision.transforms.v2 with PIL
kernels, as the release's torchvision pipeline did): the crop is cut and resized first, so
the rest works on 224- or 96-pixel images, and the blur is PIL's (three box passes whose
cost does not grow with sigma; a 13x13 float convolution cost 40% more per image).
Only the final conversion to a normalised float tensor is float work, done in one pass.
Sigma is in output pixels, as in the release (which blurs the resized crop).

All randomness comes from torch's global RNG, so ``torch.manual_seed`` makes it repeatable.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as v1
from torchvision.transforms import functional as F1
from torchvision.transforms import v2

from ..zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MultiCropAugmentation", "RandomResizedCropPIL", "RandomFlipPIL",
           "RandomColorJitterPIL", "RandomGrayscalePIL", "RandomGaussianBlur",
           "RandomSolarizePIL", "NormalizeToTensor", "ViewTransform", "blur_kernel_size",
           "to_uint8_rgb", "to_rgb_pil", "VIEW_PROBABILITIES", "check_crops_number",
           "recipe_from_config"]

#: (Gaussian blur, solarisation) probabilities of each view of the multi-crop recipe:
#: the first global crop is always blurred, the second rarely but may be solarised, the
#: local crops are blurred half of the time. Both augmentation classes read them here.
VIEW_PROBABILITIES = {"global1": (1.0, 0.0), "global2": (0.1, 0.2), "local": (0.5, 0.0)}


def check_crops_number(local_crops_number: int) -> None:
    if local_crops_number < 0:
        raise ValueError(f"local_crops_number must not be negative, got {local_crops_number}")


def recipe_from_config(cfg) -> dict:
    """The augmentation arguments a :class:`~dinofeat.training.config.TrainConfig` holds
    (the constructor arguments of both augmentation classes)."""
    return dict(global_crops_scale=cfg.global_crops_scale,
                local_crops_scale=cfg.local_crops_scale,
                local_crops_number=cfg.local_crops_number,
                global_crop_size=cfg.global_crop_size, local_crop_size=cfg.local_crop_size,
                mean=cfg.mean, std=cfg.std, grayscale=cfg.grayscale,
                blur_sigma=cfg.blur_sigma)


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """Odd Gaussian kernel size covering +-3 ``sigma_max``, at most ``crop_size`` (for
    blurs computed as a convolution, e.g. on GPU tensors)."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    cap = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(k, cap))


def _check_tensor(img: torch.Tensor) -> torch.Tensor:
    if img.dtype != torch.uint8:
        raise TypeError(f"MultiCropAugmentation: expected a uint8 image tensor, got "
                        f"{img.dtype}")
    t = img.unsqueeze(0) if img.ndim == 2 else img
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"MultiCropAugmentation: expected an image tensor [C, H, W] with "
                         f"1, 3 or 4 channels, got shape {tuple(img.shape)}")
    return t[:3]


def to_uint8_rgb(img: Image.Image | torch.Tensor, grayscale: bool = False) -> torch.Tensor:
    """A PIL image or uint8 tensor (``[3,H,W]``, ``[1,H,W]`` or ``[H,W]``) as a uint8
    ``[3, H, W]`` tensor; one-channel images are repeated to three channels, and
    ``grayscale=True`` turns colour images into three equal channels."""
    if isinstance(img, Image.Image):
        img = img.convert("L" if grayscale else "RGB")
        t = v2.functional.pil_to_tensor(img)
    elif isinstance(img, torch.Tensor):
        t = _check_tensor(img)
        if grayscale and t.shape[0] == 3:
            t = v2.functional.rgb_to_grayscale(t, num_output_channels=1)
    else:
        raise TypeError(f"MultiCropAugmentation: expected a PIL image or a uint8 tensor, got "
                        f"{type(img).__name__}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def to_rgb_pil(img: Image.Image | torch.Tensor, grayscale: bool = False) -> Image.Image:
    """A PIL image or uint8 tensor (as for :func:`to_uint8_rgb`) as an RGB PIL image
    (three equal channels for one-channel images or with ``grayscale=True``)."""
    if isinstance(img, Image.Image):
        if grayscale or img.mode in ("L", "I;16", "I", "F", "1"):
            return img.convert("L").convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, torch.Tensor):
        t = _check_tensor(img)
        if t.shape[0] == 1 or grayscale:
            if t.shape[0] == 3:
                t = v2.functional.rgb_to_grayscale(t, num_output_channels=1)
            return Image.fromarray(t[0].numpy(), "L").convert("RGB")
        return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), "RGB")
    raise TypeError(f"MultiCropAugmentation: expected a PIL image or a uint8 tensor, got "
                    f"{type(img).__name__}")


class RandomGaussianBlur:
    """With probability ``p``, PIL's Gaussian blur with sigma drawn uniformly from
    ``sigma`` (in pixels of the image it is given). Draws from torch's RNG."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), p: float = 1.0):
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return img
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item())
        return self.blur(img, sigma)

    def blur(self, img: Image.Image, sigma: float) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, p={self.p})"


class NormalizeToTensor:
    """RGB PIL image -> normalised float32 ``[3, H, W]`` tensor, ``(x / 255 - mean) / std``
    in one pass over the pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(self.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(3, 1, 1)
        self._shift = (-torch.tensor(self.mean, dtype=torch.float32) / std_t).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return torch.addcmul(self._shift, x, self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class RandomResizedCropPIL:
    """torchvision's random resized crop (the same box distribution: area fraction
    ``scale``, log-uniform aspect ratio in (3/4, 4/3), 10 tries then the central crop),
    cut and resized to ``size`` x ``size`` in one bicubic PIL resize."""

    def __init__(self, size: int, scale: Sequence[float]):
        self.size, self.scale = int(size), (float(scale[0]), float(scale[1]))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = v1.RandomResizedCrop.get_params(img, list(self.scale),
                                                          list(self.ratio))
        return img.resize((self.size, self.size), Image.BICUBIC,
                          box=(left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, bicubic)"


class RandomFlipPIL:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomColorJitterPIL:
    """With probability ``p``, torchvision's colour jitter: brightness, contrast and
    saturation factors uniform in ``[1 - x, 1 + x]``, hue shift uniform in ``[-h, h]``,
    applied in a random order (PIL kernels)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, p: float = 0.8):
        self.ranges = ([1 - brightness, 1 + brightness], [1 - contrast, 1 + contrast],
                       [1 - saturation, 1 + saturation], [-hue, hue])
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        order, b, c, s, h = v1.ColorJitter.get_params(*self.ranges)
        for i in order.tolist():
            if i == 0:
                img = F1.adjust_brightness(img, b)
            elif i == 1:
                img = F1.adjust_contrast(img, c)
            elif i == 2:
                img = F1.adjust_saturation(img, s)
            else:
                img = F1.adjust_hue(img, h)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ranges={self.ranges}, p={self.p})"


class RandomGrayscalePIL:
    """With probability ``p``, the luma in all three channels."""

    def __init__(self, p: float = 0.2):
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return img.convert("L").convert("RGB")
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomSolarizePIL:
    """With probability ``p``, pixels at or above ``threshold`` inverted."""

    def __init__(self, threshold: int = 128, p: float = 0.2):
        self.threshold, self.p = int(threshold), float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return ImageOps.solarize(img, self.threshold)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, p={self.p})"


class ViewTransform:
    """One view's steps in order (``transforms``), image -> normalised tensor."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.transforms))})"


class MultiCropAugmentation:
    """``__call__(img) -> [global1, global2, local_1 .. local_N]``: float tensors
    ``[3, G, G]`` (two) then ``[3, L, L]`` (``local_crops_number`` of them), normalised.

    ``img``: a PIL image (any mode) or a uint8 tensor ``[3|1, H, W]``.
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4),
                 local_crops_number: int = 8, global_crop_size: int = 224,
                 local_crop_size: int = 96,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 grayscale: bool = False, blur_sigma: Sequence[float] = (0.1, 2.0)):
        check_crops_number(local_crops_number)
        self.local_crops_number = local_crops_number
        self.global_crop_size, self.local_crop_size = global_crop_size, local_crop_size
        self.grayscale = grayscale
        self.mean, self.std = tuple(mean), tuple(std)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        to_tensor = NormalizeToTensor(mean, std)

        def pipeline(size: int, scale: Sequence[float], blur_p: float,
                     solarize_p: float) -> ViewTransform:
            # PIL's 8-bit kernels step by step, one float pass at the end
            steps: list = [RandomResizedCropPIL(size, scale), RandomFlipPIL(0.5),
                           RandomColorJitterPIL(0.4, 0.4, 0.2, 0.1, p=0.8),
                           RandomGrayscalePIL(0.2)]
            if blur_p > 0:
                steps.append(RandomGaussianBlur(self.blur_sigma, p=blur_p))
            if solarize_p > 0:
                steps.append(RandomSolarizePIL(128, p=solarize_p))
            steps.append(to_tensor)
            return ViewTransform(steps)

        p = VIEW_PROBABILITIES
        self.global_transform1 = pipeline(global_crop_size, global_crops_scale, *p["global1"])
        self.global_transform2 = pipeline(global_crop_size, global_crops_scale, *p["global2"])
        self.local_transform = pipeline(local_crop_size, local_crops_scale, *p["local"])

    @classmethod
    def from_config(cls, cfg) -> "MultiCropAugmentation":
        """The augmentation a :class:`~dinofeat.training.config.TrainConfig` describes."""
        return cls(**recipe_from_config(cfg))

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def __call__(self, img: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        x = to_rgb_pil(img, self.grayscale)
        crops = [self.global_transform1(x), self.global_transform2(x)]
        crops += [self.local_transform(x) for _ in range(self.local_crops_number)]
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(2 x {self.global_crop_size}px global + "
                f"{self.local_crops_number} x {self.local_crop_size}px local,\n"
                f"  global1={self.global_transform1},\n  global2={self.global_transform2},\n"
                f"  local={self.local_transform})")
