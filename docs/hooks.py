"""MkDocs hook: make sure docs/cli.md (committed, generated from the real parser by
``python -m dinofeat.cli.reference``) matches `dinofeat --help` when the site is built."""

from __future__ import annotations

from pathlib import Path


def on_pre_build(config, **kwargs):
    from dinofeat.cli.reference import render
    target = Path(config["docs_dir"]) / "cli.md"
    text = render()
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
