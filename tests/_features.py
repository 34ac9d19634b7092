"""Fixtures of the features tests (test_images, test_embed, test_attention, test_extract):
a tiny random-weight ViT and generated pictures. Imported by those modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vit():
    """A random-weight ViT-Tiny/16 with 4 blocks (dim 192, 3 heads), trained grid 2x2, as
    a DinoModel on CPU whose "dino" preprocessing is resize 37 + centre crop 32. Shared by
    the whole session: do not modify it (copy.deepcopy it first)."""
    import torch

    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=4, num_heads=3,
                                img_size=32)
    return DinoModel(vit, name="tiny-test",
                     preprocessing=Preprocessing(resize_size=37, crop_size=32)).eval()


@pytest.fixture
def make_image():
    """``make(height, width, seed=0, mode="RGB")``: a smooth, non-symmetric test picture
    (gradients plus a few blobs) as a PIL image of that mode."""
    import numpy as np
    from PIL import Image

    def make(height: int, width: int, seed: int = 0, mode: str = "RGB"):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        chans = []
        for c in range(3):
            a, b, f = rng.uniform(0.2, 1.0, 3)
            v = 120 * (x / width) * a + 100 * (y / height) * b + 35 * np.sin(f * x / 5 + c)
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            v += 90 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * height * width + 1))
            chans.append(v)
        arr = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        return img if mode == "RGB" else img.convert(mode)

    return make
