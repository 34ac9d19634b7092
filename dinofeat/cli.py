"""The ``dinofeat`` command: a thin layer that parses arguments and calls the library.

Each area registers its sub-commands in its own ``_add_*`` function below; user mistakes
(missing files, bad options) end with a one-line ``dinofeat: error: ...`` and exit code 2,
never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "UserError"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


# ------------------------------------------------------------------ models
def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo
    if args.json:
        import json
        print(json.dumps(zoo.list_models(as_dicts=True), indent=1))
    else:
        print(zoo.format_table())
    return 0


def _add_models_commands(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with published ImageNet numbers",
                       description="List every zoo model: architecture, feature dim, patch "
                                   "size, parameters, published ImageNet k-NN and linear "
                                   "top-1, and where its weights come from.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_models)


# ---------------------------------------------------------------- features
def _add_features_commands(sub) -> None:
    """embed, attn (issue: features)."""


# ------------------------------------------------------------------- index
def _add_index_commands(sub) -> None:
    """index build/add/info, search, dedup (issue: index)."""


# ------------------------------------------------------------------- train
def _add_train_commands(sub) -> None:
    """train (issue: training core)."""


# -------------------------------------------------------------------- eval
def _add_eval_commands(sub) -> None:
    """eval knn|linear|retrieval|copydetect|davis (issue: evaluation)."""


# ------------------------------------------------------------ demo, export
def _add_misc_commands(sub) -> None:
    """demo, export."""


_REGISTRARS: list[Callable] = [_add_models_commands, _add_features_commands,
                               _add_index_commands, _add_train_commands,
                               _add_eval_commands, _add_misc_commands]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="dinofeat",
        description="DINO self-supervised vision features: pretrained models, embeddings, "
                    "attention maps, k-NN search and DINO training.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2 if not argv else 0
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
        print(f"dinofeat: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failure, not a user mistake: still one line
        if args.debug:
            raise
        print(f"dinofeat: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
