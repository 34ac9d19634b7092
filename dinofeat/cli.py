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
def _load_model_arg(args: argparse.Namespace):
    """The model named by ``--weights PATH`` (``--arch`` as a hint) or ``--arch NAME``."""
    from . import load
    if args.weights:
        return load(args.weights, device=args.device, arch=args.arch_given)
    return load(args.arch, device=args.device)


def _features_device(args: argparse.Namespace) -> None:
    """Under torchrun on GPUs, each process takes the GPU of its local rank."""
    import os

    import torch
    if args.device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"


def _cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .extract import FEATURE_SUFFIXES, embed_to_file
    out = Path(args.out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise UserError(f"--out must end in .safetensors or .npy, got {out}")
    if not Path(args.input).exists():
        raise FileNotFoundError(f"no such image file or folder: {args.input}")
    if args.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    _features_device(args)
    model = _load_model_arg(args)
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
    model = _load_model_arg(args)
    maps = model.attention_maps(args.image, size=args.size, threshold=args.threshold,
                                precision=args.precision)
    written = maps.save(args.out)
    kept = maps.masks.reshape(maps.num_heads, -1).mean(axis=1)
    print(f"{maps.num_heads} heads, {maps.image.shape[1]}x{maps.image.shape[0]} px, "
          f"{model.name}: wrote {len(written)} PNGs to {Path(args.out)}/")
    print("mask area per head (share of the image holding "
          f"{args.threshold:.0%} of the attention): " + " ".join(f"{k:.2f}" for k in kept))
    return 0


def _add_model_args(p, default_arch: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, help=f"zoo model name (default {default_arch}); "
                   "with --weights, the architecture of the file (inferred when omitted)")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="weights file or training run folder instead of a zoo model")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA "
                   "when available)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (default fp32)")
    p.set_defaults(default_arch=default_arch)


def _model_args_fixup(func):
    def run(args):
        args.arch_given = args.arch
        if args.arch is None and not args.weights:
            args.arch = args.default_arch
        return func(args)
    return run


def _add_features_commands(sub) -> None:
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
    _add_model_args(p, "vit_s16")
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
    p.set_defaults(func=_model_args_fixup(_cmd_embed))

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
    _add_model_args(p, "vit_s8")
    p.set_defaults(func=_model_args_fixup(_cmd_attn))


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
