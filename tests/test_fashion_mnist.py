"""The shipped Fashion-MNIST model (``vit_t_fmnist``): it loads offline, its features are
the documented computation on raw 28x28 photos, it has really learned (it beats its own
random initialisation at k-NN by a wide margin), the k-NN top-1 the zoo reports is what
independent code measures on the full test set, and its attention Jaccard is what an
independent computation gives.

It does **not** beat raw pixels: see docs/benchmarks.md, "Fashion-MNIST", for why the CPU
runs this project could afford fall short of that target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinofeat
from dinofeat import weights as W, zoo
from dinofeat.backbones import build_backbone
from dinofeat.datasets import FASHION_MNIST_DIR, load_fashion_mnist
from dinofeat.demo import (FMNIST_ARCH, RECIPES, fashion_mnist_preprocessing,
                           fashion_mnist_stats, knn_evaluation, random_weights_model,
                           recipe_config, silhouette_jaccard, to_pil)
from dinofeat.model import save_safetensors

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")
SPEC = zoo.get_spec("vit_t_fmnist")
BANK, TEST = 5000, 1000


@pytest.fixture(scope="module")
def model():
    return dinofeat.load("vit_t_fmnist", device="cpu")


@pytest.fixture(scope="module")
def data():
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    return x_train, y_train, x_test, y_test


# ------------------------------------------------------------------ the zoo entry
def test_zoo_entry_describes_the_shipped_network():
    assert SPEC.arch == "vit" and SPEC.local_file and SPEC.hf_hub_id is None
    assert SPEC.dataset == "Fashion-MNIST" and "Fashion-MNIST" in SPEC.description
    with torch.device("meta"):
        net = build_backbone(FMNIST_ARCH, img_size=SPEC.img_size)
    assert (net.embed_dim, net.depth, net.num_heads, net.patch_size) == (
        SPEC.embed_dim, SPEC.depth, SPEC.num_heads, SPEC.patch_size)
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params / 1e6 - SPEC.params_m) <= 0.5, n_params
    p = SPEC.preprocessing
    assert p.grayscale and (p.mode, p.resize_size, p.crop_size) == ("dino", 28, 28)
    assert p.mean[0] == p.mean[1] == p.mean[2] and p.std[0] == p.std[1] == p.std[2]
    assert 10.0 < SPEC.knn_top1 < 100.0 and SPEC.linear_top1 is None
    path = W.PACKAGE_WEIGHTS / SPEC.local_file
    assert path.is_file() and path.stat().st_size <= 8 * 2 ** 20
    table = zoo.format_table()
    row = next(line for line in table.splitlines() if line.startswith("vit_t_fmnist"))
    assert "Fashion-MNIST" in row and f"{SPEC.knn_top1:.1f}" in row.split()


@needs_fmnist
def test_preprocessing_statistics_are_the_training_sets(data):
    x_train = data[0]
    mean, std = fashion_mnist_stats(x_train)
    x = x_train[:5000].astype(np.float64) / 255.0  # independent, on a subset
    assert abs(x.mean() - mean) < 0.01 and abs(x.std() - std) < 0.01
    assert SPEC.preprocessing == fashion_mnist_preprocessing(mean, std)


# ------------------------------------------------------------------ loading
def test_loads_offline_from_the_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(W.WEIGHTS_DIR_ENV, raising=False)
    m = dinofeat.load("vit_t_fmnist", device="cpu")
    assert m.spec is SPEC and m.preprocessing == SPEC.preprocessing
    assert str(W.PACKAGE_WEIGHTS) in m.source and m.is_vit
    meta = W.read_dinofeat_metadata(m.source, W.read_checkpoint(m.source))
    stored = {k: tuple(v) if isinstance(v, list) else v
              for k, v in meta["preprocessing"].items()}  # JSON in the file: lists
    assert stored == SPEC.preprocessing.to_dict()


def test_preprocessing_metadata_round_trips(tmp_path, model):
    """save_safetensors -> load gives the same preprocessing and the same features."""
    path = save_safetensors(model, tmp_path / "copy.safetensors")
    again = dinofeat.load(path, device="cpu")
    assert again.preprocessing == model.preprocessing
    assert again.weights_hash == model.weights_hash
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(again(x), model(x))


@needs_fmnist
def test_embed_of_raw_photos_is_the_documented_computation(model, data):
    """embed(28x28 grey PIL photos) == L2-normalised [CLS] of ((x / 255 - mean) / std)
    repeated to 3 channels, with no resize or crop; uint8 arrays give the same."""
    imgs = data[2][:8]
    feats = model.embed(to_pil(imgs))
    pre = model.preprocessing
    x = torch.from_numpy(imgs).float()[:, None].expand(-1, 3, -1, -1) / 255.0
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(model(x), dim=1)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.embed(list(imgs)), feats, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ it has learned
@needs_fmnist
def test_shipped_model_has_learned(model, data):
    """On a subset, the shipped network's k-NN beats the same network with random weights
    (what DINO training started from) by a wide margin."""
    x_train, y_train, x_test, y_test = data
    xb, yb, xt, yt = x_train[:BANK], y_train[:BANK], x_test[:TEST], y_test[:TEST]
    dino = knn_evaluation(model, xb, yb, xt, yt)["top1"]
    rand = knn_evaluation(random_weights_model(FMNIST_ARCH, SPEC.preprocessing), xb, yb, xt,
                          yt)["top1"]
    assert dino > rand + 5.0, (dino, rand)


@needs_fmnist
def test_reported_knn_is_what_independent_code_measures(model, data):
    """The zoo's k-NN top-1 (the full test set, the 60,000 training photos as the bank) is
    the benchmark's result, and code written here (numpy cosine k-NN on ``embed`` of the
    raw photos, DINO's vote) measures the same number."""
    import json
    from pathlib import Path
    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                         "fashion_mnist_ship.json").read_text())
    assert SPEC.knn_top1 == round(result["knn"]["dino"]["top1"], 2)
    assert result["weights"]["weights_hash"] == model.weights_hash
    x_train, y_train, x_test, y_test = data
    bank = model.embed(to_pil(x_train), batch_size=512).numpy().astype(np.float64)
    test = model.embed(to_pil(x_test), batch_size=512).numpy().astype(np.float64)
    correct = 0
    for i in range(0, len(test), 1000):
        sims = test[i:i + 1000] @ bank.T
        nn = np.argpartition(-sims, 20, axis=1)[:, :20]
        w = np.exp(np.take_along_axis(sims, nn, 1) / 0.07)
        votes = np.zeros((len(nn), 10))
        np.add.at(votes, (np.repeat(np.arange(len(nn)), 20), y_train[nn].ravel()), w.ravel())
        correct += int((votes.argmax(1) == y_test[i:i + 1000]).sum())
    assert 100.0 * correct / len(test) == pytest.approx(SPEC.knn_top1, abs=0.05)


@needs_fmnist
def test_silhouette_jaccard_matches_an_independent_computation(model, data):
    """Per head: the fewest patches holding 60% of the [CLS] attention over the patches
    (recomputed here from last_cls_attention), upsampled, against pixels > 0."""
    imgs = data[2][:4]
    got = silhouette_jaccard(model, imgs)
    pre, p = model.preprocessing, model.patch_size
    x = torch.from_numpy(imgs).float()[:, None].expand(-1, 3, -1, -1) / 255.0
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        attn = model.last_cls_attention(x)[:, :, 1:].double().numpy()  # [B, heads, h*w]
    g = 28 // p
    per_image, mean_map = [], []

    def mask_of(a: np.ndarray) -> np.ndarray:
        order = np.argsort(-a, kind="stable")
        n = int(np.searchsorted(np.cumsum(a[order]), 0.6 * a.sum() - 1e-12)) + 1
        m = np.zeros(a.shape, bool)
        m[order[:n]] = True
        return np.kron(m.reshape(g, g), np.ones((p, p), bool))

    def jaccard(m: np.ndarray, s: np.ndarray) -> float:
        return (m & s).sum() / (m | s).sum()

    for a, img in zip(attn, imgs):
        sil = img > 0
        per_image.append(np.mean([jaccard(mask_of(h), sil) for h in a]))
        mean_map.append(jaccard(mask_of(a.mean(0)), sil))
    assert got["per_head"] == pytest.approx(np.mean(per_image), abs=1e-6)
    assert got["mean_map"] == pytest.approx(np.mean(mean_map), abs=1e-6)
    assert got["images"] == 4 and 0 < got["mask_area"] < 1


def test_random_weights_model_is_the_untrained_network():
    prep = SPEC.preprocessing
    a = random_weights_model(FMNIST_ARCH, prep, seed=0)
    b = random_weights_model(FMNIST_ARCH, prep, seed=0)
    assert a.weights_hash == b.weights_hash != random_weights_model(FMNIST_ARCH, prep,
                                                                     seed=1).weights_hash
    assert (a.embed_dim, a.patch_size) == (SPEC.embed_dim, SPEC.patch_size)


def test_recipes_are_valid_training_configs(tmp_path):
    for name, r in RECIPES.items():
        cfg = recipe_config(name, data=tmp_path, output_dir=tmp_path / name, mean=0.286,
                            std=0.353)
        assert cfg.epochs * cfg.max_iters_per_epoch == r.steps
        assert cfg.arch == FMNIST_ARCH and cfg.grayscale
        assert cfg.global_crop_size % cfg.patch_size == 0
        assert cfg.local_crop_size % cfg.patch_size == 0
        assert cfg.peak_lr() == pytest.approx(cfg.lr * r.batch / 256)
