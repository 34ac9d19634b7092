"""dinofeat serve: the JSON API of a real server process (the command line on a free local
port) over an index of generated photos made with a tiny random-weight ViT."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="dinofeat serve needs the serve extra: "
                                        "pip install 'dinofeat[serve]'")
pytest.importorskip("uvicorn", reason="dinofeat serve needs the serve extra")
pytest.importorskip("multipart", reason="dinofeat serve needs the serve extra")

from _serve import (
    REPO,
    InProcessServer,
    Server,
    build_index,
    get_json,
    multipart,
    post_search,
    request,
    write_photos,
)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    index, weights, photos = build_index(root)
    return {"root": root, "index": index, "weights": weights, "photos": photos}


@pytest.fixture(scope="module")
def server(collection):
    srv = Server(collection["index"], "--model", str(collection["weights"]))
    yield srv
    srv.stop()


def _model(collection):
    from dinofeat.model import load
    return load(collection["weights"], device="cpu")


def _one_line_error(body: dict) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert body["error"] and "\n" not in body["error"], body
    return body["error"]


# ------------------------------------------------------------------ the checks
def test_search_with_an_indexed_photo_finds_it_first(server, collection):
    from dinofeat.search import KNNIndex
    index = KNNIndex.load(collection["index"])
    model = _model(collection)
    for photo in collection["photos"][2:5]:
        status, out = post_search(server.url, photo.read_bytes(), filename=photo.name, k=5)
        assert status == 200, out
        res = out["results"]
        assert len(res) == 5 and out["model"] == model.name and out["ms"] > 0
        assert res[0]["path"] == os.path.abspath(photo)
        assert res[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert res[0]["label"] == photo.parent.name
        # the scores are the cosine similarities of the model's embeddings, computed here
        q = model.embed(photo, **index.embed_options(), num_workers=0).numpy()[0]
        feats = index.vectors([r["id"] for r in res])
        np.testing.assert_allclose([r["score"] for r in res], feats @ q, atol=1e-4)
        assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)


def test_broken_uploads_get_4xx_and_the_server_keeps_answering(server, collection):
    from PIL import Image
    good = collection["photos"][1].read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 Mpixels in a small file
    assert len(bomb.getvalue()) < 200_000
    cases = [
        ("not an image", {"image": b"hello, I am text", "filename": "notes.jpg"}, 400,
         "not an image"),
        ("truncated", {"image": good[: len(good) // 3], "filename": "cut.jpg"}, 400, "cut.jpg"),
        ("bomb", {"image": bomb.getvalue(), "filename": "bomb.png"}, 413, "decompression bomb"),
        ("empty", {"image": b"", "filename": "empty.jpg"}, 400, "empty"),
        ("k=0", {"image": good, "k": 0}, 400, "k must be"),
        ("k=10^9", {"image": good, "k": 10**9}, 400, "k must be"),
        ("k=abc", {"image": good, "k": "abc"}, 400, "k must be"),
        ("no image", {"image": None, "k": 3}, 400, "no image"),
    ]
    for what, kw, want, text in cases:
        status, body = post_search(server.url, **kw)
        assert status == want, (what, body)
        assert text in _one_line_error(body), (what, body)
        assert get_json(server.url + "/healthz")[0] == 200
    status, body, _ = request(server.url + "/api/search", b"k=3",
                              "application/x-www-form-urlencoded")
    assert status == 415 and "multipart" in _one_line_error(json.loads(body))
    status, out = post_search(server.url, good, k=2)
    assert status == 200 and out["results"][0]["path"] == os.path.abspath(
        collection["photos"][1])


def test_a_100_mb_upload_is_refused_without_reading_it(server):
    import http.client
    body, ctype = multipart({"k": "3"}, {"image": ("huge.jpg", b"\xff" * (100 << 20))})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/api/search")
    conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    try:
        conn.send(body[:1 << 20])  # the server answers after the headers
    except OSError:
        pass
    resp = conn.getresponse()
    assert resp.status == 413
    assert "limit of 20 MB" in _one_line_error(json.loads(resp.read()))
    conn.close()
    assert get_json(server.url + "/healthz")[0] == 200


def test_the_page_is_served(server):
    status, body, headers = request(server.url + "/")
    html = body.decode()
    assert status == 200 and "<title>dinofeat serve</title>" in html
    assert "/static/app.js" in html and "http" not in html.split("<body>")[1]  # no CDN
    assert "default-src 'self'" in headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        status, body, _ = request(server.url + "/static/" + name)
        assert status == 200 and len(body) > 500


def test_image_serves_only_indexed_files(server, collection):
    from PIL import Image
    status, body = get_json(server.url + "/api/image/987654")
    assert status == 404 and "987654" in _one_line_error(body)
    for bad in ("..%2F..%2Fetc%2Fpasswd", "abc", "1.5"):
        status, body, _ = request(server.url + "/api/image/" + bad)
        assert status == 404, bad
    status, body, headers = request(server.url + "/api/image/3?size=64")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(body))
    assert max(img.size) == 64
    status, body = get_json(server.url + "/api/image/3?size=100000")
    assert status == 400 and "size" in _one_line_error(body)


def test_item_and_info(server, collection):
    status, rec = get_json(server.url + "/api/item/4")
    assert status == 200 and rec["id"] == 4 and Path(rec["path"]).is_file()
    assert rec["sha256"] and rec["label"] in ("beach", "city")
    assert get_json(server.url + "/api/item/4444")[0] == 404
    status, info = get_json(server.url + "/api/info")
    assert info["items"] == len(collection["photos"]) and info["attention"] is True
    assert info["max_upload_mb"] == 20


def test_search_by_indexed_id(server):
    status, out = post_search(server.url, None, id=7, k=3)
    assert status == 200 and out["results"][0]["id"] == 7
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    status, body = post_search(server.url, None, id=99999)
    assert status == 404 and "99999" in _one_line_error(body)


def test_duplicates_group_as_dedup_does(server, collection):
    from dinofeat.search import KNNIndex, duplicate_groups
    index = KNNIndex.load(collection["index"])
    x = index.vectors()
    paths = [r["path"] for r in index.lookup(index.ids)]
    for threshold in (0.97, 0.9, 0.8):
        status, out = get_json(server.url + f"/api/duplicates?threshold={threshold}")
        assert status == 200 and out["threshold"] == threshold
        want = [[int(index.ids[r]) for r in g.rows]
                for g in duplicate_groups(x, threshold, paths=paths)]
        assert [[m["id"] for m in g["members"]] for g in out["groups"]] == want
        for g in out["groups"]:
            keep = g["members"][0]
            assert g["keep"] == keep["id"] and keep["similarity"] == pytest.approx(1.0)
            # no chains: every member is at the threshold or above to the kept photo
            kx = x[list(index.ids).index(keep["id"])]
            for m in g["members"]:
                mx = x[list(index.ids).index(m["id"])]
                assert m["similarity"] == pytest.approx(float(kx @ mx), abs=1e-5)
                assert m["similarity"] >= threshold - 1e-6
    # the re-saved copy of the first photo is grouped with it, the original kept
    status, out = get_json(server.url + "/api/duplicates?threshold=0.99")
    first = os.path.abspath(collection["photos"][0])
    group = [g for g in out["groups"] if any(m["path"] == first for m in g["members"])]
    assert group and group[0]["members"][0]["path"] == first
    assert group[0]["members"][1]["path"].endswith("copy_of_first.jpg")
    for bad in ("2", "nan", "x"):
        status, body = get_json(server.url + f"/api/duplicates?threshold={bad}")
        assert status == 400 and "threshold" in _one_line_error(body)


def test_histogram_of_nearest_similarities(server, collection):
    from dinofeat.search import KNNIndex
    x = KNNIndex.load(collection["index"]).vectors()
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.max(axis=1)  # computed here by brute force
    status, h = get_json(server.url + "/api/histogram")
    assert status == 200 and len(h["edges"]) == len(h["counts"]) + 1
    assert sum(h["counts"]) == h["items"] == len(collection["photos"])
    want, _ = np.histogram(np.clip(nearest, -1, 1), bins=np.array(h["edges"]))
    assert h["counts"] == want.tolist()


def test_attention_overlay(server, collection):
    from PIL import Image
    photo = collection["photos"][0]
    body, ctype = multipart({"size": "64"}, {"image": ("a.jpg", photo.read_bytes())})
    status, png, headers = request(server.url + "/api/attention", body, ctype)
    assert status == 200 and headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png))
    # short side 64 (72x96 -> 64x85), cropped to multiples of the patch (16)
    assert img.size == (80, 64)
    body, ctype = multipart({"id": "2"}, {})
    assert request(server.url + "/api/attention", body, ctype)[0] == 200
    body, ctype = multipart({}, {"image": ("x.jpg", b"nope")})
    status, out, _ = request(server.url + "/api/attention", body, ctype)
    assert status == 400 and "not an image" in _one_line_error(json.loads(out))


def test_attention_refused_for_a_model_without_it(tmp_path):
    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel
    from dinofeat.search import KNNIndex
    from dinofeat.serve import create_app
    resnet = DinoModel(build_backbone("resnet50"), name="resnet-test").eval()
    index = KNNIndex(dim=2048)
    index.add(np.random.default_rng(0).normal(size=(4, 2048)).astype(np.float32))
    index.save(tmp_path / "vectors.idx")
    srv = InProcessServer(create_app(tmp_path / "vectors.idx", model=resnet))
    try:
        body, ctype = multipart({"id": "0"}, {})
        status, out, _ = request(srv.url + "/api/attention", body, ctype)
        assert status == 422 and "need a ViT" in _one_line_error(json.loads(out))
        assert get_json(srv.url + "/api/info")[1]["attention"] is False
    finally:
        srv.stop()


def test_upload_limit_is_configurable(collection):
    from dinofeat.model import load
    from dinofeat.serve import ServeConfig, create_app
    photo = collection["photos"][0].read_bytes()
    app = create_app(collection["index"], model=load(collection["weights"], device="cpu"),
                     config=ServeConfig(max_upload_mb=len(photo) / 2 / (1 << 20)))
    srv = InProcessServer(app)
    try:
        status, body = post_search(srv.url, photo)
        assert status == 413 and "larger than the limit" in _one_line_error(body)
        assert get_json(srv.url + "/healthz")[0] == 200
        # without a Content-Length (chunked), reading stops at the limit
        import http.client
        big, ctype = multipart({}, {"image": ("big.jpg", photo * 4)})
        conn = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]),
                                          timeout=60)
        conn.request("POST", "/api/search", headers={"Content-Type": ctype},
                     body=(big[i:i + 4096] for i in range(0, len(big), 4096)),
                     encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "limit" in _one_line_error(json.loads(resp.read()))
        conn.close()
        assert get_json(srv.url + "/healthz")[0] == 200
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="weights"):
        create_app(collection["index"], model=_other_model())


def _other_model():
    from _serve import tiny_model
    return tiny_model(seed=5)


# ------------------------------------------------------------------ load
def test_concurrent_clients(server, collection):
    """At least 200 requests from 16 concurrent clients: no errors, and the server's
    memory after a second round is where it was after the first (numbers printed; they
    go in docs/serve.md, not asserted as speeds)."""
    photos = [p.read_bytes() for p in collection["photos"][:8]]
    n_items = len(collection["photos"])

    def one(i: int) -> tuple[float, bool]:
        t0 = time.perf_counter()
        kind = i % 4
        if kind in (0, 1):
            status, out = post_search(server.url, photos[i % len(photos)], k=10, timeout=120)
            ok = status == 200 and len(out["results"]) == 10
        elif kind == 2:
            status, body, _ = request(server.url + f"/api/image/{i % n_items}", timeout=120)
            ok = status == 200 and body[:2] == b"\xff\xd8"
        else:
            status, out = get_json(server.url + "/healthz", timeout=120)
            ok = status == 200
        return time.perf_counter() - t0, ok

    def round_(n: int) -> tuple[np.ndarray, int]:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(n)))
        return np.array([r[0] for r in results]), sum(not r[1] for r in results)

    rss0 = server.rss_kib()
    lat1, err1 = round_(240)
    rss1 = server.rss_kib()
    lat2, err2 = round_(240)
    rss2 = server.rss_kib()
    p50, p95 = np.percentile(np.concatenate([lat1, lat2]) * 1000, [50, 95])
    print(f"\nserve load: 2 x 240 requests, 16 clients (half /api/search k=10): errors "
          f"{err1 + err2}; p50 {p50:.0f} ms, p95 {p95:.0f} ms; RSS {rss0 / 1024:.0f} MiB at "
          f"start, {rss1 / 1024:.0f} MiB after round 1, {rss2 / 1024:.0f} MiB after round 2; "
          f"load {os.getloadavg()[0]:.1f}")
    assert err1 == 0 and err2 == 0
    assert rss2 - rss1 < 40 * 1024, "memory grew from one round of requests to the next"


# ------------------------------------------------------------------ generations
def test_searches_during_index_add_see_old_or_new_index(collection, tmp_path):
    index = tmp_path / "live.idx"
    shutil.copytree(collection["index"], index)
    new = write_photos(tmp_path / "new", 6, seed=7)
    srv = Server(index, "--model", str(collection["weights"]))  # --model: an alias
    try:
        before = get_json(srv.url + "/healthz")[1]
        query = collection["photos"][5].read_bytes()
        stop = threading.Event()
        seen: list[tuple[int, int | None]] = []

        def hammer():
            while not stop.is_set():
                status, out = post_search(srv.url, query, k=3, timeout=120)
                seen.append((status, out.get("generation")))

        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for t in clients:
            t.start()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        add = subprocess.run([sys.executable, "-m", "dinofeat", "index", "add", str(index),
                              str(tmp_path / "new"), "--labels-from-folders",
                              "--model", str(collection["weights"]),
                              "--no-progress"], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert add.returncode == 0, add.stderr
        deadline = time.monotonic() + 60
        while get_json(srv.url + "/healthz")[1]["items"] != before["items"] + len(new):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        for t in clients:
            t.join()
        assert seen and all(status == 200 for status, _ in seen), seen
        after = get_json(srv.url + "/healthz")[1]["generation"]
        assert {g for _, g in seen} <= {before["generation"], after}
        _, out = post_search(srv.url, new[2].read_bytes(), k=1)
        assert out["results"][0]["path"] == os.path.abspath(new[2])
    finally:
        srv.stop()


def test_command_line_defaults_and_missing_extra(server, collection, monkeypatch, capsys):
    # the default bind address is the loopback interface
    assert f"at http://127.0.0.1:{server.port}/" in server.log()
    from dinofeat.cli import main
    assert main(["serve", str(collection["index"]), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the extra were not installed
    assert main(["serve", str(collection["index"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'dinofeat[serve]'" in err
