"""PCA-whitening against an independent computation, its files, Copydays scoring, and
`dinofeat eval copydetect` on a synthetic Copydays tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinofeat.eval import Whitening, copy_detection_map, learn_whitening


def _feats(n=200, d=12, seed=0, low=0.1):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3, low, d)  # anisotropic, correlated
    return torch.tensor(rng.normal(size=(n, d)) @ mix + 5.0, dtype=torch.float32)


def _numpy_whitening(x, dim, power, centered):
    x = x.astype(np.float64)
    mu = x.mean(0)
    xc = x - mu if centered else x
    d, v = np.linalg.eigh(xc.T @ xc / len(x))
    d = np.maximum(d, d.max() * 1e-5)
    idx = np.argsort(d)[::-1][:dim]
    return mu, (v[:, idx] / d[idx] ** power).T  # rows: directions scaled by d^-power


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("dim", [None, 5])
def test_whitening_matches_numpy(centered, dim):
    x = _feats()
    y = _feats(30, seed=1)
    w = learn_whitening(x, dim, centered=centered)
    mu, P = _numpy_whitening(x.numpy(), dim or 12, 0.5, centered)
    ref = (y.numpy() - mu) @ P.T
    got = w.apply(y, normalize=False).numpy()
    # Eigenvectors are defined up to sign: compare the Gram matrices (sign-free).
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, rtol=1e-3, atol=1e-3)
    assert w.dim == (dim or 12) and w.in_dim == 12
    norm = w.apply(y)
    np.testing.assert_allclose(norm.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_centered_whitening_gives_identity_covariance():
    x = _feats(500, low=1.0)
    w = learn_whitening(x)
    z = w.apply(x, normalize=False).double()
    cov = z.T @ z / len(z)
    np.testing.assert_allclose(cov.numpy(), np.eye(12), atol=1e-3)
    assert z.mean(0).abs().max() < 1e-4
    # Eigenvalues below 1e-5 of the largest are floored there (no division blow-up).
    x = _feats(500, low=1e-4)
    w = learn_whitening(x)
    assert w.eigenvalues.min() >= w.eigenvalues.max() * 1e-5 * (1 - 1e-6)


def test_whitening_rank_deficient_and_errors():
    x = _feats(5, d=12)  # fewer samples than dimensions: eigenvalues floored, all finite
    w = learn_whitening(x)
    assert torch.isfinite(w.apply(x)).all()
    assert 0 < w.energy <= 1
    with pytest.raises(ValueError, match="dim"):
        learn_whitening(x, dim=13)
    with pytest.raises(ValueError, match="no variance"):
        learn_whitening(torch.zeros(4, 3), centered=True)
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        w.apply(torch.zeros(2, 7))


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_whitening_file_roundtrip(tmp_path, suffix):
    x = _feats()
    w = learn_whitening(x, 6, info={"pool": "cls+gem", "imsize": 224})
    path = w.save(tmp_path / f"wh{suffix}")
    back = Whitening.load(path)
    assert back.info == {"pool": "cls+gem", "imsize": 224} and back.dim == 6
    torch.testing.assert_close(back.apply(x), w.apply(x), rtol=1e-5, atol=1e-6)
    (tmp_path / "junk.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="whitening"):
        Whitening.load(tmp_path / "junk.json")


def test_copy_detection_map_by_hand():
    ranked = np.array([[2, 0, 1], [1, 2, 0]])
    # Query 0: positives {0, 1} at ranks 1 and 2 -> ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2.
    # Query 1: positive {1} at rank 0 -> 1.
    m, aps = copy_detection_map(ranked, [[0, 1], [1]])
    np.testing.assert_allclose(aps, [(0.25 + 7 / 12) / 2, 1.0])
    assert m == pytest.approx(aps.mean())
    # A positive cut off the list counts as not retrieved.
    assert copy_detection_map(ranked[:, :1], [[0, 1], [1]])[1][0] == 0.0


def test_cls_gem_is_the_release_formula():
    """The features copy detection uses: [CLS] then GeM (p = 4, clamp 1e-6) of the output
    patch tokens, computed here from the tokens directly."""
    from test_eval_linear import _tiny_model
    model = _tiny_model(depth=2)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        tok = model.forward_tokens(x)
        ref = torch.cat([tok[:, 0], tok[:, 1:].clamp(min=1e-6).pow(4).mean(1).pow(0.25)], 1)
        got = model.embed(x, pool="cls+gem", normalize=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _copydays(root: Path, n_series: int = 3):
    """originals 2000xx.jpg..., strong attacks that are exact copies (rank 0 guaranteed),
    a jpegqual block re-encoded at quality 50, and distractors."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for d in ("original", "strong", "jpegqual/50", "distractors"):
        (root / d).mkdir(parents=True)
    for s in range(n_series):
        arr = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        arr[:, : 10 * (s + 1)] = (30 * s, 200, 90)
        name = f"20{s:02d}00.jpg"
        Image.fromarray(arr).save(root / "original" / name, quality=95)
        (root / "strong" / f"20{s:02d}00_copy.jpg").write_bytes(
            (root / "original" / name).read_bytes())
        Image.open(root / "original" / name).save(root / "jpegqual/50" / name, quality=50)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
            root / "distractors" / f"d{i}.jpg")


def test_cli_copydetect_whitening_saved_and_reused(tmp_path, capsys):
    from dinofeat.cli import main
    from test_eval_knn import _tiny_model_file
    weights = _tiny_model_file(tmp_path)
    root = tmp_path / "copydays"
    _copydays(root)
    common = ["--model", str(weights), "--device", "cpu", "--no-progress", "--num-workers",
              "0", "--size", "32"]
    out = tmp_path / "cd.json"
    rc = main(["eval", "copydetect", "--data-root", str(root), "--distractors",
               str(root / "distractors"), "--save-whitening", str(tmp_path / "wh.safetensors"),
               "--out", str(out)] + common)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"]["strong"]["mAP"] == pytest.approx(100.0)
    assert res["results"]["strong"]["n_queries"] == 3
    assert "jpegqual/50" in res["results"]
    assert res["n_originals"] == 3 and res["n_distractors"] == 8
    assert res["whitening"]["in_dim"] == 2 * 192 and not res["whitening"]["centered"]
    wh = Whitening.load(tmp_path / "wh.safetensors")
    assert wh.info["pool"] == "cls+gem" and wh.info["imsize"] == 32
    # Reusing the saved whitening gives the same numbers.
    rc = main(["eval", "copydetect", "--data-root", str(root), "--distractors",
               str(root / "distractors"), "--whitening", str(tmp_path / "wh.safetensors"),
               "--out", str(tmp_path / "cd2.json")] + common)
    assert rc == 0
    assert json.loads((tmp_path / "cd2.json").read_text())["results"] == res["results"]
    assert "strong" in capsys.readouterr().out
    rc = main(["eval", "copydetect", "--data-root", str(tmp_path / "nothing")] + common)
    assert rc == 2
