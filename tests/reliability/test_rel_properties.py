"""Property-based tests (hypothesis): the image reader on random images and random
bytes, the attention-mask rule, ``knn_classify`` against the formula, and the index's
invariants across random add / remove / save+load sequences (extending
tests/test_index.py's add/remove property with persistence, id reuse, lookups and the
k-NN vote)."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dinofeat import images as I  # noqa: E402
from dinofeat.attention import mass_masks  # noqa: E402
from dinofeat.eval.knn import knn_classify  # noqa: E402
from dinofeat.search import KNNIndex  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------- image reader
# (mode, formats that can store it)
_MODES = {
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM"],
    "RGBA": ["PNG", "TIFF", "WEBP", "GIF"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "BMP", "TIFF", "GIF"],
    "1": ["PNG", "BMP", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "CMYK": ["JPEG", "TIFF"],
}


@st.composite
def random_images(draw):
    mode = draw(st.sampled_from(sorted(_MODES)))
    fmt = draw(st.sampled_from(_MODES[mode]))
    h = draw(st.integers(1, 48))
    w = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray(rng.uniform(0, 1, (h, w)).astype(np.float32), "F")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "LA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA"
                              ).convert("LA")
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue(), (h, w), mode, fmt


def _read_both(path):
    out = []
    for reader in (I.read_image, I.open_image):
        try:
            r = reader(path)
        except I.ImageReadError as e:
            assert str(path) in str(e) and e.reason
            out.append(None)
            continue
        t = r if isinstance(r, torch.Tensor) else torch.from_numpy(
            np.asarray(r).copy()).permute(2, 0, 1)
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
        assert t.shape[1] >= 1 and t.shape[2] >= 1
        out.append(t)
    return out


@settings(max_examples=60, **SETTINGS)
@given(random_images())
def test_reader_on_random_valid_images(tmp_path, tally, sample):
    data, (h, w), mode, fmt = sample
    p = tmp_path / f"x.{fmt.lower()}"
    p.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, pil = _read_both(p)
    assert fast is not None and pil is not None, (mode, fmt)
    assert tuple(fast.shape) == (3, h, w) == tuple(pil.shape), (mode, fmt)
    assert torch.equal(fast, pil), (mode, fmt)  # both decoding paths give the same pixels
    tally.add("properties: image reader", inputs=1, checks=3)


@settings(max_examples=80, **SETTINGS)
@given(random_images(), st.data())
def test_reader_on_damaged_bytes(tmp_path, tally, sample, data):
    """Truncated, bit-flipped or random bytes: a valid RGB image or an ImageReadError
    naming the file, never any other exception."""
    raw, _, mode, fmt = sample
    how = data.draw(st.sampled_from(["truncate", "flip", "random", "prefix"]))
    b = bytearray(raw)
    if how == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "random":
        b = bytearray(data.draw(st.binary(min_size=0, max_size=512)))
    else:  # a valid header followed by garbage
        b = b[:32] + bytearray(data.draw(st.binary(min_size=0, max_size=256)))
    p = tmp_path / f"x.{fmt.lower()}"
    p.write_bytes(bytes(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _read_both(p)  # asserts inside: image or ImageReadError, nothing else
    tally.add("properties: damaged image bytes", inputs=1, checks=2)


# -------------------------------------------------------------- attention masks
@settings(max_examples=150, **SETTINGS)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7),
       st.floats(0.01, 1.0), st.integers(0, 2 ** 32 - 1), st.sampled_from(["exp", "ties",
                                                                           "zeros"]))
def test_mask_is_the_fewest_patches_holding_the_mass(tally, heads, h, w, threshold, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "exp":
        grid = rng.exponential(size=(heads, h, w)) ** 3
    elif kind == "ties":
        grid = rng.integers(0, 3, (heads, h, w)).astype(np.float64)
    else:
        grid = np.zeros((heads, h, w))
        grid[..., rng.integers(0, h), rng.integers(0, w)] = rng.uniform(0, 1)
    masks = mass_masks(grid, threshold)
    assert masks.shape == grid.shape and masks.dtype == bool
    for g, m in zip(grid, masks):
        total, kept = g.sum(), g[m].sum()
        n = int(m.sum())
        assert n >= 1
        assert kept >= threshold * total - 1e-9 * max(total, 1)
        top = np.sort(g.ravel())[::-1]
        # fewest: the n - 1 largest cells do not hold the mass
        if n > 1:
            assert top[: n - 1].sum() < threshold * total + 1e-9 * max(total, 1)
        # and the kept cells are among the largest
        if n < g.size:
            assert g[m].min() >= g[~m].max()
    tally.add("properties: attention masks", inputs=1, checks=4)


# ----------------------------------------------------------------- k-NN vote
def _vote(train, labels, test, k, T, C):
    """The paper's formula, written directly (float64)."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = b @ a.T
    out = np.zeros((len(test), C))
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    for q in range(len(test)):
        for i in order[q]:
            out[q, labels[i]] += math.exp(sim[q, i] / T)
    return out, np.sort(sim, axis=1)[:, ::-1]


@settings(max_examples=60, **SETTINGS)
@given(st.integers(1, 30), st.integers(1, 6), st.integers(1, 8), st.integers(1, 5),
       st.integers(1, 40), st.floats(0.02, 1.0), st.integers(0, 2 ** 32 - 1),
       st.integers(1, 7))
def test_knn_classify_equals_the_formula_and_ignores_training_order(
        tally, n_train, n_test, dim, C, k, T, seed, chunk):
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((n_train, dim))
    test = rng.standard_normal((n_test, dim))
    labels = rng.integers(0, C, n_train)
    want, sims = _vote(train, labels, test, k, T, C)
    kk = min(k, n_train)
    if kk < n_train:  # no tie at the k-th neighbour (which one votes would be arbitrary)
        assume(np.all(sims[:, kk - 1] - sims[:, kk] > 1e-5))
    got = knn_classify(torch.tensor(train, dtype=torch.float32), torch.tensor(labels),
                       torch.tensor(test, dtype=torch.float32), k=k, T=T, num_classes=C,
                       chunk_size=chunk, train_chunk_size=chunk + 2)
    assert got.shape == (n_test, C)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=1e-6)
    perm = rng.permutation(n_train)
    again = knn_classify(torch.tensor(train[perm], dtype=torch.float32),
                         torch.tensor(labels[perm]), torch.tensor(test, dtype=torch.float32),
                         k=k, T=T, num_classes=C)
    np.testing.assert_allclose(again.numpy(), got.numpy(), rtol=1e-5, atol=1e-7)
    tally.add("properties: knn_classify", inputs=1, checks=3)


# ------------------------------------------------------- index with persistence
_OP = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 9), st.integers(0, 2 ** 31)),
    st.tuples(st.just("remove"), st.integers(1, 6), st.integers(0, 2 ** 31)),
    st.tuples(st.just("save+load"), st.just(0), st.just(0)),
)


@settings(max_examples=30, **SETTINGS)
@given(st.lists(_OP, min_size=1, max_size=10), st.sampled_from(["Flat", "HNSW4"]))
def test_index_invariants_through_save_and_load(tmp_path_factory, tally, ops, factory):
    """After every operation (adds with labels and paths, removals, save + load): the live
    ids are exactly those added and not removed; ids are never reused; removed ids look up
    as None and never come back from a search; every live item finds itself first (Flat),
    and classify's votes come only from live items."""
    folder = tmp_path_factory.mktemp("idx") / "i.idx"
    index = KNNIndex(dim=6, factory=factory)
    live: dict[int, tuple[np.ndarray, str]] = {}
    ever: set[int] = set()
    removed: set[int] = set()
    for step, (op, n, seed) in enumerate(ops):
        seed = seed * 31 + step  # two adds never make the same vectors
        if op == "add":
            v = np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)
            labs = [f"c{int(x)}" for x in np.random.default_rng(seed + 1).integers(0, 3, n)]
            new = index.add(v, labels=labs, meta=[{"path": f"p{seed}-{i}"} for i in range(n)])
            assert not set(new.tolist()) & ever  # never reused, even after removal
            ever |= set(new.tolist())
            live.update({int(i): (x, lab) for i, x, lab in zip(new, v, labs)})
        elif op == "remove" and live:
            victims = np.random.default_rng(seed).choice(sorted(live), size=min(n, len(live)),
                                                         replace=False)
            assert index.remove(victims) == len(victims)
            for i in victims:
                live.pop(int(i))
                removed.add(int(i))
        elif op == "save+load":
            index.save(folder)
            index = KNNIndex.load(folder)
        assert len(index) == len(live) and set(index.ids.tolist()) == set(live)
        assert all(r is None for r in index.lookup(sorted(removed)))
    if not live:
        return
    keys = sorted(live)
    q = np.stack([live[i][0] for i in keys])
    scores, ids = index.search(q, k=min(5, len(live)))
    assert not set(ids.ravel().tolist()) & removed
    assert set(ids.ravel().tolist()) - {-1} <= set(live)
    if factory == "Flat":
        assert ids[:, 0].tolist() == keys
    votes = index.classify(q, k=3, T=0.1)
    live_labels = {lab for _, lab in live.values()}
    for j, c in enumerate(index.classes):
        if c not in live_labels:
            assert np.all(votes[:, j] == 0), "a removed item voted"
    tally.add("properties: index sequences", inputs=len(ops), checks=6)
