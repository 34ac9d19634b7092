"""DinoModel.embed / iter_embed / patch_features, checked against direct computations."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinofeat
from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat import images as I
from dinofeat.embedding import feature_dim
from dinofeat.model import save_safetensors


@pytest.fixture
def pics(make_image):
    return [make_image(40 + 7 * i, 48 + 3 * i, seed=i) for i in range(5)]


@pytest.fixture
def folder(tmp_path, pics):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for i, img in enumerate(pics):
        img.save(d / ("sub" if i % 2 else "") / f"im{i}.png")
    return d


def _input(model, pics):
    """The normalised batch the model's "dino" preprocessing makes of ``pics``."""
    tf = I.ImageTransform(model.preprocessing, model.patch_size)
    u8 = torch.stack([tf(I.pil_to_tensor(p)) for p in pics])
    return I.normalize_batch(u8, model.preprocessing.mean, model.preprocessing.std)


def _tokens_per_block(model, x):
    """Independent forward through the timm modules: tokens after every block."""
    vit = model.backbone.vit
    t = model.backbone.prepare_tokens(x)
    out = []
    for blk in vit.blocks:
        t = blk(t)
        out.append(t)
    return out


def test_every_pool_against_direct_computation(tiny_vit, pics):
    m = tiny_vit
    x = _input(m, pics)
    with torch.no_grad():
        blocks = _tokens_per_block(m, x)
        normed = [m.backbone.vit.norm(t) for t in blocks]
    out = normed[-1]
    cls, patches = out[:, 0], out[:, 1:]
    B, N, D = patches.shape
    h = w = int(math.isqrt(N))
    gem_ref = F.avg_pool2d(patches.clamp(min=1e-6).reshape(B, h, w, D).permute(0, 3, 1, 2)
                           .pow(4), (h, w)).pow(0.25).reshape(B, D)
    refs = {
        "cls": cls,
        "mean": patches.mean(1),
        "gem": gem_ref,
        "cls+gem": torch.cat([cls, gem_ref], 1),
    }
    for pool, ref in refs.items():
        raw = m.embed(pics, pool=pool, normalize=False)
        assert raw.shape == (5, feature_dim(m, pool)) and raw.dtype == torch.float32
        torch.testing.assert_close(raw, ref, atol=2e-5, rtol=1e-4)
        unit = m.embed(pics, pool=pool)
        torch.testing.assert_close(unit, F.normalize(ref, dim=-1), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(unit.norm(dim=1), torch.ones(5))
    # linear evaluation: [CLS] of the last 4 blocks; [CLS] + mean patch, interleaved
    lin4 = m.embed(pics, n_last_blocks=4, normalize=False)
    torch.testing.assert_close(lin4, torch.cat([t[:, 0] for t in normed[-4:]], 1), atol=2e-5,
                               rtol=1e-4)
    avg = m.embed(pics, avgpool=True, normalize=False)
    assert avg.shape == (5, 2 * D) == (5, feature_dim(m, "cls", 1, True))
    torch.testing.assert_close(avg[:, 0::2], cls, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(avg[:, 1::2], patches.mean(1), atol=2e-5, rtol=1e-4)
    # more blocks with the average token: the concatenated layout, as linear heads take it
    cat = m.embed(pics, n_last_blocks=2, avgpool=True, normalize=False)
    assert cat.shape == (5, 3 * D) == (5, feature_dim(m, "cls", 2, True))
    torch.testing.assert_close(cat, torch.cat([normed[-2][:, 0], cls, patches.mean(1)], 1),
                               atol=2e-5, rtol=1e-4)


def test_multiscale_average(tiny_vit, pics):
    m = tiny_vit
    x = torch.randn(2, 3, 64, 64)
    got = m.embed(x, multiscale=True)
    with torch.no_grad():
        parts = []
        for s in (1, 1 / math.sqrt(2), 0.5):
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                align_corners=False)
            hs, ws = xs.shape[-2] // 16 * 16, xs.shape[-1] // 16 * 16  # 64 -> 45 -> 32
            parts.append(m(xs[..., :hs, :ws]))
        ref = F.normalize(sum(parts) / 3, dim=-1)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert m.embed(pics, multiscale=True, pool="cls+gem").shape == (5, 384)


def test_float_tensor_is_model_input(tiny_vit):
    x = torch.randn(3, 3, 48, 32)
    with torch.no_grad():
        ref = F.normalize(tiny_vit(x), dim=-1)
    torch.testing.assert_close(tiny_vit.embed(x), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tiny_vit.embed(x[0]), ref[:1], atol=1e-6, rtol=1e-5)


def test_deterministic_and_batch_invariant(tiny_vit, pics):
    a = tiny_vit.embed(pics, batch_size=5)
    assert torch.equal(a, tiny_vit.embed(pics, batch_size=5))
    for bs in (1, 2, 3):
        torch.testing.assert_close(tiny_vit.embed(pics, batch_size=bs), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_vit.embed(pics[3]), a[3:4], atol=1e-5, rtol=0)
    # decoding in two worker processes changes nothing
    torch.testing.assert_close(tiny_vit.embed(pics, batch_size=2, num_workers=2), a,
                               atol=1e-5, rtol=0)


def test_input_kinds_agree(tiny_vit, pics, folder):
    ref = tiny_vit.embed(pics)
    paths = [folder / "im0.png", folder / "sub" / "im1.png", folder / "im2.png",
             folder / "sub" / "im3.png", folder / "im4.png"]
    arrays = [np.asarray(p) for p in pics]
    tensors = [I.pil_to_tensor(p) for p in pics]
    for inp in (paths, [str(p) for p in paths], arrays, tensors):
        torch.testing.assert_close(tiny_vit.embed(inp), ref, atol=1e-5, rtol=0)
    feats, keys = tiny_vit.embed(folder, return_keys=True)
    assert keys == I.list_images(folder)
    order = [int(k.stem[2:]) for k in keys]
    torch.testing.assert_close(feats, ref[order], atol=1e-5, rtol=0)
    same = [pics[0].resize((40, 40))] * 2
    stacked = torch.from_numpy(np.stack([np.asarray(p) for p in same]))
    torch.testing.assert_close(tiny_vit.embed(stacked.numpy()), tiny_vit.embed(same))
    torch.testing.assert_close(tiny_vit.embed(stacked.permute(0, 3, 1, 2)), tiny_vit.embed(same))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tiny_vit.embed(stacked)  # channels-last tensors are refused, not misread


def test_whole_mode_groups_sizes(tiny_vit, pics):
    one_by_one = torch.cat([tiny_vit.embed(p, preprocessing="whole", size=48) for p in pics])
    together = tiny_vit.embed(pics, preprocessing="whole", size=48, batch_size=4)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    x = _input(tiny_vit, pics)  # "whole" really differs from the crop
    assert (together - F.normalize(tiny_vit(x), dim=-1)).abs().max() > 1e-3


def test_folder_with_broken_files(tiny_vit, folder, caplog):
    (folder / "aa_broken.jpg").write_bytes(b"not a jpeg")
    (folder / "sub" / "zz_empty.png").write_bytes(b"")
    good = [p for p in I.list_images(folder) if p.stat().st_size > 20]
    with caplog.at_level(logging.WARNING, logger="dinofeat"):
        feats, keys = tiny_vit.embed(folder, return_keys=True, batch_size=2)
    assert keys == good and feats.shape == (len(good), 192)
    torch.testing.assert_close(feats, tiny_vit.embed(good), atol=1e-5, rtol=0)
    text = caplog.text
    assert "aa_broken.jpg" in text and "skipped 2 unreadable" in text
    stream = tiny_vit.iter_embed(folder, batch_size=3)
    batches = list(stream)
    assert all(len(k) == f.shape[0] <= 3 for k, f in batches)
    assert [k for ks, _ in batches for k in ks] == good
    assert sorted(s.key.name for s in stream.skipped) == ["aa_broken.jpg", "zz_empty.png"]
    assert all(s.reason for s in stream.skipped) and len(stream) == len(good) + 2
    # an explicit list of paths raises on the broken one, unless asked to skip
    with pytest.raises(I.ImageReadError, match="aa_broken.jpg"):
        tiny_vit.embed([good[0], folder / "aa_broken.jpg"])
    assert tiny_vit.embed([good[0], folder / "aa_broken.jpg"],
                          skip_unreadable=True).shape == (1, 192)


def test_reduced_precision_close(tiny_vit, pics):
    ref = tiny_vit.embed(pics)
    bf = tiny_vit.embed(pics, precision="bf16")
    assert bf.dtype == torch.float32
    assert (bf * ref).sum(1).min() > 0.97  # cosine similarity
    with pytest.raises(ValueError, match="precision"):
        tiny_vit.embed(pics, precision="fp8")


def test_option_errors(tiny_vit, pics):
    with pytest.raises(ValueError, match="pool must be"):
        tiny_vit.embed(pics, pool="max")
    with pytest.raises(ValueError, match="n_last_blocks=5"):
        tiny_vit.embed(pics, n_last_blocks=5)
    with pytest.raises(ValueError, match="interleaved"):
        tiny_vit.embed(pics, n_last_blocks=2, avgpool=True, layout="interleaved")
    with pytest.raises(TypeError, match="unknown feature option.*poll"):
        tiny_vit.embed(pics, poll="cls")
    with pytest.raises(ValueError, match="cannot be combined"):
        tiny_vit.embed(pics, n_last_blocks=2, pool="gem")
    with pytest.raises(ValueError, match="preprocessing must be"):
        tiny_vit.embed(pics, preprocessing="square")
    with pytest.raises(ValueError, match="batch_size"):
        tiny_vit.embed(pics, batch_size=0)


def test_resnet(make_image):
    from dinofeat.backbones import build_backbone
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    m = dinofeat.DinoModel(build_backbone("resnet50"), name="rn",
                           preprocessing=Preprocessing(resize_size=40, crop_size=32)).eval()
    imgs = [make_image(40, 50, seed=s) for s in range(2)]
    f = m.embed(imgs)
    assert f.shape == (2, 2048)
    with torch.no_grad():
        ref = F.normalize(m.backbone.net(_input(m, imgs).contiguous()), dim=-1)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)
    for bad in (dict(pool="gem"), dict(n_last_blocks=2)):
        with pytest.raises(TypeError, match="ResNet|ViT"):
            m.embed(imgs, **bad)
    with pytest.raises(TypeError, match="ResNet"):
        m.patch_features(imgs)
    with pytest.raises(TypeError, match="ViT"):
        m.attention_maps(imgs[0])


def test_patch_features(tiny_vit, pics):
    m = tiny_vit
    x = _input(m, pics)
    with torch.no_grad():
        blocks = _tokens_per_block(m, x)
    norm = m.backbone.vit.norm
    pf = m.patch_features(pics)
    assert pf.shape == (5, 2, 2, 192)
    torch.testing.assert_close(pf, norm(blocks[-1])[:, 1:].reshape(5, 2, 2, 192), atol=2e-5,
                               rtol=1e-4)
    # patch order is row-major: token 1 + r * w + c sits at [r, c]
    torch.testing.assert_close(pf[:, 1, 0], norm(blocks[-1])[:, 3], atol=2e-5, rtol=1e-4)
    one = m.patch_features(pics, blocks=3)
    torch.testing.assert_close(one, norm(blocks[3])[:, 1:].reshape(5, 2, 2, 192), atol=2e-5,
                               rtol=1e-4)
    raw = m.patch_features(pics, blocks=3, norm=False)
    torch.testing.assert_close(raw, blocks[3][:, 1:].reshape(5, 2, 2, 192), atol=2e-5, rtol=1e-4)
    many = m.patch_features(pics, blocks=[-1, 0])
    assert many.shape == (5, 2, 2, 2, 192)
    torch.testing.assert_close(many[:, 0], pf, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(many[:, 1], norm(blocks[0])[:, 1:].reshape(5, 2, 2, 192),
                               atol=2e-5, rtol=1e-4)
    whole = m.patch_features(pics[0], preprocessing="whole", size=64)
    assert whole.shape == (1, 3, 4, 192)  # 40 x 48 -> 53 x 64 -> 48 x 64 pixels
    with pytest.raises(ValueError, match="different sizes"):
        m.patch_features(pics, preprocessing="whole", size=64)
    with pytest.raises(ValueError, match="out of range"):
        m.patch_features(pics, blocks=4)


def test_module_level_shortcuts(tiny_vit, pics, tmp_path):
    from dinofeat import shortcuts
    ref = tiny_vit.embed(pics)
    torch.testing.assert_close(dinofeat.embed(pics, model=tiny_vit), ref)
    path = save_safetensors(tiny_vit, tmp_path / "tiny.safetensors")
    shortcuts.clear_model_cache()
    try:
        a = dinofeat.embed(pics, model=str(path), device="cpu")
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)
        assert shortcuts.get_model(str(path), "cpu") is shortcuts.get_model(str(path), "cpu")
        maps = dinofeat.attention_maps(pics[0], model=str(path), device="cpu")
        assert maps.heads.shape[0] == 3
    finally:
        shortcuts.clear_model_cache()
    with pytest.raises(TypeError, match="model must be"):
        dinofeat.embed(pics, model=3)
