"""``dinofeat embed`` and ``dinofeat attn``: features and attention maps of images."""

from __future__ import annotations

import argparse

from .common import (UserError, add_model_args, features_device,
                     load_model_arg, model_args_fixup)


def _cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..extract import FEATURE_SUFFIXES, embed_to_file
    out = Path(args.out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise UserError(f"--out must end in .safetensors or .npy, got {out}")
    if not Path(args.input).exists():
        raise FileNotFoundError(f"no such image file or folder: {args.input}")
    if args.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    features_device(args)
    model = load_model_arg(args)
    res = embed_to_file(
        model, args.input, out, shard_size=args.shard_size, shard_dir=args.shard_dir,
        keep_shards=args.keep_shards, progress=None if args.progress else False,
        pool=args.pool, normalize=not args.no_normalize, multiscale=args.multiscale,
        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, size=args.size,
        preprocessing=args.preprocessing, precision=args.precision,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    if res.rank == 0 and res.features is not None:
        f = res.features
        where = f"{out}" + ("" if out.suffix == ".safetensors" else f" (+ {out.name}.json)")
        print(f"wrote {f.features.shape[0]} x {f.features.shape[1]} features "
              f"({model.name}, pool={args.pool}) to {where}")
        if f.skipped:
            print(f"skipped {len(f.skipped)} unreadable file(s), e.g. {f.skipped[0][0]}: "
                  f"{f.skipped[0][1]}")
    return 0


def _cmd_attn(args: argparse.Namespace) -> int:
    from pathlib import Path
    model = load_model_arg(args)
    maps = model.attention_maps(args.image, size=args.size, threshold=args.threshold,
                                precision=args.precision)
    written = maps.save(args.out)
    kept = maps.masks.reshape(maps.num_heads, -1).mean(axis=1)
    print(f"{maps.num_heads} heads, {maps.image.shape[1]}x{maps.image.shape[0]} px, "
          f"{model.name}: wrote {len(written)} PNGs to {Path(args.out)}/")
    print("mask area per head (share of the image holding "
          f"{args.threshold:.0%} of the attention): " + " ".join(f"{k:.2f}" for k in kept))
    return 0




def register(sub) -> None:
    """embed, attn (issue: features)."""
    p = sub.add_parser(
        "embed", help="embed images into a .safetensors/.npy feature file",
        description="Embed an image, a folder (recursive, sorted) of images into a feature "
                    "file: .safetensors (paths and model identity in its metadata) or .npy "
                    "(paths in <out>.json). Unreadable files are skipped and counted. Work "
                    "is written in shards and resumes after an interruption; under "
                    "'torchrun --nproc_per_node N -m dinofeat embed ...' every process "
                    "embeds its share and rank 0 merges them in path order.")
    p.add_argument("input", help="image file or folder")
    p.add_argument("--out", required=True, help="output file, .safetensors or .npy")
    add_model_args(p, "vit_s16")
    g = p.add_argument_group("features")
    g.add_argument("--pool", choices=("cls", "mean", "gem", "cls+gem"), default="cls",
                   help="cls (k-NN, default), mean / gem of the patch tokens, cls+gem "
                        "(copy detection)")
    g.add_argument("--n-last-blocks", type=int, default=1,
                   help="concatenate the [CLS] of the last N blocks (linear eval, ViT-S: 4)")
    g.add_argument("--avgpool", action="store_true",
                   help="add the average patch token to [CLS] (linear eval, ViT-B)")
    g.add_argument("--multiscale", action="store_true",
                   help="average over scales 1, 1/sqrt(2), 1/2 (retrieval)")
    g.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    g.add_argument("--preprocessing", choices=("dino", "whole"), default=None,
                   help="dino: resize 256 + centre crop 224; whole: the whole image, long "
                        "side --size (default: the model's own)")
    g.add_argument("--size", type=int, default=None,
                   help="crop size (dino) or long side (whole)")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-workers", type=int, default=None,
                   help="decoding processes (default: up to 8)")
    g.add_argument("--shard-size", type=int, default=10_000,
                   help="images per shard (the unit of resuming), default 10000")
    g.add_argument("--shard-dir", default=None, help="where shards go (default <out>.shards)")
    g.add_argument("--keep-shards", action="store_true", help="keep the shards after merging")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(func=model_args_fixup(_cmd_embed))

    p = sub.add_parser(
        "attn", help="attention maps of every head of the last block as PNGs",
        description="Save the last block's [CLS] attention of every head for one image: "
                    "heatmaps, overlays on the image, and masks of the fewest patches "
                    "holding --threshold of each head's attention.")
    p.add_argument("image", help="image file")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="attention mass the masks keep (default 0.6)")
    p.add_argument("--size", type=int, default=None,
                   help="resize the short side to this first (default: image as it is)")
    add_model_args(p, "vit_s8")
    p.set_defaults(func=model_args_fixup(_cmd_attn))

