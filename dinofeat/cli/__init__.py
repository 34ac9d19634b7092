"""The ``dinofeat`` command: a thin layer that parses arguments and calls the library.

Each verb group is one module of this package with a ``register(sub)`` function that adds
its sub-command parsers; :data:`VERBS` lists them in the order ``--help`` shows them, so a
new verb is one module plus one line there. User mistakes (missing files, bad options) end
with a one-line ``dinofeat: error: ...`` and exit code 2, never a traceback (``--debug``
shows it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .common import Parser, UserError
from .output import install_output, safe

__all__ = ["main", "build_parser", "UserError", "VERBS"]

#: Modules of this package that register verbs, in ``--help`` order.
VERBS = ("models", "features", "search", "serve", "train", "evaluate", "demo", "export",
         "push")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__
    parser = Parser(
        prog="dinofeat",
        description="DINO self-supervised vision features: pretrained models, embeddings, "
                    "attention maps, k-NN search and DINO training.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in VERBS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    _finish_verbs(parser)
    return parser


def _finish_verbs(parser: argparse.ArgumentParser) -> None:
    """Every verb's parser accepts ``--debug`` too (before or after the verb) and records
    itself, so that late errors point to that verb's own ``--help``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb in dict.fromkeys(action.choices.values()):  # aliases share a parser
                verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                  help="show full tracebacks instead of one-line errors")
                verb.set_defaults(verb_parser=verb)
                _finish_verbs(verb)


def _paths_safe_output() -> None:
    """File names that are not UTF-8 (kept by Python as lone surrogates) are printed as
    their original bytes, as ls and find do, instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and stream in (sys.__stdout__, sys.__stderr__) and \
                hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    from ..weights import reset_interface, set_interface
    token = set_interface("cli")  # library errors name --model PATH, not dinofeat.load(...)
    try:
        return _main(argv)
    finally:  # a program calling main() keeps its own wording afterwards
        reset_interface(token)


def _main(argv: Sequence[str] | None) -> int:
    _paths_safe_output()
    streams = install_output()
    try:
        return _parse_and_run(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _parse_and_run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    verb = getattr(args, "verb_parser", parser)
    if extra:
        verb.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2 if not argv else 0
    see = f" (see '{verb.prog} --help')"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dinofeat: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, KeyError, ValueError, TypeError, PermissionError,
            IsADirectoryError, NotADirectoryError) as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(safe(f"dinofeat: error: {msg}") + (see if isinstance(e, UserError) else ""),
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failure, not a user mistake: still one line
        if args.debug:
            raise
        print(safe(f"dinofeat: error: {type(e).__name__}: {e}") + " (run with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
