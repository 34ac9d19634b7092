"""``dinofeat serve``: the index on a local web page and JSON API (the work is in
:func:`dinofeat.serve.serve`)."""

from __future__ import annotations

import argparse

from .common import UserError, add_deprecated


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..serve import require_serve_extra, serve
    if not Path(args.index).exists():
        raise FileNotFoundError(f"no such index: {args.index}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    try:
        require_serve_extra()
    except ImportError as e:
        raise UserError(str(e)) from None
    serve(args.index, host=args.host, port=args.port, weights=args.model, device=args.device,
          max_upload_mb=args.max_upload_mb, workers=args.workers)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="search and review an index in the browser (needs dinofeat[serve])",
        description="Serve an index on a local web page and a JSON API: drop a photo to see "
                    "its nearest neighbours with scores and attention maps, click a result to "
                    "search with it, review duplicate groups with a threshold slider. Loads "
                    "the index's own model once; picks up new generations written by "
                    "'dinofeat index add' while it runs. No authentication: it listens on "
                    "127.0.0.1 unless --host says otherwise. See docs/serve.md.")
    p.add_argument("index", help="index folder (from 'dinofeat index build')")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                        "exposes it to the network without authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the index's model: a weights file or zoo name (needed when the index "
                        "records a weights file outside its folder; its weights hash must "
                        "match the index's)")
    add_deprecated(p, "--weights", new="--model", dest="model")
    p.add_argument("--device", default=None, help="where to run the model (default: CUDA "
                   "if available, else CPU)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest photo accepted (default 20)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads running the model (default 2)")
    p.set_defaults(func=_cmd_serve)
