"""Feature files, sharded extraction with resume, two processes, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat import extract as X
from dinofeat.cli import main
from dinofeat.images import list_images
from dinofeat.model import save_safetensors


@pytest.fixture
def photos(tmp_path, make_image):
    d = tmp_path / "photos"
    (d / "b").mkdir(parents=True)
    for i in range(7):
        make_image(36 + 3 * i, 44, seed=i).save(d / ("b" if i % 3 == 0 else "") / f"p{i}.png")
    (d / "b" / "p3_broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return d


@pytest.fixture
def weights(tmp_path, tiny_vit):
    return save_safetensors(tiny_vit, tmp_path / "tiny.safetensors")


def _readable(folder: Path) -> list[Path]:
    return [p for p in list_images(folder) if "broken" not in p.name]


# --------------------------------------------------------------------- feature files
@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_feature_file_roundtrip(tmp_path, suffix, monkeypatch):
    f = torch.randn(4, 6)
    paths = [f"a/{i}.jpg" for i in range(4)]
    out = X.save_features(tmp_path / f"f{suffix}", f, paths, {"model": {"name": "m"},
                                                              "skipped": [["x.jpg", "bad"]]})
    got = X.load_features(out)
    assert torch.equal(got.features, f) and got.paths == paths
    assert got.meta["model"] == {"name": "m"} and got.skipped == [("x.jpg", "bad")]
    assert X.sidecar_path(out).exists() == (suffix == ".npy")
    # path lists too big for a safetensors header go to the sidecar
    monkeypatch.setattr(X, "_HEADER_LIMIT", 10)
    out = X.save_features(tmp_path / f"g{suffix}", f, paths)
    assert X.sidecar_path(out).exists()
    assert X.load_features(out).paths == paths
    with pytest.raises(ValueError, match="do not match"):
        X.save_features(tmp_path / f"h{suffix}", f, paths[:3])
    with pytest.raises(ValueError, match=r"\.safetensors or \.npy"):
        X.save_features(tmp_path / "f.pt", f, paths)
    if suffix == ".npy":
        X.sidecar_path(out).unlink()
        with pytest.raises(FileNotFoundError, match="g.npy.json"):
            X.load_features(out)


# ----------------------------------------------------------------------- extraction
def test_embed_to_file_matches_embed(tmp_path, tiny_vit, photos, caplog):
    out = tmp_path / "feats.safetensors"
    res = X.embed_to_file(tiny_vit, photos, out, shard_size=3, batch_size=2)
    good = _readable(photos)
    got = X.load_features(out)
    assert got.paths == [str(p) for p in good]
    assert got.features.shape == (7, 192)
    torch.testing.assert_close(got.features, tiny_vit.embed(good), atol=1e-5, rtol=0)
    assert [Path(p).name for p, _ in got.skipped] == ["p3_broken.jpg"] == \
        [Path(p).name for p, _ in res.skipped]
    assert got.meta["model"]["weights_hash"] == tiny_vit.weights_hash
    assert got.meta["embed"]["pool"] == "cls" and got.meta["num_images"] == 8
    assert not (tmp_path / "feats.safetensors.shards").exists()
    assert "p3_broken.jpg" in caplog.text


def test_resume_after_interruption(tmp_path, tiny_vit, photos, monkeypatch):
    reference = X.embed_to_file(tiny_vit, photos, tmp_path / "ref.npy", shard_size=2)
    calls: list[int] = []
    real = type(tiny_vit).iter_embed

    def flaky(self, images, **kw):
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(self, images, **kw)

    monkeypatch.setattr(type(tiny_vit), "iter_embed", flaky)
    out = tmp_path / "feats.npy"
    with pytest.raises(RuntimeError, match="power cut"):
        X.embed_to_file(tiny_vit, photos, out, shard_size=2)
    shards = out.with_name("feats.npy.shards")
    done = sorted(p.name for p in shards.glob("shard_*.safetensors"))
    assert done == ["shard_000000.safetensors", "shard_000001.safetensors"]
    assert not out.exists()
    before = {p: p.stat().st_mtime_ns for p in shards.glob("shard_*")}
    calls.clear()
    X.embed_to_file(tiny_vit, photos, out, shard_size=2, keep_shards=True)
    assert calls == [2, 2]  # only shards 2 and 3 were embedded
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    got, ref = X.load_features(out), reference.features
    assert got.paths == ref.paths
    torch.testing.assert_close(got.features, ref.features, atol=1e-5, rtol=0)
    # the same shard folder with other settings is refused, not mixed
    with pytest.raises(ValueError, match="another run|other settings"):
        X.embed_to_file(tiny_vit, photos, out, shard_size=2, pool="gem")


def test_ranks_take_strided_shards(tmp_path, tiny_vit, photos):
    shards = tmp_path / "shards"
    for rank in (1, 0):
        X.extract_to_shards(tiny_vit, photos, shards, shard_size=3, rank=rank, world_size=2)
    assert sorted(p.name for p in shards.glob("shard_*")) == [
        "shard_000000.safetensors", "shard_000001.safetensors", "shard_000002.safetensors"]
    merged = X.merge_shards(shards, tmp_path / "m.safetensors")
    single = X.embed_to_file(tiny_vit, photos, tmp_path / "s.safetensors", shard_size=8)
    assert merged.paths == single.features.paths
    torch.testing.assert_close(merged.features, single.features.features, atol=1e-5, rtol=0)
    (shards / "shard_000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard_000001"):
        X.merge_shards(shards, tmp_path / "m2.safetensors")


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path, tiny_vit, photos, weights):
    """``torchrun --nproc_per_node 2 -m dinofeat embed``: two gloo processes on CPU give
    the single-process result."""
    out = tmp_path / "two.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dinofeat", "embed", str(photos), "--model", str(weights), "--out",
           str(out), "--shard-size", "2", "--batch-size", "2", "--num-workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 7 x 192 features" in proc.stdout
    two = X.load_features(out)
    one = X.embed_to_file(tiny_vit, photos, tmp_path / "one.safetensors", shard_size=2)
    assert two.paths == one.features.paths == [str(p) for p in _readable(photos)]
    torch.testing.assert_close(two.features, one.features.features, atol=1e-5, rtol=0)
    assert len(two.skipped) == 1
    assert not (tmp_path / "two.safetensors.shards").exists()


# ---------------------------------------------------------------------------- CLI
def test_cli_embed(tmp_path, tiny_vit, photos, weights, capsys):
    out = tmp_path / "f.npy"
    rc = main(["embed", str(photos), "--model", str(weights), "--out", str(out),
               "--pool", "cls+gem", "--batch-size", "3", "--shard-size", "4", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 7 x 384 features" in text and "skipped 1 unreadable" in text
    arr = np.load(out)
    side = json.loads(X.sidecar_path(out).read_text())
    assert arr.shape == (7, 384) and side["paths"] == [str(p) for p in _readable(photos)]
    assert side["embed"]["pool"] == "cls+gem" and side["model"]["name"] == "tiny-test"
    ref = tiny_vit.embed(_readable(photos), pool="cls+gem")
    np.testing.assert_allclose(arr, ref.numpy(), atol=1e-5)


def test_cli_attn(tmp_path, weights, make_image, capsys):
    img = tmp_path / "photo.jpg"
    make_image(50, 70).save(img)
    rc = main(["attn", str(img), "--model", str(weights), "--out", str(tmp_path / "a"),
               "--size", "64", "--threshold", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 13 PNGs" in text and str(tmp_path / "a") in text
    assert len(list((tmp_path / "a").glob("*.png"))) == 13


def test_cli_errors(tmp_path, weights, photos, capsys):
    cases = [
        (["embed", str(photos), "--model", str(weights), "--out", str(tmp_path / "x.txt")],
         ".safetensors or .npy"),
        (["embed", str(tmp_path / "nope"), "--model", str(weights), "--out",
          str(tmp_path / "x.npy")], "no such image file or folder"),
        (["attn", str(tmp_path / "nope.jpg"), "--model", str(weights), "--out",
          str(tmp_path / "a")], "nope.jpg"),
        (["embed", str(photos), "--model", str(tmp_path / "missing.pth"), "--out",
          str(tmp_path / "x.npy")], "missing.pth"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dinofeat: error:") and msg in err, err
        assert "Traceback" not in err
