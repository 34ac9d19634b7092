"""Every CLI verb that takes a model works with an exported ONNX file (embed, attn,
index build, search, dedup), through ``dinofeat.cli.main``, and gives what the PyTorch
weights give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat.cli import main

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_vit, tmp_path_factory):
    """``(folder of photos, .onnx with attention, .onnx without, .safetensors)``."""
    from dinofeat.export import export_model
    from dinofeat.model import save_safetensors
    from PIL import Image
    d = tmp_path_factory.mktemp("onnx")
    photos = d / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)
        arr[:, :20] = 30 * i  # a different flat band per picture
        Image.fromarray(arr).save(photos / f"im{i}.png")
    (photos / "copy_of_im2.png").write_bytes((photos / "im2.png").read_bytes())
    Image.open(photos / "im3.png").save(photos / "im3_again.jpg", quality=95)
    with_attn, without = d / "attn.onnx", d / "plain.onnx"
    export_model(tiny_vit, with_attn, attention=True, check_sizes=[32])
    export_model(tiny_vit, without, check_sizes=[32])
    weights = d / "tiny.safetensors"
    save_safetensors(tiny_vit, weights)
    return photos, with_attn, without, weights


def test_onnx_model_satisfies_the_protocol(exported):
    import dinofeat
    from dinofeat.protocol import FeatureModel
    model = dinofeat.load(exported[1])
    assert isinstance(model, FeatureModel) and isinstance(model, dinofeat.OnnxModel)
    assert not hasattr(model, "backbone")


def test_onnx_embed_takes_the_same_spec(exported, tiny_vit):
    import dinofeat
    from dinofeat import FeatureSpec
    photos = exported[0]
    onnx = dinofeat.load(exported[2])
    for spec in (FeatureSpec(avgpool=True, normalize=False), FeatureSpec(pool="cls+gem"),
                 FeatureSpec(pool="mean", multiscale=True, preprocessing="whole", size=48)):
        torch.testing.assert_close(onnx.embed(photos, spec, num_workers=0),
                                   tiny_vit.embed(photos, spec, num_workers=0),
                                   atol=1e-4, rtol=1e-3)
        assert spec.identity(onnx)["weights_hash"] == spec.identity(tiny_vit)["weights_hash"]
    with pytest.raises(TypeError, match="n_last_blocks"):
        onnx.embed(photos, n_last_blocks=4)
    with pytest.raises(ValueError, match="device"):
        onnx.embed(photos, device="cuda")
    with pytest.raises(TypeError, match="blocks"):
        onnx.patch_features(photos / "im0.png", blocks=[0])
    grid = onnx.patch_features(photos / "im0.png")
    torch.testing.assert_close(grid, tiny_vit.patch_features(photos / "im0.png"),
                               atol=1e-4, rtol=1e-3)


def test_embed_verb(exported, tiny_vit, tmp_path, capsys):
    from dinofeat.extract import load_features
    photos, onnx, _, _ = exported
    out = tmp_path / "f.npy"
    assert main(["embed", str(photos), "--model", str(onnx), "--out", str(out),
                 "--multiscale", "--pool", "gem", "--num-workers", "0"]) == 0
    got = load_features(out)
    ref = tiny_vit.embed(photos, pool="gem", multiscale=True, num_workers=0)
    torch.testing.assert_close(got.features, ref, atol=1e-4, rtol=1e-3)
    assert got.meta["features"]["weights_hash"] == tiny_vit.weights_hash
    # what an export cannot do is refused, naming the option
    capsys.readouterr()
    assert main(["embed", str(photos), "--model", str(onnx), "--out", str(tmp_path / "g.npy"),
                 "--n-last-blocks", "2"]) == 2
    assert "n_last_blocks" in capsys.readouterr().err
    assert main(["embed", str(photos), "--model", str(onnx), "--out", str(tmp_path / "h.npy"),
                 "--precision", "bf16"]) == 2
    assert "precision" in capsys.readouterr().err


def test_attn_verb(exported, tiny_vit, tmp_path, capsys):
    photos, onnx, plain, _ = exported
    image = photos / "im4.png"
    assert main(["attn", str(image), "--model", str(onnx), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "head00_heatmap.png").is_file()
    import dinofeat
    got = dinofeat.load(onnx).attention_maps(image)
    ref = tiny_vit.attention_maps(image)
    np.testing.assert_allclose(got.grid, ref.grid, atol=1e-5)
    capsys.readouterr()
    assert main(["attn", str(image), "--model", str(plain), "--out", str(tmp_path / "b")]) == 2
    assert "--attention" in capsys.readouterr().err


def test_index_build_and_search_verbs(exported, tmp_path, capsys):
    photos, onnx, _, weights = exported
    idx = tmp_path / "photos.idx"
    assert main(["index", "build", str(photos), "--model", str(onnx), "--out", str(idx),
                 "--num-workers", "0"]) == 0
    capsys.readouterr()
    query = photos / "im1.png"
    assert main(["search", str(idx), str(query), "--model", str(onnx), "-k", "2",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"][0]["path"].endswith("im1.png")
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the PyTorch weights of the same model search the ONNX-built index too
    assert main(["search", str(idx), str(query), "--model", str(weights), "-k", "1",
                 "--json"]) == 0
    assert "im1.png" in capsys.readouterr().out


def test_dedup_verb(exported, tmp_path, capsys):
    photos, onnx, _, _ = exported
    out = tmp_path / "groups.json"
    assert main(["dedup", str(photos), "--model", str(onnx), "--out", str(out),
                 "--threshold", "0.99", "--num-workers", "0"]) == 0
    groups = json.loads(out.read_text())["groups"]
    members = [sorted(m["path"].rsplit("/", 1)[-1] for m in g["members"]) for g in groups]
    assert ["copy_of_im2.png", "im2.png"] in members
