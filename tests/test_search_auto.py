"""``factory="auto"``: chosen by a memory budget and a recall target. Just above each
switch point (exact-search limit, memory, a target SQ8 cannot reach, an exact index that
outgrows the limit) the index reaches its target, measured here against brute force; the
header records the target and what was measured; a budget below every candidate is refused."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import dinofeat.search.factory as factory_mod
from dinofeat.search import KNNIndex
from dinofeat.search.auto import (BudgetTooSmallError, candidates, estimate_memory,
                                  parse_memory)


@pytest.fixture(autouse=True)
def _small_world(monkeypatch):
    """Exact search up to 1,500 vectors (instead of 1M), and one faiss thread: the test
    machine's cores are shared."""
    monkeypatch.setattr(factory_mod, "AUTO_EXACT_LIMIT", 1500)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _clustered(n: int, dim: int = 32, centers: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.45 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall_vs_brute_force(index: KNNIndex, x: np.ndarray, k: int = 10, nq: int = 200,
                           seed: int = 7) -> float:
    """recall@k of ``index.search`` for ``nq`` of its own vectors (ids = rows), each
    query's own row left out, against numpy's exact top-k."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), nq, replace=False)
    sim = x[rows] @ x.T
    sim[np.arange(nq), rows] = -np.inf
    truth = np.argsort(-sim, axis=1)[:, :k]
    _, ids = index.search(x[rows], k + 1)
    hits = 0
    for r, found, t in zip(rows, ids, truth):
        found = found[found != r][:k]
        hits += len(np.intersect1d(found, t))
    return hits / (nq * k)


def _fresh_recall(index: KNNIndex, x: np.ndarray, fresh: np.ndarray, k: int = 10) -> float:
    """recall@k of ``index.search`` for queries that are not in the index (ids = rows of
    ``x``), against numpy's exact top-k."""
    truth = np.argsort(-(fresh @ x.T), axis=1)[:, :k]
    _, ids = index.search(fresh, k)
    return sum(len(np.intersect1d(f, t)) for f, t in zip(ids, truth)) / truth.size


def _with_fresh(n: int, seed: int, fresh: int = 300, dim: int = 32
                ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clustered vectors to index and ``fresh`` more from the same clusters."""
    both = _clustered(n + fresh, dim=dim, seed=seed)
    return both[:n], both[n:]


def test_exact_below_the_limit_and_compressed_just_above():
    x = _clustered(1500, seed=1)
    exact = KNNIndex(factory="auto", recall=0.95)
    exact.add(x)
    assert exact.resolved_factory == "Flat" and exact.auto["recall"] == 1.0
    x, fresh = _with_fresh(4000, seed=2)
    index = KNNIndex(factory="auto", expected_size=len(x), recall=0.95)
    index.add(x)
    assert _fresh_recall(index, x, fresh) >= 0.95
    assert index.resolved_factory.startswith("IVF") and index.resolved_factory.endswith("SQ8")
    assert index.auto["recall_target"] == 0.95 and index.auto["target_met"]
    measured = _recall_vs_brute_force(index, x)
    assert measured >= 0.95, (index.search_params, index.auto)
    # what the header says was measured agrees with the test's own measurement
    assert abs(index.auto["recall"] - measured) < 0.03


def test_recall_bound_is_the_one_sided_95_percent_bound():
    import statistics
    from dinofeat.search.auto import per_query_recall, recall_at_k, recall_bound
    rng = np.random.default_rng(0)
    per = rng.integers(7, 11, 300) / 10
    expected = statistics.mean(per) - 1.6448536 * statistics.stdev(per) / 300 ** 0.5
    assert recall_bound(per) == pytest.approx(expected, abs=1e-9)
    assert recall_bound(np.ones(50)) == 1.0 and recall_bound(np.array([])) == 1.0
    truth = np.array([[1, 2, 3], [4, 5, -1]])
    found = np.array([[3, 9, 1], [5, 8, 7]])
    np.testing.assert_allclose(per_query_recall(found, truth, 3), [2 / 3, 1 / 2])
    assert recall_at_k(found, truth, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_tuning_stops_where_the_lower_bound_reaches_the_target():
    """The chosen nprobe is the cheapest whose 95% lower bound of the mean per-query
    recall (over the held-out queries, measured here with numpy against brute force)
    reaches the target; the header records the mean and the bound."""
    import statistics
    both = _clustered(6300, dim=32, centers=60, seed=12)
    x, fresh = both[:6000], both[6000:]  # fresh queries: same clusters, not indexed
    target = 0.95
    index = KNNIndex(factory="auto", expected_size=len(x), recall=target)
    index.add(x)
    a = index.auto
    assert a["recall_bound"] <= a["recall"] and a["confidence"] == 0.95
    assert a["sample_recall_bound"] >= target and a["recall_bound"] >= target
    p = index._probe
    qids, queries = p["ids"], p["queries"]
    sim = queries @ x.T
    sim[np.arange(len(qids)), qids] = -np.inf
    truth = np.argsort(-sim, axis=1)[:, :10]

    def bound_at(nprobe: int) -> tuple[float, float]:
        index.set_search_params(nprobe=nprobe)
        _, ids = index.search(queries, 11)
        per = [len(np.intersect1d([i for i in f if i != q][:10], t)) / 10
               for q, f, t in zip(qids, ids, truth)]
        m = statistics.mean(per)
        return m, m - 1.6448536 * statistics.stdev(per) / len(per) ** 0.5

    chosen = a["params"]["nprobe"]
    mean, bound = bound_at(chosen)
    assert mean == pytest.approx(a["recall"], abs=1e-4)
    assert bound == pytest.approx(a["recall_bound"], abs=1e-4) and bound >= target
    if chosen > 1:  # one step cheaper does not reach the target with the margin
        assert bound_at(chosen // 2)[1] < target
    index.set_search_params(nprobe=chosen)
    # and fresh queries (not in the index) meet the target against numpy brute force
    sim = fresh @ x.T
    truth = np.argsort(-sim, axis=1)[:, :10]
    _, ids = index.search(fresh, 10)
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(ids, truth))
    assert hits / truth.size >= target


def test_memory_switch_point(tmp_path):
    """Under the exact-search limit, but with a budget just below what Flat needs: a
    compressed index that still meets the target."""
    x, fresh = _with_fresh(1400, seed=3)
    flat_needs = estimate_memory("Flat", len(x), x.shape[1])
    index = KNNIndex(factory="auto", expected_size=len(x), memory=flat_needs - 1, recall=0.9)
    index.add(x)
    assert index.resolved_factory != "Flat"
    assert index.auto["memory_estimate"] <= flat_needs - 1
    assert _recall_vs_brute_force(index, x) >= 0.9
    assert _fresh_recall(index, x, fresh) >= 0.9
    header = KNNIndex.read_header(index.save(tmp_path / "m.idx"))
    assert header["memory_budget"] == flat_needs - 1 and header["recall_target"] == 0.9
    assert header["auto"]["factory"] == index.resolved_factory
    assert header["auto"]["params"] == header["search_params"]
    loaded = KNNIndex.load(tmp_path / "m.idx")
    assert loaded.auto == index.auto and loaded.memory == flat_needs - 1
    np.testing.assert_array_equal(loaded.search(x[:20], 5)[1], index.search(x[:20], 5)[1])


def test_recall_switch_point_goes_past_sq8():
    """A target SQ8's one-byte rounding does not reach on this data: the next candidate
    (two bytes or exact vectors in the lists) is chosen, and reaches it."""
    x, fresh = _with_fresh(4000, seed=4)
    index = KNNIndex(factory="auto", expected_size=len(x), recall=0.995)
    index.add(x)
    tried = [c["factory"] for c in index.auto["candidates"]]
    assert len(tried) >= 2 and tried[0].endswith("SQ8") and index.resolved_factory == tried[-1]
    assert not index.resolved_factory.endswith("SQ8")
    assert index.auto["candidates"][0]["recall"] < 0.995
    assert _recall_vs_brute_force(index, x) >= 0.995
    assert _fresh_recall(index, x, fresh) >= 0.995


def test_exact_index_that_outgrows_the_limit_converts_and_meets_target(caplog):
    x, fresh = _with_fresh(4000, seed=5)
    index = KNNIndex(factory="auto", recall=0.95)  # size unknown: starts exact
    with caplog.at_level("INFO", logger="dinofeat"):
        index.add(x[:1000])
        assert index.resolved_factory == "Flat"
        index.add(x[1000:])
    assert "outgrew exact search" in caplog.text
    assert index.resolved_factory.startswith("IVF") and len(index) == 4000
    assert set(index.ids.tolist()) == set(range(4000))
    assert _recall_vs_brute_force(index, x) >= 0.95
    assert _fresh_recall(index, x, fresh) >= 0.95


def test_budget_below_every_candidate_is_refused():
    x = _clustered(3000, seed=6)
    smallest = min(c.memory(len(x)) for c in candidates(len(x), 32))
    index = KNNIndex(factory="auto", expected_size=len(x), memory=smallest - 1)
    with pytest.raises(BudgetTooSmallError) as err:
        index.add(x)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "memory budget" in msg and "3,000" in msg
    assert "--memory" in msg
    assert len(index) == 0  # nothing half-added


def test_options_and_sizes():
    assert parse_memory("8GB") == 8 * 2 ** 30 and parse_memory("512MB") == 512 * 2 ** 20
    assert parse_memory("1.5G") == int(1.5 * 2 ** 30) and parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="memory"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="factory='auto'"):
        KNNIndex(factory="Flat", recall=0.9)
    with pytest.raises(ValueError, match="recall"):
        KNNIndex(factory="auto", recall=1.5)


def test_index_info_prints_the_choice(tmp_path, capsys):
    from dinofeat.cli import main
    x = _clustered(4000, seed=8)
    index = KNNIndex(factory="auto", expected_size=len(x), recall=0.95, memory="1GB")
    index.add(x)
    index.save(tmp_path / "a.idx")
    assert main(["index", "info", str(tmp_path / "a.idx")]) == 0
    out = capsys.readouterr().out
    assert "target recall@10 0.95 within 1.0 GB" in out and index.resolved_factory in out
    assert f"{index.auto['recall']} (on 4,000 vectors, 300 held-out queries)" in out
    assert f"recall lower bound  {index.auto['recall_bound']} (one-sided 95% confidence)" in out
    assert main(["index", "info", str(tmp_path / "a.idx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["recall_target"] == 0.95


# ------------------------------------------------------------------ larger than memory
@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW8", "IVF16,PQ4,RFlat"])
def test_memory_mapped_index_searches_and_keeps_add(tmp_path, factory):
    """``load(mmap=True)`` leaves the faiss data in the generation file (searches equal the
    in-memory ones); add/remove copy it into memory first and save a new generation; a
    mapped reader keeps searching after a writer replaced and deleted its generation."""
    x = _clustered(2000, seed=9)
    index = KNNIndex(factory=factory)
    index.add(x[:1500])
    folder = index.save(tmp_path / "big.idx")
    mapped = KNNIndex.load(folder, mmap=True)
    reader = KNNIndex.load(folder, mmap=True)
    assert mapped._mapped and reader._mapped
    s_mem, i_mem = index.search(x[:50], 10)
    s_map, i_map = mapped.search(x[:50], 10)
    np.testing.assert_array_equal(i_mem, i_map)
    np.testing.assert_allclose(s_mem, s_map, atol=1e-6)
    mapped.add(x[1500:])  # IVF: grows next to the mapped lists; others: copies first
    assert mapped._mapped == (factory == "IVF16,SQ8") and len(mapped) == 2000
    mapped.remove([0, 1])  # copies into memory
    assert not mapped._mapped
    mapped.save(folder)
    mapped.save(folder)  # the generation the reader mapped is deleted now
    assert not (folder / "index.1.faiss").exists()
    np.testing.assert_array_equal(reader.search(x[:50], 10)[1], i_mem)
    again = KNNIndex.load(folder, mmap=True)
    assert len(again) == 1998 and 0 not in again.search(x[:1], 5)[1][0].tolist()


def test_mapped_load_does_not_read_the_vectors(tmp_path):
    """A 150 MB exact index loaded with mmap=True adds its records and id maps to the
    process's resident memory, not its vectors; read normally it adds its size."""
    import subprocess
    import sys
    import textwrap
    rng = np.random.default_rng(0)
    index = KNNIndex(dim=256, factory="Flat")
    for _ in range(15):
        index.add(rng.standard_normal((10_000, 256)).astype(np.float32))
    folder = index.save(tmp_path / "flat.idx")
    code = textwrap.dedent(f"""
        import sys
        from dinofeat.search import KNNIndex
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2 ** 20
        before = rss()
        index = KNNIndex.load({str(folder)!r}, mmap=sys.argv[1] == "1")
        print(rss() - before)
    """)
    grown = {}
    for mm in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", code, mm], capture_output=True, text=True,
                             check=True).stdout
        grown[mm] = float(out.strip().splitlines()[-1])
    # mapped: the items and faiss's id maps only (~40 MB here), not the 150 MB of vectors
    assert grown["0"] > 140 and grown["1"] < grown["0"] / 3, grown


def test_reranking_candidate_takes_k_factor(tmp_path):
    """IVF-PQ with exact re-ranking: k_factor reaches the Refine index under the id map
    (faiss's ParameterSpace does not), is saved, and re-ranking lifts recall over PQ."""
    x = _clustered(3000, seed=10)
    pq = KNNIndex(factory="IVF16,PQ4", search_params={"nprobe": 16})
    pq.add(x)
    pq.train()  # 3,000 vectors are fewer than PQ wants: train now, on them
    rr = KNNIndex(factory="IVF16,PQ4,RFlat", search_params={"nprobe": 16, "k_factor": 8})
    rr.add(x)
    rr.train()
    assert pq.is_trained and rr.is_trained
    loaded = KNNIndex.load(rr.save(tmp_path / "rr.idx"))
    assert loaded.search_params["k_factor"] == 8
    assert _recall_vs_brute_force(loaded, x) > _recall_vs_brute_force(pq, x)
    assert _recall_vs_brute_force(loaded, x) >= 0.95


def test_mapped_ivf_index_grows_without_reading_its_lists(tmp_path, monkeypatch):
    """An IVF index loaded with mmap=True takes new vectors without its lists being read
    into memory; saving merges old and new lists into the next generation's on-disk lists
    file, published atomically: results equal an in-memory index holding all vectors, a
    crash before the commit leaves the old generation, readers of the old generation keep
    searching, and files the index did not write are left alone."""
    from dinofeat.search import storage
    x = _clustered(3000, seed=11)
    q = x[::37]
    index = KNNIndex(factory="IVF16,SQ8", search_params={"nprobe": 4})
    index.add(x[:1500])
    folder = index.save(tmp_path / "grow.idx")
    (folder / "notes.txt").write_text("the user's")
    old_ids = index.search(q, 10)[1]
    reader = KNNIndex.load(folder, mmap=True)
    ref = KNNIndex.load(folder)  # in memory, same quantiser: the reference
    ref.add(x[1500:2500])
    grown = KNNIndex.load(folder, mmap=True)
    grown.add(x[1500:2000])
    grown.add(x[2000:2500])
    assert grown._mapped and grown._grower is not None and grown._grower.added == 1000
    s_ref, i_ref = ref.search(q, 10)
    s_gr, i_gr = grown.search(q, 10)
    np.testing.assert_array_equal(i_gr, i_ref)
    np.testing.assert_allclose(s_gr, s_ref, atol=1e-6)

    real = storage.atomic_write_json

    def crash_at_commit(path, *a, **kw):
        if path.name == "index.json":
            raise OSError("disk full")
        return real(path, *a, **kw)
    monkeypatch.setattr(storage, "atomic_write_json", crash_at_commit)
    with pytest.raises(OSError):
        grown.save(folder)
    monkeypatch.setattr(storage, "atomic_write_json", real)
    old = KNNIndex.load(folder, mmap=True)  # the old generation, whole
    assert len(old) == 1500 and "lists_file" not in KNNIndex.read_header(folder)
    np.testing.assert_array_equal(old.search(q, 10)[1], old_ids)

    grown.save(folder)
    header = KNNIndex.read_header(folder)
    gen = header["generation"]
    assert header["lists_file"] == f"lists.{gen}.ivfdata" and header["count"] == 2500
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["index.json", f"index.{gen}.faiss", f"items.{gen}.json", f"lists.{gen}.ivfdata",
         "notes.txt"])
    # the trained part alone is small: the codes are in the lists file
    assert (folder / f"index.{gen}.faiss").stat().st_size < \
        (folder / f"lists.{gen}.ivfdata").stat().st_size / 4
    np.testing.assert_array_equal(reader.search(q, 10)[1], old_ids)  # deleted, still mapped
    np.testing.assert_array_equal(grown.search(q, 10)[1], i_ref)
    assert grown._grower is None  # the new vectors now come from the lists file

    again = KNNIndex.load(folder, mmap=True)
    np.testing.assert_array_equal(again.search(q, 10)[1], i_ref)
    again.add(x[2500:])
    ref.add(x[2500:])
    again.save(folder)
    plain = KNNIndex.load(folder)  # on-disk lists are mapped even without mmap=True
    assert plain._mapped and len(plain) == 3000
    s_ref, i_ref = ref.search(q, 10)
    np.testing.assert_array_equal(plain.search(q, 10)[1], i_ref)
    np.testing.assert_allclose(plain.search(q, 10)[0], s_ref, atol=1e-6)
    plain.remove([0, 5])  # removing reads the lists into memory first
    ref.remove([0, 5])
    assert not plain._mapped
    np.testing.assert_array_equal(plain.search(q, 10)[1], ref.search(q, 10)[1])
    plain.save(folder)  # back to one faiss file
    assert "lists_file" not in KNNIndex.read_header(folder)
    assert (folder / "notes.txt").read_text() == "the user's"
    assert not [p for p in folder.iterdir() if p.name.endswith(".ivfdata")]


def test_lists_file_named_by_the_header_is_checked(tmp_path):
    x = _clustered(2000, seed=13)
    index = KNNIndex(factory="IVF16,Flat")
    index.add(x[:1500])
    folder = index.save(tmp_path / "l.idx")
    grown = KNNIndex.load(folder, mmap=True)
    grown.add(x[1500:])
    grown.save(folder)
    header = json.loads((folder / "index.json").read_text())
    lists = folder / header["lists_file"]
    lists.write_bytes(lists.read_bytes()[:100])  # truncated
    with pytest.raises(Exception, match="outside"):
        KNNIndex.load(folder)


def test_growing_a_mapped_ivf_index_keeps_its_codes_out_of_memory(tmp_path):
    """Anonymous memory (what the OS cannot page back to a file) of a process that loads
    a 150 MB IVF-Flat index with mmap=True, adds 5,000 vectors and saves: the new vectors
    and the items, not the 150 MB of codes; copying the index into memory (a removal)
    adds them."""
    import subprocess
    import sys
    import textwrap
    rng = np.random.default_rng(0)
    index = KNNIndex(dim=256, factory="IVF64,Flat", metric="l2")
    for _ in range(15):
        index.add(rng.standard_normal((10_000, 256)).astype(np.float32))
    folder = index.save(tmp_path / "ivf.idx")
    code = textwrap.dedent(f"""
        import numpy as np
        from dinofeat.search import KNNIndex
        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) / 1024
        index = KNNIndex.load({str(folder)!r}, mmap=True)
        before = anon()
        index.add(np.random.default_rng(1).standard_normal((5000, 256)).astype(np.float32))
        index.save({str(folder)!r})
        grown = anon() - before
        index.remove([0])
        print(grown, anon() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    grown, copied = map(float, out.strip().splitlines()[-1].split())
    assert grown < 40 and copied > 140, (grown, copied)
    assert len(KNNIndex.load(folder)) == 155_000


def test_recall_is_measured_again_as_the_index_grows():
    """Without a save, ``add`` measures recall again once the index has grown by a tenth
    since the last measurement, so that searches run with parameters measured on about the
    index they search."""
    x, fresh = _with_fresh(20000, seed=14)
    index = KNNIndex(factory="auto", expected_size=len(x), recall=0.95)
    # the training sample (128 lists, planned for 20,000): chosen and measured on these,
    # although 5,000 vectors alone would get 64 lists
    index.add(x[:5000])
    assert index.resolved_factory.startswith("IVF128,")
    assert index.auto["measured_on"] == 5000
    index.add(x[5000:5200])  # less than a tenth more: not measured again
    assert index.auto["measured_on"] == 5000
    index.add(x[5200:])
    assert index.auto["measured_on"] == 20000 and index.auto["recall_bound"] >= 0.95
    assert _fresh_recall(index, x, fresh) >= 0.95


def test_budget_that_leaves_only_reranked_pq_meets_the_target():
    """A budget below every candidate but IVF-PQ with re-ranking: it is chosen, its
    ``nprobe`` and ``k_factor`` grow together until the bound reaches the target, and
    fresh queries meet it against numpy brute force."""
    x, fresh = _with_fresh(6000, seed=15, dim=64)  # PQ's codebooks pay off from here
    cands = {c.factory: c.memory(len(x)) for c in candidates(len(x), x.shape[1])}
    rflat = next(f for f in cands if f.endswith("RFlat"))
    assert cands[rflat] == min(cands.values())
    budget = min(m for f, m in cands.items() if f != rflat) - 1
    index = KNNIndex(factory="auto", expected_size=len(x), memory=budget, recall=0.95)
    index.add(x)
    index.train()
    assert index.resolved_factory == rflat
    params = index.auto["params"]
    assert params["k_factor"] == min(256, 8 * params["nprobe"])
    assert index.auto["recall_bound"] >= 0.95
    assert _fresh_recall(index, x, fresh) >= 0.95


def test_openblas_core_is_pinned_before_faiss_loads():
    """``import dinofeat`` sets OPENBLAS_CORETYPE from the CPU's flags before faiss
    loads its OpenBLAS (0.3.15 falls back to generic kernels on newer CPUs), and leaves a
    value the user set."""
    import subprocess
    import sys
    from dinofeat.openblas import core_for_flags
    assert core_for_flags({"avx2", "fma"} | {f"avx512{x}" for x in "f cd bw dq vl".split()}) \
        == "SkylakeX"
    assert core_for_flags({"avx2", "fma", "sse3"}) == "Haswell"
    assert core_for_flags({"sse3"}) is None
    # accel loads faiss for its probes without going through dinofeat.search
    code = ("import os, dinofeat.accel, faiss; "
            "print(os.environ.get('OPENBLAS_CORETYPE'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()[-1]
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert out == str(core_for_flags(flags))
    env["OPENBLAS_CORETYPE"] = "Haswell"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()[-1]
    assert out == "Haswell"
