"""`dinofeat demo` end to end in a tiny mode, and its pictures.

The tiny demo pretrains for 2 steps of 8 images, so its accuracy means nothing; what is
checked is that every step runs, every file is written and readable, and that the
accuracy it reports is DINO's k-NN vote recomputed independently from the saved model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinofeat import cli
from dinofeat.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from dinofeat.demo import demo_split, neighbour_grid, run_demo, to_pil

HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")

TINY = dict(steps=2, batch=8, train_images=16, bank=40, test=12, queries=2, neighbours=3,
            compare_shipped=False)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    res = run_demo(out, progress=False, echo=lines.append, **TINY)
    return res, out, lines


@needs_fmnist
def test_tiny_demo_writes_everything(tiny_demo):
    res, out, lines = tiny_demo
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert res.steps == 2 and res.images_seen == 16 and (res.bank, res.test) == (40, 12)
    for name in ("neighbours.png", "model.safetensors", "results.json", "run/checkpoint.pth",
                 "attention/query_0.png", "attention/query_1.png",
                 "attention/query_0/head00_mask.png", "attention/query_1/mean_overlay.png"):
        assert (out / name).is_file(), name
    assert (out / "train.idx").exists()
    assert len(list((out / "data").glob("*.png"))) == 16  # pretraining photos, no labels
    meta = json.loads((out / "results.json").read_text())
    assert meta["knn_top1"] == res.knn_top1 and meta["random_knn_top1"] == res.random_knn_top1
    assert 0.0 <= res.knn_top1 <= 100.0 and 0.0 <= res.random_knn_top1 <= 100.0
    assert 0 < res.train_seconds < res.total_seconds
    assert "DINO, this demo (2 steps x 8 photos" in res.summary()
    assert res.shipped_knn_top1 is None and "vit_t_fmnist" not in res.summary()
    # the neighbour grid: 2 query rows, query + 3 neighbours, 28 px x 3 + 2 x 2 px frame
    grid = Image.open(out / "neighbours.png")
    assert grid.size == (4 * (28 * 3 + 4) + 4, 2 * (28 * 3 + 4))
    # one attention strip per query: image, mean overlay, 3 heads' maps and 3 masks
    strip = Image.open(out / "attention" / "query_0.png")
    assert strip.size == ((8 * 28 + 7) * 4, 28 * 4)


@needs_fmnist
def test_tiny_demo_accuracy_is_the_dino_vote_of_the_saved_model(tiny_demo):
    """Recompute the reported accuracy: embed the same photos with the saved model and
    apply the vote sum(exp(s / 0.07)) over the 20 nearest bank photos, here in numpy."""
    import dinofeat
    res, out, _ = tiny_demo
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    _, bank, test = demo_split(len(x_train), len(x_test), TINY["train_images"], TINY["bank"],
                               TINY["test"])
    model = dinofeat.load(out / "model.safetensors", device="cpu")
    fb = model.embed(to_pil(x_train[bank])).numpy().astype(np.float64)
    ft = model.embed(to_pil(x_test[test])).numpy().astype(np.float64)
    sims = ft @ fb.T
    correct = 0
    for i in range(len(test)):
        nn = np.argsort(-sims[i], kind="stable")[:20]
        votes = np.zeros(10)
        np.add.at(votes, y_train[bank][nn], np.exp(sims[i, nn] / 0.07))
        correct += int(votes.argmax() == y_test[test][i])
    assert res.knn_top1 == pytest.approx(100.0 * correct / len(test))
    # raw pixels on the same bank: minus the mean bank image, L2-normalised, the same vote
    pb = x_train[bank].reshape(len(bank), -1).astype(np.float64)
    pt = x_test[test].reshape(len(test), -1).astype(np.float64)
    mu = pb.mean(0)
    pb, pt = pb - mu, pt - mu
    pb /= np.linalg.norm(pb, axis=1, keepdims=True)
    pt /= np.linalg.norm(pt, axis=1, keepdims=True)
    sims = pt @ pb.T
    correct = 0
    for i in range(len(test)):
        nn = np.argsort(-sims[i], kind="stable")[:20]
        votes = np.zeros(10)
        np.add.at(votes, y_train[bank][nn], np.exp(sims[i, nn] / 0.07))
        correct += int(votes.argmax() == y_test[test][i])
    assert res.pixels_knn_top1 == pytest.approx(100.0 * correct / len(test))
    meta = json.loads((out / "results.json").read_text())
    assert meta["pixels_knn_top1"] == res.pixels_knn_top1
    assert meta["dino_minus_random"] == pytest.approx(res.knn_top1 - res.random_knn_top1)
    assert "raw pixels" in res.summary()
    # the index holds the labelled bank photos, with class names as labels
    index = dinofeat.KNNIndex.load(out / "train.idx")
    assert len(index) == TINY["bank"]
    assert set(index.classes) <= set(FASHION_MNIST_CLASSES)


def test_neighbour_grid_frames(tmp_path):
    """Blue frame for the query, green for a neighbour of the same class, red otherwise."""
    img = np.full((5, 5), 200, np.uint8)
    path = neighbour_grid([img], [[img, img]], [[True, False]], tmp_path / "g.png", scale=2,
                          pad=1)
    a = np.asarray(Image.open(path))
    cell = 5 * 2 + 2
    assert a.shape == (cell, 3 * cell + 2, 3)
    assert tuple(a[0, 0]) == (40, 90, 220)                  # query frame
    assert tuple(a[0, cell + 2]) == (30, 170, 60)           # same class
    assert tuple(a[0, 2 * cell + 2]) == (220, 40, 40)       # other class
    assert tuple(a[1, 1]) == (200, 200, 200)                # the (upscaled) photo


@needs_fmnist
def test_cli_demo_rejects_bad_options(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--train-images", "10"]) == 2
    assert "at least one batch" in capsys.readouterr().err


def test_cli_demo_help_names_the_dataset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "Fashion-MNIST" in capsys.readouterr().out


def test_demo_split_is_fixed_and_nested():
    a = demo_split(1000, 100, 50, 20, 10, seed=3)
    b = demo_split(1000, 100, 50, 20, 10, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    pretrain, bank, test = a
    assert len(pretrain) == 50 and len(bank) == 20 and len(test) == 10
    assert set(bank) <= set(pretrain) and np.all(np.diff(test) > 0)
    assert torch.tensor(test).max() < 100
