"""Helpers of the serve tests (test_serve, test_serve_browser): a photo collection indexed
with a tiny random-weight ViT saved as a weights file, a real ``dinofeat serve`` process on
a free local port, and a small multipart HTTP client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0):
    """A random-weight ViT-Tiny/16 with 4 blocks at 32 px: fast on a CPU, and a ViT, so
    attention maps work."""
    import torch

    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=4, num_heads=3,
                                img_size=32)
    return DinoModel(vit, name="tiny-serve-test",
                     preprocessing=Preprocessing(resize_size=37, crop_size=32)).eval()


def write_photos(folder: Path, n: int, seed: int = 0, size=(72, 96)) -> list[Path]:
    """``n`` distinct photo-like JPEGs (smooth gradients and blobs) in two sub-folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for i in range(n):
        chans = []
        for c in range(3):
            a, b, f = rng.uniform(0.2, 1.0, 3)
            v = 120 * (x / w) * a + 100 * (y / h) * b + 35 * np.sin(f * x / 5 + c)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            v += 90 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * h * w + 1))
            chans.append(v)
        arr = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)
        sub = folder / ("beach" if i % 2 else "city")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"photo{seed:02d}_{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=92)
        out.append(p)
    return out


def build_index(root: Path, n: int = 24) -> tuple[Path, Path, list[Path]]:
    """(index folder, weights file, photos): ``n`` photos plus a near-copy of the first
    (resaved at lower quality, so dedup finds it) indexed with the tiny model."""
    from PIL import Image

    from dinofeat.model import load, save_safetensors
    from dinofeat.search import KNNIndex
    photos = write_photos(root / "photos", n)
    copy = root / "photos" / "city" / "copy_of_first.jpg"
    Image.open(photos[0]).save(copy, quality=60)
    weights = save_safetensors(tiny_model(), root / "tiny.safetensors")
    index_dir = root / "photos.idx"
    KNNIndex.from_images(root / "photos", load(weights, device="cpu"), index_dir,
                         labels="folder", num_workers=0, batch_size=16, progress=False)
    return index_dir, weights, photos + [copy]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``dinofeat serve INDEX`` in a subprocess on a free port (the real command line)."""

    def __init__(self, index: Path, *args: str, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.log_path = log or Path(index).with_suffix(f".serve{self.port}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dinofeat", "serve", str(Path(index).resolve()), "--port", str(self.port),
             *args], stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dinofeat serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if get_json(self.url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dinofeat serve did not start:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]
              ) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                     f"{value}\r\n".encode())
    for name, (filename, data) in files.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream"
                     f"\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(url: str, data: bytes | None = None, content_type: str | None = None,
            method: str | None = None, timeout: float = 60) -> tuple[int, bytes, dict]:
    """(status, body, headers) of one HTTP request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(url: str, timeout: float = 60) -> tuple[int, dict]:
    status, body, _ = request(url, timeout=timeout)
    return status, json.loads(body)


def post_search(base: str, image: bytes | None = None, filename: str = "q.jpg",
                timeout: float = 60, **fields) -> tuple[int, dict]:
    files = {"image": (filename, image)} if image is not None else {}
    body, ctype = multipart({k: str(v) for k, v in fields.items()}, files)
    status, out, _ = request(base + "/api/search", body, ctype, timeout=timeout)
    return status, json.loads(out)


class InProcessServer:
    """An application from :func:`dinofeat.serve.create_app` served by uvicorn in a
    thread on a free port (for settings the command line does not reach cheaply)."""

    def __init__(self, app):
        import threading

        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
