"""``dinofeat models``: the model zoo."""

from __future__ import annotations

import argparse


def _cmd_models(args: argparse.Namespace) -> int:
    from .. import zoo
    if args.json:
        import json
        print(json.dumps(zoo.list_models(as_dicts=True), indent=1))
    elif args.markdown:
        print(zoo.format_markdown_table())
    else:
        print(zoo.format_table())
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with published ImageNet numbers",
                       description="List every zoo model: architecture, feature dim, patch "
                                   "size, parameters, published ImageNet k-NN and linear "
                                   "top-1, and where its weights come from.")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--markdown", action="store_true",
                     help="print a Markdown table (the one in README.md)")
    p.set_defaults(func=_cmd_models)

