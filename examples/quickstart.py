"""Quickstart: the zoo, a model, features, attention maps, an index and a search.

What it shows, in the order a newcomer needs it: ``dinofeat.list_models`` (the zoo),
``dinofeat.load`` (a zoo name or a weights file), ``model.embed`` (L2-normalised [CLS]
features of a folder), ``model.attention_maps`` (the last block's [CLS] attention, saved
as PNG files), and a :class:`dinofeat.KNNIndex` searched with the first photo.

Run it::

    python examples/quickstart.py photos/                     # ViT-S/16 from the hub
    python examples/quickstart.py photos/ --model runs/exp1   # your own weights

``--model`` takes anything ``dinofeat.load`` takes. Zoo weights come from the Hugging
Face hub cache; with ``HF_HUB_OFFLINE=1`` nothing is downloaded (see docs/weights.md).
"""

from __future__ import annotations

import argparse

import dinofeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder of photos (searched recursively)")
    parser.add_argument("--model", default="vit_s16",
                        help="zoo name or weights file/run folder (default: vit_s16)")
    parser.add_argument("--out", default="quickstart-attention",
                        help="folder for the attention pictures of the first photo")
    args = parser.parse_args(argv)

    print("zoo:", ", ".join(dinofeat.list_models()))
    model = dinofeat.load(args.model)
    feats, paths = model.embed(args.folder, return_keys=True, progress=False)
    print(f"{model.name}: {feats.shape[0]} photos -> features {tuple(feats.shape)}")

    maps = model.attention_maps(paths[0])
    maps.save(args.out)
    print(f"attention of {maps.num_heads} heads over {paths[0]} -> {args.out}/")

    index = dinofeat.KNNIndex()
    index.add(feats, meta=paths)
    scores, ids = index.search(feats[:1], k=min(3, len(paths)))
    for score, rec in zip(scores[0], index.lookup(ids[0])):
        print(f"  {score:.3f}  {rec['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
