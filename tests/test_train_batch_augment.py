"""The multi-crop augmentation of whole batches (dinofeat.training.batch_augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinofeat.training.augment import MultiCropAugmentation
from dinofeat.training.batch_augment import BatchMultiCropAugmentation
from dinofeat.training.loop import train
from test_train_loop import image_dir, make_images, one_thread, tiny_config  # noqa: F401

KW = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), local_crops_number=3,
          global_crop_size=28, local_crop_size=14, mean=(0.5,) * 3, std=(0.25,) * 3,
          blur_sigma=(0.1, 0.5))


def _images(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):  # a bright garment-like blob on a dark background
        a, b = rng.integers(4, 12, 2)
        x[i, a:28 - b, b:28 - a] = rng.integers(120, 255)
    return x


def _plain(view_size, n, **over):
    """Parameters for _view that do nothing but the crop (whole image, no flip)."""
    p = {"w": np.full(n, 28.0), "h": np.full(n, 28.0), "top": np.zeros(n),
         "left": np.zeros(n), "flip": np.zeros(n, bool), "jitter": np.zeros(n, bool),
         "brightness": np.ones(n), "contrast": np.ones(n), "saturation": np.ones(n),
         "hue": np.zeros(n), "order": np.tile(np.arange(4), (n, 1)),
         "gray": np.zeros(n, bool), "blur": np.zeros(n, bool), "sigma": np.full(n, 0.3),
         "solarize": np.zeros(n, bool)}
    p.update(over)
    return p


def test_shapes_seeds_and_the_per_image_statistics():
    aug = BatchMultiCropAugmentation(**KW)
    ref = MultiCropAugmentation(**KW)
    x = _images(256)
    torch.manual_seed(0)
    batch = [(aug.prepare(Image.fromarray(a)), []) for a in x]
    crops, failures = aug.collate(batch)
    assert [tuple(c.shape) for c in crops] == [(256, 3, 28, 28)] * 2 + [(256, 3, 14, 14)] * 3
    assert failures == [] and failures.replaced == 0
    again, _ = aug.collate(batch)  # the seeds decide everything
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    torch.manual_seed(1)
    other, _ = aug.collate([(aug.prepare(Image.fromarray(a)), []) for a in x])
    assert not torch.equal(crops[0], other[0])
    # same recipe as the per-image pipeline: the crops' pixel statistics agree (in pixel
    # units, 0..1; 256 images: the batch means differ by ~0.01 between two seeds)
    per = [ref(Image.fromarray(a)) for a in x]
    for v in range(5):
        mine = crops[v] * 0.25
        theirs = torch.stack([p[v] for p in per]) * 0.25
        assert mine.mean().item() == pytest.approx(theirs.mean().item(), abs=0.04)
        assert mine.std().item() == pytest.approx(theirs.std().item(), rel=0.08)


def test_crop_flip_jitter_blur_and_solarise_by_hand():
    aug = BatchMultiCropAugmentation(**KW)
    x = torch.from_numpy(_images(4)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    xf = x.float() / 255
    g = aug.views[1]
    norm = lambda t: (t - 0.5) / 0.25  # noqa: E731
    # the whole image at its own size: bicubic sampling at the pixel centres is exact
    out = aug._view(xf, g, _plain(28, 4))
    torch.testing.assert_close(out, norm(xf), atol=1e-5, rtol=0)
    out = aug._view(xf, g, _plain(28, 4, flip=np.ones(4, bool)))
    torch.testing.assert_close(out, norm(xf.flip(-1)), atol=1e-5, rtol=0)
    # a crop box: the top-left 14x14 pixels, at 14 px (local view)
    loc = aug.views[2]
    out = aug._view(xf, loc, _plain(14, 4, w=np.full(4, 14.0), h=np.full(4, 14.0)))
    torch.testing.assert_close(out, norm(xf[..., :14, :14]), atol=1e-5, rtol=0)
    # brightness then contrast, as torchvision's functions compute them
    p = _plain(28, 4, jitter=np.ones(4, bool), brightness=np.full(4, 1.3),
               contrast=np.full(4, 0.7))
    want = TF.adjust_contrast(TF.adjust_brightness(xf, 1.3), 0.7)
    torch.testing.assert_close(aug._view(xf, g, p), norm(want), atol=1e-5, rtol=0)
    # Gaussian blur (one sigma per image) against torchvision's
    sig = np.array([0.2, 0.35, 0.5, 0.45])
    out = aug._view(xf, g, _plain(28, 4, blur=np.ones(4, bool), sigma=sig))
    for i in range(4):
        want = TF.gaussian_blur(xf[i], [g.kernel, g.kernel], [float(sig[i])] * 2)
        torch.testing.assert_close(out[i], norm(want), atol=1e-5, rtol=0)
    # solarisation at 128 of 255
    out = aug._view(xf, g, _plain(28, 4, solarize=np.ones(4, bool)))
    want = torch.where(xf >= 128 / 255, 1 - xf, xf)
    torch.testing.assert_close(out, norm(want), atol=1e-5, rtol=0)


def test_drawn_crop_boxes_follow_torchvision_rules():
    aug = BatchMultiCropAugmentation(**KW)
    p = aug._draw(list(range(2000)), 28, 28)
    area = p["w"] * p["h"] / 784
    assert p["w"].min() >= 1 and p["w"].max() <= 28 and (p["left"] + p["w"]).max() <= 28
    assert (p["top"] + p["h"]).max() <= 28 and p["top"].min() >= 0
    assert area[:, :2].min() >= 0.4 - 0.08 and area[:, 2:].max() <= 0.4 + 0.1
    assert p["flip"].mean() == pytest.approx(0.5, abs=0.03)
    assert p["jitter"].mean() == pytest.approx(0.8, abs=0.03)
    assert p["gray"].mean() == pytest.approx(0.2, abs=0.03)
    assert p["blur"][:, 0].all() and p["blur"][:, 1].mean() == pytest.approx(0.1, abs=0.03)
    assert p["blur"][:, 2:].mean() == pytest.approx(0.5, abs=0.03)
    assert not p["solarize"][:, [0, 2, 3, 4]].any()
    assert p["solarize"][:, 1].mean() == pytest.approx(0.2, abs=0.03)
    assert {tuple(o) for o in p["order"].reshape(-1, 4)} == \
        {tuple(o) for o in __import__("itertools").permutations(range(4))}


def test_training_with_batch_augmentation_runs_and_resumes_alike(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, 12)
    cfg = tiny_config(d, tmp_path / "a", batch_augment=True, epochs=1, warmup_epochs=0,
                      warmup_teacher_temp_epochs=0, num_workers=1)
    res = train(cfg)
    assert res.iteration == 3 and np.isfinite(res.history[-1]["loss"])
    again = train(cfg.replace(output_dir=str(tmp_path / "b"), num_workers=0))
    assert again.history[-1]["loss"] == res.history[-1]["loss"]  # workers change nothing
