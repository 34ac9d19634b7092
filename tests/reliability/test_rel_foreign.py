"""Folders the user names that also hold other things, and files written by someone else:
dinofeat must never delete, read or write outside what is its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _zoo import picture
from dinofeat import extract as X


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(5):
        Image.fromarray(picture(40, 40, seed=90 + i)).save(d / f"{i}.png")
    return d


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_shard_dir_with_foreign_files_is_refused_and_kept(tmp_path, tiny_model, photos, tally):
    work = tmp_path / "mywork"
    (work / "chapters").mkdir(parents=True)
    (work / "thesis.tex").write_text("\\documentclass{article}")
    (work / "chapters" / "one.tex").write_text("one")
    before = _tree(work)
    with pytest.raises(ValueError, match=r"mywork is not empty and holds no shard manifest"):
        X.embed_to_file(tiny_model, photos, tmp_path / "f.safetensors", shard_dir=work,
                        shard_size=2)
    assert _tree(work) == before
    assert not (tmp_path / "f.safetensors").exists()
    tally.add("foreign folders", inputs=1, checks=3)


def test_shard_dir_cleanup_removes_only_what_the_run_wrote(tmp_path, tiny_model, photos, tally):
    """A shard folder that gains a file of someone else's during the run keeps it (and so
    survives itself); a fresh folder used only by the run is removed."""
    shards = tmp_path / "shards"
    X.extract_to_shards(tiny_model, photos, shards, shard_size=2)
    (shards / "notes.txt").write_text("mine")  # appears while the run is going on
    res = X.embed_to_file(tiny_model, photos, tmp_path / "f.safetensors", shard_dir=shards,
                          shard_size=2)
    assert res.num_images == 5
    assert sorted(p.name for p in shards.iterdir()) == ["notes.txt"]
    own = tmp_path / "own"
    X.embed_to_file(tiny_model, photos, tmp_path / "g.safetensors", shard_dir=own, shard_size=2)
    assert not own.exists()
    # an existing empty folder is fine to use, and is removed afterwards like a new one
    empty = tmp_path / "empty"
    empty.mkdir()
    X.embed_to_file(tiny_model, photos, tmp_path / "h.safetensors", shard_dir=empty,
                    shard_size=2)
    assert not empty.exists()
    tally.add("foreign folders", inputs=2, checks=4)


def test_cli_shard_dir_dot_keeps_the_working_folder(tmp_path, tiny_weights, photos, tally):
    """The reported case: ``--shard-dir .`` emptied the working folder (inputs, notes and
    the output just written)."""
    (photos / "notes.txt").write_text("keep me")
    before = _tree(photos)
    proc = subprocess.run(
        [sys.executable, "-m", "dinofeat", "embed", ".", "--model", str(tiny_weights),
         "--out", "feats.safetensors", "--shard-dir", ".", "--num-workers", "0"],
        cwd=photos, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "is not empty and holds no shard manifest" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _tree(photos) == before
    tally.add("foreign folders", inputs=1, checks=3)


# ------------------------------------------------------------ names read from files
def test_feature_file_paths_file_outside_is_refused(tmp_path, tally):
    import json

    import torch
    out = X.save_features(tmp_path / "f.safetensors", torch.zeros(2, 3), ["a.jpg", "b.jpg"])
    secret = tmp_path.parent / f"{tmp_path.name}-outside.json"
    secret.write_text(json.dumps({"paths": ["x", "y"]}))
    from safetensors.torch import save_file
    for name in (f"../{secret.name}", str(secret), "link.json"):
        (tmp_path / "link.json").unlink(missing_ok=True)
        (tmp_path / "link.json").symlink_to(secret)
        save_file({"features": torch.zeros(2, 3)}, str(out),
                  metadata={"dinofeat": json.dumps({"paths_file": name})})
        with pytest.raises(ValueError, match=r"f\.safetensors: paths_file .* points outside"):
            X.load_features(out)
    tally.add("names in files", inputs=3, checks=3)


def test_davis_listing_cannot_name_folders_outside(tmp_path, tally):
    from dinofeat.eval.davis import evaluate_davis
    root = tmp_path / "DAVIS"
    for sub in ("JPEGImages/480p", "Annotations/480p", "ImageSets/2017"):
        (root / sub).mkdir(parents=True)
    victim = tmp_path / "pwned"
    victim.mkdir()
    Image.fromarray(picture(32, 32, seed=1)).save(victim / "00000.jpg")
    (root / "ImageSets" / "2017" / "val.txt").write_text("../../../pwned\n")

    class _Vit:
        is_vit = True
        name = "stub"
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"ImageSets: sequence '../../../pwned' points outside"):
        evaluate_davis(_Vit(), root, tmp_path / "out")
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()
    tally.add("names in files", inputs=1, checks=2)


def test_davis_annotation_bomb_is_refused(tmp_path, monkeypatch, tally):
    from dinofeat import images
    from dinofeat.eval.davis import write_indexed_png
    from dinofeat.eval.davis import _read_labels  # the reader every annotation goes through
    import numpy as np
    p = tmp_path / "00000.png"
    write_indexed_png(p, np.zeros((64, 64), dtype=np.uint8))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(images.ImageReadError, match="decompression bomb"):
        _read_labels(p)
    tally.add("names in files", inputs=1, checks=1)


def test_retrieval_ground_truth_names_stay_in_the_dataset(tmp_path, tally):
    import json
    from dinofeat.eval.retrieval import load_revisited
    base = tmp_path / "data" / "roxford5k"
    (base / "jpg").mkdir(parents=True)
    private = tmp_path / "private"
    private.mkdir()
    Image.fromarray(picture(32, 32, seed=2)).save(private / "x.jpg")
    Image.fromarray(picture(32, 32, seed=3)).save(base / "jpg" / "a.jpg")
    gnd = {"imlist": ["a", "../../../private/x"], "qimlist": ["a"],
           "gnd": [{"bbx": [0, 0, 8, 8], "easy": [0], "hard": [], "junk": []}]}
    (base / "gnd_roxford5k.json").write_text(json.dumps(gnd))
    with pytest.raises(ValueError, match=r"imlist '../../../private/x.jpg' points outside"):
        load_revisited("roxford5k", tmp_path / "data")
    tally.add("names in files", inputs=1, checks=1)


# ------------------------------------------------------------- links at fixed names
def test_training_log_is_not_written_through_a_planted_link(tmp_path, tally):
    from dinofeat.training.config import TrainConfig
    from dinofeat.training.loop import train
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(picture(36, 40, seed=70 + i)).save(imgs / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere.txt"  # does not exist: a dangling link
    (run / "log.jsonl").symlink_to(target)
    cfg = TrainConfig(arch="vit_mini16", out_dim=32, hidden_dim=32, bottleneck_dim=16,
                      global_crop_size=32, local_crop_size=16, local_crops_number=1,
                      batch_size_per_gpu=2, epochs=1, warmup_epochs=0,
                      warmup_teacher_temp_epochs=0, num_workers=0, precision="fp32",
                      data=str(imgs), output_dir=str(run))
    with pytest.raises(OSError, match="log.jsonl is a symbolic link"):
        train(cfg)
    assert not target.exists()
    tally.add("planted links", inputs=1, checks=2)


def test_image_export_does_not_write_through_links(tmp_path, tally):
    import numpy as np
    from dinofeat.datasets import export_image_folder
    out = tmp_path / "export"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("unchanged")
    for name in ("img_0.tmp.png", "img_0.tmp"):  # the names the export once used
        (out / name).symlink_to(victim)
    export_image_folder(np.zeros((2, 8, 8), dtype=np.uint8), None, out)
    assert victim.read_text() == "unchanged"
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["img_0.png",
                                                                          "img_1.png"]
    tally.add("planted links", inputs=2, checks=2)


# ---------------------------------------------------------- sizes and code-like files
def test_preprocessing_from_a_file_is_validated(tmp_path, tiny_model, tally):
    import time

    import dinofeat
    from dinofeat.model import save_safetensors
    from dinofeat.weights import CheckpointError
    from dinofeat.zoo import Preprocessing
    bad = [dict(crop_size=40000), dict(resize_size=0), dict(mode="zoom"),
           dict(interpolation="cubic-spline"), dict(mean=[0.5, 0.5]), dict(std=[1, 0, 1]),
           dict(crop_size="224"), dict(grayscale="yes")]
    for b in bad:
        with pytest.raises(ValueError, match="preprocessing"):
            Preprocessing.from_dict({**Preprocessing().to_dict(), **b})
    with pytest.raises(ValueError, match="unknown preprocessing field"):
        Preprocessing.from_dict({"crop": 3})
    # a weights file whose metadata asks a 28-px model for 40000-px crops
    path = save_safetensors(tiny_model, tmp_path / "w.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["dinofeat"])
    info["preprocessing"]["crop_size"] = 40000
    info["preprocessing"]["resize_size"] = 40000
    save_file(tensors, str(path), metadata={**meta, "dinofeat": json.dumps(info)})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"w\.safetensors: bad preprocessing .*_size must be a whole number .* 40000"):
        dinofeat.load(path)
    assert time.perf_counter() - t0 < 30
    tally.add("sizes from metadata", inputs=len(bad) + 2, checks=len(bad) + 2)


def test_onnx_external_data_is_refused_before_reading(tmp_path, tally):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from dinofeat.export import OnnxModel
    secret = tmp_path / "secret.txt"
    secret.write_bytes(bytes(16))
    sub = tmp_path / "model"
    sub.mkdir()
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend([4])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.txt"), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="dinofeat", value="{}")
    path = sub / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match=r"m\.onnx: tensor\(s\) w keep their data in external"):
        OnnxModel(path)
    tally.add("code-like files", inputs=1, checks=1)


def test_dependency_floors_exclude_known_holes(tally):
    """The loaders rely on these versions' fixes: weights_only=True that cannot run code
    (torch >= 2.10), faiss's deserialisation limits (faiss-cpu >= 1.14.2), ONNX Runtime
    refusing external data outside the model's folder (checked in the test above anyway)."""
    import re
    import tomllib
    root = Path(__file__).resolve().parents[2]
    doc = tomllib.loads((root / "pyproject.toml").read_text())
    reqs = doc["project"]["dependencies"] + [
        r for extra in doc["project"]["optional-dependencies"].values() for r in extra]
    floors = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\[\]-]+?)(?:\[[^\]]*\])?\s*>=\s*([0-9.]+).*", r)
        if m:
            floors[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split("."))
    need = {"torch": (2, 10), "torchvision": (0, 25), "faiss-cpu": (1, 14, 2),
            "onnxruntime": (1, 24, 1)}
    for name, low in need.items():
        assert floors.get(name, (0,)) >= low, (name, floors.get(name))
    tally.add("dependency floors", checks=len(need))
