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
