"""Index folders written by someone else, and folders that hold other things: a header
naming files outside its folder, a crafted faiss file declaring a huge array, a weights
path recorded in the header, and saving into a folder that is not an index."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from dinofeat.search import IndexFormatError, KNNIndex


def _index(tmp_path: Path, name: str = "i.idx", n: int = 20) -> Path:
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    index = KNNIndex(dim=8)
    index.add(x, meta=[f"/photos/{i}.png" for i in range(n)])
    return index.save(tmp_path / name)


def _edit_header(folder: Path, **changes) -> None:
    header = json.loads((folder / "index.json").read_text())
    header.update(changes)
    (folder / "index.json").write_text(json.dumps(header))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("key", ["faiss_file", "items_file", "pending_file"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_header_names_outside_the_folder_are_refused(tmp_path, key, how, tally):
    folder = _index(tmp_path)
    other = _index(tmp_path, "other.idx")
    header = json.loads((folder / "index.json").read_text())
    target_key = key if key != "pending_file" else "faiss_file"
    target = other / json.loads((other / "index.json").read_text())[target_key]
    if how == "absolute":
        name = str(target) if key != "items_file" else "/etc/passwd"
    elif how == "dotdot":
        name = os.path.relpath(target, folder)
        assert name.startswith("..")
    else:  # a link inside the folder that leads out of it
        (folder / "link.bin").symlink_to(target)
        name = "link.bin"
    _edit_header(folder, **{key: name})
    with pytest.raises(IndexFormatError) as err:
        KNNIndex.load(folder)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert key in msg and "index.json" in msg and "outside" in msg
    assert header  # the header was a real index's
    tally.add("index files", inputs=1, checks=3)


def test_header_file_name_that_is_not_a_string(tmp_path, tally):
    folder = _index(tmp_path)
    _edit_header(folder, items_file=["items.1.json"])
    with pytest.raises(IndexFormatError, match="items_file is not a file name"):
        KNNIndex.load(folder)
    tally.add("index files", inputs=1, checks=1)


def _crafted_flat(path: Path, declared: int, size: int = 730) -> None:
    """An IndexFlatIP file whose code array declares ``declared`` floats (4 bytes each)
    but holds only what fits in ``size`` bytes of file."""
    flat = faiss.IndexFlatIP(4)
    flat.add(np.ones((2, 4), np.float32))
    raw = bytearray(faiss.serialize_index(flat).tobytes())
    # fourcc, d, ntotal, two dummies, is_trained, metric_type: then the code array's length
    off = 4 + 4 + 8 + 8 + 8 + 1 + 4
    assert struct.unpack("<Q", raw[off:off + 8])[0] == 2 * 4  # 2 vectors of 4 floats
    raw[off:off + 8] = struct.pack("<Q", declared)
    path.write_bytes(bytes(raw[:off + 8]) + b"\0" * (size - off - 8))


@pytest.mark.parametrize("declared", [2 ** 31, 2 ** 32, 2 ** 40])
def test_crafted_faiss_file_refused_without_allocating(tmp_path, declared, tally):
    """A 730-byte IndexFlat declaring 2^31+ floats of codes: without a bound faiss allocates
    them before noticing the file is short (8.2 GB and 28 s measured for 2^31 on the test
    machine). Loading runs in a child process whose peak memory and time are measured."""
    folder = _index(tmp_path)
    header = json.loads((folder / "index.json").read_text())
    _crafted_flat(folder / header["faiss_file"], declared)
    assert (folder / header["faiss_file"]).stat().st_size == 730
    code = textwrap.dedent(f"""
        import json, resource, time
        from dinofeat.search import KNNIndex, IndexFormatError
        t = time.perf_counter()
        try:
            KNNIndex.load({str(folder)!r})
            outcome = "loaded"
        except IndexFormatError as e:
            outcome = str(e)
        print(json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - t,
                          "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["outcome"] != "loaded"
    assert "not a readable faiss index" in res["outcome"] and header["faiss_file"] in res["outcome"]
    assert len(res["outcome"].splitlines()) == 1
    # an interpreter with torch and faiss imported is ~0.5-1 GB; 2^31 floats would be 8 GB
    assert res["max_rss_mb"] < 1500, res
    print(f"crafted 730-byte IndexFlat declaring {declared} floats: refused in "
          f"{res['seconds']:.4f} s, peak RSS {res['max_rss_mb']:.0f} MB")
    tally.add("index files", inputs=1, checks=3)


def test_the_bound_leaves_faiss_setting_as_it_was(tmp_path):
    before = faiss.get_deserialization_vector_byte_limit()
    folder = _index(tmp_path, n=500)
    assert len(KNNIndex.load(folder)) == 500
    assert faiss.get_deserialization_vector_byte_limit() == before


def test_model_source_outside_the_folder_is_not_followed(tmp_path, tiny_model, tally):
    from dinofeat.model import save_safetensors
    weights = save_safetensors(tiny_model, tmp_path / "w.safetensors")
    from dinofeat.model import load
    model = load(weights)
    index = KNNIndex(dim=4, model_info=model)
    index.add(np.eye(4, dtype=np.float32))
    folder = index.save(tmp_path / "m.idx")
    assert index.model_info["source"] == str(weights)
    loaded = KNNIndex.load(folder)
    with pytest.raises(FileNotFoundError) as err:
        loaded.load_model()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "--model" in msg and str(weights) in msg
    assert "model.source" in msg
    # the same weights passed explicitly are fine
    assert loaded.load_model(weights).weights_hash == model.weights_hash
    # weights kept inside the index folder are followed
    inside = save_safetensors(tiny_model, folder / "model.safetensors")
    _edit_header(folder, model={**loaded.model_info, "source": str(inside)})
    assert KNNIndex.load(folder).load_model().weights_hash == model.weights_hash
    # a source that climbs out through '..' from inside is still outside
    _edit_header(folder, model={**loaded.model_info,
                                "source": str(folder / ".." / "w.safetensors")})
    with pytest.raises(FileNotFoundError, match="--model"):
        KNNIndex.load(folder).load_model()
    tally.add("index files", inputs=2, checks=6)


def test_cli_search_names_weights_for_an_outside_source(tmp_path, tiny_model, capsys, tally):
    from PIL import Image

    from _zoo import picture
    from dinofeat.cli import main
    from dinofeat.model import save_safetensors
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(picture(40, 40, seed=i)).save(photos / f"{i}.png")
    weights = save_safetensors(tiny_model, tmp_path / "w.safetensors")
    out = tmp_path / "p.idx"
    assert main(["index", "build", str(photos), "--model", str(weights), "--out", str(out),
                 "--num-workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), str(photos / "0.png")]) == 2
    err = capsys.readouterr().err
    assert f"--model {weights}" in err and len(err.strip().splitlines()) == 1
    assert main(["search", str(out), str(photos / "0.png"), "--model", str(weights)]) == 0
    tally.add("index files", inputs=1, checks=3)


def test_save_refuses_a_foreign_header_and_keeps_its_files(tmp_path, tally):
    x = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    index = KNNIndex(dim=8)
    index.add(x)
    crowded = tmp_path / "project"
    crowded.mkdir()
    (crowded / "index.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    (crowded / "index.2.faiss").write_bytes(b"someone else's")
    (crowded / "items.1.json").write_text("[]")
    before = _tree(crowded)
    with pytest.raises(FileExistsError, match="not the header of a dinofeat index"):
        index.save(crowded)
    assert _tree(crowded) == before
    # a folder with other files and no header at all
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a dinofeat index"):
        index.save(notes)
    assert _tree(notes) == {"todo.txt": b"x"}
    # a header that is a link to another index's header
    good = index.save(tmp_path / "good.idx")
    linked = tmp_path / "linked.idx"
    linked.mkdir()
    (linked / "index.json").symlink_to(good / "index.json")
    with pytest.raises(FileExistsError, match="symbolic link"):
        index.save(linked)
    # empty folders and dinofeat index folders are fine
    empty = tmp_path / "empty"
    empty.mkdir()
    index.save(empty)
    index.save(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["index.2.faiss", "index.json",
                                                      "items.2.json"]
    tally.add("index files", inputs=3, checks=6)
