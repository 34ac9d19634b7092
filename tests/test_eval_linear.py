"""Linear probe: feature layouts, the release optimiser and schedule, learning a separable
problem, heads (ours and the release's) and DinoModel.classify."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dinofeat.eval.linear import attach_classifier
from dinofeat.eval import (LinearClassifier, LinearProbe, LinearProbeConfig, image_folder,
                           linear_features, train_linear_on_features, train_linear_probe)


def _tiny_model(depth: int = 3):
    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=depth, num_heads=3,
                                img_size=32)
    return DinoModel(vit, name="tiny",
                     preprocessing=Preprocessing(resize_size=36, crop_size=32)).eval()


# ------------------------------------------------------------------- feature layouts
def test_feature_layouts():
    model = _tiny_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blocks = model.intermediate_tokens(x, 3, norm=True)
        cls = [b[:, 0] for b in blocks]
        avg = blocks[-1][:, 1:].mean(1)
        f1 = linear_features(model, x, 1)
        assert torch.allclose(f1, model(x), atol=1e-5)  # the last [CLS] is the feature
        f3 = linear_features(model, x, 3)
        assert torch.allclose(f3, torch.cat(cls, -1), atol=1e-6)
        # n=1 + avgpool: the release's interleaving [cls_0, avg_0, cls_1, avg_1, ...].
        fi = linear_features(model, x, 1, avgpool=True)
        assert fi.shape == (2, 384)
        assert torch.allclose(fi[:, 0::2], cls[-1], atol=1e-6)
        assert torch.allclose(fi[:, 1::2], avg, atol=1e-6)
        # The same as embed's avgpool representation (another engineer's code path).
        emb = model.embed(x, n_last_blocks=1, avgpool=True, normalize=False)
        assert torch.allclose(fi, emb, atol=1e-5)
        # n > 1 + avgpool (the release cannot): plain concatenation.
        fc = linear_features(model, x, 2, avgpool=True)
        assert torch.allclose(fc, torch.cat([cls[1], cls[2], avg], -1), atol=1e-6)


# ---------------------------------------------------------------- training on features
def _blobs(n_per_class: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0] + [0] * (dim - 1), [0, 4.0] + [0] * (dim - 2),
                            [-3.0, -3.0] + [0] * (dim - 2)])
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_learns_separable_problem_and_follows_the_schedule():
    tr_x, tr_y = _blobs(60, 16, seed=0)
    va_x, va_y = _blobs(20, 16, seed=1)
    cfg = LinearProbeConfig(epochs=30, batch_size=32, lr=2.0, val_freq=10)
    clf, hist = train_linear_on_features(tr_x, tr_y, 3, config=cfg, val_feats=va_x,
                                         val_labels=va_y)
    assert hist[-1]["val_acc1"] == 100.0
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] / 4
    assert [h["epoch"] for h in hist if "val_acc1" in h] == [0, 10, 20, 29]
    # lr of epoch e: base * batch/256 * (1 + cos(pi e / E)) / 2 (cosine to 0, per epoch).
    base = 2.0 * 32 / 256
    for h in hist:
        assert h["lr"] == pytest.approx(base * (1 + math.cos(math.pi * h["epoch"] / 30)) / 2)


def test_linear_classifier_init_and_optimiser_settings():
    torch.manual_seed(0)
    clf = LinearClassifier(2000, 500)
    assert clf.linear.bias.abs().max() == 0
    assert clf.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    from dinofeat.eval.linear import _optimizer
    opt, sched = _optimizer(clf, LinearProbeConfig(batch_size=1024))
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.004, 0.9, 0.0)
    assert type(opt).__name__ == "SGD" and sched.T_max == 100


# --------------------------------------------------------------------------- heads
def test_head_save_load_roundtrip(tmp_path):
    clf = LinearClassifier(384, 3)
    probe = LinearProbe(clf, ["cat", "dog", "eel"], n_last_blocks=1, avgpool=True,
                        model_info={"name": "tiny"})
    path = probe.save(tmp_path / "head.safetensors")
    side = json.loads((tmp_path / "head.safetensors.json").read_text())
    assert side["class_names"] == ["cat", "dog", "eel"] and side["layout"] == "interleaved"
    back = LinearProbe.load(path)
    assert back.class_names == probe.class_names
    assert (back.n_last_blocks, back.avgpool, back.layout) == (1, True, "interleaved")
    assert torch.equal(back.classifier.linear.weight, clf.linear.weight)


def test_release_head_loads_and_classifies(tmp_path):
    from PIL import Image
    model = _tiny_model()
    torch.manual_seed(1)
    # A release-style head for "ViT-B" (here dim 192): n=1 + avgpool -> width 2 x 192.
    w, b = torch.randn(5, 384) * 0.05, torch.randn(5)
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": w, "module.linear.bias": b},
                "best_acc": 80.1}, tmp_path / "dino_vitbase16_linearweights.pth")
    head = attach_classifier(model, tmp_path / "dino_vitbase16_linearweights.pth")
    assert (head.n_last_blocks, head.avgpool) == (1, True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    top = model.classify([img, img], k=3, num_workers=0)
    assert len(top) == 2 and len(top[0]) == 3
    assert [n for n, _ in top[0]] == [n for n, _ in top[1]]
    np.testing.assert_allclose([q for _, q in top[0]], [q for _, q in top[1]], rtol=1e-5)
    # The probabilities are the softmax of W f + b with f the interleaved feature.
    from dinofeat.images import ImageTransform, as_uint8_image, normalize_batch
    x = normalize_batch(ImageTransform(model.preprocessing, 16)(as_uint8_image(img))[None],
                        model.preprocessing.mean, model.preprocessing.std)
    with torch.no_grad():
        p = torch.softmax(linear_features(model, x, 1, True) @ w.T + b, dim=1)[0]
    want = p.topk(3)
    assert [name for name, _ in top[0]] == [str(i) for i in want.indices.tolist()]
    np.testing.assert_allclose([q for _, q in top[0]], want.values.numpy(), rtol=1e-4)
    # A 4 x D head is the ViT-S recipe (n=4); a head of the wrong width is refused.
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(2, 768),
                               "module.linear.bias": torch.zeros(2)}}, tmp_path / "s.pth")
    assert attach_classifier(model, tmp_path / "s.pth").n_last_blocks == 4
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(2, 100),
                               "module.linear.bias": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="multiple"):
        attach_classifier(model, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no linear.weight"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "none.pth")
        attach_classifier(model, tmp_path / "none.pth")


def test_classify_needs_a_head():
    with pytest.raises(RuntimeError, match="attach_classifier"):
        _tiny_model().classify(torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------ images, end to end
def _tree(root: Path, n: int, seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["dark", "light"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = 40 if c == 0 else 210
            arr = (base + rng.integers(-30, 30, (40, 40, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_train_linear_probe_on_images_resumes(tmp_path, monkeypatch):
    model = _tiny_model(depth=2)
    _tree(tmp_path / "train", 6, 0)
    _tree(tmp_path / "val", 3, 1)
    (tmp_path / "train" / "dark" / "broken.png").write_bytes(b"\x89PNG broken")
    train = image_folder(tmp_path / "train")
    val = image_folder(tmp_path / "val", classes=train.classes)
    cfg = LinearProbeConfig(epochs=3, batch_size=8, lr=5.0, n_last_blocks=2, num_workers=0)

    # Interrupt after the first epoch: a checkpoint is left behind.
    import dinofeat.eval.linear as lin
    real = lin._train_epoch
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lin, "_train_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_linear_probe(model, train, val, config=cfg, output_dir=tmp_path / "run",
                           progress=False)
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    monkeypatch.setattr(lin, "_train_epoch", real)
    probe, res = train_linear_probe(model, train, val, config=cfg,
                                    output_dir=tmp_path / "run", progress=False)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    assert res["n_train"] == 13 and res["skipped"]["train"] == 1
    assert res["final"]["acc1"] == 100.0  # dark vs light is easy even for random weights
    assert probe.in_dim == 2 * 192
    assert (tmp_path / "run" / "linear_head.safetensors").is_file()

    # Precomputed features: the fast path, no augmentation.
    pre = LinearProbeConfig(epochs=20, batch_size=8, lr=5.0, n_last_blocks=1,
                            precompute=True, num_workers=0)
    _, res2 = train_linear_probe(model, train, val, config=pre, progress=False)
    assert res2["final"]["acc1"] == 100.0 and res2["skipped"]["train"] == 1


def test_cli_linear_train_then_evaluate(tmp_path, capsys):
    from dinofeat.cli import main
    from test_eval_knn import _tiny_model_file
    weights = _tiny_model_file(tmp_path)
    _tree(tmp_path / "train", 4, 0)
    _tree(tmp_path / "val", 2, 1)
    common = ["--model", str(weights), "--device", "cpu", "--no-progress",
              "--num-workers", "0"]
    rc = main(["eval", "linear", "--train", str(tmp_path / "train"), "--val",
               str(tmp_path / "val"), "--out", str(tmp_path / "run"), "--epochs", "2",
               "--batch-size", "4", "--precompute"] + common)
    assert rc == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    # ViT-S-like default for dims < 768: the last 4 blocks, here all 2 there are.
    assert res["config"]["n_last_blocks"] == 2
    rc = main(["eval", "linear", "--val", str(tmp_path / "val"), "--evaluate",
               str(tmp_path / "run" / "linear_head.safetensors"), "--out",
               str(tmp_path / "ev")] + common)
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["final"]["acc1"] == pytest.approx(res["final"]["acc1"])
    assert "top-1" in capsys.readouterr().out


def test_release_head_evaluated_by_class_order(tmp_path):
    from dinofeat.eval import evaluate_linear
    model = _tiny_model(depth=2)
    torch.manual_seed(2)
    torch.save({"state_dict": {"module.linear.weight": torch.randn(3, 2 * 192),
                               "module.linear.bias": torch.zeros(3)}}, tmp_path / "h.pth")
    head = attach_classifier(model, tmp_path / "h.pth")
    _tree(tmp_path / "val", 3, 1)  # classes "dark", "light" -> head classes 0 and 1
    val = image_folder(tmp_path / "val")
    res = evaluate_linear(model, head, val, num_workers=0, progress=False)
    top1 = [t[0][0] for t in model.classify(val.paths, k=1, num_workers=0)]
    want = 100 * np.mean([int(p) == y for p, y in zip(top1, val.labels)])
    assert res["n_val"] == 6 and res["final"]["acc1"] == pytest.approx(want)
