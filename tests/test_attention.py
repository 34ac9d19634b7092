"""Attention maps: values against an explicit softmax(QK^T), masks against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat import images as I
from dinofeat.attention import AttentionMaps, colorize, mass_masks


def _explicit_cls_attention(model, x: torch.Tensor) -> torch.Tensor:
    """[CLS] row of the last block's attention, written out: ``[heads, N]`` over patches."""
    vit = model.backbone.vit
    with torch.no_grad():
        t = model.backbone.prepare_tokens(x)
        for blk in vit.blocks[:-1]:
            t = blk(t)
        last = vit.blocks[-1]
        y = F.layer_norm(t, (t.shape[-1],), last.norm1.weight, last.norm1.bias, eps=1e-6)
        qkv = y @ last.attn.qkv.weight.T + last.attn.qkv.bias  # [1, 1+N, 3D]
        heads = model.num_heads
        hd = t.shape[-1] // heads
        q, k, _ = qkv.reshape(1, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(hd), dim=-1)  # [1, h, 1+N, 1+N]
    return a[0, :, 0, 1:]


def _brute_force_min_count(values: np.ndarray, threshold: float) -> int:
    """Fewest cells whose sum reaches ``threshold`` of the total, over all subsets."""
    n = values.size
    subsets = np.array(list(itertools.product([0, 1], repeat=n)), dtype=bool)
    mass = subsets.astype(np.float64) @ values.ravel().astype(np.float64)
    ok = mass >= threshold * values.sum(dtype=np.float64) * (1 - 1e-12)  # summation order
    return int(subsets[ok].sum(axis=1).min())


def test_maps_equal_explicit_softmax(tiny_vit, make_image):
    img = make_image(45, 70)  # W=70, H=45 -> cropped to 64 x 32: a 2 x 4 patch grid
    maps = tiny_vit.attention_maps(img)
    assert isinstance(maps, AttentionMaps)
    assert maps.image.shape == (32, 64, 3) and maps.image.dtype == np.uint8
    assert (maps.image == np.asarray(img)[:32, :64]).all()  # top-left crop, unresized
    assert maps.heads.shape == (3, 32, 64) and maps.heads.dtype == np.float32
    assert maps.grid.shape == (3, 2, 4)
    u8 = I.pil_to_tensor(img)[:, :32, :64]
    x = I.normalize_batch(u8[None], tiny_vit.preprocessing.mean, tiny_vit.preprocessing.std)
    ref = _explicit_cls_attention(tiny_vit, x).reshape(3, 2, 4).numpy()
    np.testing.assert_allclose(maps.grid, ref, atol=1e-6, rtol=1e-5)
    # raw softmax weights over patches: below 1 by the [CLS]->[CLS] weight
    assert (maps.grid.reshape(3, -1).sum(1) < 1).all()
    # nearest upsampling: each patch's value fills its 16 x 16 pixels
    np.testing.assert_array_equal(maps.heads[:, ::16, ::16], maps.grid)
    np.testing.assert_array_equal(maps.heads[:, 17:32, 49:64],
                                  np.broadcast_to(maps.grid[:, 1:2, 3:4], (3, 15, 15)))
    np.testing.assert_allclose(maps.mean, maps.heads.mean(0), rtol=1e-6)


def test_size_resizes_short_side(tiny_vit, make_image):
    img = make_image(40, 60)
    maps = tiny_vit.attention_maps(img, size=50)  # 40x60 -> 50x75 -> 48x64 cropped
    assert maps.image.shape == (48, 64, 3) and maps.grid.shape == (3, 3, 4)
    t = tiny_vit.attention_maps(I.pil_to_tensor(img), size=50)
    np.testing.assert_allclose(t.heads, maps.heads, rtol=1e-6)


def test_masks_are_fewest_patches_holding_the_mass(tiny_vit, make_image):
    maps = tiny_vit.attention_maps(make_image(48, 64, seed=3), threshold=0.6)
    assert maps.masks.dtype == bool and maps.masks.shape == maps.heads.shape
    grid_masks = maps.masks[:, ::16, ::16]
    np.testing.assert_array_equal(maps.masks, np.repeat(np.repeat(grid_masks, 16, 1), 16, 2))
    for h in range(maps.num_heads):
        v = maps.grid[h].astype(np.float64)
        kept = v[grid_masks[h]]
        assert kept.sum() >= 0.6 * v.sum()
        assert grid_masks[h].sum() == _brute_force_min_count(v, 0.6)
        # the kept patches are the largest ones
        assert kept.min() >= v[~grid_masks[h]].max(initial=-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.6, 0.9, 1.0])
def test_mass_masks_brute_force(seed, threshold):
    rng = np.random.default_rng(seed)
    grid = rng.exponential(size=(2, 3, 4)) ** 3
    masks = mass_masks(grid, threshold)
    for g, m in zip(grid, masks):
        assert g[m].sum() >= threshold * g.sum() - 1e-12
        assert m.sum() == _brute_force_min_count(g, threshold)


def test_mass_masks_uniform_and_errors():
    m = mass_masks(np.ones((1, 4, 5)), 0.6)
    assert m.sum() == 12  # ceil(0.6 * 20)
    with pytest.raises(ValueError, match="threshold"):
        mass_masks(np.ones((2, 2)), 0.0)


def test_save_writes_pngs_that_open(tiny_vit, make_image, tmp_path):
    maps = tiny_vit.attention_maps(make_image(40, 50))
    written = maps.save(tmp_path / "out")
    assert len(written) == 3 + 3 * maps.num_heads + 1
    assert len(set(written)) == len(written) and all(p.suffix == ".png" for p in written)
    for p in written:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG"
            if p.name == "masks.png":  # masks side by side, 2-px gaps, a 14-px label band
                h = maps.num_heads
                assert im.size == (48 * h + 2 * (h - 1), 14 + 32)
                strip = np.asarray(im)
                for i in range(h):  # each head's band carries its (white) label
                    assert strip[:14, i * 50:i * 50 + 48].max() > 128
                    assert (strip[14:, i * 50:i * 50 + 48] > 0).mean() == pytest.approx(
                        maps.masks[i].mean())
            else:
                assert im.size == (48, 32)  # 50 x 40 cropped to 48 x 32
    assert {"image.png", "mean_overlay.png", "head00_heatmap.png", "head02_mask.png"} <= {
        p.name for p in written}
    heat = colorize(maps.heads[0])
    assert heat.shape == (32, 48, 3) and heat.dtype == np.uint8
    # brightness grows with the value
    lum = heat.astype(float) @ np.array([0.299, 0.587, 0.114])
    order = np.argsort(maps.grid[0].ravel())
    assert (np.diff(lum[::16, ::16].ravel()[order]) >= 0).all()


def test_attention_errors(tiny_vit, make_image, tmp_path):
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        tiny_vit.attention_maps(make_image(10, 40))
    with pytest.raises(ValueError, match="threshold"):
        tiny_vit.attention_maps(make_image(32, 32), threshold=1.5)
    with pytest.raises(ValueError, match="one image"):
        tiny_vit.attention_maps([make_image(32, 32), make_image(32, 32)])
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(I.ImageReadError, match="bad.jpg"):
        tiny_vit.attention_maps(tmp_path / "bad.jpg")
    # a normalised float tensor works too, and is shown un-normalised
    img = make_image(32, 48)
    u8 = I.pil_to_tensor(img)
    x = I.normalize_batch(u8[None], tiny_vit.preprocessing.mean, tiny_vit.preprocessing.std)
    a, b = tiny_vit.attention_maps(x), tiny_vit.attention_maps(img)
    np.testing.assert_allclose(a.heads, b.heads, rtol=1e-5, atol=1e-7)
    assert np.abs(a.image.astype(int) - b.image).max() <= 1
