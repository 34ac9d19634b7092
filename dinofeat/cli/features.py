"""``dinofeat embed`` and ``dinofeat attn``: features and attention maps of images."""

from __future__ import annotations

import argparse

from .common import (UserError, add_deprecated, add_model_args, features_device,
                     load_model_arg, model_args_fixup)
from .output import plural


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
    # One path rule for embed, index and dedup: files are recorded by absolute path (made
    # absolute from the current folder, symbolic links kept), whatever the spelling given.
    import os
    res = embed_to_file(
        model, os.path.abspath(args.input), out, shard_size=args.shard_size, shard_dir=args.shard_dir,
        keep_shards=args.keep_shards, progress=args.progress,
        pool=args.pool, normalize=not args.no_normalize, multiscale=args.multiscale,
        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, size=args.size,
        preprocessing=args.preprocessing, precision=args.precision,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    if res.rank == 0 and res.features is not None:
        f = res.features
        where = f"{out}" + ("" if out.suffix == ".safetensors" else f" (+ {out.name}.json)")
        # Unreadable files were each named once on stderr as they were met.
        skipped = f"; skipped {plural(len(f.skipped), 'unreadable file')}" if f.skipped else ""
        print(f"wrote {f.features.shape[0]} x {f.features.shape[1]} features "
              f"({model.name}, pool={args.pool}) to {where}{skipped}")
    return 0


#: ``attn`` resizes larger images to this short side unless told otherwise (the DINO
#: release's visualisation used 480 px): a 12-megapixel photo at full resolution and patch
#: 8 would take hours and write hundreds of megabytes of PNGs.
ATTN_DEFAULT_SHORT_SIDE = 480


def _short_side(text: str) -> int | str:
    if text.lower() == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'full', got "
                                         f"{text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {value}")
    return value


def _attn_size(path, requested) -> int | None:
    """The short side to resize to: ``--short-side`` when given (``full``: none), else the
    image's own up to :data:`ATTN_DEFAULT_SHORT_SIDE` (never upscaled)."""
    if requested == "full":
        return None
    if requested is not None:
        return requested
    from PIL import Image
    with Image.open(path) as im:
        short = min(im.size)
    return ATTN_DEFAULT_SHORT_SIDE if short > ATTN_DEFAULT_SHORT_SIDE else None


def _cmd_attn(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .output import Progress, safe
    source, out = Path(args.image), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"no such image file or folder: {source}")
    if source.is_dir():
        from ..images import list_images
        files = list_images(source)
        if not files:
            raise UserError(f"{source}: no image files in this folder")
        jobs = [(f, out / f.relative_to(source).with_suffix("")) for f in files]
    else:
        jobs = [(source, out)]
    model = load_model_arg(args)
    failed: list[tuple[Path, str]] = []
    done = 0
    show = args.progress and len(jobs) > 1
    with Progress(len(jobs), "attn", unit="image", enabled=show) as bar:
        for path, folder in jobs:
            try:
                size = _attn_size(path, args.short_side)
                maps = model.attention_maps(path, size=size, threshold=args.threshold,
                                            precision=args.precision)
            except (OSError, ValueError) as e:
                if len(jobs) == 1:
                    raise
                failed.append((path, str(e)))
                bar.update()
                continue
            written = maps.save(folder)
            done += 1
            bar.update()
            if len(jobs) == 1:
                kept = maps.masks.reshape(maps.num_heads, -1).mean(axis=1)
                print(f"{maps.num_heads} heads, {maps.image.shape[1]}x{maps.image.shape[0]} px, "
                      f"{safe(model.name)}: wrote {len(written)} PNGs to {safe(folder)}/")
                print("mask area per head (share of the image holding "
                      f"{args.threshold:.0%} of the attention): "
                      + " ".join(f"{k:.2f}" for k in kept))
    if len(jobs) > 1:
        print(f"{safe(model.name)}: attention maps of {plural(done, 'image')} written under "
              f"{safe(out)}/ (one folder per image)")
    if failed:
        print(f"skipped {plural(len(failed), 'unreadable file')}, e.g. {safe(failed[0][0])}: "
              f"{safe(failed[0][1])}")
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
        description="Save the last block's [CLS] attention of every head for an image (or "
                    "every image of a folder): heatmaps, overlays on the image, masks of the "
                    "fewest patches holding --threshold of each head's attention, and "
                    "masks.png, every head's mask side by side with its number.")
    p.add_argument("image", help="image file, or a folder (recursive): one sub-folder of "
                   "maps per image under --out, mirroring the input's layout")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="attention mass the masks keep (default 0.6)")
    p.add_argument("--short-side", type=_short_side, default=None, metavar="PX",
                   help=f"resize the image's short side to PX pixels first; 'full': the "
                        f"image as it is (default: larger images are brought down to "
                        f"{ATTN_DEFAULT_SHORT_SIDE} px, smaller ones kept)")
    add_deprecated(p, "--size", new="--short-side", dest="short_side", type=_short_side)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress display for folders")
    add_model_args(p, "vit_s8")
    p.set_defaults(func=model_args_fixup(_cmd_attn))

