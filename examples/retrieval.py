"""Retrieve similar photos: index a folder, search it with a query image, draw the result.

What it shows: building a :class:`dinofeat.KNNIndex` of every image under a folder
(``KNNIndex.from_images``: resumable, skips unreadable files and byte-identical copies),
searching it with a query photo (``index.search_images``), reading back the neighbours'
paths (``index.lookup``) and drawing them as one picture (``dinofeat.demo.neighbour_grid``).

Run it::

    python examples/retrieval.py photos/ query.jpg                   # ViT-S/16 from the hub
    python examples/retrieval.py photos/ query.jpg -k 8 --out neighbours.png \\
        --index photos.idx                                           # keep the index on disk
    python examples/retrieval.py photos/ query.jpg --model runs/exp1   # your own weights

``--model`` takes anything ``dinofeat.load`` takes: a zoo name (``dinofeat models``) or a
weights file / training run folder. With ``--index`` the index is saved there and the next
run only embeds the images it does not hold yet. In the picture the query comes first
(blue frame), then its neighbours, nearest first: green when the neighbour lies in a folder
of the same name as the query's (its class, in a ``root/<class>/<image>`` tree), red
otherwise. The same from the command line: ``dinofeat index build`` and ``dinofeat search``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import ImageOps

import dinofeat
from dinofeat.demo import neighbour_grid


def thumbnail(path: str | Path, size: int) -> np.ndarray:
    """The image at ``path`` centre-cropped and resized to ``size`` x ``size``, RGB uint8."""
    return np.asarray(ImageOps.fit(dinofeat.open_image(path), (size, size)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the photos to search (searched recursively)")
    parser.add_argument("query", help="the query image")
    parser.add_argument("--model", default="vit_s16",
                        help="zoo name or weights file/run folder (default: vit_s16)")
    parser.add_argument("-k", type=int, default=5, help="neighbours to show (default: 5)")
    parser.add_argument("--index", default=None,
                        help="index folder to save and resume (default: in memory only)")
    parser.add_argument("--out", default="neighbours.png", help="picture to write")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels")
    args = parser.parse_args(argv)

    model = dinofeat.load(args.model)
    index = dinofeat.KNNIndex.from_images(args.folder, model, out=args.index, progress=False)
    print(f"{len(index)} images indexed with {model.name} ({model.embed_dim}-d features)")

    scores, ids, _ = index.search_images(args.query, model, k=args.k)
    found = [(float(s), rec) for s, rec in zip(scores[0], index.lookup(ids[0])) if rec]
    print(f"nearest to {args.query}:")
    for rank, (score, rec) in enumerate(found, start=1):
        print(f"{rank:3d}  cosine {score:.3f}  {rec['path']}")

    query_class = Path(args.query).parent.name
    hits = [Path(rec["path"]).parent.name == query_class for _, rec in found]
    picture = neighbour_grid([thumbnail(args.query, args.thumb)],
                             [[thumbnail(rec["path"], args.thumb) for _, rec in found]],
                             [hits], args.out, scale=1)
    print(f"wrote {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
