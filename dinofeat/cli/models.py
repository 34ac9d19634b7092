"""``dinofeat models``: the model zoo."""

from __future__ import annotations

import argparse


def _cmd_models(args: argparse.Namespace) -> int:
    from .. import weights, zoo
    if args.json:
        import json
        here = weights.local_weights_all()
        print(json.dumps([{**d, "local_path": str(here[d["name"]]) if here[d["name"]] else None}
                          for d in zoo.list_models(as_dicts=True)], indent=1))
    elif args.markdown:
        print(zoo.format_markdown_table())
    else:
        print(zoo.format_table(local=weights.local_weights_all()))
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with published ImageNet numbers",
                       description="List every zoo model: architecture, feature dim, patch "
                                   "size, parameters, published ImageNet k-NN and linear "
                                   "top-1, where its weights come from, and whether a copy "
                                   "is already on this machine (column 'here').")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--markdown", action="store_true",
                     help="print a Markdown table (the one in README.md)")
    p.set_defaults(func=_cmd_models)

