"""``dinofeat serve``: search and review an index of photos in the browser.

A Starlette application (:func:`create_app`) with a JSON API and a page of plain
HTML/CSS/JavaScript shipped in the package (no build step, nothing fetched from
elsewhere), run by uvicorn (:func:`serve`). Needs the ``serve`` extra::

    pip install 'dinofeat[serve]'
    dinofeat serve photos.idx            # then open http://127.0.0.1:8000/

See docs/serve.md for the API.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "require_serve_extra", "serve"]

_MISSING = ("dinofeat serve needs the serve extra (starlette, uvicorn, python-multipart): "
            "pip install 'dinofeat[serve]'")


def require_serve_extra() -> None:
    """Raise ``ImportError`` with the install command when the extra is missing."""
    try:
        import multipart  # type: ignore[import-untyped]  # noqa: F401  (python-multipart)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(_MISSING) from None


def __getattr__(name: str):
    if name in ("create_app", "ServeConfig"):
        require_serve_extra()
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'dinofeat.serve' has no attribute {name!r}")


def serve(index, *, host: str = "127.0.0.1", port: int = 8000, model=None,
          weights: str | None = None, device: str | None = None, max_upload_mb: float = 20.0,
          workers: int = 2, log_level: str = "info") -> None:
    """Serve the index folder ``index`` at ``http://host:port/`` until interrupted.

    Binds to the loopback interface unless ``host`` says otherwise: the server has no
    authentication, so expose it to a network only behind a proxy that adds some."""
    require_serve_extra()
    import uvicorn

    from ..utils import get_logger
    from .app import ServeConfig, create_app
    app = create_app(index, model=model, weights=weights, device=device,
                     config=ServeConfig(max_upload_mb=max_upload_mb, workers=workers))
    if host not in ("127.0.0.1", "localhost", "::1"):
        get_logger("dinofeat.serve").warning(
            "listening on %s: anyone who can reach this address can search the index and "
            "see its images (there is no authentication)", host)
    served = app.state.served
    get_logger("dinofeat.serve").info("serving %s (%d items, generation %d) at http://%s:%d/",
                                      served.path, len(served.index), served.generation,
                                      host if ":" not in host else f"[{host}]", port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                limit_concurrency=512)
