"""dinofeat serve under load: latency, errors and memory with concurrent clients.

    python benchmarks/serve_load.py [--images /usr/share/backgrounds] [--arch vit_s16]
        [--requests 240] [--rounds 3] [--clients 16] [--out benchmarks/results/serve_load.json]

Indexes the photos under ``--images`` (default: the Debian wallpapers of mate-backgrounds
and ukui-wallpapers; ``apt-get install mate-backgrounds ukui-wallpapers``) with a
random-weight ``--arch`` (no weights can be downloaded here; the cost of a forward pass
does not depend on the weights), starts the real ``dinofeat serve`` command on a free
local port and fires ``--rounds`` rounds of ``--requests`` requests from ``--clients``
concurrent clients: half ``POST /api/search`` (k=10) with one of the indexed photos as
the upload, a quarter thumbnails, a quarter ``/healthz``. Reports per-kind p50/p95
latency, errors, and the server's resident memory after every round (flat = no leak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _request(url, data=None, ctype=None, timeout=300):
    req = urllib.request.Request(url, data=data)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(image: bytes, k: int) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + \
        f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="/usr/share/backgrounds")
    ap.add_argument("--arch", default="vit_s16")
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="dinofeat serve --workers")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()

    import torch

    from dinofeat.backbones import build_backbone
    from dinofeat.model import DinoModel, load, save_safetensors
    from dinofeat.search import KNNIndex
    from dinofeat.zoo import get_spec

    work = Path(tempfile.mkdtemp(prefix="dinofeat-serve-load-"))
    torch.manual_seed(0)
    spec = get_spec(args.arch)
    model = DinoModel(build_backbone(args.arch), name=f"{args.arch}-random",
                      preprocessing=spec.preprocessing).eval()
    weights = save_safetensors(model, work / "model.safetensors")
    t0 = time.perf_counter()
    index = KNNIndex.from_images(args.images, load(weights, device="cpu"), work / "photos.idx",
                                 progress=False)
    build_s = time.perf_counter() - t0
    files = [p for p in (r["path"] for r in index.lookup(index.ids)) if p]
    print(f"indexed {len(index)} photos in {build_s:.1f} s", flush=True)
    uploads = [Path(p).read_bytes() for p in files[:16]]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "dinofeat", "serve", str(work / "photos.idx"),
                             "--port", str(port), "--workers", str(args.workers),
                             "--weights", str(weights)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit((work / "serve.log").read_text())
            try:
                if _request(url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)

        def one(i: int):
            kind = ("search", "search", "thumbnail", "healthz")[i % 4]
            t = time.perf_counter()
            if kind == "search":
                body, ctype = _multipart(uploads[i % len(uploads)], args.k)
                status, out = _request(url + "/api/search", body, ctype)
                ok = status == 200 and len(json.loads(out)["results"]) == min(args.k,
                                                                             len(index))
            elif kind == "thumbnail":
                status, out = _request(url + f"/api/image/{int(index.ids[i % len(index)])}")
                ok = status == 200
            else:
                status, out = _request(url + "/healthz")
                ok = status == 200
            return kind, (time.perf_counter() - t) * 1000, ok

        rss = [_rss_mib(proc.pid)]
        lat: dict[str, list[float]] = {}
        errors = 0
        rounds = []
        for r in range(args.rounds):
            t = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                res = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t
            rss.append(_rss_mib(proc.pid))
            errors += sum(not ok for _, _, ok in res)
            for kind, ms, _ in res:
                lat.setdefault(kind, []).append(ms)
            rounds.append({"seconds": round(wall, 2),
                           "requests_per_s": round(args.requests / wall, 2),
                           "rss_mib_after": round(rss[-1], 1)})
            print(f"round {r + 1}: {args.requests} requests in {wall:.1f} s, RSS "
                  f"{rss[-1]:.0f} MiB", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    every = np.concatenate([np.array(v) for v in lat.values()])
    result = {
        "cpu": _cpu(), "cores": os.cpu_count(), "loadavg_end": os.getloadavg(),
        "arch": args.arch, "weights": "random (speed does not depend on them)",
        "photos": len(index), "images": args.images, "index_build_s": round(build_s, 1),
        "clients": args.clients, "requests_per_round": args.requests, "rounds": args.rounds,
        "workers": args.workers, "k": args.k, "errors": errors,
        "p50_ms": round(float(np.percentile(every, 50)), 1),
        "p95_ms": round(float(np.percentile(every, 95)), 1),
        "per_kind": {k: {"n": len(v), "p50_ms": round(float(np.percentile(v, 50)), 1),
                         "p95_ms": round(float(np.percentile(v, 95)), 1)}
                     for k, v in lat.items()},
        "rss_mib_start": round(rss[0], 1), "rounds_detail": rounds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
