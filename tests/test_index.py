"""KNNIndex: search against brute force, DINO's k-NN vote against its formula, saving and
loading (atomic, checked), refusals, removal, automatic training, image builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import dinofeat.search.factory as factory_mod
import dinofeat.search.storage as storage_mod
from dinofeat.search import (AUTO_EXACT_LIMIT, IncompatibleFeaturesError, IndexFormatError,
                             KNNIndex, choose_factory, features_info)

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch/faiss thread: the test machine's two cores are shared by several test
    runs, and spinning OpenMP threads made small ops ~25x slower there."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, d: int, centers: int, seed: int = 0, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    lab = rng.integers(0, centers, n)
    x = c[lab] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), lab


MODEL_A = {"name": "vit_tiny16", "weights_hash": "aaaa", "embed_dim": 16, "patch_size": 16,
           "preprocessing": {"mode": "dino", "crop_size": 224}, "pooling": "cls"}
MODEL_B = dict(MODEL_A, weights_hash="bbbb")


# ------------------------------------------------------------------ exact search
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    q = rng.standard_normal((17, 24)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64)  # arbitrary user ids
    index = KNNIndex(metric=metric)
    index.add(torch.from_numpy(x), ids=ids)  # torch in
    scores, got = index.search(q, k=7)  # numpy in
    if metric == "cosine":
        sim = _unit(q).astype(np.float64) @ _unit(x).T.astype(np.float64)
        order = np.argsort(-sim, axis=1)[:, :7]
    else:
        sim = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
        order = np.argsort(sim, axis=1)[:, :7]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(sim, order, 1), rtol=1e-4, atol=1e-4)
    assert scores.dtype == np.float32 and got.dtype == np.int64
    assert len(index) == 300


def test_fewer_items_than_k_pads_with_minus_one():
    index = KNNIndex()
    index.add(np.eye(3, 8, dtype=np.float32))
    scores, ids = index.search(np.eye(1, 8, dtype=np.float32), k=5)
    assert ids[0, :3].tolist() == [0, 1, 2] or set(ids[0, :3].tolist()) == {0, 1, 2}
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    empty_scores, empty_ids = KNNIndex(dim=8).search(np.ones((2, 8)), k=3)
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all()


def test_bad_inputs_are_refused_clearly():
    index = KNNIndex()
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="zero vectors"):
        index.add(np.zeros((2, 4)))
    index.add(np.ones((2, 4)), ids=[5, 6])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.ones((1, 4)), ids=[6])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(np.ones((2, 4)), ids=[8, 8])
    with pytest.raises(ValueError, match="labels"):
        index.add(np.ones((1, 4)), labels=[1])  # index has no labels
    with pytest.raises(ValueError, match="factory"):
        KNNIndex(factory="NoSuchThing12").add(np.ones((1, 4)))
    with pytest.raises(ValueError, match="metric"):
        KNNIndex(metric="dot")


# ------------------------------------------------------------------ classify
@pytest.mark.parametrize("labels_kind", ["int", "str"])
def test_classify_equals_dino_weighted_vote(labels_kind):
    """Section 3.7, computed directly: top-k cosine similarities s_i, weights
    exp(s_i / T), summed per class."""
    x, lab = _clustered(400, 32, centers=5, seed=3, spread=1.0)
    q, _ = _clustered(25, 32, centers=5, seed=4, spread=1.0)
    names = np.array(["boot", "coat", "dress", "shirt", "tee"])
    labels = lab.tolist() if labels_kind == "int" else names[lab].tolist()
    index = KNNIndex()
    index.add(x, labels=labels)
    k, T = 20, 0.07
    got = index.classify(torch.from_numpy(q), k=k, T=T)

    sim = _unit(q).astype(np.float64) @ _unit(x).astype(np.float64).T
    expected = np.zeros((len(q), 5))
    for i in range(len(q)):
        top = np.argsort(-sim[i])[:k]
        for j in top:
            expected[i, lab[j]] += np.exp(sim[i, j] / T)
    assert index.classes == (list(range(5)) if labels_kind == "int" else names.tolist())
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    assert index.predict(q, k=k, T=T) == [index.classes[c] for c in expected.argmax(1)]


def test_classify_explicit_classes_and_refusals():
    x, lab = _clustered(60, 8, centers=3, seed=5)
    index = KNNIndex()
    index.add(x, labels=lab + 1)  # classes 1..3
    scores = index.classify(x[:4], k=5, classes=range(5))
    assert scores.shape == (4, 5) and (scores[:, [0, 4]] == 0).all()
    assert np.allclose(scores.sum(1) > 0, True)
    with pytest.raises(ValueError, match="cosine"):
        l2 = KNNIndex(metric="l2")
        l2.add(x, labels=lab)
        l2.classify(x[:1])
    with pytest.raises(TypeError, match="mix"):
        KNNIndex().add(x[:2], labels=[1, "a"])


# ------------------------------------------------------------------ save / load
def _build(factory="Flat", n=300, d=16, **kw) -> tuple[KNNIndex, np.ndarray]:
    x, lab = _clustered(n, d, centers=6, seed=7)
    index = KNNIndex(factory=factory, model_info=MODEL_A, **kw)
    meta = [{"path": f"/photos/{i:04d}.jpg", "sha256": f"{i:064x}", "camera": "x"} for i in
            range(n)]
    index.add(x, ids=np.arange(n) * 2 + 100, labels=[f"c{v}" for v in lab], meta=meta)
    return index, x


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8"])
def test_save_load_round_trip(tmp_path, factory):
    index, x = _build(factory, train_size=200)
    assert index.is_trained
    index.remove([100, 102])
    before = index.search(x[:10], k=5)
    out = index.save(tmp_path / "photos.idx")
    assert sorted(p.name for p in out.iterdir()) == ["index.1.faiss", "index.json",
                                                     "items.1.json"]
    loaded = KNNIndex.load(out)
    after = loaded.search(x[:10], k=5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    assert len(loaded) == len(index) == 298
    assert loaded.model_info == features_info(MODEL_A)
    assert loaded.lookup([104])[0] == {"id": 104, "label": index.lookup([104])[0]["label"],
                                       "path": "/photos/0002.jpg", "sha256": f"{2:064x}",
                                       "meta": {"camera": "x"}}
    assert loaded.classes == index.classes and loaded.search_params == index.search_params
    header = KNNIndex.read_header(out)
    assert header["format_version"] == storage_mod.FORMAT_VERSION
    assert header["count"] == 298 and header["dim"] == 16 and header["metric"] == "cosine"
    assert header["model"]["weights_hash"] == "aaaa" and header["normalization"] == "l2"
    # ids continue after the largest one
    new = loaded.add(x[:1], labels=["c0"])
    assert new.tolist() == [100 + 2 * 299 + 1]


def test_untrained_buffer_is_saved_and_searchable(tmp_path):
    index, x = _build("IVF16,Flat", n=100)  # 39 * 16 = 624 training points wanted
    assert not index.is_trained
    scores, ids = index.search(x[:3], k=1)
    assert ids[:, 0].tolist() == [100, 102, 104]  # the exact buffer answers
    out = index.save(tmp_path / "buf.idx")
    assert (out / "pending.1.faiss").exists()
    loaded = KNNIndex.load(out)
    assert not loaded.is_trained and len(loaded) == 100
    np.testing.assert_array_equal(loaded.search(x[:3], k=1)[1], ids)


def test_interrupted_save_keeps_previous_index(tmp_path, monkeypatch):
    index, x = _build("Flat", n=50)
    path = index.save(tmp_path / "p.idx")
    expected_ids = index.search(x[:5], k=3)[1]
    index.add(np.ones((1, 16)), labels=["new"])
    index.remove([100])
    real_replace = os.replace

    for victim in ("index.json", "items."):
        def failing_replace(src, dst, _v=victim):
            if Path(dst).name.startswith(_v):
                raise OSError("injected crash")
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="injected"):
            index.save(path)
        monkeypatch.setattr(os, "replace", real_replace)
        old = KNNIndex.load(path)  # still the previous, complete index
        assert len(old) == 50 and "new" not in old.classes
        np.testing.assert_array_equal(old.search(x[:5], k=3)[1], expected_ids)

    index.save(path)  # the next save succeeds and removes the leftovers
    assert len(KNNIndex.load(path)) == 50
    names = sorted(p.name for p in path.iterdir())
    assert names == ["index.3.faiss", "index.json", "items.3.json"] or \
        len([n for n in names if n.endswith(".faiss")]) == 1


def test_load_checks_files_belong_together(tmp_path):
    index, _ = _build("Flat", n=20)
    path = index.save(tmp_path / "a.idx")
    other, _ = _build("Flat", n=30)
    other_path = other.save(tmp_path / "b.idx")
    # swap in another index's faiss file: counts disagree
    (path / "index.1.faiss").write_bytes((other_path / "index.1.faiss").read_bytes())
    with pytest.raises(IndexFormatError, match="do not belong together"):
        KNNIndex.load(path)
    (path / "index.1.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match="not a readable faiss index"):
        KNNIndex.load(path)
    header = json.loads((other_path / "index.json").read_text())
    header["format_version"] = 99
    (other_path / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="newer"):
        KNNIndex.load(other_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(IndexFormatError, match="not a dinofeat index"):
        KNNIndex.load(tmp_path / "plain")
    with pytest.raises(FileExistsError, match="not a dinofeat index"):
        index.save(tmp_path / "plain")  # never writes into someone's folder
    with pytest.raises(FileNotFoundError):
        KNNIndex.load(tmp_path / "missing.idx")


# ------------------------------------------------------------------ refusals
def test_refuses_other_model_pooling_or_dimension(tmp_path):
    index, x = _build("Flat", n=20)
    loaded = KNNIndex.load(index.save(tmp_path / "r.idx"))
    loaded.search(x[:1], 3, model_info=MODEL_A)  # same model: fine
    with pytest.raises(IncompatibleFeaturesError, match="weights_hash"):
        loaded.search(x[:1], 3, model_info=MODEL_B)
    with pytest.raises(IncompatibleFeaturesError, match="pooling"):
        loaded.search(x[:1], 3, model_info=dict(MODEL_A, pooling="cls+gem"))
    with pytest.raises(IncompatibleFeaturesError, match="preprocessing"):
        loaded.add(x[:1], labels=["c"], model_info=dict(MODEL_A, preprocessing={"mode": "whole"}))
    with pytest.raises(IncompatibleFeaturesError, match="dimension 8 .* 16-d"):
        loaded.search(np.ones((1, 8)), 3)
    with pytest.raises(IncompatibleFeaturesError, match="dimension"):
        loaded.add(np.ones((1, 32)), labels=["c"])


# ------------------------------------------------------------------ removal
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "IVF4,PQ4x4"])
def test_removed_ids_never_come_back(factory):
    x, _ = _clustered(400, 16, centers=4, seed=11, spread=0.05)  # many near-ties
    index = KNNIndex(factory=factory, train_size=200)
    index.add(x, ids=np.arange(400) + 1000)
    if factory != "Flat":
        index.set_search_params(**({"nprobe": 4} if "IVF" in factory else {"efSearch": 64}))
    else:
        with pytest.raises(ValueError, match="efSearch"):
            index.set_search_params(efSearch=64)
        assert index.search_params == {}
    removed = np.arange(1000, 1400, 3)
    assert index.remove(removed) == len(removed)
    assert index.remove(removed) == 0  # second time: nothing left to remove
    scores, ids = index.search(x, k=30)
    assert not np.isin(ids, removed).any()
    assert (ids >= 0).all() and len(index) == 400 - len(removed)
    if factory == "HNSW8":
        assert index.info()["tombstones"] == len(removed)
        index.rebuild()  # drops the tombstones
        assert index.info()["tombstones"] == 0 and index.info()["ntotal"] == len(index)
        assert not np.isin(index.search(x, k=30)[1], removed).any()


if given is not None:
    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.booleans(), st.integers(1, 12), st.integers(0, 2**31)),
                    min_size=1, max_size=8),
           st.sampled_from(["Flat", "HNSW4"]))
    def test_add_remove_search_invariants(ops, factory):
        """After any sequence of adds and removes: len equals the live ids, and a search
        returns exactly the live ids brute force ranks first (Flat) / only live ids."""
        rng = np.random.default_rng(0)
        index = KNNIndex(dim=6, factory=factory)
        live: dict[int, np.ndarray] = {}
        for is_add, n, seed in ops:
            if is_add or not live:
                v = rng.standard_normal((n, 6)).astype(np.float32)
                new = index.add(v)
                live.update(zip(new.tolist(), v))
            else:
                r = np.random.default_rng(seed)
                victims = r.choice(list(live), size=min(n, len(live)), replace=False)
                victims = np.concatenate([victims, [10**9]])  # plus an unknown id
                assert index.remove(victims) == len(victims) - 1
                for i in victims[:-1]:
                    live.pop(int(i))
        assert len(index) == len(live) and set(index.ids.tolist()) == set(live)
        q = rng.standard_normal((3, 6)).astype(np.float32)
        k = 5
        scores, ids = index.search(q, k)
        valid = ids[ids >= 0]
        assert set(valid.tolist()) <= set(live)
        assert (ids >= 0).sum(1).tolist() == [min(k, len(live))] * 3
        if factory == "Flat" and live:
            keys = np.array(list(live))
            mat = _unit(np.stack([live[i] for i in keys]))
            sim = _unit(q) @ mat.T
            best = np.sort(-sim, axis=1)[:, :min(k, len(live))]
            np.testing.assert_allclose(-best, scores[:, :best.shape[1]], atol=1e-5)


# ------------------------------------------------------------------ training, auto
def test_ivf_trains_automatically_at_train_size(caplog):
    x, _ = _clustered(1000, 16, centers=8, seed=2)
    index = KNNIndex(factory="IVF8,Flat")
    assert factory_mod.default_train_size("IVF8,Flat", 16) == 39 * 8
    index.add(x[:300])  # below 312: buffered, searched exactly
    assert not index.is_trained and index.info()["pending"] == 300
    exact = index.search(x[:20], k=5)
    with caplog.at_level("INFO", logger="dinofeat"):
        index.add(x[300:])  # crosses 312: trains on all 1000, moves the buffer in
    assert index.is_trained and index.info()["ntotal"] == 1000 and index.info()["pending"] == 0
    assert "trained IVF8,Flat on 1000 vectors" in caplog.text
    assert index.search_params["nprobe"] == 8
    ivf = faiss.extract_index_ivf(index._index)
    assert ivf.nprobe == 8  # nprobe = min(16, nlist): searches every list here
    np.testing.assert_array_equal(index.search(x[:20], k=5)[1][:, 0], exact[1][:, 0])


def test_train_on_demand_and_too_few():
    x, _ = _clustered(100, 8, centers=4, seed=9)
    index = KNNIndex(factory="IVF4,Flat")
    index.add(x[:3])
    with pytest.raises(ValueError, match="at least 4"):
        index.train()
    index.add(x[3:])
    index.train()  # 100 < 156 wanted, but >= nlist: trains now
    assert index.is_trained and index.info()["ntotal"] == 100


def test_auto_factory_rule_and_conversion(monkeypatch, caplog):
    """The size rule of IVF-PQ factories (kept for callers that want one), and "auto"
    before it has a sample: the first candidate that fits stands in, untrained. How auto
    chooses on a sample and meets its recall target: tests/test_search_auto.py."""
    assert choose_factory(AUTO_EXACT_LIMIT, 384) == "Flat"
    assert choose_factory(AUTO_EXACT_LIMIT + 1, 384) == "IVF4096,PQ48"
    assert choose_factory(10_000_000, 768) == "IVF16384,PQ96"
    assert choose_factory(2_000_000, 2048) == "IVF4096,PQ256"
    big = KNNIndex(dim=384, factory="auto", expected_size=5_000_000, memory="64GB")
    assert big.resolved_factory == "IVF2048,SQ8" and not big.is_trained
    assert big.bytes_per_vector == 384 + 8
    small = KNNIndex(dim=384, factory="auto", expected_size=1000, memory="64GB")
    assert small.resolved_factory == "Flat" and small.auto["recall"] == 1.0
    # without expected_size an exact index converts itself once it outgrows the limit
    monkeypatch.setattr(factory_mod, "AUTO_EXACT_LIMIT", 500)
    x, lab = _clustered(1200, 16, centers=10, seed=4)
    index = KNNIndex(factory="auto")
    index.add(x[:500])
    assert index.resolved_factory == "Flat"
    with caplog.at_level("INFO", logger="dinofeat"):
        index.add(x[500:])
    assert "outgrew exact search" in caplog.text
    assert index.resolved_factory.startswith("IVF")
    assert len(index) == 1200 and index.info()["ntotal"] == 1200
    assert set(index.ids.tolist()) == set(range(1200))
    hits = index.search(x[:100], k=1)[1][:, 0]
    assert (lab[hits] == lab[:100]).mean() >= 0.95


@pytest.mark.skipif(not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0),
                    reason="needs faiss-gpu and a CUDA device")
@pytest.mark.gpu
def test_gpu_search_matches_cpu():  # pragma: no cover - no GPU here
    x, _ = _clustered(500, 16, centers=5)
    cpu = KNNIndex(device="cpu")
    gpu = KNNIndex(device="cuda")
    cpu.add(x)
    gpu.add(x)
    np.testing.assert_array_equal(cpu.search(x[:20], 5)[1], gpu.search(x[:20], 5)[1])


# ------------------------------------------------------------------ from images
def _tiny_model(seed: int = 0, size: int = 32):
    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(seed)
    return DinoModel(build_backbone("vit_tiny16", img_size=size), name=f"tiny{seed}",
                     preprocessing=Preprocessing(resize_size=size, crop_size=size)).eval()


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sub = folder / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        arr[: 10 + i] = rng.integers(0, 255, 3)
        p = sub / f"img{i:03d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    _write_images(root, 14)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_from_images_add_is_idempotent_and_checks_model(photo_dir, tmp_path):
    model = _tiny_model()
    out = tmp_path / "photos.idx"
    index = KNNIndex.from_images(photo_dir, model, out, labels="folder", num_workers=0,
                                 batch_size=4)
    assert len(index) == 14 and index.classes == ["cats", "dogs"]
    assert index.build_state["complete"] and len(index.build_state["unreadable"]) == 1
    assert index.model_info["weights_hash"] == model.weights_hash
    assert index.model_info["pooling"] == "cls"
    # the vectors are the model's embeddings of the files, under the user's ids
    feats, keys = model.embed(photo_dir, return_keys=True, num_workers=0)
    recs = index.lookup(index.ids)
    assert [r["path"] for r in recs] == [os.path.abspath(k) for k in keys]
    np.testing.assert_allclose(index._reconstruct(index.ids), feats.numpy(), atol=1e-5)
    # adding the same folder again (plus a byte-identical copy) adds nothing
    (photo_dir / "copy.png").write_bytes((photo_dir / "cats" / "img001.png").read_bytes())
    try:
        again = KNNIndex.load(out)
        report = again.add_images(photo_dir, model, labels="folder", num_workers=0)
        assert report.added == 0 and report.already_indexed == 15
        assert len(report.unreadable) == 1 and len(again) == 14
    finally:
        (photo_dir / "copy.png").unlink()
    # a query image finds itself; another model's features are refused
    scores, ids, qkeys = again.search_images(photo_dir / "cats" / "img003.png", model, k=2)
    assert again.lookup(ids[0])[0]["path"].endswith("img003.png") and scores[0, 0] > 0.9999
    with pytest.raises(IncompatibleFeaturesError, match="weights_hash"):
        again.search_images(photo_dir / "cats" / "img003.png", _tiny_model(seed=1))
    with pytest.raises(IncompatibleFeaturesError, match="pooling"):
        again.add_images(photo_dir, model, pool="cls+gem", labels="folder")
    with pytest.raises(IncompatibleFeaturesError, match="weights_hash"):
        again.search(feats[:1].numpy(), 2, model_info=_tiny_model(seed=1))


def test_interrupted_build_resumes(photo_dir, tmp_path, monkeypatch):
    model = _tiny_model()
    out = tmp_path / "resume.idx"
    calls = {"n": 0}
    real_add = KNNIndex.add

    def crashing_add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real_add(self, *a, **kw)

    monkeypatch.setattr(KNNIndex, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        KNNIndex.from_images(photo_dir, model, out, batch_size=4, checkpoint_every=4,
                             num_workers=0)
    monkeypatch.setattr(KNNIndex, "add", real_add)
    partial = KNNIndex.load(out)
    done = len(partial)  # the batches saved before the crash (every >= 4 images)
    assert 4 <= done < 14 and partial.build_state["complete"] is False
    resumed = KNNIndex.from_images(photo_dir, model, out, batch_size=4, num_workers=0)
    assert len(resumed) == 14 and resumed.build_state["complete"]
    assert f"added {14 - done} images ({done} already indexed" in \
        resumed.build_state["last_add"]
    whole = KNNIndex.from_images(photo_dir, model, batch_size=4, num_workers=0)
    assert resumed.paths() == whole.paths() and resumed.ids.tolist() == whole.ids.tolist()
    np.testing.assert_allclose(resumed._reconstruct(resumed.ids),
                               whole._reconstruct(whole.ids), atol=1e-6)


def _cli(*argv) -> int:
    from dinofeat.cli import main
    return main([str(a) for a in argv])


def test_cli_build_info_search_add(photo_dir, tmp_path, capsys):
    from dinofeat.model import save_safetensors
    weights = save_safetensors(_tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "cli.idx"
    assert _cli("index", "build", photo_dir, "--model", weights, "--out", out,
                "--num-workers", 0, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "added 14 images" in text and "1 unreadable" in text
    # the file is named once, in the log as it was met (tests/test_cli.py checks a real
    # process's stderr), and recorded in the index
    assert "broken.jpg" in str(KNNIndex.read_header(out)["build"]["unreadable"])
    assert _cli("index", "info", out) == 0
    text = capsys.readouterr().out
    assert "14" in text and "192-d, cosine, faiss Flat" in text and "776 bytes" in text
    query = photo_dir / "dogs" / "img004.png"
    # the weights file lies outside the index folder: its recorded path is not followed
    assert _cli("search", out, query, "-k", 3) == 2
    assert f"--model {weights}" in capsys.readouterr().err
    assert _cli("search", out, query, "-k", 3, "--json", "--model", weights) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"][0]["path"] == os.path.abspath(query)
    assert res["results"][0]["score"] > 0.9999 and len(res["results"]) == 3
    assert _cli("index", "add", out, photo_dir, "--model", weights, "--num-workers", 0,
                "--no-progress") == 0
    assert "added 0 images (14 already indexed" in capsys.readouterr().out
    # another model's weights are refused, in one line
    other = save_safetensors(_tiny_model(seed=3), tmp_path / "other.safetensors")
    assert _cli("search", out, query, "--model", other) == 2
    err = capsys.readouterr().err
    assert "not the one this index was built with" in err and len(err.strip().splitlines()) == 1
    assert _cli("search", tmp_path / "nope.idx", query) == 2
    assert "no such index" in capsys.readouterr().err


def test_cli_mmap_add_and_search(photo_dir, tmp_path, capsys):
    """`index add --mmap` grows an IVF index without reading its lists into memory and
    `search --mmap` searches it mapped: the same answers as the index read whole."""
    from dinofeat.model import save_safetensors
    weights = save_safetensors(_tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "ivf.idx"
    assert _cli("index", "build", photo_dir / "cats", "--model", weights, "--out", out,
                "--factory", "IVF2,Flat", "--num-workers", 0, "--no-progress") == 0
    n_cats = len(KNNIndex.load(out))
    assert _cli("index", "add", out, photo_dir, "--model", weights, "--mmap",
                "--num-workers", 0, "--no-progress") == 0
    assert "added 7 images" in capsys.readouterr().out
    assert len(KNNIndex.load(out)) == n_cats + 7 == 14
    query = photo_dir / "dogs" / "img004.png"
    answers = []
    for extra in ((), ("--mmap",)):
        assert _cli("search", out, query, "-k", 5, "--json", "--model", weights, *extra) == 0
        answers.append(json.loads(capsys.readouterr().out)["results"])
    assert answers[0] == answers[1] and answers[0][0]["path"] == os.path.abspath(query)
    assert "--mmap" in capsys.readouterr().out + _help("search")


def _help(verb: str) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        _cli(verb, "--help")
    return buf.getvalue()


@pytest.mark.slow
def test_torchrun_two_processes_build_the_same_index(photo_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m dinofeat index build` (gloo, CPU) gives the index
    one process builds: same items in the same order, same vectors."""
    import subprocess
    import sys
    from dinofeat.model import save_safetensors
    weights = save_safetensors(_tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "dist.idx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "dinofeat", "index", "build", str(photo_dir), "--model", str(weights),
         "--out", str(out), "--num-workers", "0", "--shard-size", "3", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "added 14 images" in proc.stdout
    assert not Path(str(out) + ".shards").exists()  # cleaned up
    dist = KNNIndex.load(out)
    single = KNNIndex.from_images(photo_dir, dinofeat_load(weights), num_workers=0)
    assert dist.paths() == single.paths() and dist.ids.tolist() == single.ids.tolist()
    assert dist.hashes == single.hashes and dist.model_info == single.model_info
    np.testing.assert_allclose(dist._reconstruct(dist.ids), single._reconstruct(single.ids),
                               atol=1e-5)


def dinofeat_load(path):
    from dinofeat.model import load
    return load(path, device="cpu")


def test_index_refuses_features_made_with_other_spec_settings(photo_dir, tmp_path):
    """The index stores the FeatureSpec identity: queries or additions embedded with
    another normalisation or n_last_blocks/avgpool setting are refused, naming it."""
    from dinofeat.features import FeatureSpec
    from dinofeat.search import embedding_identity
    model = _tiny_model()
    index = KNNIndex.from_images(photo_dir / "dogs", model, tmp_path / "s.idx",
                                 num_workers=0, progress=False)
    assert index.model_info["normalize"] is True and index.model_info["n_last_blocks"] == 1
    loaded = KNNIndex.load(tmp_path / "s.idx")
    query = photo_dir / "dogs" / "img004.png"
    same = model.embed([query], num_workers=0)
    assert loaded.search(same, 1, model_info=embedding_identity(model))[1][0, 0] >= 0
    for change, word in (({"normalize": False}, "normalize"),
                         ({"n_last_blocks": 4, "avgpool": True}, "n_last_blocks")):
        other = FeatureSpec(**change)
        with pytest.raises(IncompatibleFeaturesError, match=word):
            loaded.search(same, 1, model_info=other.identity(model))
        with pytest.raises(IncompatibleFeaturesError, match=word):
            loaded.add_images(photo_dir / "cats", model, num_workers=0, progress=False,
                              **other.to_dict())
    # an index saved before the spec existed (pooling/normalized keys) still matches
    old = dict(loaded.model_info)
    old["pooling"] = old.pop("pool")
    for key in ("normalize", "multiscale", "n_last_blocks", "avgpool", "layout", "dim"):
        old.pop(key, None)
    legacy = KNNIndex(model_info=old)
    legacy.add(same)
    legacy.search(same, 1, model_info=embedding_identity(model))
    with pytest.raises(IncompatibleFeaturesError, match="normalize"):
        legacy.search(same, 1, model_info=FeatureSpec(normalize=False).identity(model))
