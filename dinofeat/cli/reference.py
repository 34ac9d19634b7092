"""docs/cli.md, the command-line reference, generated from the parsers themselves.

``python -m dinofeat.cli.reference`` rewrites docs/cli.md; ``--check`` exits 1 when the
committed file differs from what ``--help`` says now (the tests run that check).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["render", "VOCABULARY", "DEPRECATED"]

#: One option name per concept, in every verb.
VOCABULARY = [
    ("--model NAME_OR_PATH", "the trained model: a zoo name (`dinofeat models`), a weights "
     "file (.pth, .safetensors) or a training run folder. In `search` and `index add`: the "
     "index's own model, when its weights file moved"),
    ("--arch NAME", "an architecture, never a trained model: in `train` the untrained network "
     "to build; in `push` the architecture of a weights file when it cannot be inferred"),
    ("--data DIR", "`train` only: the training images (verbs that read one input take it as "
     "their first argument)"),
    ("--out PATH", "what the verb writes: a file (features, index, results JSON, export) or "
     "a folder (attention maps, a training or linear-probe run, DAVIS masks)"),
    ("--results FILE", "`eval linear` and `eval davis`: the results JSON (default "
     "`<out>/results.json`)"),
    ("-k N", "a number of neighbours or results (search, dedup, eval knn/copydetect/davis)"),
    ("--temperature T", "a softmax temperature (eval knn's vote, davis' propagation)"),
    ("--batch-size N", "images per step (per process under torchrun)"),
    ("--num-workers N", "image-decoding worker processes"),
    ("--size PX", "the model's input size: the crop side (preprocessing `dino`), the long "
     "side (`whole`) or the square side (copydetect)"),
    ("--short-side PX", "resize the image's short side first (attn, eval davis)"),
    ("--precision", "fp32, bf16 or fp16 autocast"),
    ("--device", "cpu, cuda, cuda:1 ..."),
    ("--no-progress", "no progress display"),
    ("--debug", "full tracebacks instead of one-line errors (before or after the verb)"),
]

#: Old spellings still accepted for one release, each with one warning line.
DEPRECATED = [
    ("--arch NAME (outside train)", "--model NAME"),
    ("--weights PATH", "--model PATH"),
    ("--output, --output-dir (train, eval linear, eval davis)", "--out"),
    ("--out FILE.json (eval linear, eval davis)", "--results FILE.json"),
    ("--k, --topk", "-k"),
    ("--T", "--temperature"),
    ("--imsize", "--size"),
    ("--size (attn)", "--short-side"),
    ("--batch-size-per-gpu (train)", "--batch-size"),
]


def _walk(parser: argparse.ArgumentParser, prefix: str, out: list[str]) -> None:
    out.append(f"## `{prefix}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _walk(sub, f"{prefix} {name}", out)


def render() -> str:
    """The Markdown of docs/cli.md (help wrapped at 100 columns whatever the terminal)."""
    from . import build_parser
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        out = ["# Command line reference\n",
               "Generated from `dinofeat --help` by `python -m dinofeat.cli.reference` (a test "
               "fails when this page is stale).\n",
               "## One name per concept\n",
               "| option | meaning |", "|---|---|"]
        out += [f"| `{o}` | {m} |" for o, m in VOCABULARY]
        out += ["", "Older spellings still work for one release and print one deprecation "
                "line:\n", "| old | new |", "|---|---|"]
        out += [f"| `{o}` | `{n}` |" for o, n in DEPRECATED]
        out += ["", "## Messages, progress and outputs\n", " ".join([
            "Results go to stdout; progress, log lines and errors to stderr. A mistake ends",
            "with one line, `dinofeat: error: ...` (exit code 2, pointing to the verb's",
            "`--help` when the command line itself is wrong); `--debug`, before or after the",
            "verb, shows the traceback instead. On a terminal long verbs draw progress bars; in",
            "a pipe or a log file they print one plain line when a bar starts, then at most",
            "one every `DINOFEAT_PROGRESS_INTERVAL` seconds (default 30) and the last state.",
            "Unreadable images are named once each, as they are met, and counted in the",
            "summary. Text taken from files (paths, model names, index headers) is printed",
            "with terminal control characters escaped (`\\x1b`), so a crafted file name or",
            "model cannot drive the terminal. `embed`, `index` and `dedup` record images by",
            "absolute path (made absolute from the folder the command ran in, symbolic links",
            "kept); output files get the usual permissions (0644 under umask 022).",
            "The [API page](api.md) shows how to read a feature file back",
            "(`load_features`)."]), ""]
        _walk(parser, "dinofeat", out)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dinofeat.cli.reference",
                                description="Write (or --check) docs/cli.md.")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs" / "cli.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = p.parse_args(argv)
    target, text = Path(args.out), render()
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if args.check:
        if current != text:
            print(f"{target} is stale: run python -m dinofeat.cli.reference", file=sys.stderr)
            return 1
        return 0
    if current != text:
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
