"""Broken and awkward image files through every reader and every pipeline.

The zoo (``_zoo.py``): truncated JPEG/PNG, a zero-byte file, a text file named ``.jpg``, a
decompression bomb, a file without read permission, 1x1 / 100000x10 / 8x8 images, 16-bit,
CMYK, palette and alpha images, invalid EXIF orientations, a corrupt EXIF block, a name
that is not UTF-8 and a folder named ``photo.jpg``. ``embed`` (API and CLI), ``index
build``, ``dedup`` and ``train`` must finish, skip and count the unreadable files, name
each of them exactly once in the log, and return results for all the others.

Permissions: the suite runs as root in CI, where ``chmod 000`` does not stop a read. There
the denial is simulated in-process (every ``open`` of that file raises EACCES, see
``_zoo.deny_read``) and the pipelines run with ``num_workers=0``; as another user the real
``chmod 000`` is used. In the subprocess CLI test the file is then readable (root), and
expected to be.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _zoo import NON_UTF8_NAME, is_root, picture, write_zoo
from dinofeat import images as I
from dinofeat.cli import main

REPO = Path(__file__).resolve().parents[2]


def _expect(files, *, permission_denied: bool = True):
    """(readable paths in listing order, unreadable paths) of the zoo."""
    listed = I.list_images(files[0].path.parents[1])
    by_path = {f.path: f for f in files}
    readable = [p for p in listed if by_path[p].readable or
                (not permission_denied and by_path[p].kind == "no read permission")]
    unreadable = {p for p in listed if p not in set(readable)}
    return readable, unreadable


def _named_once(text: str, unreadable: set[Path], readable: list[Path]) -> None:
    """Each unreadable file is named exactly once in ``text``; no readable file is."""
    for p in unreadable:
        assert text.count(str(p)) == 1, (p, text.count(str(p)), text[-3000:])
    for p in readable:
        assert str(p) not in text, p


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith("dinofeat") and r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------- readers
def test_every_reader_on_every_zoo_file(zoo_dir, unreadable_by_permission, tally):
    root, files = zoo_dir
    assert len(files) == 25
    plain = np.asarray(Image.open(root / "odd/exif-orientation-0.jpg").convert("RGB"))
    for f in files:
        for reader in (I.open_image, I.read_image):
            if not f.readable:
                with pytest.raises(I.ImageReadError) as ei:
                    reader(f.path)
                assert str(f.path) in str(ei.value) and ei.value.reason, f.kind
                continue
            out = reader(f.path)
            arr = np.asarray(out) if isinstance(out, Image.Image) else \
                out.permute(1, 2, 0).numpy()
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, f.kind
            with Image.open(f.path) as im:
                assert arr.shape[:2] == (im.size[1], im.size[0]), f.kind
            if f.kind.startswith("EXIF orientation") or f.kind == "corrupt EXIF block":
                # an invalid orientation or a garbage EXIF block means "as stored"
                assert np.array_equal(arr, plain), f.kind
        tally.add("images: readers", inputs=2, checks=2)
    tally.note("permissions", f"chmod 000 denial: {unreadable_by_permission}")


def test_image_smaller_than_a_patch(tiny_model, zoo_dir, tally):
    root, _ = zoo_dir
    tiny = root / "odd/tiny-8x8.png"
    assert tiny_model.embed(tiny).shape == (1, 192)  # "dino": resized up to 37, crop 32
    assert tiny_model.embed(tiny, preprocessing="whole").shape == (1, 192)  # one patch
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        tiny_model.attention_maps(tiny)
    assert tiny_model.attention_maps(tiny, size=32).heads.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        tiny_model.embed(torch.zeros(1, 3, 8, 8))  # normalised input is used as is
    tally.add("images: readers", inputs=4, checks=5)


# ------------------------------------------------------------------ embed, API + CLI
def test_embed_api_skips_counts_and_names_each_bad_file_once(tiny_model, zoo_dir,
                                                            unreadable_by_permission,
                                                            caplog, tally):
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        stream = tiny_model.iter_embed(root, num_workers=0, batch_size=8)
        keys, chunks = [], []
        for k, f in stream:
            keys += k
            chunks.append(f)
    feats = torch.cat(chunks)
    assert keys == readable and feats.shape == (len(readable), 192)
    assert torch.isfinite(feats).all()
    assert {s.key for s in stream.skipped} == unreadable
    assert all(s.reason for s in stream.skipped)
    text = _warnings(caplog)
    _named_once(text, unreadable, readable)
    assert f"skipped {len(unreadable)} unreadable" in text
    # the rows are the features of those files, computed alone
    some = [readable[0], root / "odd" / NON_UTF8_NAME, root / "odd/photo.jpg/inside.png"]
    alone = tiny_model.embed(some, num_workers=0)
    torch.testing.assert_close(feats[[keys.index(p) for p in some]], alone, atol=1e-5, rtol=0)
    tally.add("images: embed API", inputs=len(files), checks=len(files) + 3)


def test_cli_embed_in_process(tiny_weights, zoo_dir, unreadable_by_permission, tmp_path,
                              caplog, capsys, tally):
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    out = tmp_path / "feats.safetensors"
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        rc = main(["embed", str(root), "--model", str(tiny_weights), "--out", str(out),
                   "--num-workers", "0", "--batch-size", "8", "--shard-size", "7",
                   "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(readable)} x 192 features" in printed
    assert f"skipped {len(unreadable)} unreadable" in printed
    _named_once(_warnings(caplog), unreadable, readable)
    from dinofeat.extract import load_features
    ff = load_features(out)
    assert ff.paths == [str(p) for p in readable]
    assert {Path(p) for p, _ in ff.skipped} == unreadable
    tally.add("images: embed CLI", inputs=len(files), checks=len(files) + 2)


@pytest.mark.slow
def test_cli_embed_subprocess_no_traceback(tiny_weights, tmp_path, tally):
    """The real command in its own process: exit 0, each bad file named once on stderr,
    non-UTF-8 names printed without crashing, no traceback."""
    root = tmp_path / "photos"
    files = write_zoo(root, good=2, huge=False)
    readable, unreadable = _expect(files, permission_denied=not is_root())
    out = tmp_path / "f.npy"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "dinofeat", "embed", str(root), "--model",
                           str(tiny_weights), "--out", str(out), "--num-workers", "0",
                           "--no-progress"], capture_output=True, env=env, timeout=300)
    err = proc.stderr.decode("utf-8", "surrogateescape")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    _named_once(err, unreadable, readable)
    side = json.loads((tmp_path / "f.npy.json").read_text())
    assert side["paths"] == [str(p) for p in readable]
    assert np.load(out).shape == (len(readable), 192)
    tally.add("images: embed CLI", inputs=len(files), checks=len(files) + 3)


# ----------------------------------------------------------------------- index build
def test_index_build_api_and_cli(tiny_model, tiny_weights, zoo_dir, unreadable_by_permission,
                                 tmp_path, caplog, capsys, tally):
    from dinofeat.search import KNNIndex
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        index = KNNIndex.from_images(root, tiny_model, tmp_path / "a.idx", num_workers=0,
                                     batch_size=8, progress=False)
    assert len(index) == len(readable)
    assert sorted(index.paths()) == sorted(str(p) for p in readable)
    unread = index.build_state["unreadable"]
    assert {Path(p) for p, _ in unread} == unreadable and len(unread) == len(unreadable)
    _named_once(_warnings(caplog), unreadable, readable)
    # every readable image finds itself first
    q = torch.cat([tiny_model.embed(p) for p in readable[:3]])
    _, ids = index.search(q, k=1)
    assert [index.lookup([i])[0]["path"] for i in ids[:, 0]] == [str(p) for p in readable[:3]]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        rc = main(["index", "build", str(root), "--model", str(tiny_weights), "--out",
                   str(tmp_path / "b.idx"), "--num-workers", "0", "--no-progress"])
    assert rc == 0
    assert len(KNNIndex.load(tmp_path / "b.idx")) == len(readable)
    _named_once(_warnings(caplog), unreadable, readable)
    tally.add("images: index build", inputs=2 * len(files), checks=2 * len(files) + 3)


# ----------------------------------------------------------------------------- dedup
def test_dedup_api_and_cli(tiny_model, tiny_weights, zoo_dir, unreadable_by_permission,
                           tmp_path, caplog, capsys, tally):
    from dinofeat.search.dedup import dedup_folder
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        res = dedup_folder(root, tiny_model, 0.95, num_workers=0, batch_size=8,
                           progress=False, out=tmp_path / "g.json",
                           html_path=tmp_path / "review.html")
    assert res.paths == [str(p) for p in readable]
    assert {Path(p) for p, _ in res.unreadable} == unreadable
    _named_once(_warnings(caplog), unreadable, readable)
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["images"] == len(readable) and len(saved["unreadable"]) == len(unreadable)
    page = (tmp_path / "review.html").read_text(encoding="utf-8")
    assert page.count("<li>") == len(unreadable)
    res.save(tmp_path / "g.csv")  # names that are not UTF-8 survive in every format
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        rc = main(["dedup", str(root), "--model", str(tiny_weights), "--num-workers", "0",
                   "--no-progress", "--out", str(tmp_path / "c.csv"), "--html",
                   str(tmp_path / "c.html")])
    assert rc == 0, capsys.readouterr().err
    _named_once(_warnings(caplog), unreadable, readable)
    tally.add("images: dedup", inputs=2 * len(files), checks=2 * len(files) + 4)


# ----------------------------------------------------------------------------- train
@pytest.mark.slow
def test_train_skips_counts_and_names_each_bad_file_once(zoo_dir, unreadable_by_permission,
                                                         tmp_path, caplog, tally):
    from dinofeat.training.config import TrainConfig
    from dinofeat.training.loop import train
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    n = len(readable) + len(unreadable)
    cfg = TrainConfig(arch="vit_mini16", out_dim=32, hidden_dim=32, bottleneck_dim=16,
                      global_crop_size=32, local_crop_size=16, local_crops_number=1,
                      batch_size_per_gpu=5, epochs=1, warmup_epochs=0,
                      warmup_teacher_temp_epochs=0, num_workers=0, log_every=100,
                      precision="fp32", saveckp_freq=0, data=str(root),
                      output_dir=str(tmp_path / "run"))
    assert n % 5 == 0  # every file is visited exactly once in the epoch
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        res = train(cfg)
    assert res.iteration == n // 5 and math_finite(res.history[0]["loss"])
    assert res.skipped_images == len(unreadable)
    assert res.history[0]["skipped_images"] == len(unreadable)
    _named_once(_warnings(caplog), unreadable, readable)
    tally.add("images: train", inputs=len(files), checks=len(files) + 3)


def math_finite(x: float) -> bool:
    return bool(np.isfinite(x))


# ------------------------------------------------------------- a folder named *.jpg
def test_folder_named_like_an_image(tiny_model, tmp_path, tally):
    d = tmp_path / "c"
    (d / "photo.jpg").mkdir(parents=True)
    Image.fromarray(picture(30, 30)).save(d / "a.png")
    assert I.list_images(d) == [d / "a.png"]  # an empty folder named .jpg is not a file
    with pytest.raises(I.ImageReadError, match="is a folder"):
        I.read_image(d / "photo.jpg")
    # named explicitly, an empty folder is a user mistake, reported by name
    with pytest.raises(FileNotFoundError, match="no image files in folder .*photo.jpg"):
        tiny_model.embed([d / "a.png", d / "photo.jpg"], num_workers=0)
    Image.fromarray(picture(30, 30, seed=1)).save(d / "photo.jpg" / "in.png")
    feats = tiny_model.embed([d / "a.png", d / "photo.jpg"], num_workers=0)
    assert feats.shape == (2, 192)  # a folder given as input contributes its images
    tally.add("images: readers", inputs=2, checks=4)


# ------------------------------------------------------- evaluation feature paths
def test_evaluation_feature_extraction(tiny_model, zoo_dir, unreadable_by_permission, caplog,
                                       tally):
    """The linear probe's and k-NN's feature extraction over the zoo's files."""
    from dinofeat.eval.features import embed_labeled, extract_with_transform
    root, files = zoo_dir
    readable, unreadable = _expect(files)
    paths = readable + sorted(unreadable)
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        feats, kept, skipped = extract_with_transform(
            tiny_model, paths, I.ImageTransform(tiny_model.preprocessing, 16), tiny_model,
            num_workers=0, progress=False)
    assert kept == list(range(len(readable))) and feats.shape == (len(readable), 192)
    assert len(skipped) == len(unreadable)
    _named_once(_warnings(caplog), unreadable, readable)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        f2, labels, skipped2 = embed_labeled(tiny_model, paths, list(range(len(paths))),
                                             num_workers=0)
    assert labels.tolist() == list(range(len(readable))) and len(skipped2) == len(unreadable)
    _named_once(_warnings(caplog), unreadable, readable)
    tally.add("images: evaluation features", inputs=2 * len(files), checks=2 * len(files) + 4)
