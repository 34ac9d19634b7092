"""Near-duplicate detection: pairs and groups against brute force, planted copies found in
a folder of generated images, the JSON/CSV/HTML outputs, whitening, the CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dinofeat.search.dedup import (connected_groups, dedup_folder,
                                   duplicate_groups, find_duplicate_pairs, find_duplicates,
                                   group_pairs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch/faiss thread: the shared two-core test machine made spinning OpenMP
    threads very slow."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def _brute_groups(x: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components by breadth-first search over the full similarity matrix."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    linked = (x @ x.T) >= threshold
    seen, groups = set(), []
    for s in range(len(x)):
        if s in seen:
            continue
        comp, todo = {s}, [s]
        while todo:
            a = todo.pop()
            for b in np.flatnonzero(linked[a]).tolist():
                if b not in comp:
                    comp.add(b)
                    todo.append(b)
        seen |= comp
        if len(comp) > 1:
            groups.append(sorted(comp))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_pairs_and_groups_equal_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    # plant near-copies, and a chain a -> b -> c where a and c are not linked directly
    x[10] = x[3] + 0.05 * rng.standard_normal(16)
    x[11] = x[3] + 0.05 * rng.standard_normal(16)
    u = x[50] / np.linalg.norm(x[50])
    v = rng.standard_normal(16)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    for row, degrees in ((51, 15), (52, 30)):  # cos 15 deg = 0.966, cos 30 deg = 0.866
        x[row] = np.cos(np.radians(degrees)) * u + np.sin(np.radians(degrees)) * v
    threshold = 0.95
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    assert sim[50, 51] >= threshold and sim[51, 52] >= threshold > sim[50, 52]
    i, j, s = find_duplicate_pairs(torch.from_numpy(x), threshold)
    bi, bj = np.nonzero(np.triu(sim >= threshold, k=1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(bi.tolist(), bj.tolist()))
    np.testing.assert_allclose(s, sim[i, j], atol=1e-5)
    # connected components chain: a -> b -> c is one component
    components = connected_groups(len(x), i, j)
    assert components == _brute_groups(x, threshold) and [50, 51, 52] in components
    # groups do not: every member is at the threshold or above to the row kept
    groups = find_duplicates(x, threshold)
    assert sorted(r for g in groups for r in g) == sorted(r for c in components for r in c)
    for g in groups:
        assert all(sim[g[0], m] >= threshold for m in g[1:])
    assert [51, 50, 52] in groups  # the middle of the chain is linked to both ends
    # if the chain's end is the one to keep, the far end is not in its group
    prefer_50 = [0 if r == 50 else 1 for r in range(len(x))]
    split = find_duplicates(x, threshold, priority=prefer_50)
    assert [50, 51] in split and not any(52 in g and 50 in g for g in split)
    # neighbours-only search finds the same groups when k covers them
    assert find_duplicates(x, threshold, k=5) == groups
    assert find_duplicates(x[:1], 0.5) == [] and find_duplicates(x, 1.0) == []
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(x, 1.5)


def test_group_pairs_never_chains_random_graphs():
    """On random similarity graphs every member of every group is linked to its kept
    item, no item is in two groups, and a pair's two items are never both left out."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        x = rng.standard_normal((n, 4)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        threshold = float(rng.uniform(0.5, 0.95))
        i, j, s = find_duplicate_pairs(x, threshold)
        groups = group_pairs(n, i, j, s, priority=rng.permutation(n).tolist())
        seen = [r for g in groups for r in g.rows]
        assert len(seen) == len(set(seen))
        for g in groups:
            assert all(sim[g.keep, m] >= threshold - 1e-6 for m in g.rows[1:])
            np.testing.assert_allclose(g.similarity[1:], sim[g.keep, g.rows[1:]], atol=1e-5)
            assert all(v >= threshold for v in g.similarity)
        grouped = set(seen)
        assert all(a in grouped or b in grouped for a, b in zip(i.tolist(), j.tolist()))


def test_duplicate_groups_prefers_the_given_keeper():
    x = np.array([[1, 0], [0.9, 0.1], [0.8, 0.3]], dtype=np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    t = float(min((xn[0] @ xn[1]), (xn[1] @ xn[2])) - 1e-4)
    assert xn[0] @ xn[2] < t
    assert [g.rows for g in duplicate_groups(x, t, priority=[2, 1, 0])] == [[2, 1]]
    assert [g.rows for g in duplicate_groups(x, t)] == [[1, 0, 2]]  # the most links


def test_connected_groups_order():
    groups = connected_groups(8, np.array([5, 0, 6, 2]), np.array([6, 1, 7, 0]))
    assert groups == [[0, 1, 2], [5, 6, 7]]
    assert connected_groups(3, np.zeros(0, int), np.zeros(0, int)) == []


# ------------------------------------------------------------------ folders
def _scene(seed: int) -> Image.Image:
    """A distinct generated picture: a coloured background with six random shapes."""
    r = np.random.default_rng(seed)
    img = Image.new("RGB", (96, 96), tuple(int(v) for v in r.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = r.integers(0, 80, 2)
        w, h = r.integers(10, 50, 2)
        colour = tuple(int(v) for v in r.integers(0, 255, 3))
        shape = draw.rectangle if r.random() < 0.5 else draw.ellipse
        shape([x0, y0, x0 + w, y0 + h], fill=colour)
    return img


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """30 distinct pictures; 5 of them copied three ways (resized to 75%, re-encoded as
    JPEG quality 60, cropped by 4 px on every side); one broken file; odd file names."""
    root = tmp_path_factory.mktemp("collection")
    (root / "originals").mkdir()
    (root / "copies").mkdir()
    for i in range(30):
        _scene(i).save(root / "originals" / f"photo{i:02d}.png")
    time.sleep(0.01)  # copies are newer than their originals
    expected = []
    for i in range(5):
        src = root / "originals" / f"photo{i:02d}.png"
        im = Image.open(src)
        names = [f"small {i}.png", f"re&encoded<{i}>.jpg", f"crop{i}.png"]
        im.resize((72, 72), Image.BICUBIC).save(root / "copies" / names[0])
        im.save(root / "copies" / names[1], quality=60)
        im.crop((4, 4, 92, 92)).save(root / "copies" / names[2])
        expected.append([str(src)] + [str(root / "copies" / n) for n in names])
    (root / "copies" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root, expected


def _tiny_model():
    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    return DinoModel(build_backbone("vit_tiny16", img_size=64), name="tiny",
                     preprocessing=Preprocessing(resize_size=64, crop_size=64)).eval()


# The model has random weights: its [CLS]+GeM features still separate these generated
# pictures, but with a narrow margin (copies >= ~0.97, distinct pairs <= ~0.96), so the
# threshold is set for it. Real DINO weights want another threshold (see dinofeat.search.dedup).
RANDOM_MODEL_THRESHOLD = 0.965


def test_dedup_folder_finds_planted_copies(collection, tmp_path):
    root, expected = collection
    model = _tiny_model()
    result = dedup_folder(root, model, RANDOM_MODEL_THRESHOLD, num_workers=0, batch_size=16,
                          out=tmp_path / "groups.json", html_path=tmp_path / "report.html")
    assert len(result.paths) == 45 and len(result.unreadable) == 1
    assert result.unreadable[0][0].endswith("broken.jpg")
    found = sorted(sorted(g.paths) for g in result.groups)
    assert found == sorted(sorted(e) for e in expected)
    for g in result.groups:
        assert g.keep.endswith(".png") and "originals" in g.keep  # most pixels, oldest
        assert g.similarity[0] == pytest.approx(1.0, abs=1e-5)
        assert min(g.similarity) >= RANDOM_MODEL_THRESHOLD
    assert len(result.duplicates) == 15
    assert result.model["pooling"] == "cls+gem"
    assert result.model["weights_hash"] == model.weights_hash

    doc = json.loads((tmp_path / "groups.json").read_text())
    assert doc == json.loads(json.dumps(result.as_dict()))
    assert doc["groups_count"] == 5 and doc["images"] == 45

    result.save(tmp_path / "groups.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "groups.csv").read_text())))
    assert len(rows) == 20 and sum(int(r["keep"]) for r in rows) == 5
    assert {r["path"] for r in rows} == {p for e in expected for p in e}

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.text = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    assert len(page.images) == 20
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 160
    text = "".join(page.text)
    assert "re&encoded<0>.jpg" in text  # escaped in the page, intact once parsed
    assert "<0>" not in (tmp_path / "report.html").read_text()
    # every thumbnail links to its full-size file, and the page has the histogram
    html_text = (tmp_path / "report.html").read_text()
    for g in result.groups:
        for p in g.paths:
            assert f'href="{Path(p).as_uri()}"'.replace("&", "&amp;") in html_text
    assert "<svg" in html_text and f"threshold {RANDOM_MODEL_THRESHOLD}" in html_text
    hist = doc["nearest_histogram"]
    assert sum(hist["counts"]) == 45 and len(hist["edges"]) == len(hist["counts"]) + 1


@pytest.mark.parametrize("threshold", [0.9, 0.95, RANDOM_MODEL_THRESHOLD])
def test_dedup_folder_members_at_threshold_to_kept(collection, threshold):
    """At low thresholds the random model links many distinct pictures (connected
    components would chain them into one big group); every member must still be at the
    threshold or above to the image kept, measured here from independently embedded
    features."""
    root, _ = collection
    model = _tiny_model()
    result = dedup_folder(root, model, threshold, num_workers=0, batch_size=16)
    feats = model.embed(result.paths, pool="cls+gem", num_workers=0).numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    row = {p: r for r, p in enumerate(result.paths)}
    assert result.groups
    for g in result.groups:
        keep = feats[row[g.keep]]
        for p, s in zip(g.paths[1:], g.similarity[1:]):
            assert s >= threshold
            assert float(feats[row[p]] @ keep) >= threshold - 1e-5
    if threshold == 0.9:  # the chaining case: components are larger than any group
        x = feats
        i, j, _ = find_duplicate_pairs(x, threshold)
        biggest = max(len(c) for c in connected_groups(len(x), i, j))
        assert biggest > max(len(g.paths) for g in result.groups)


def test_dedup_with_whitening(collection, tmp_path):
    """A PCA-whitening learnt on distractor pictures (as in the paper's copy detection)
    widens the gap between copies and distinct pictures: the planted groups come out at a
    far lower threshold than without it."""
    from dinofeat.eval.copydetect import learn_whitening
    root, expected = collection
    model = _tiny_model()
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    for i in range(1000, 1150):
        _scene(i).save(distractors / f"d{i}.png")
    raw = model.embed(distractors, pool="cls+gem", normalize=False, num_workers=0)
    white = learn_whitening(raw, dim=32, info={"model": model.describe(), "pool": "cls+gem"})
    path = white.save(tmp_path / "white.safetensors")
    result = dedup_folder(root, model, 0.75, whitening=path, num_workers=0)
    assert result.model["whitening"].startswith(f"{2 * model.embed_dim}->32:")
    assert sorted(sorted(g.paths) for g in result.groups) == sorted(sorted(e) for e in expected)
    plain = dedup_folder(root, model, 0.75, num_workers=0)  # without: everything links up
    assert len(plain.groups) < 5 or max(len(g.paths) for g in plain.groups) > 4
    # the whitening of another model, or of other features, is refused
    other = learn_whitening(raw, dim=8, info={"model": {"weights_hash": "0" * 16}})
    with pytest.raises(ValueError, match="weights"):
        dedup_folder(root, model, whitening=other, num_workers=0)
    with pytest.raises(ValueError, match="pool"):
        dedup_folder(root, model, pool="cls", whitening=white, num_workers=0)


def test_dedup_cli(collection, tmp_path, capsys):
    from dinofeat.cli import main
    from dinofeat.model import save_safetensors
    root, expected = collection
    weights = save_safetensors(_tiny_model(), tmp_path / "tiny.safetensors")
    code = main(["dedup", str(root), "--model", str(weights), "--threshold",
                 str(RANDOM_MODEL_THRESHOLD), "--out", str(tmp_path / "g.csv"), "--html",
                 str(tmp_path / "r.html"), "--num-workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "5 duplicate groups" in out and "1 unreadable" in out
    assert (tmp_path / "g.csv").stat().st_size > 0 and (tmp_path / "r.html").exists()
    assert main(["dedup", str(root), "--out", str(tmp_path / "g.txt")]) == 2
    assert "--out must end in .json or .csv" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path / "missing")]) == 2
