"""The Starlette application of ``dinofeat serve``: the JSON API and the page.

Routes (documented in docs/serve.md)::

    GET  /                      the page (static files shipped in the package)
    POST /api/search            multipart: image (a file) or id (an indexed item), k
    GET  /api/item/{id}         the item's record
    GET  /api/image/{id}        a JPEG thumbnail of an indexed file (?size=, 32..512 px)
    GET  /api/duplicates        ?threshold= (&limit=): duplicate groups, like dinofeat dedup
    GET  /api/histogram         each item's similarity to its nearest other item, binned
    POST /api/attention         multipart: image or id (&size=): a PNG attention overlay
    GET  /api/info              the index, the model, the limits
    GET  /healthz               liveness and the generation served

Every error is ``{"error": "one line"}`` with a 4xx status (5xx only for a server fault).
Model calls and image decoding run in bounded thread pools, so the event loop keeps
answering; when the model's queue is full a request gets 503 at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import images as _images
from ..search import DEFAULT_THRESHOLD
from ..utils import get_logger
from .state import ServedIndex, duplicate_view, similarity_histogram

__all__ = ["MAX_K", "STATIC_DIR", "ServeConfig", "create_app"]

_log = get_logger("dinofeat.serve")

STATIC_DIR = Path(__file__).parent / "static"
MAX_K = 1000  # results per query; more is a mistake or an attempt to tie up the server
THUMB_SIZES = (32, 512)
ATTENTION_SIZES = (32, 1024)
_FORM_SLACK = 64 * 1024  # multipart headers and the small fields around the file


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ServeConfig:
    """Settings of one server. ``max_upload_mb``: the largest upload accepted;
    ``max_pixels``: the largest decoded image (decompression bombs);
    ``workers``: threads running the model; ``queue``: model calls allowed to wait
    before requests are turned away with 503."""

    def __init__(self, *, max_upload_mb: float = 20.0, max_pixels: int | None = None,
                 workers: int = 2, queue: int = 64, thumb_cache: int = 512):
        if max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
        if workers < 1 or queue < 1:
            raise ValueError("workers and queue must be at least 1")
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_upload_mb = max_upload_mb
        self.max_pixels = int(max_pixels or _images.MAX_PIXELS)
        self.workers = int(workers)
        self.queue = int(queue)
        self.thumb_cache = int(thumb_cache)


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim``, or a no-op elsewhere. Decoding large photos in several
    threads leaves freed memory in per-thread heaps that glibc does not hand back by
    itself, so the server's memory would creep up under load without it."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    state = {"last": 0.0}
    lock = threading.Lock()

    def run() -> None:
        now = time.monotonic()
        with lock:  # at most twice a second: a trim walks every heap
            if now - state["last"] < 0.5:
                return
            state["last"] = now
        trim(0)
    return run


_trim = _malloc_trim()


class _Pool:
    """A thread pool with a bounded number of jobs in it (running or waiting)."""

    def __init__(self, workers: int, limit: int, name: str):
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.slots = threading.BoundedSemaphore(workers + limit)

    @staticmethod
    def _job(fn: Callable, args: tuple) -> Any:
        try:
            return fn(*args)
        finally:
            _trim()

    async def run(self, fn: Callable, *args: Any) -> Any:
        if not self.slots.acquire(blocking=False):
            raise ApiError(503, "the server is busy (too many requests waiting for the "
                                "model); retry in a moment")
        try:
            return await asyncio.wrap_future(self.executor.submit(self._job, fn, args))
        finally:
            self.slots.release()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


# ------------------------------------------------------------------ request parsing
async def _read_form(request: Request, cfg: ServeConfig) -> dict[str, Any]:
    """The multipart form of a request, never reading more than the upload limit:
    ``{"image": bytes | None, "filename": str, **fields}``."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, "send a multipart/form-data body with the photo in the field "
                            "'image' (or an indexed item's 'id')")
    limit = cfg.max_upload_bytes + _FORM_SLACK
    too_big = ApiError(413, f"the upload is larger than the limit of {cfg.max_upload_mb:g} "
                            "MB (dinofeat serve --max-upload-mb)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_big

    async def limited():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_big
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=8,
                             max_part_size=_FORM_SLACK)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"bad multipart body: {e}") from None
    out: dict[str, Any] = {"image": None, "filename": "upload"}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ApiError(400, f"unexpected file field {key!r}; send the photo as "
                                        "'image'")
                data = await value.read()
                if len(data) > cfg.max_upload_bytes:
                    raise too_big
                out["image"], out["filename"] = data, value.filename or "upload"
            else:
                out[key] = value
    finally:
        await form.close()
    return out


def _int_field(value: Any, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}, got "
                            f"{str(value)[:40]!r}") from None
    if not lo <= n <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}, got {n}")
    return n


def _decode_upload(data: bytes, filename: str, cfg: ServeConfig) -> Image.Image:
    """An uploaded file as an RGB image, with the library's checks (format, truncation,
    decompression bombs); failures become a 400 naming the upload."""
    if not data:
        raise ApiError(400, f"{filename}: empty upload")
    fd, tmp = tempfile.mkstemp(prefix="dinofeat-serve-", suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _images.open_image(tmp, max_pixels=cfg.max_pixels)
    except _images.ImageReadError as e:
        status = 413 if "decompression bomb" in e.reason else 400
        raise ApiError(status, f"{filename}: {e.reason}") from None
    finally:
        os.unlink(tmp)


def _open_indexed(index, item_id: int, cfg: ServeConfig) -> tuple[Image.Image, dict]:
    """The image file of an indexed item (only paths recorded in the index are opened)."""
    rec = index.lookup([item_id])[0]
    if rec is None:
        raise ApiError(404, f"no item with id {item_id} in the index")
    if not rec["path"]:
        raise ApiError(404, f"item {item_id} has no image file (added as a vector)")
    try:
        return _images.open_image(rec["path"], max_pixels=cfg.max_pixels), rec
    except _images.ImageReadError as e:
        raise ApiError(410, f"item {item_id}: the indexed file cannot be read now "
                            f"({e.reason})") from None


def _record(rec: dict) -> dict:
    return {"id": int(rec["id"]), "path": rec["path"],
            **({"label": rec["label"]} if rec["label"] is not None else {})}


# ------------------------------------------------------------------ the app
def create_app(index: str | Path, *, model: Any = None, weights: str | None = None,
               device: str | None = None, config: ServeConfig | None = None) -> Starlette:
    """The ``dinofeat serve`` application for the index folder ``index``.

    The model is the one the index was built with, loaded once: pass it as ``model`` (a
    :class:`~dinofeat.model.DinoModel`), or ``weights`` (a zoo name or file) when the index
    records a weights file outside its folder (not followed without your say-so) or one
    that moved; its weights hash must match the index's."""
    cfg = config or ServeConfig()
    served = ServedIndex(index)
    first = served.index
    if model is None:
        model = first.load_model(weights, device=device)
    else:
        want = (first.model_info or {}).get("weights_hash")
        have = getattr(model, "weights_hash", None)
        if want and have and want != have:
            raise ValueError(f"the model given ({getattr(model, 'name', '?')}, weights "
                             f"{have}) is not the one {index} was built with (weights {want})")
    has_attention = bool(getattr(model, "is_vit", False))
    model_pool = _Pool(cfg.workers, cfg.queue, "dinofeat-model")
    io_pool = _Pool(2, 256, "dinofeat-io")
    thumbs: OrderedDict[tuple, bytes] = OrderedDict()
    thumbs_lock = threading.Lock()
    model_name = getattr(model, "name", None) or (first.model_info or {}).get("name")

    def embed_search(idx, img: Image.Image, k: int):
        scores, ids, _ = idx.search_images([img], model, k=k, progress=False, num_workers=0)
        return scores[0], ids[0]

    async def query_image(request: Request, idx) -> tuple[Image.Image, dict]:
        form = await _read_form(request, cfg)
        if form["image"] is not None:
            img = await io_pool.run(_decode_upload, form["image"], form["filename"], cfg)
            return img, form
        if form.get("id") not in (None, ""):
            item = _int_field(form["id"], "id", 0, -2**63, 2**63 - 1)
            img, _ = await io_pool.run(_open_indexed, idx, item, cfg)
            return img, form
        raise ApiError(400, "no image: send the photo in the multipart field 'image' (or an "
                            "indexed item's 'id')")

    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        idx, generation = served.snapshot()
        img, form = await query_image(request, idx)
        k = _int_field(form.get("k"), "k", 10, 1, MAX_K)
        scores, ids = await model_pool.run(embed_search, idx, img, k)
        results = []
        for s, rec in zip(scores.tolist(), idx.lookup(ids.tolist())):
            if rec is not None:
                results.append({**_record(rec), "score": round(float(s), 6)})
        return JSONResponse({"results": results, "model": model_name, "metric": idx.metric,
                             "k": k, "generation": generation,
                             "query": {"width": img.width, "height": img.height},
                             "ms": round((time.perf_counter() - t0) * 1000, 1)})

    def parse_id(request: Request) -> int:
        raw = request.path_params["item"]
        try:
            return int(raw)
        except ValueError:
            raise ApiError(404, f"no item with id {raw[:40]!r} (ids are integers)") from None

    async def item(request: Request) -> Response:
        idx = served.get()
        item_id = parse_id(request)
        rec = idx.lookup([item_id])[0]
        if rec is None:
            raise ApiError(404, f"no item with id {item_id} in the index")
        return JSONResponse({**rec, "id": int(rec["id"])})

    def make_thumbnail(idx, item_id: int, size: int) -> bytes:
        rec = idx.lookup([item_id])[0]
        if rec is None:
            raise ApiError(404, f"no item with id {item_id} in the index")
        path = rec["path"]
        if not path:
            raise ApiError(404, f"item {item_id} has no image file (added as a vector)")
        try:
            mtime = Path(path).stat().st_mtime_ns
        except OSError:
            raise ApiError(410, f"item {item_id}: the indexed file is gone") from None
        key = (path, mtime, size)
        with thumbs_lock:
            if key in thumbs:
                thumbs.move_to_end(key)
                return thumbs[key]
        img, _ = _open_indexed(idx, item_id, cfg)
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        with thumbs_lock:
            thumbs[key] = data
            while len(thumbs) > cfg.thumb_cache:
                thumbs.popitem(last=False)
        return data

    async def image(request: Request) -> Response:
        idx = served.get()
        item_id = parse_id(request)
        size = _int_field(request.query_params.get("size"), "size", 256, *THUMB_SIZES)
        data = await io_pool.run(make_thumbnail, idx, item_id, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    def vectors_of(idx) -> np.ndarray:
        return served.cached(idx, "vectors", idx.vectors)

    async def duplicates(request: Request) -> Response:
        idx = served.get()
        q = request.query_params
        raw = q.get("threshold")
        try:
            threshold = DEFAULT_THRESHOLD if not raw else float(raw)
        except ValueError:
            raise ApiError(400, f"threshold must be a number from -1 to 1, got "
                                f"{str(raw)[:40]!r}") from None
        if not -1.0 <= threshold <= 1.0:  # also refuses nan
            raise ApiError(400, f"threshold is a cosine similarity from -1 to 1, got {raw}")
        if idx.metric != "cosine":
            raise ApiError(409, "duplicates need a cosine index; this one is "
                                f"{idx.metric}")
        limit = _int_field(q.get("limit"), "limit", 200, 1, 10000)
        threshold = round(threshold, 4)

        def compute():
            x = vectors_of(idx)
            return served.cached(idx, ("dups", threshold),
                                 lambda: duplicate_view(idx, x, threshold))
        view = await model_pool.run(compute)
        return JSONResponse(view.as_dict(limit))

    async def histogram(request: Request) -> Response:
        idx = served.get()
        if idx.metric != "cosine":
            raise ApiError(409, f"the histogram needs a cosine index; this one is {idx.metric}")

        def compute():
            x = vectors_of(idx)
            return served.cached(idx, "histogram", lambda: similarity_histogram(x))
        return JSONResponse(await model_pool.run(compute))

    def attention_png(img: Image.Image, size: int) -> bytes:
        from ..attention import overlay
        maps = model.attention_maps(img, size=min(size, min(img.size)) if size else None)
        buf = io.BytesIO()
        Image.fromarray(overlay(maps.image, maps.mean)).save(buf, format="PNG")
        return buf.getvalue()

    async def attention(request: Request) -> Response:
        idx = served.get()
        if not has_attention:
            raise ApiError(422, f"attention maps need a ViT; {model_name} has no "
                                "self-attention")
        img, form = await query_image(request, idx)
        size = _int_field(form.get("size"), "size", 224, *ATTENTION_SIZES)
        data = await model_pool.run(attention_png, img, size)
        return Response(data, media_type="image/png")

    async def info(request: Request) -> Response:
        idx = served.get()
        return JSONResponse({
            "index": str(served.path), "items": len(idx), "generation": served.generation,
            "metric": idx.metric, "labels": idx.has_labels, "model": model_name,
            "model_info": idx.model_info, "attention": has_attention,
            "max_upload_mb": cfg.max_upload_mb, "max_k": MAX_K,
            "default_threshold": DEFAULT_THRESHOLD, "reload_error": served.reload_error})

    async def healthz(request: Request) -> Response:
        idx = served.get()
        return JSONResponse({"status": "ok", "items": len(idx),
                             "generation": served.generation})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if exc.status_code != 404 else f"not found: {request.url.path}"
        return _error(exc.status_code, detail)

    async def on_failure(request: Request, exc: Exception) -> Response:
        _log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/api/info", info),
        Route("/api/search", search, methods=["POST"]),
        Route("/api/item/{item}", item),
        Route("/api/image/{item}", image),
        Route("/api/duplicates", duplicates),
        Route("/api/histogram", histogram),
        Route("/api/attention", attention, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)],
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                        Exception: on_failure})
    app.state.served = served
    app.state.model = model
    app.state.config = cfg
    return app


class _SecurityHeaders:
    """Adds headers that keep the page's content its own: no scripts or images from
    elsewhere, no MIME sniffing, no framing by other sites."""

    HEADERS = (
        (b"content-security-policy",
         (b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
          b"frame-ancestors 'none'; base-uri 'none'")),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    )

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           list(self.HEADERS)}
            await send(message)
        await self.app(scope, receive, send_with_headers)
