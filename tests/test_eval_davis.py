"""DAVIS: J and F on hand-made masks, label propagation on crafted features, a synthetic
video end to end, and `dinofeat eval davis`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinofeat.eval import (boundary_f_measure, davis_palette, evaluate_sequence,
                           propagate_labels, region_jaccard, segment_video)
from dinofeat.eval.davis import _dilate, boundary_map, frame_size, neighborhood_mask


# ----------------------------------------------------------------------- J
def test_region_jaccard_by_hand():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 0:3] = True  # 6 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:3] = True  # 4 pixels, 2 of them in gt
    assert region_jaccard(pred, gt) == pytest.approx(2 / 8)
    assert region_jaccard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    void = np.zeros((4, 4), bool)
    void[2, :] = True  # drops pred's 2 pixels outside gt
    assert region_jaccard(pred, gt, void) == pytest.approx(2 / 6)


# ----------------------------------------------------------------------- F
def test_boundary_map_by_hand():
    m = np.zeros((5, 5), bool)
    m[1:3, 1:3] = True
    want = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)}
    assert set(zip(*np.nonzero(boundary_map(m)))) == want


def test_dilation_is_a_disk():
    b = np.zeros((15, 15), bool)
    b[7, 7] = True
    b[0, 14] = True
    for r in (0, 1, 2, 4):
        d = _dilate(b, r)
        yy, xx = np.mgrid[:15, :15]
        ref = ((yy - 7) ** 2 + (xx - 7) ** 2 <= r * r) | ((yy - 0) ** 2 + (xx - 14) ** 2 <= r * r)
        assert np.array_equal(d, ref), r


def test_boundary_f_by_hand():
    gt = np.zeros((7, 7), bool)
    gt[1:3, 1:3] = True
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert boundary_f_measure(np.zeros_like(gt), gt) == 0.0
    pred = np.zeros_like(gt)
    pred[1:3, 4:6] = True
    # Boundaries: gt columns 0-2, pred columns 3-5 of rows 0-2 (8 pixels each). Within one
    # pixel (a plus-shaped disk) only the three pairs facing each other across the
    # column 2/3 edge match: precision = recall = 3/8.
    assert boundary_f_measure(pred, gt, bound_th=1) == pytest.approx(3 / 8)
    assert boundary_f_measure(pred, gt, bound_th=5) == 1.0
    # The default tolerance is ceil(0.008 x diagonal): 8 pixels at 480 x 854.
    big_gt = np.zeros((480, 854), bool)
    big_gt[100:200, 100:300] = True
    shifted = np.roll(big_gt, 8, axis=1)
    assert boundary_f_measure(shifted, big_gt) == 1.0
    assert boundary_f_measure(np.roll(big_gt, 9, axis=1), big_gt) < 1.0


def _brute_force_f(pred, gt, radius):
    """F from Euclidean distances between boundary pixels (no dilation)."""
    bp, bg = np.argwhere(boundary_map(pred)), np.argwhere(boundary_map(gt))
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    p, r = (d.min(1) <= radius).mean(), (d.min(0) <= radius).mean()
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("seed", range(4))
def test_boundary_f_equals_distance_definition(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :50]
    def blob():
        cy, cx, ry, rx = rng.uniform(10, 30), rng.uniform(10, 40), *rng.uniform(4, 12, 2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    pred, gt = blob() | blob(), blob()
    for radius in (1, 2, 3):
        assert boundary_f_measure(pred, gt, bound_th=radius) == pytest.approx(
            _brute_force_f(pred, gt, radius))


def test_evaluate_sequence_skips_first_and_last_frames():
    gt = np.zeros((6, 6), np.uint8)
    gt[1:4, 1:4] = 1
    gt[4:6, 4:6] = 2
    wrong = np.zeros_like(gt)  # the first and last frames are wrong but not scored
    scores = evaluate_sequence([wrong, gt, gt, wrong], [gt, gt, gt, gt])
    assert scores == {"J": [1.0, 1.0], "F": [1.0, 1.0]}
    half = gt.copy()
    half[half == 2] = 0  # object 2 lost in one of the two scored frames
    scores = evaluate_sequence([gt, gt, half, gt], [gt] * 4)
    assert scores["J"] == [1.0, 0.5] and scores["F"] == [1.0, 0.5]


# ------------------------------------------------------------------ propagation
def reference_propagation(tgt, ctx, labels, grid, k, T, radius):
    """Section 3.8 written out, one target patch at a time (float64)."""
    h, w = grid
    tgt = tgt / np.linalg.norm(tgt, axis=1, keepdims=True)
    ctx = ctx / np.linalg.norm(ctx, axis=2, keepdims=True)
    n_ctx, n, _ = ctx.shape
    C = labels.shape[1]
    out = np.zeros((C, n))
    for q in range(n):
        qy, qx = divmod(q, w)
        aff = []
        for t in range(n_ctx):
            for key in range(n):
                ky, kx = divmod(key, w)
                near = radius is None or (abs(ky - qy) <= radius and abs(kx - qx) <= radius)
                aff.append(math.exp(float(ctx[t, key] @ tgt[q]) / T) if near else 0.0)
        aff = np.array(aff)
        kth = np.sort(aff)[-k]
        aff[aff < kth] = 0
        aff /= aff.sum()
        out[:, q] = labels.transpose(1, 0, 2).reshape(C, -1) @ aff
    return out


@pytest.mark.parametrize("radius,k", [(None, 5), (1, 3), (2, 1)])
def test_propagation_matches_formula(radius, k):
    g = torch.Generator().manual_seed(0)
    h, w, D, T_ctx, C = 4, 5, 8, 3, 3
    tgt = torch.randn(h * w, D, generator=g)
    ctx = torch.randn(T_ctx, h * w, D, generator=g)
    lab = torch.softmax(torch.randn(T_ctx, C, h * w, generator=g), dim=1)
    got = propagate_labels(tgt, ctx, lab, grid=(h, w), topk=k, temperature=0.1,
                           radius=radius, chunk_size=7)
    ref = reference_propagation(tgt.double().numpy(), ctx.double().numpy(),
                                lab.double().numpy(), (h, w), k, 0.1, radius)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(0).numpy(), 1.0, rtol=1e-5)


def test_propagation_follows_crafted_features_and_neighbourhood():
    # Features encode "object" (e0) vs "background" (e1); the target frame's object is one
    # column to the right of the context frame's.
    h, w = 3, 6
    def frame(obj_cols):
        f = torch.zeros(h, w, 2)
        f[..., 1] = 1
        f[:, obj_cols, 0], f[:, obj_cols, 1] = 1, 0
        return f
    ctx = frame([1, 2])[None]
    labels = torch.zeros(1, 2, h, w)
    labels[0, 1, :, 1:3] = 1
    labels[0, 0] = 1 - labels[0, 1]
    out = propagate_labels(frame([2, 3]), ctx, labels, topk=1, radius=2)
    assert out.argmax(0)[:, 2:4].eq(1).all() and out.argmax(0)[:, [0, 1, 4, 5]].eq(0).all()
    # The object jumps 3 columns: without a neighbourhood it is found again; within a
    # 1-patch neighbourhood the context object is out of reach of the new object patches.
    far = frame([4, 5])
    assert propagate_labels(far, ctx, labels, topk=1, radius=None).argmax(0)[:, 4:].eq(1).all()
    assert propagate_labels(far, ctx, labels, topk=1, radius=0).argmax(0)[:, 4:].eq(1).all()
    assert propagate_labels(far, ctx, labels, topk=1, radius=1).argmax(0)[:, 4:].eq(0).all()
    assert neighborhood_mask(3, 4, 1).sum(1).tolist() == [4, 6, 6, 4, 6, 9, 9, 6, 4, 6, 6, 4]


def test_frame_size_rule():
    assert frame_size(480, 854) == (480, 832)
    assert frame_size(854, 480) == (832, 480)
    assert frame_size(1080, 1920) == (480, 832)


def test_palette():
    pal = davis_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                [0, 0, 128]]
    assert len({tuple(c) for c in pal}) == 256


# -------------------------------------------------------- a synthetic video end to end
def _video(root: Path, n_frames: int = 5, size=(64, 128), step: int = 16):
    """A red square moving right on a blue-green background; returns (frames, masks)."""
    rng = np.random.default_rng(0)
    frames, masks = [], []
    for t in range(n_frames):
        img = np.zeros((*size, 3), np.uint8)
        img[..., 1], img[..., 2] = 90, 160
        img = (img + rng.integers(0, 20, img.shape)).astype(np.uint8)
        m = np.zeros(size, np.uint8)
        x0 = 16 + step * t
        m[16:48, x0:x0 + 32] = 1
        img[m == 1] = (220, 30, 30)
        p = root / f"{t:05d}.jpg"
        Image.fromarray(img).save(p, quality=95)
        frames.append(p)
        masks.append(m)
    return frames, masks


def _colour_patches(patch: int):
    """Crafted patch features: the mean colour of each patch (a stand-in for DINO)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.avg_pool2d(x, patch)  # [1, 3, h, w]
        return f.permute(0, 2, 3, 1)
    return fn


def test_segment_video_tracks_a_square(tmp_path):
    (tmp_path / "frames").mkdir()
    frames, masks = _video(tmp_path / "frames")
    preds = segment_video(frames, masks[0], _colour_patches(16), 16, short_side=64,
                          out_dir=tmp_path / "out", n_last_frames=2)
    assert len(preds) == 5 and all(p.shape == (64, 128) for p in preds)
    for p, m in zip(preds[1:], masks[1:]):
        assert region_jaccard(p == 1, m == 1) > 0.9
    png = Image.open(tmp_path / "out" / "00003.png")
    assert png.mode == "P"
    assert png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert np.array_equal(np.asarray(png), preds[3])


def test_cli_davis_writes_masks_and_scores(tmp_path, capsys):
    from dinofeat.cli import main
    from dinofeat.eval.davis import write_indexed_png
    from test_eval_knn import _tiny_model_file
    weights = _tiny_model_file(tmp_path)
    root = tmp_path / "DAVIS"
    for name in ("square", "square2"):
        fdir = root / "JPEGImages" / "480p" / name
        fdir.mkdir(parents=True)
        _, masks = _video(fdir, n_frames=4)
        adir = root / "Annotations" / "480p" / name
        for t, m in enumerate(masks):
            write_indexed_png(adir / f"{t:05d}.png", m)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("square\nsquare2\n")
    out = tmp_path / "masks"
    rc = main(["eval", "davis", "--data-root", str(root), "--out", str(out),
               "--model", str(weights), "--short-side", "64", "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    assert "J&F" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["videos"]) == ["square", "square2"]
    s = res["results"]
    assert s["objects"] == 2 and 0 <= s["J"] <= 100 and 0 <= s["F"] <= 100
    assert s["J&F"] == pytest.approx((s["J"] + s["F"]) / 2)
    assert len(list((out / "square").glob("*.png"))) == 4
    # The per-video numbers are those of the written masks scored directly.
    preds = [np.asarray(Image.open(p)) for p in sorted((out / "square").glob("*.png"))]
    gts = [np.asarray(Image.open(p)) for p in sorted((root / "Annotations" / "480p" /
                                                        "square").glob("*.png"))]
    sc = evaluate_sequence(preds, gts)
    assert res["videos"]["square"]["J"] == pytest.approx(100 * np.mean(sc["J"]))
    assert res["videos"]["square"]["F"] == pytest.approx(100 * np.mean(sc["F"]))
