"""The saved index under faults: damaged or mismatched files, wrong queries, and readers
running while a writer saves the same index again and again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dinofeat.cli import main
from dinofeat.search import IncompatibleFeaturesError, IndexFormatError, KNNIndex

REPO = Path(__file__).resolve().parents[2]


def _index(n: int, dim: int = 8, seed: int = 0, factory: str = "Flat") -> KNNIndex:
    ix = KNNIndex(dim=dim, factory=factory, model_info={"name": "m", "weights_hash": "abc",
                                                        "pooling": "cls"})
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    ix.add(x, meta=[{"path": f"img{i}.jpg"} for i in range(n)])
    return ix


def _files(d: Path) -> dict[str, Path]:
    h = json.loads((d / "index.json").read_text())
    return {"header": d / "index.json", "items": d / h["items_file"], "faiss": d / h["faiss_file"]}


# ------------------------------------------------------------- mismatched files
@pytest.mark.parametrize("case", ["faiss of another index", "faiss of another dimension",
                                  "items of another index", "header count edited",
                                  "header dim edited", "header metric edited",
                                  "faiss truncated", "items truncated", "header truncated",
                                  "faiss missing", "items missing", "newer format"])
def test_mismatched_or_damaged_files_are_refused_by_name(case, tmp_path, tally):
    a = _index(20).save(tmp_path / "a.idx")
    fa = _files(a)
    if case == "faiss of another index":
        shutil.copyfile(_files(_index(25, seed=1).save(tmp_path / "b.idx"))["faiss"], fa["faiss"])
    elif case == "faiss of another dimension":
        shutil.copyfile(_files(_index(20, dim=4).save(tmp_path / "b.idx"))["faiss"], fa["faiss"])
    elif case == "items of another index":
        b = _index(25, seed=1).save(tmp_path / "b.idx")
        shutil.copyfile(_files(b)["items"], fa["items"])
    elif case.startswith("header") and case.endswith("edited"):
        h = json.loads(fa["header"].read_text())
        key = case.split()[1]
        h[key] = {"count": 21, "dim": 16, "metric": "l2"}[key]
        fa["header"].write_text(json.dumps(h))
    elif case.endswith("truncated"):
        f = fa[case.split()[0]]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case.endswith("missing"):
        fa[case.split()[0]].unlink()
    elif case == "newer format":
        h = json.loads(fa["header"].read_text())
        h["format_version"] += 1
        fa["header"].write_text(json.dumps(h))
    with pytest.raises((IndexFormatError, FileNotFoundError)) as ei:
        KNNIndex.load(a)
    assert str(a) in str(ei.value), str(ei.value)
    tally.add("index: damaged files", inputs=1, checks=2)


def test_wrong_queries_are_refused(tmp_path, tally):
    ix = _index(20)
    with pytest.raises(ValueError, match="dimension|dim"):
        ix.search(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError):
        ix.search(np.full((1, 8), np.nan, np.float32))
    with pytest.raises(IncompatibleFeaturesError, match="abc|weights"):
        ix.search(np.zeros((1, 8), np.float32),
                  model_info={"name": "other", "weights_hash": "zzz", "pooling": "cls"})
    with pytest.raises(IncompatibleFeaturesError):
        ix.search(np.zeros((1, 8), np.float32),
                  model_info={"name": "m", "weights_hash": "abc", "pooling": "cls+gem"})
    tally.add("index: wrong queries", inputs=4, checks=4)


def test_search_with_another_models_weights_cli(tiny_model, tiny_weights, tmp_path, capsys,
                                                tally):
    """An index built with one model, queried through the CLI with other weights: a
    one-line refusal, exit 2."""
    import torch
    from PIL import Image

    from _zoo import picture
    from dinofeat.model import save_safetensors
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(picture(40, 40, seed=i)).save(d / f"{i}.png")
    assert main(["index", "build", str(d), "--model", str(tiny_weights), "--out",
                 str(tmp_path / "i.idx"), "--num-workers", "0", "--no-progress"]) == 0
    import copy
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.backbone.vit.cls_token.add_(1.0)
    w2 = save_safetensors(other, tmp_path / "other.safetensors")
    capsys.readouterr()
    rc = main(["search", str(tmp_path / "i.idx"), str(d / "0.png"), "--model", str(w2)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("dinofeat: error:"), err
    assert "weights" in err
    tally.add("index: wrong queries", inputs=1, checks=2)


# ------------------------------------------------------- readers while saving
_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from dinofeat.search import KNNIndex
    path, rounds = sys.argv[1], int(sys.argv[2])
    for g in range(rounds):
        n = 10 + g % 7
        ix = KNNIndex(dim=8, factory="Flat")
        x = np.full((n, 8), g + 1.0, np.float32) + np.eye(n, 8, dtype=np.float32)
        ix.add(x, meta=[{"path": f"g{g}/img{i}.jpg"} for i in range(n)])
        ix.save(path)
    print("saved", rounds)
""")

_READER = textwrap.dedent("""
    import os, sys, time, json, numpy as np
    from dinofeat.search import KNNIndex
    path, stop = sys.argv[1], sys.argv[2]
    ok, errors, gens = 0, [], set()
    while not os.path.exists(os.path.join(path, "index.json")):
        time.sleep(0.01)
    print("ready", flush=True)
    while not os.path.exists(stop) or ok < 5:
        try:
            ix = KNNIndex.load(path)
            paths = ix.paths()
            g = {p.split("/")[0] for p in paths}
            assert len(g) == 1, f"items of several generations: {sorted(g)}"
            gen = int(next(iter(g))[1:])
            assert len(ix) == 10 + gen % 7, (len(ix), gen)
            vecs = ix._reconstruct(ix.ids)
            # cosine index: stored vectors are the normalised rows of (g + 1 + eye)
            raw = np.full((len(ix), 8), gen + 1.0, np.float32) + np.eye(len(ix), 8,
                                                                        dtype=np.float32)
            want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
            assert np.allclose(vecs, want, atol=1e-5), "vectors of another generation"
            s, i = ix.search(want[:1], k=1)
            assert i[0, 0] == ix.ids[0]
            gens.add(gen)
            ok += 1
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    print(json.dumps({"ok": ok, "errors": errors[:5], "n_errors": len(errors),
                      "generations": len(gens)}))
""")


@pytest.mark.slow
def test_concurrent_readers_while_a_writer_saves(tmp_path, tally):
    """2 reader processes load the index in a loop while a writer process saves a new
    version of it 60 times: every load must succeed and be one consistent version
    (items, vectors and counts of the same save)."""
    path = tmp_path / "shared.idx"
    stop = tmp_path / "writer-done"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    (tmp_path / "w.py").write_text(_WRITER)
    (tmp_path / "r.py").write_text(_READER)
    rounds = 60
    readers = [subprocess.Popen([sys.executable, str(tmp_path / "r.py"), str(path), str(stop)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    try:
        w = subprocess.run([sys.executable, str(tmp_path / "w.py"), str(path), str(rounds)],
                           env=env, capture_output=True, timeout=300)
    finally:
        stop.write_text("x")
    assert w.returncode == 0, w.stderr.decode()[-2000:]
    results = []
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    total_ok = sum(r["ok"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    assert not errors, errors
    assert max(r["generations"] for r in results) > 1, results
    # what is left is the last version, complete, and no temporary files
    final = KNNIndex.load(path)
    assert len(final) == 10 + (rounds - 1) % 7
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    # faults: saves racing the readers; checks: loads verified consistent; lost: failed loads
    tally.add("index: concurrent readers", faults=rounds, checks=total_ok,
              lost=sum(r["n_errors"] for r in results))
    tally.note("index readers", f"{total_ok} loads by 2 readers during {rounds} saves, "
               f"{sum(r['n_errors'] for r in results)} failed; versions seen: "
               f"{[r['generations'] for r in results]}")
