"""MkDocs hook: generate the command-line reference (docs/cli.md) from the real parser, so the
page always matches `dinofeat --help`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _walk(parser: argparse.ArgumentParser, prefix: str, out: list[str]) -> None:
    out.append(f"## `{prefix}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _walk(sub, f"{prefix} {name}", out)


def render_cli_reference() -> str:
    import os
    os.environ.setdefault("COLUMNS", "100")
    from dinofeat.cli import build_parser

    out = ["# Command line reference\n",
           "Generated from `dinofeat --help` at documentation build time.\n"]
    _walk(build_parser(), "dinofeat", out)
    return "\n".join(out)


def on_pre_build(config, **kwargs):
    target = Path(config["docs_dir"]) / "cli.md"
    text = render_cli_reference()
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
