"""Revisited Oxford/Paris scoring, the restricted ground-truth unpickler, and the command."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinofeat.eval import compute_map, revisited_map
from dinofeat.eval.retrieval import (UnsafePickleError, average_precision, protocol_gnd,
                                     read_gnd, restricted_loads)


# ------------------------------------------------------------------ AP and mAP by hand
def test_average_precision_by_hand():
    # Positives at 0-based positions 0 and 2, three positives in the ground truth:
    # trapezoids (1 + 1)/2 and (1/2 + 2/3)/2, each times a recall step of 1/3.
    assert average_precision([0, 2], 3) == pytest.approx((1.0 + 7 / 12) / 3)
    assert average_precision([], 4) == 0.0
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        average_precision([2, 1], 3)


def _example():
    # 6 database images, 2 queries, ranks in revisitop's [n_db, n_queries] layout.
    ranks = np.array([[3, 0, 5, 1, 2, 4],
                      [0, 1, 2, 3, 4, 5]]).T
    gnd = [{"easy": [0], "hard": [2], "junk": [5]},
           {"easy": [1], "hard": [], "junk": []}]
    return ranks, gnd


def test_compute_map_medium_and_hard_by_hand():
    ranks, gnd = _example()
    # Query 0, Medium: positives {0, 2}, junk {5}. Without junk the list is 3 0 1 2 4:
    # positives at positions 1 and 3 -> AP = [(0 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = 1/3.
    # mP@k (1-based positions 2, 4): @1 -> 0/1, @5 -> k' = min(4, 5) = 4 -> 2/4.
    # Query 1, Medium: positive {1} at position 1 -> AP = (0 + 1/2)/2 = 1/4;
    # @1 -> 0, @5 -> k' = 2 -> 1/2.
    med = compute_map(ranks, gnd, kappas=(1, 5), protocol="medium")
    np.testing.assert_allclose(med.aps, [1 / 3, 1 / 4])
    assert med.map == pytest.approx((1 / 3 + 1 / 4) / 2)
    np.testing.assert_allclose(med.prs, [[0, 0.5], [0, 0.5]])
    np.testing.assert_allclose(med.pr, [0, 0.5])
    # Hard: query 0 positives {2}, junk {5, 0}: list 3 1 2 4 -> position 2 -> AP = 1/6;
    # @5 -> k' = 3 -> 1/3. Query 1 has no hard positive: NaN, left out of the means.
    hard = compute_map(ranks, gnd, kappas=(1, 5), protocol="hard")
    assert hard.aps[0] == pytest.approx(1 / 6) and np.isnan(hard.aps[1])
    assert hard.map == pytest.approx(1 / 6)
    np.testing.assert_allclose(hard.pr, [0, 1 / 3])
    # revisitop's tuple order, the other layout, and the percent summary agree.
    m, aps, pr, prs = compute_map(ranks.T, protocol_gnd(gnd, "medium"), kappas=(1, 5),
                                  queries_first=True)
    assert m == pytest.approx(med.map)
    summary = revisited_map(ranks, gnd, kappas=(1, 5))
    assert summary["medium"]["mAP"] == pytest.approx(100 * med.map)
    assert summary["hard"]["mP@5"] == pytest.approx(100 / 3)


def test_compute_map_errors():
    ranks, gnd = _example()
    with pytest.raises(ValueError, match="protocol"):
        compute_map(ranks, gnd)
    with pytest.raises(ValueError, match="query columns"):
        compute_map(ranks.T[:1].T[:, :1], gnd, protocol="medium")


def _trapezoid_ap(ranked, ok, junk):
    """AP as the area under the precision-recall curve (trapezoids between consecutive
    recall levels, starting at precision 1 for recall 0) over the list without junk."""
    lst = [i for i in ranked if i not in junk]
    area, tp, prev_r = 0.0, 0, 0.0
    for n, i in enumerate(lst, start=1):
        if i in ok:
            p_before = tp / (n - 1) if n > 1 else 1.0
            tp += 1
            r, p = tp / len(ok), tp / n
            area += (r - prev_r) * (p_before + p) / 2
            prev_r = r
    return area


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_map_equals_pr_curve_area(seed):
    rng = np.random.default_rng(seed)
    n_db, n_q = int(rng.integers(3, 30)), int(rng.integers(1, 5))
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        roles = rng.integers(0, 4, size=n_db)  # 0 negative, 1 easy, 2 hard, 3 junk
        gnd.append({"easy": np.flatnonzero(roles == 1), "hard": np.flatnonzero(roles == 2),
                    "junk": np.flatnonzero(roles == 3)})
    res = compute_map(ranks, gnd, kappas=(1,), protocol="medium")
    for q in range(n_q):
        ok = set(gnd[q]["easy"]) | set(gnd[q]["hard"])
        if not ok:
            assert np.isnan(res.aps[q])
            continue
        ref = _trapezoid_ap(list(ranks[:, q]), ok, set(gnd[q]["junk"]))
        assert res.aps[q] == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------- restricted unpickling
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload_cls,named", [(_Payload, "system"), (_EvalPayload, "eval")])
def test_restricted_unpickler_refuses_code(tmp_path, payload_cls, named):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"imlist": ["a"], "gnd": [payload_cls(marker)]}, protocol=2)
    # The payload is live: plain pickle would run it (this is what we guard against).
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=named):
        restricted_loads(data, "evil.pkl")
    assert not marker.exists()
    # Through the ground-truth reader too, and no JSON conversion is left behind.
    (tmp_path / "gnd_evil.pkl").write_bytes(data)
    with pytest.raises(UnsafePickleError, match="gnd_evil.pkl"):
        read_gnd(tmp_path / "gnd_evil.pkl")
    assert not marker.exists() and not (tmp_path / "gnd_evil.json").exists()


def _gnd_dict():
    return {"imlist": ["all_souls_000000", "all_souls_000001", "ashmolean_000000"],
            "qimlist": ["all_souls_000013"],
            "gnd": [{"bbx": np.array([10.5, 20.0, 30.25, 40.0]),
                     "easy": np.array([0], dtype=np.int64), "hard": [2],
                     "junk": np.array([], dtype=np.int32)}]}


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_reads_gnd_and_writes_json(tmp_path, protocol):
    pkl = tmp_path / "gnd_roxford5k.pkl"
    pkl.write_bytes(pickle.dumps(_gnd_dict(), protocol=protocol))
    cfg = read_gnd(pkl)
    assert cfg["imlist"] == _gnd_dict()["imlist"]
    g = cfg["gnd"][0]
    assert g["bbx"] == [10.5, 20.0, 30.25, 40.0] and g["easy"] == [0] and g["junk"] == []
    js = tmp_path / "gnd_roxford5k.json"
    assert json.loads(js.read_text()) == cfg
    # Later reads use the JSON: a damaged pickle no longer matters.
    pkl.write_bytes(b"garbage")
    os.utime(pkl, (1, 1))
    assert read_gnd(pkl) == cfg


def test_gnd_checks(tmp_path):
    bad = _gnd_dict()
    bad["gnd"][0]["hard"] = [7]
    (tmp_path / "gnd_x.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="outside the 3 database images"):
        read_gnd(tmp_path / "gnd_x.pkl")
    (tmp_path / "gnd_y.pkl").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="not a readable pickle"):
        read_gnd(tmp_path / "gnd_y.pkl")


# ------------------------------------------------------------------- the command
def test_cli_retrieval_matches_api(tmp_path, capsys):
    import torch
    from PIL import Image

    import dinofeat
    from dinofeat.cli import main
    from test_eval_knn import _tiny_model_file

    weights = _tiny_model_file(tmp_path)
    root = tmp_path / "data" / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(6)]
    for i, n in enumerate(names):
        arr = rng.integers(0, 255, size=(48 + 8 * i, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "jpg" / f"{n}.jpg")
    cfg = {"imlist": names, "qimlist": ["img1", "img4"],
           "gnd": [{"bbx": [4.0, 4.0, 60.0, 40.0], "easy": [1], "hard": [3], "junk": [0]},
                   {"bbx": [0.0, 0.0, 64.0, 50.0], "easy": [], "hard": [4, 5], "junk": []}]}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(cfg, protocol=2))
    out = tmp_path / "ret.json"
    rc = main(["eval", "retrieval", "--dataset", "roxford5k", "--data-root",
               str(tmp_path / "data"), "--size", "48", "--model", str(weights),
               "--out", str(out), "--no-progress", "--num-workers", "0", "--device", "cpu"])
    assert rc == 0
    assert "medium" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert (root / "gnd_roxford5k.json").is_file()

    model = dinofeat.load(weights, device="cpu")
    kw = dict(preprocessing="whole", size=48, num_workers=0)
    db = model.embed([root / "jpg" / f"{n}.jpg" for n in names], **kw)
    crops = [Image.open(root / "jpg" / "img1.jpg").convert("RGB").crop((4, 4, 60, 40)),
             Image.open(root / "jpg" / "img4.jpg").convert("RGB").crop((0, 0, 64, 50))]
    q = model.embed(crops, **kw)
    ranks = torch.argsort(db @ q.T, dim=0, descending=True).numpy()
    want = revisited_map(ranks, cfg["gnd"])
    for p in ("medium", "hard"):
        for key, v in want[p].items():
            assert res["results"][p][key] == pytest.approx(v)


def test_no_query_crop_embeds_whole_queries(tmp_path):
    # the release's script embedded whole query images; query_crop=False reproduces it
    import torch
    from PIL import Image

    import dinofeat
    from dinofeat.eval import evaluate_retrieval
    from test_eval_knn import _tiny_model_file

    weights = _tiny_model_file(tmp_path)
    root = tmp_path / "data" / "rparis6k"
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"p{i}" for i in range(5)]
    for i, n in enumerate(names):
        arr = rng.integers(0, 255, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "jpg" / f"{n}.jpg")
    cfg = {"imlist": names, "qimlist": ["p1", "p3"],
           "gnd": [{"bbx": [2.0, 2.0, 30.0, 30.0], "easy": [1, 2], "hard": [0], "junk": []},
                   {"bbx": [8.0, 4.0, 50.0, 44.0], "easy": [3], "hard": [4], "junk": [0]}]}
    (root / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(cfg, protocol=2))
    model = dinofeat.load(weights, device="cpu")
    kw = dict(imsize=48, num_workers=0, progress=False)
    whole = evaluate_retrieval(model, "rparis6k", tmp_path / "data", query_crop=False, **kw)
    cropped = evaluate_retrieval(model, "rparis6k", tmp_path / "data", **kw)
    assert (whole["query_crop"], cropped["query_crop"]) == (False, True)
    emb = dict(preprocessing="whole", size=48, num_workers=0)
    db = model.embed([root / "jpg" / f"{n}.jpg" for n in names], **emb)
    for queries, res in (([root / "jpg" / "p1.jpg", root / "jpg" / "p3.jpg"], whole),
                         ([Image.open(root / "jpg" / "p1.jpg").convert("RGB").crop((2, 2, 30, 30)),
                           Image.open(root / "jpg" / "p3.jpg").convert("RGB").crop((8, 4, 50, 44))],
                          cropped)):
        q = model.embed(queries, **emb)
        ranks = torch.argsort(db @ q.T, dim=0, descending=True).numpy()
        want = revisited_map(ranks, cfg["gnd"])
        for p in ("medium", "hard"):
            for key, v in want[p].items():
                assert res["results"][p][key] == pytest.approx(v)
