"""Attention maps: where each head of a DINO ViT looks, as heatmaps, overlays and masks.

What it shows: ``model.attention_maps(image)`` returns the last block's [CLS] attention of
every head at the image's resolution (``maps.heads`` ``[heads, H, W]``, ``maps.mean``) and,
per head, the smallest set of patches holding ``--threshold`` of its attention
(``maps.masks``, the paper's 60% masks). ``maps.save(dir)`` writes them as PNG files:
``image.png``, ``mean_overlay.png``, ``headNN_overlay.png``, ``headNN_mask.png``,
``masks.png``...; ``dinofeat.demo.attention_picture`` puts them side by side in one strip.

Run it::

    python examples/attention.py cat.jpg                          # ViT-S/16 from the hub
    python examples/attention.py cat.jpg --model vit_s8 --size 480 --out attn/
    python examples/attention.py a.jpg b.jpg --model runs/exp1     # your own weights

``--model`` takes anything ``dinofeat.load`` takes (a ViT: ResNet and XCiT have no [CLS]
self-attention). ``--size`` resizes the short side first (the paper's figures: 480 px with
ViT-S/8); by default the image keeps its own resolution. The command-line equivalent is
``dinofeat attn``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import dinofeat
from dinofeat.demo import attention_picture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="one or more image files")
    parser.add_argument("--model", default="vit_s16",
                        help="zoo name or weights file/run folder (default: vit_s16)")
    parser.add_argument("--size", type=int, default=None,
                        help="resize the short side to this many pixels first")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="attention mass each head's mask keeps (default: 0.6)")
    parser.add_argument("--out", default="attention", help="folder for the pictures")
    args = parser.parse_args(argv)

    model = dinofeat.load(args.model)
    for image in args.images:
        maps = model.attention_maps(image, size=args.size, threshold=args.threshold)
        folder = Path(args.out) / Path(image).stem
        files = maps.save(folder)
        strip = attention_picture(maps, folder / "all_heads.png", scale=1)
        h, w = maps.mean.shape
        kept = maps.masks.reshape(maps.num_heads, -1).mean(axis=1)
        print(f"{image}: {maps.num_heads} heads at {w}x{h} px; masks keep "
              f"{np.round(100 * kept).astype(int).tolist()} % of the image")
        print(f"    wrote {len(files) + 1} PNG files to {folder} (overview: {strip.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
