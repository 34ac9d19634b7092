"""k-NN evaluation: the weighted vote against the paper's formula, and `dinofeat eval knn`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dinofeat.eval import image_folder, knn_accuracy, knn_classify
from dinofeat.eval.knn import knn_topk


def reference_knn(train, labels, test, k, T, C):
    """Section 3.7 written out: cosine similarity, k largest, weights exp(s/T), summed
    per class (numpy, float64, one test row at a time)."""
    tr = np.asarray(train, np.float64)
    te = np.asarray(test, np.float64)
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    out = np.zeros((len(te), C))
    for i, q in enumerate(te):
        s = tr @ q
        nn = np.argsort(-s, kind="stable")[:k]
        for j in nn:
            out[i, labels[j]] += math.exp(s[j] / T)
    return out


@pytest.mark.parametrize("k,chunk,train_chunk", [(1, 1024, 65536), (5, 3, 7), (20, 4, 1000),
                                                 (50, 2, 11)])
def test_knn_matches_formula(k, chunk, train_chunk):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(40, 16, generator=g)
    test = torch.randn(9, 16, generator=g)
    labels = torch.randint(0, 6, (40,), generator=g)
    got = knn_classify(train, labels, test, k=k, T=0.07, num_classes=6, chunk_size=chunk,
                       train_chunk_size=train_chunk)
    ref = reference_knn(train.numpy(), labels.numpy(), test.numpy(), min(k, 40), 0.07, 6)
    assert got.shape == (9, 6)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-5)


def test_knn_hand_example():
    # Train: (1,0) class 0, (0,1) class 1, (0.8,0.6) class 1. Test (2,0): cosine 1, 0, 0.8.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])
    # k=2: neighbours 0 (s=1) and 2 (s=0.8). T=0.5: class 0 gets e^2, class 1 gets e^1.6.
    s = knn_classify(train, labels, test, k=2, T=0.5)
    np.testing.assert_allclose(s.numpy(), [[7.38905609893065, 4.953032424395115]], rtol=1e-6)
    # k=3 adds neighbour 1 (s=0) to class 1: e^1.6 + e^0.
    s = knn_classify(train, labels, test, k=3, T=0.5)
    np.testing.assert_allclose(s.numpy(), [[7.38905609893065, 5.953032424395115]], rtol=1e-6)
    assert s.argmax(1).item() == 0


def test_k_larger_than_train_set_and_normalisation():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    all7 = knn_classify(train, labels, test, k=7)
    assert torch.allclose(knn_classify(train, labels, test, k=200), all7)
    # Features are normalised inside: scaling rows changes nothing.
    scaled = knn_classify(train * torch.arange(1, 8)[:, None], labels, test * 5.0, k=3)
    assert torch.allclose(scaled, knn_classify(train, labels, test, k=3), rtol=1e-5)


def test_num_classes_and_label_errors():
    train, test = torch.eye(3), torch.eye(3)
    s = knn_classify(train, torch.tensor([0, 1, 2]), test, k=1, num_classes=5)
    assert s.shape == (3, 5) and (s[:, 3:] == 0).all()
    assert s.argmax(1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_classify(train, torch.tensor([0, 1, 2]), test, num_classes=2)
    with pytest.raises(ValueError, match=">= 0"):
        knn_classify(train, torch.tensor([0, -1, 2]), test)
    with pytest.raises(ValueError, match="dimensions differ"):
        knn_classify(train, torch.tensor([0, 1, 2]), torch.ones(2, 4))
    with pytest.raises(TypeError, match="integer"):
        knn_classify(train, torch.tensor([0.0, 1.0, 2.0]), test)


def test_topk_merge_equals_full_sort():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(101, 8, generator=g), torch.randn(13, 8, generator=g)
    s, i = knn_topk(train, test, 10, chunk_size=5, train_chunk_size=9)
    full = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(
        train, dim=1).T
    ref_s, ref_i = full.topk(10, dim=1)
    assert torch.allclose(s, ref_s, atol=1e-6)
    assert torch.equal(i, ref_i)


def test_knn_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 2, 2, 1])
    acc = knn_accuracy(scores, labels, topk=(1, 2, 5))
    assert acc[1] == pytest.approx(50.0)  # rows 0 and 2
    assert acc[2] == pytest.approx(75.0)  # + row 3 (second best is class 1)
    assert acc[5] == pytest.approx(100.0)  # k beyond the class count counts every row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(500, 32, generator=g), torch.randn(70, 32, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    cpu = knn_classify(train, labels, test, k=20, chunk_size=16)
    gpu = knn_classify(train.cuda(), labels.cuda(), test.cuda(), k=20, chunk_size=16)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ CLI end to end
def _tiny_model_file(tmp_path: Path) -> Path:
    """A 2-block ViT-tiny/16 with random weights, 32-pixel preprocessing, saved as
    safetensors (so that `--weights` reloads it with its preprocessing)."""
    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel, save_safetensors
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=2, num_heads=3, img_size=32)
    model = DinoModel(vit, name="tiny", preprocessing=Preprocessing(resize_size=32, crop_size=32))
    return save_safetensors(model, tmp_path / "tiny.safetensors")


def _image_tree(root: Path, n_per_class: int, seed: int) -> None:
    """Three classes of 40x48 images: mostly red, green or blue with noise and a random
    bright square, so that neighbours carry some class signal."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["blue", "green", "red"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 90, size=(40, 48, 3))
            img[..., 2 - c] += 150
            y, x = rng.integers(0, 24, size=2)
            img[y:y + 12, x:x + 12] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{name}{i}.png")


def test_cli_knn_matches_api_and_caches(tmp_path, capsys):
    import dinofeat
    from dinofeat.cli import main
    weights = _tiny_model_file(tmp_path)
    _image_tree(tmp_path / "train", 4, seed=1)
    _image_tree(tmp_path / "val", 2, seed=2)
    (tmp_path / "train" / "red" / "broken.png").write_bytes(b"not a png")
    cache, out = tmp_path / "cache", tmp_path / "knn.json"
    argv = ["eval", "knn", "--model", str(weights), "--train", str(tmp_path / "train"),
            "--val", str(tmp_path / "val"), "-k", "1", "3", "20", "--cache-dir", str(cache),
            "--out", str(out), "--no-progress", "--num-workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "skipped 1 unreadable" in printed
    res = json.loads(out.read_text())
    assert res["train"]["images"] == 12 and res["train"]["skipped"] == 1
    assert res["val"]["images"] == 6 and res["train"]["classes"] == 3
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2

    # The same numbers through the public API.
    model = dinofeat.load(weights, device="cpu")
    train = image_folder(tmp_path / "train")
    val = image_folder(tmp_path / "val", classes=train.classes)
    keep = [i for i, p in enumerate(train.paths) if p.name != "broken.png"]
    tr = model.embed([train.paths[i] for i in keep], num_workers=0)
    va = model.embed(val.paths, num_workers=0)
    tr_y = torch.tensor([train.labels[i] for i in keep])
    for row in res["results"]:
        scores = knn_classify(tr, tr_y, va, k=row["k"], T=0.07, num_classes=3)
        acc = knn_accuracy(scores, torch.tensor(val.labels))
        assert row["top1"] == pytest.approx(acc[1])
        assert row["top5"] == pytest.approx(acc[5])

    # A second run reads the cache (files untouched) and gives the same results.
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert main(argv) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert json.loads(out.read_text())["results"] == res["results"]
    # Changing the folder listing changes the cache key (a new entry would be written).
    from dinofeat.eval.features import feature_cache_key
    opts = {"pool": "cls"}
    key = feature_cache_key(model, val.paths, val.root, val.labels, opts)
    assert key == feature_cache_key(model, val.paths, val.root, val.labels, opts)
    val.paths[0].write_bytes(val.paths[1].read_bytes())  # same name, new content and size
    assert feature_cache_key(model, val.paths, val.root, val.labels, opts) != key
    assert feature_cache_key(model, val.paths[1:], val.root, val.labels[1:], opts) != key
    assert feature_cache_key(model, val.paths, val.root, val.labels, {"pool": "gem"}) != key


def test_cli_knn_user_errors(tmp_path, capsys):
    from dinofeat.cli import main
    weights = tmp_path / "never-loaded.safetensors"  # folders are checked first
    _image_tree(tmp_path / "train", 1, seed=1)
    (tmp_path / "val" / "cats").mkdir(parents=True)
    rc = main(["eval", "knn", "--model", str(weights), "--train", str(tmp_path / "train"),
               "--val", str(tmp_path / "val"), "--no-cache"])
    assert rc == 2
    assert "cats" in capsys.readouterr().err
    rc = main(["eval", "knn", "--model", str(weights), "--train", str(tmp_path / "nope"),
               "--val", str(tmp_path / "val"), "--no-cache"])
    assert rc == 2 and "no such folder" in capsys.readouterr().err


def test_one_weighted_vote_for_the_index_and_the_evaluation():
    """KNNIndex.classify and knn_classify share weighted_vote: same scores on the same
    data, and the vote is sum exp(s / T) per class with missing neighbours (-1) ignored."""
    import numpy as np

    from dinofeat import KNNIndex
    from dinofeat.eval.knn import knn_classify, weighted_vote
    sims = torch.tensor([[0.9, 0.5, 0.1]], dtype=torch.float64)
    classes = torch.tensor([[1, 1, -1]])
    got = weighted_vote(sims, classes, 0.07, 3)
    want = torch.tensor([[0.0, np.exp(0.9 / 0.07) + np.exp(0.5 / 0.07), 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want)
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    test = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    index = KNNIndex(dim=8)
    index.add(train, labels=labels.tolist())
    from_index = index.classify(test, k=10, T=0.07, classes=list(range(4)))
    from_eval = knn_classify(train, labels, test, k=10, T=0.07, num_classes=4)
    np.testing.assert_allclose(from_index, from_eval.double().numpy(), rtol=1e-4)
