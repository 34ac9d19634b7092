"""Find near-duplicate photos in a folder: resized, re-encoded, lightly edited copies.

What it shows: ``dinofeat.search.dedup.dedup_folder`` embeds every image with DINO's
copy-detection features ([CLS] + GeM-pooled patch tokens, paper section 3.8), links the
pairs whose cosine similarity reaches ``--threshold`` and returns the connected groups,
each with a suggested keeper (most pixels, then oldest file). The groups are printed and
written as JSON (or CSV) and as an HTML page with thumbnails to review in a browser.

Run it::

    python examples/dedup.py photos/                                 # ViT-S/16 from the hub
    python examples/dedup.py photos/ --threshold 0.95 --out groups.csv --html report.html
    python examples/dedup.py photos/ --model runs/exp1/checkpoint.pth  # your own weights

``--model`` takes anything ``dinofeat.load`` takes. The threshold depends on the model and
the collection: look at the report of a sample and adjust it. Nothing is deleted; the
command-line equivalent is ``dinofeat dedup``.
"""

from __future__ import annotations

import argparse

import dinofeat
from dinofeat.search.dedup import DEFAULT_THRESHOLD, dedup_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the photos to scan (searched recursively)")
    parser.add_argument("--model", default="vit_s16",
                        help="zoo name or weights file/run folder (default: vit_s16)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine similarity that makes two images duplicates "
                             f"(default: {DEFAULT_THRESHOLD})")
    parser.add_argument("--out", default="groups.json", help="groups as .json or .csv")
    parser.add_argument("--html", default="groups.html", help="review page to write")
    args = parser.parse_args(argv)

    model = dinofeat.load(args.model)
    result = dedup_folder(args.folder, model, threshold=args.threshold, out=args.out,
                          html_path=args.html, progress=False)
    print(result)
    for n, group in enumerate(result.groups, start=1):
        print(f"group {n}: keep {group.keep}")
        for path, sim in zip(group.paths[1:], group.similarity[1:]):
            print(f"    similarity {sim:.3f}  {path}")
    for path, reason in result.unreadable:
        print(f"unreadable: {path} ({reason})")
    print(f"wrote {args.out} and {args.html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
