"""DINO's multi-crop data augmentation on torchvision.transforms.v2.

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

Gaussian blur kernel size rule: the smallest odd size covering +-3 sigma of the largest
sigma, ``2 * ceil(3 * sigma_max) + 1`` (13 for sigma 2; 99.7% of the Gaussian's mass),
capped at the largest odd size not above the crop side so that small crops still work.
Sigma is in output pixels, as in the release (which blurs the resized crop).

All randomness comes from torch's global RNG, so ``torch.manual_seed`` makes it repeatable.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from ..zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MultiCropAugmentation", "blur_kernel_size", "to_uint8_rgb"]


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """Odd Gaussian kernel size covering +-3 ``sigma_max``, at most ``crop_size``."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    cap = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(k, cap))


def to_uint8_rgb(img: Image.Image | torch.Tensor, grayscale: bool = False) -> torch.Tensor:
    """A PIL image or uint8 tensor (``[3,H,W]``, ``[1,H,W]`` or ``[H,W]``) as a uint8
    ``[3, H, W]`` tensor; one-channel images are repeated to three channels, and
    ``grayscale=True`` turns colour images into three equal channels."""
    if isinstance(img, Image.Image):
        img = img.convert("L" if grayscale else "RGB")
        t = v2.functional.pil_to_tensor(img)
    elif isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8:
            raise TypeError(f"MultiCropAugmentation: expected a uint8 image tensor, got "
                            f"{img.dtype}")
        t = img.unsqueeze(0) if img.ndim == 2 else img
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"MultiCropAugmentation: expected an image tensor [C, H, W] with "
                             f"1, 3 or 4 channels, got shape {tuple(img.shape)}")
        t = t[:3]
        if grayscale and t.shape[0] == 3:
            t = v2.functional.rgb_to_grayscale(t, num_output_channels=1)
    else:
        raise TypeError(f"MultiCropAugmentation: expected a PIL image or a uint8 tensor, got "
                        f"{type(img).__name__}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


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
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must not be negative, got "
                             f"{local_crops_number}")
        self.local_crops_number = local_crops_number
        self.global_crop_size, self.local_crop_size = global_crop_size, local_crop_size
        self.grayscale = grayscale
        sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

        def pipeline(size: int, scale: Sequence[float], blur_p: float,
                     solarize_p: float) -> v2.Compose:
            steps: list[v2.Transform] = [
                v2.RandomResizedCrop(size, scale=tuple(scale),
                                     interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2,
                                               hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]
            if blur_p > 0:
                blur = v2.GaussianBlur(blur_kernel_size(sigma[1], size), sigma=sigma)
                steps.append(blur if blur_p >= 1 else v2.RandomApply([blur], p=blur_p))
            if solarize_p > 0:
                steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
            steps += [v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(mean=list(mean), std=list(std))]
            return v2.Compose(steps)

        self.global_transform1 = pipeline(global_crop_size, global_crops_scale, 1.0, 0.0)
        self.global_transform2 = pipeline(global_crop_size, global_crops_scale, 0.1, 0.2)
        self.local_transform = pipeline(local_crop_size, local_crops_scale, 0.5, 0.0)

    @classmethod
    def from_config(cls, cfg) -> "MultiCropAugmentation":
        """The augmentation a :class:`~dinofeat.training.config.TrainConfig` describes."""
        return cls(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                   cfg.global_crop_size, cfg.local_crop_size, mean=cfg.mean, std=cfg.std,
                   grayscale=cfg.grayscale, blur_sigma=cfg.blur_sigma)

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number

    def __call__(self, img: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        x = to_uint8_rgb(img, self.grayscale)
        crops = [self.global_transform1(x), self.global_transform2(x)]
        crops += [self.local_transform(x) for _ in range(self.local_crops_number)]
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(2 x {self.global_crop_size}px global + "
                f"{self.local_crops_number} x {self.local_crop_size}px local,\n"
                f"  global1={self.global_transform1},\n  global2={self.global_transform2},\n"
                f"  local={self.local_transform})")
