"""dinofeat.export: ONNX / TorchScript export with dynamic batch and image size, DINO's
position-embedding interpolation inside the graph, parity with PyTorch, running an ONNX
file through dinofeat.load, and the `dinofeat export` command."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat.backbones import build_backbone, interpolate_pos_embed
from dinofeat.export import ExportedViT, bicubic_matrix, export_model
from dinofeat.model import DinoModel, load, save_safetensors

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _resize_with_matrices(pe, grid, trained):
    h, w = grid
    h0, w0 = trained
    patch = pe[0, 1:].reshape(h0, w0, -1)
    same = torch.tensor([(h, w) == (h0, w0)])
    mh = bicubic_matrix(torch.arange(h).float(), h0, same)
    mw = bicubic_matrix(torch.arange(w).float(), w0, same)
    return torch.einsum("ih,hwd,jw->ijd", mh, patch, mw).reshape(1, h * w, -1)


@pytest.mark.parametrize("grid", [(15, 17), (7, 30), (28, 28), (60, 45), (1, 2), (14, 20), (9, 14), (14, 14)])
def test_bicubic_matrix_is_dinos_interpolation(grid):
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8)
    ref = interpolate_pos_embed(pe, grid, (14, 14), "dino")[:, 1:]
    got = _resize_with_matrices(pe, grid, (14, 14))
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5 * pe.abs().max()


def test_bicubic_matrix_identity_at_trained_grid():
    m = bicubic_matrix(torch.arange(14).float(), 14)
    assert torch.equal(m, torch.eye(14))
    # rows are interpolation weights: they sum to one
    m = bicubic_matrix(torch.arange(23).float(), 14)
    assert torch.allclose(m.sum(dim=1), torch.ones(23), atol=1e-6)


def test_exported_graph_equals_backbone_in_pytorch(tiny_vit):
    wrapper = ExportedViT(tiny_vit.backbone, attention=True).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.inference_mode():
        cls, patches, attn = wrapper(x)
        tokens = tiny_vit.backbone.forward_tokens(x)
        ref_attn = tiny_vit.backbone.last_cls_attention(x)
    assert patches.shape == (2, 3 * 5, 192) and attn.shape == (2, 3, 1 + 15)
    assert (cls - tokens[:, 0]).abs().max() < 1e-5
    assert (patches - tokens[:, 1:]).abs().max() < 1e-5
    assert (attn - ref_attn).abs().max() < 1e-6


def test_onnx_export_parity_and_dynamic_shapes(tiny_vit, tmp_path):
    path = tmp_path / "tiny.onnx"
    report = export_model(tiny_vit, path, attention=True)
    assert report.format == "onnx" and report.outputs == ["cls", "patch_tokens",
                                                            "cls_attention"]
    assert len(report.checked_shapes) == 2
    assert all(v < 1e-4 for v in report.max_abs_diff.values()), report
    assert "max abs difference" in str(report)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 32), (3, 3, 64, 48), (1, 3, 50, 37)]:  # 50x37: partial patches
        x = torch.randn(*shape)
        cls, patches, attn = sess.run(None, {"input": x.numpy()})
        with torch.inference_mode():
            tokens = tiny_vit.backbone.forward_tokens(x[..., :shape[2] // 16 * 16,
                                                        :shape[3] // 16 * 16])
        assert np.abs(cls - tokens[:, 0].numpy()).max() < 1e-4
        assert np.abs(patches - tokens[:, 1:].numpy()).max() < 1e-4
        assert attn.shape == (shape[0], 3, tokens.shape[1])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert '"embed_dim": 192' in meta["dinofeat"]


def test_load_onnx_embeds_like_pytorch(tiny_vit, make_image, tmp_path):
    path = tmp_path / "tiny.onnx"
    export_model(tiny_vit, path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        make_image(40 + 8 * i, 56, seed=i).save(folder / f"{i}.jpg", quality=92)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    om = load(path)
    assert type(om).__name__ == "OnnxModel" and om.embed_dim == 192
    assert om.preprocessing == tiny_vit.preprocessing
    feats, keys = om.embed(folder, return_keys=True, num_workers=0)
    ref, ref_keys = tiny_vit.embed(folder, return_keys=True, num_workers=0)
    assert keys == ref_keys and len(keys) == 3
    assert (feats - ref).abs().max() < 1e-4
    gem = om.embed(folder, pool="cls+gem", num_workers=0)
    assert (gem - tiny_vit.embed(folder, pool="cls+gem", num_workers=0)).abs().max() < 1e-4
    with pytest.raises(TypeError, match="without attention"):
        om.last_cls_attention(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="CPU"):
        load(path, device="cuda")


def test_torchscript_export_parity(tiny_vit, tmp_path):
    path = tmp_path / "tiny.pt"
    report = export_model(tiny_vit, path, attention=True)
    assert report.format == "torchscript"
    assert all(v < 1e-4 for v in report.max_abs_diff.values()), report
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        extra = {"dinofeat.json": ""}
        ts = torch.jit.load(str(path), _extra_files=extra)
    assert b"\"patch_size\": 16" in extra["dinofeat.json"]
    x = torch.randn(2, 3, 80, 48)
    with torch.inference_mode():
        cls, patches, attn = ts(x)
        tokens = tiny_vit.backbone.forward_tokens(x)
    assert (cls - tokens[:, 0]).abs().max() < 1e-4 and patches.shape == (2, 15, 192)


def test_export_refusals(tmp_path, tiny_vit):
    resnet = DinoModel(build_backbone("resnet50"), name="r")
    with pytest.raises(TypeError, match="needs a ViT"):
        export_model(resnet, tmp_path / "r.onnx")
    with pytest.raises(ValueError, match="format"):
        export_model(tiny_vit, tmp_path / "x.bin")
    timm_interp = copy.deepcopy(tiny_vit)
    timm_interp.backbone.pos_embed_interp = "timm"
    with pytest.raises(ValueError, match="interpolation"):
        export_model(timm_interp, tmp_path / "x.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        load(bad)


def test_cli_export(tiny_vit, tmp_path, capsys):
    from dinofeat.cli import main
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(tiny_vit, weights)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(weights), "--out", str(out), "--attention",
                 "--check-size", "32", "--check-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "cls_attention" in text and "max abs difference" in text and out.is_file()
    assert "1x3x64x80" in text
    assert main(["export", "--model", str(weights), "--out", str(tmp_path / "m.pt"),
                 "--format", "onnx"]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
