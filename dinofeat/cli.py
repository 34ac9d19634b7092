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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``dinofeat embed: error: ... (see ... --help)``)
    instead of the usage block; sub-command parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------ models
def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo
    if args.json:
        import json
        print(json.dumps(zoo.list_models(as_dicts=True), indent=1))
    elif args.markdown:
        print(zoo.format_markdown_table())
    else:
        print(zoo.format_table())
    return 0


def _add_models_commands(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with published ImageNet numbers",
                       description="List every zoo model: architecture, feature dim, patch "
                                   "size, parameters, published ImageNet k-NN and linear "
                                   "top-1, and where its weights come from.")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--markdown", action="store_true",
                     help="print a Markdown table (the one in README.md)")
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
def _embed_run_options(args: argparse.Namespace) -> dict:
    opts = {"batch_size": args.batch_size, "num_workers": args.num_workers,
            "progress": None if args.progress else False, "precision": args.precision}
    if getattr(args, "device", None):
        opts["device"] = args.device
    return opts


def _print_add_report(report, index, out) -> None:
    print(f"{out}: {report}; {len(index)} items in the index ({report.seconds:.1f} s)")
    for path, reason in report.unreadable[:5]:
        print(f"  unreadable: {path}: {reason}")
    if len(report.unreadable) > 5:
        print(f"  ... and {len(report.unreadable) - 5} more unreadable files")


def _cmd_index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .index import KNNIndex
    if not Path(args.folder).exists():
        raise FileNotFoundError(f"no such image folder: {args.folder}")
    if args.checkpoint_every < 1 or args.shard_size < 1:
        raise UserError("--checkpoint-every and --shard-size must be at least 1")
    _features_device(args)
    model = _load_model_arg(args)
    opts = _embed_run_options(args)
    if args.size:
        opts["size"] = args.size
    if args.preprocessing:
        opts["preprocessing"] = args.preprocessing
    index = KNNIndex.from_images(
        args.folder, model, args.out, metric=args.metric, factory=args.factory,
        pool=args.pool, labels="folder" if args.labels_from_folders else None,
        checkpoint_every=args.checkpoint_every, shard_size=args.shard_size, **opts)
    if index.build_state.get("last_add") and _rank() == 0:
        print(f"{args.out}: {index.build_state['last_add']}; {len(index)} items "
              f"({index.resolved_factory}, {index.dim}-d, {model.name}, pool={args.pool})")
        unreadable = index.build_state.get("unreadable") or []
        for path, reason in unreadable[:5]:
            print(f"  unreadable: {path}: {reason}")
    return 0


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0") or 0)


def _index_model(index, args: argparse.Namespace):
    """The model an index was built with (``--weights`` if given), errors naming it."""
    try:
        return index.load_model(args.weights, device=args.device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{args.index}: {e}") from None


def _cmd_index_add(args: argparse.Namespace) -> int:
    from .index import KNNIndex
    index = KNNIndex.load(args.index)
    _features_device(args)
    model = _index_model(index, args)
    opts = {**index.embed_options(), **_embed_run_options(args)}
    labels = "folder" if args.labels_from_folders else None
    if index.has_labels and labels is None:
        raise UserError(f"{args.index} has labels: pass --labels-from-folders")
    report = index.add_images(args.folder, model, labels=labels, checkpoint=args.index,
                              checkpoint_every=args.checkpoint_every, **opts)
    _print_add_report(report, index, args.index)
    return 0


def _cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from .index import KNNIndex
    header = KNNIndex.read_header(args.index)
    if args.json:
        print(json.dumps(header, indent=1))
        return 0
    model = header.get("model") or {}
    build = header.get("build") or {}
    rows = [
        ("items", f"{header['count']:,}" + (f" (+{header['tombstones']} removed, kept as "
                                            "tombstones)" if header.get("tombstones") else "")),
        ("vectors", f"{header['dim']}-d, {header['metric']}, faiss "
                    f"{header.get('resolved_factory') or header['factory']}"
                    + ("" if header.get("trained", True) else
                       f" (untrained: {header.get('pending', 0)} vectors in an exact buffer)")),
        ("memory", f"about {header.get('bytes_per_vector') or '?'} bytes per vector"),
        ("search params", ", ".join(f"{k}={v}" for k, v in
                                    (header.get("search_params") or {}).items()) or "-"),
        ("model", f"{model.get('name', 'unknown')} (weights {model.get('weights_hash', '?')})"
                  + (f" from {model['source']}" if model.get("source") else "")),
        ("features", f"pool={model.get('pooling', 'cls')}, preprocessing "
                     + _preprocessing_text(model.get("preprocessing"))),
        ("labels", f"{len(header.get('classes') or [])} classes" if header.get("has_labels")
         else "none"),
        ("build", ("complete" if build.get("complete", True) else
                   "interrupted (run the same build command again to continue)")
         + (f", {len(build.get('unreadable') or [])} unreadable files"
            if build.get("unreadable") else "")),
        ("saved", f"{header.get('saved_at', '?')} by dinofeat {header.get('dinofeat_version')}"
                  f", faiss {header.get('faiss_version')}, format "
                  f"{header.get('format_version')}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{args.index}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def _preprocessing_text(pre: dict | None) -> str:
    if not pre:
        return "unknown"
    if pre.get("mode") == "dino":
        return f"resize {pre.get('resize_size')} + centre crop {pre.get('crop_size')}"
    return f"whole image, long side {pre.get('crop_size')}"


def _cmd_search(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .index import KNNIndex
    if args.k < 1:
        raise UserError("-k must be at least 1")
    for q in args.queries:
        if not Path(q).exists():
            raise FileNotFoundError(f"no such query image: {q}")
    index = KNNIndex.load(args.index)
    if len(index) == 0:
        raise UserError(f"{args.index} is empty")
    model = _index_model(index, args)
    scores, ids, keys = index.search_images(list(args.queries), model, k=args.k,
                                            batch_size=args.batch_size, progress=False,
                                            precision=args.precision)
    results = []
    for q, row_s, row_i in zip(keys, scores, ids):
        hits = []
        for rank, (s, i, rec) in enumerate(zip(row_s, row_i, index.lookup(row_i)), 1):
            if rec is None:
                continue
            hits.append({"rank": rank, "score": round(float(s), 6), "id": int(i),
                         "path": rec["path"], **({"label": rec["label"]}
                                                 if rec["label"] is not None else {})})
        results.append({"query": str(q), "results": hits})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return 0
    what = "cosine" if index.metric == "cosine" else "sq. L2"
    for r in results:
        print(f"{r['query']}:")
        for h in r["results"]:
            label = f"  [{h['label']}]" if "label" in h else ""
            print(f"  {h['rank']:>3}  {h['score']:.4f} {what}  {h['path'] or h['id']}{label}")
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dedup import dedup_folder
    if not Path(args.folder).exists():
        raise FileNotFoundError(f"no such image folder: {args.folder}")
    if not -1 <= args.threshold <= 1:
        raise UserError("--threshold is a cosine similarity between -1 and 1")
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--out must end in .json or .csv, got {args.out}")
    if args.k is not None and args.k < 1:
        raise UserError("--k must be at least 1 (or left out: all pairs)")
    _features_device(args)
    model = _load_model_arg(args)
    opts = _embed_run_options(args)
    if args.size:
        opts["size"] = args.size
    if args.preprocessing:
        opts["preprocessing"] = args.preprocessing
    result = dedup_folder(args.folder, model, args.threshold, pool=args.pool,
                          whitening=args.whitening, k=args.k, factory=args.factory,
                          out=args.out, html_path=args.html, **opts)
    print(result)
    for n, g in enumerate(result.groups[:args.show], 1):
        print(f"group {n}: keep {g.keep}")
        for p, s in zip(g.paths[1:], g.similarity[1:]):
            print(f"    {s:.4f}  {p}")
    if len(result.groups) > args.show:
        print(f"... {len(result.groups) - args.show} more groups")
    for what, path in (("groups", args.out), ("review page", args.html)):
        if path:
            print(f"{what} written to {path}")
    return 0


def _add_index_commands(sub) -> None:
    """index build/add/info, search, dedup (issue: index)."""
    from .dedup import DEFAULT_THRESHOLD

    def running(q, checkpoint: bool = True) -> None:
        g = q.add_argument_group("running")
        g.add_argument("--batch-size", type=int, default=64)
        g.add_argument("--num-workers", type=int, default=None,
                       help="decoding processes (default: up to 8)")
        if checkpoint:
            g.add_argument("--checkpoint-every", type=int, default=5000, metavar="N",
                           help="save the partial index every N images (default 5000); "
                                "rerun the same command to continue an interrupted build")
        g.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars")

    p = sub.add_parser("index", help="build, extend and inspect a k-NN index of images",
                       description="A faiss-backed k-NN index of image features, saved as a "
                       "folder that records the model, preprocessing and pooling.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    q = isub.add_parser(
        "build", help="embed a folder of images into a new index",
        description="Embed every image under FOLDER and index it. Unreadable files are "
        "skipped and listed; files whose content is already indexed are skipped. The index "
        "is checkpointed while it grows: run the same command again to continue after an "
        "interruption. Under 'torchrun --nproc_per_node N -m dinofeat index build ...' "
        "every process embeds a share of the images and rank 0 builds the index.")
    q.add_argument("folder", help="image folder (recursive)")
    q.add_argument("--out", required=True, help="index folder to write, e.g. photos.idx")
    _add_model_args(q, "vit_s16")
    g = q.add_argument_group("index")
    g.add_argument("--factory", default="Flat",
                   help="faiss index: Flat (exact, default), auto (exact up to 1M vectors, "
                        "IVF-PQ beyond), or a faiss factory string such as IVF4096,PQ48 or "
                        "HNSW32")
    g.add_argument("--metric", choices=("cosine", "l2"), default="cosine")
    g.add_argument("--pool", choices=("cls", "mean", "gem", "cls+gem"), default="cls",
                   help="feature: cls (default; retrieval, k-NN), cls+gem (copy detection)")
    g.add_argument("--size", type=int, default=None,
                   help="crop size (dino) or long side (whole)")
    g.add_argument("--preprocessing", choices=("dino", "whole"), default=None,
                   help="default: the model's own")
    g.add_argument("--labels-from-folders", action="store_true",
                   help="label each image with its folder's name (for classification)")
    g.add_argument("--shard-size", type=int, default=2000,
                   help="images per shard under torchrun (default 2000)")
    running(q)
    q.set_defaults(func=_model_args_fixup(_cmd_index_build))

    q = isub.add_parser("add", help="add the new images of a folder to an index",
                        description="Embed the images under FOLDER that the index does not "
                        "hold yet (by content hash) with the index's own model and options.")
    q.add_argument("index", help="index folder")
    q.add_argument("folder", help="image folder (recursive) or file")
    q.add_argument("--weights", default=None, metavar="PATH",
                   help="the model's weights, if the file recorded at build time moved")
    q.add_argument("--device", default=None)
    q.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    q.add_argument("--labels-from-folders", action="store_true")
    running(q)
    q.set_defaults(func=_cmd_index_add)

    q = isub.add_parser("info", help="describe an index",
                        description="Counts, faiss type, memory, model and build state.")
    q.add_argument("index", help="index folder")
    q.add_argument("--json", action="store_true", help="print the whole header as JSON")
    q.set_defaults(func=_cmd_index_info)

    q = sub.add_parser("search", help="find the images of an index most similar to a query",
                       description="Embed the query image(s) with the model the index was "
                       "built with (reloaded from its metadata) and print the nearest indexed "
                       "images with their scores.")
    q.add_argument("index", help="index folder")
    q.add_argument("queries", nargs="+", metavar="query", help="query image file(s)")
    q.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--weights", default=None, metavar="PATH",
                   help="the model's weights, if the file recorded at build time moved")
    q.add_argument("--device", default=None)
    q.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=_cmd_search)

    q = sub.add_parser(
        "dedup", help="find near-duplicate and copied images in a folder",
        description="Copy detection inside a collection: [CLS] + GeM features (paper 3.8), "
        "optionally PCA-whitened, pairs above --threshold cosine similarity, grouped into "
        "connected components. Writes the groups as JSON or CSV and an HTML page with "
        "thumbnails to review. The threshold depends on the model: check the page.")
    q.add_argument("folder", help="image folder (recursive)")
    q.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine similarity linking two images (default {DEFAULT_THRESHOLD})")
    q.add_argument("--out", default=None, help="groups file, .json or .csv")
    q.add_argument("--html", default=None, help="review page with thumbnails, e.g. report.html")
    q.add_argument("--whitening", default=None, metavar="FILE",
                   help="PCA-whitening from 'dinofeat eval copydetect --save-whitening'")
    q.add_argument("--pool", choices=("cls", "gem", "cls+gem"), default="cls+gem")
    q.add_argument("--size", type=int, default=None)
    q.add_argument("--preprocessing", choices=("dino", "whole"), default=None)
    q.add_argument("--k", type=int, default=None,
                   help="approximate: link only among each image's K nearest neighbours "
                        "(large collections); default: all pairs, exactly")
    q.add_argument("--factory", default="Flat", help="faiss index for --k (default Flat)")
    q.add_argument("--show", type=int, default=10, help="groups to print (default 10)")
    _add_model_args(q, "vit_s16")
    running(q, checkpoint=False)
    q.set_defaults(func=_model_args_fixup(_cmd_dedup))


# ------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from .training.config import TrainConfig
    from .training.loop import train
    cfg = TrainConfig.from_args(args)
    if not cfg.data:
        raise UserError("--data is required: a folder of images (searched recursively) or a "
                        ".txt file with one image path per line")
    result = train(cfg)
    if result.history and (result.run_dir / "checkpoint.pth").exists():
        last = result.history[-1]
        knn = f", k-NN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else ""
        print(f"{result.run_dir}: {result.epoch} epochs, {result.iteration} steps, last loss "
              f"{last['loss']:.4f}{knn}; {result.skipped_images} unreadable images skipped"
              f"{'; WARNING: the teacher looks collapsed' if result.collapsed else ''}")
        print(f"load it with dinofeat.load({str(result.run_dir)!r})")
    return 0


def _add_train_commands(sub) -> None:
    """train (issue: training core)."""
    from .training.config import add_arguments
    p = sub.add_parser(
        "train", help="pretrain a DINO model on your own images",
        description="DINO self-supervised pretraining (student/teacher self-distillation "
                    "with multi-crop). Defaults are the release's ViT-S/16 recipe; "
                    "--preset NAME starts from a paper recipe and explicit options override "
                    "it. Running the same command again resumes from OUTPUT/checkpoint.pth. "
                    "Several GPUs or machines: torchrun --nproc_per_node N -m dinofeat train "
                    "... (see docs/training.md).")
    add_arguments(p)
    p.set_defaults(func=_cmd_train)


# -------------------------------------------------------------------- eval
def _eval_finish(args: argparse.Namespace, results: dict, default_out: str) -> int:
    from pathlib import Path

    from .eval.report import results_table, write_results
    path = write_results(Path(args.out or default_out), results)
    print(results_table(results))
    print(f"results written to {path}")
    return 0


def _cmd_eval_knn(args: argparse.Namespace) -> int:
    from .eval import evaluate_knn
    if any(k < 1 for k in args.k) or args.T <= 0:
        raise UserError("--k values must be >= 1 and --T > 0")
    from .eval import image_folder
    image_folder(args.val, classes=image_folder(args.train).classes)  # fail before loading
    model = _load_model_arg(args)
    res = evaluate_knn(model, args.train, args.val, ks=args.k, T=args.T,
                       cache_dir=False if args.no_cache else args.cache_dir,
                       batch_size=args.batch_size, num_workers=args.num_workers,
                       precision=args.precision, progress=args.progress)
    for part in ("train", "val"):
        if res[part]["skipped"]:
            print(f"{part}: skipped {res[part]['skipped']} unreadable image(s)")
    return _eval_finish(args, res, "knn_results.json")


def _cmd_eval_linear(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval import LinearProbe, LinearProbeConfig, evaluate_linear, image_folder
    from .eval import train_linear_probe
    model = _load_model_arg(args)
    val = image_folder(args.val) if args.val else None
    if args.evaluate:
        if val is None:
            raise UserError("--evaluate needs --val")
        head = LinearProbe.load(args.evaluate, embed_dim=model.embed_dim,
                                n_last_blocks=args.n_last_blocks,
                                avgpool=True if args.avgpool else None)
        res = evaluate_linear(model, head, val, batch_size=args.batch_size,
                              num_workers=args.num_workers, progress=args.progress,
                              precision=args.precision)
        return _eval_finish(args, res, str(Path(args.output) / "results.json"))
    if not args.train:
        raise UserError("--train is needed (or --evaluate HEAD to score an existing head)")
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    n, avg = args.n_last_blocks, args.avgpool
    if n is None:  # the paper's recipes: ViT-S 4 blocks; ViT-B 1 block + avgpool
        n, avg = (1, avg) if not model.is_vit else (
            (min(4, model.backbone.depth), avg) if model.embed_dim < 768 else (1, True))
    cfg = LinearProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            n_last_blocks=n, avgpool=avg, val_freq=args.val_freq,
                            precompute=args.precompute, num_workers=args.num_workers,
                            seed=args.seed, precision=args.precision)
    train = image_folder(args.train)
    if val is not None:
        val = image_folder(args.val, classes=train.classes)
    _, res = train_linear_probe(model, train, val, config=cfg, output_dir=args.output,
                                progress=args.progress)
    print(f"linear head saved to {Path(args.output) / 'linear_head.safetensors'}")
    return _eval_finish(args, res, str(Path(args.output) / "results.json"))


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from .eval import evaluate_retrieval
    model = _load_model_arg(args)
    res = evaluate_retrieval(model, args.dataset, args.data_root, imsize=args.imsize,
                             multiscale=args.multiscale, num_workers=args.num_workers,
                             precision=args.precision, query_crop=args.query_crop,
                             progress=args.progress)
    return _eval_finish(args, res, f"retrieval_{args.dataset}_results.json")


def _cmd_eval_copydetect(args: argparse.Namespace) -> int:
    from .eval import evaluate_copydetect
    model = _load_model_arg(args)
    res = evaluate_copydetect(model, args.data_root, imsize=args.imsize,
                              distractors=args.distractors, whitening=args.whitening,
                              whitening_data=args.whitening_data,
                              whitening_dim=args.whitening_dim,
                              centered=args.centered_whitening,
                              save_whitening=args.save_whitening, topk=args.topk,
                              batch_size=args.batch_size, num_workers=args.num_workers,
                              precision=args.precision, progress=args.progress)
    if args.save_whitening and res["whitening"] and not args.whitening:
        print(f"whitening saved to {args.save_whitening}")
    return _eval_finish(args, res, "copydetect_results.json")


def _cmd_eval_davis(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval import evaluate_davis
    model = _load_model_arg(args)
    res = evaluate_davis(model, args.data_root, args.output, sequences=args.sequences,
                         split=args.split, n_last_frames=args.n_last_frames, topk=args.topk,
                         temperature=args.temperature, radius=args.radius,
                         short_side=args.short_side, precision=args.precision,
                         progress=args.progress)
    print(f"masks written under {args.output}/<video>/")
    return _eval_finish(args, res, str(Path(args.output) / "results.json"))


def _add_eval_commands(sub) -> None:
    """eval knn|linear|retrieval|copydetect|davis (issue: evaluation)."""
    p = sub.add_parser("eval", help="the paper's evaluations: knn, linear, retrieval, "
                       "copydetect, davis",
                       description="Reproduce the DINO paper's evaluations on any model. Each "
                       "prints a table and writes JSON; docs/evaluation.md lists the datasets "
                       "and the published numbers.")
    esub = p.add_subparsers(dest="eval_command", metavar="TASK", required=True)

    def common(q, out_help: str) -> None:
        _add_model_args(q, "vit_s16")
        g = q.add_argument_group("running")
        g.add_argument("--out", default=None, help=f"results JSON ({out_help})")
        g.add_argument("--batch-size", type=int, default=64)
        g.add_argument("--num-workers", type=int, default=None,
                       help="decoding processes (default: up to 8)")
        g.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars")

    q = esub.add_parser("knn", help="weighted k-NN classification on ImageFolder trees",
                        description="k-NN classification (paper 3.7): [CLS] features of the "
                        "train and val ImageFolder trees (any size, any number of classes), "
                        "cosine similarity, the k nearest vote with weight exp(s/T). "
                        "Features are cached on disk and reused while the model, "
                        "preprocessing and folder listing are unchanged.")
    q.add_argument("--train", required=True, help="training ImageFolder (class sub-folders)")
    q.add_argument("--val", required=True, help="validation ImageFolder (same class names)")
    q.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="neighbour counts (default 10 20 100 200)")
    q.add_argument("--T", type=float, default=0.07, help="vote temperature (default 0.07)")
    q.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default $DINOFEAT_CACHE/features or "
                        "~/.cache/dinofeat/features)")
    q.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    common(q, "default knn_results.json")
    q.set_defaults(func=_model_args_fixup(_cmd_eval_knn))

    q = esub.add_parser("linear", help="linear probe on frozen features",
                        description="Train a linear classifier on frozen features (paper "
                        "3.8): SGD momentum 0.9, lr 0.001 x batch/256, cosine, no weight "
                        "decay, random resized crop + flip; centre-crop evaluation. Saves "
                        "<output>/linear_head.safetensors (+ .json) and resumes from "
                        "<output>/checkpoint.pth. --evaluate scores an existing head (ours "
                        "or a released *_linearweights.pth).")
    q.add_argument("--train", default=None, help="training ImageFolder")
    q.add_argument("--val", default=None, help="validation ImageFolder")
    q.add_argument("--output", default="linear_probe", help="run folder (default linear_probe)")
    q.add_argument("--epochs", type=int, default=100)
    q.add_argument("--lr", type=float, default=0.001, help="lr for a batch of 256 (scaled)")
    q.add_argument("--n-last-blocks", type=int, default=None,
                   help="[CLS] of the last N blocks (default: 4 for ViT-S, 1 for ViT-B)")
    q.add_argument("--avgpool", action="store_true",
                   help="add the average patch token (default on for ViT-B)")
    q.add_argument("--precompute", action="store_true",
                   help="compute centre-crop features once and train on them (fast, no "
                        "augmentation)")
    q.add_argument("--val-freq", type=int, default=1, help="validate every N epochs")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--evaluate", default=None, metavar="HEAD",
                   help="score this head on --val instead of training")
    common(q, "default <output>/results.json")
    q.set_defaults(func=_model_args_fixup(_cmd_eval_linear), batch_size=256)

    q = esub.add_parser("retrieval", help="revisited Oxford / Paris image retrieval",
                        description="Revisited Oxford/Paris retrieval (paper 3.8): [CLS] "
                        "features of whole images (long side --imsize), queries cropped to "
                        "their box, cosine ranking; Medium and Hard mAP and mP@1/5/10.")
    q.add_argument("--dataset", required=True, choices=("roxford5k", "rparis6k"))
    q.add_argument("--data-root", required=True,
                   help="folder holding <dataset>/jpg/ and <dataset>/gnd_<dataset>.pkl")
    q.add_argument("--imsize", type=int, default=224, help="long side (default 224)")
    q.add_argument("--multiscale", action="store_true",
                   help="average features at scales 1, 1/sqrt(2), 1/2")
    q.add_argument("--query-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the queries to their bounding box (the revisited protocol; "
                        "default); --no-query-crop embeds whole queries as the release's "
                        "script behind the paper's numbers did")
    common(q, "default retrieval_<dataset>_results.json")
    q.set_defaults(func=_model_args_fixup(_cmd_eval_retrieval), batch_size=16)

    q = esub.add_parser("copydetect", help="Copydays copy detection",
                        description="Copy detection on Copydays (paper 3.8): [CLS] + GeM "
                        "(p=4) features of square-resized images, PCA-whitening learnt on "
                        "distractor images, cosine ranking of originals (+ distractors), mAP "
                        "per block ('strong' is the paper's).")
    q.add_argument("--data-root", required=True,
                   help="Copydays folder: original/, strong/ (+ jpegqual/, crops/)")
    q.add_argument("--imsize", type=int, default=224, help="square input size (default 224)")
    q.add_argument("--distractors", default=None, help="folder of distractor images added "
                   "to the database (the whitening is learnt on them unless "
                   "--whitening-data/--whitening)")
    q.add_argument("--whitening-data", default=None,
                   help="folder to learn the whitening on (paper: 20k YFCC100M images)")
    q.add_argument("--whitening", default=None, metavar="FILE",
                   help="apply a saved whitening instead of learning one")
    q.add_argument("--save-whitening", default=None, metavar="FILE",
                   help="write the learnt whitening (.safetensors or .json) for dedup/index")
    q.add_argument("--whitening-dim", type=int, default=None,
                   help="output dimension (default: the input's)")
    q.add_argument("--centered-whitening", action="store_true",
                   help="learn on the centred covariance (the release uses the uncentred "
                        "second moment)")
    q.add_argument("--topk", type=int, default=20, help="ranked list length (default 20)")
    common(q, "default copydetect_results.json")
    q.set_defaults(func=_model_args_fixup(_cmd_eval_copydetect), batch_size=32)

    q = esub.add_parser("davis", help="DAVIS-2017 video object segmentation",
                        description="Video object segmentation by label propagation (paper "
                        "3.8): output patch features, context = first frame + previous "
                        "frames, top-k neighbours inside a square neighbourhood. Writes "
                        "indexed PNG masks and, with ground truth, J, F and J&F.")
    q.add_argument("--data-root", required=True,
                   help="DAVIS folder: JPEGImages/480p, Annotations/480p, ImageSets/2017")
    q.add_argument("--output", required=True, help="folder for the masks")
    q.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default val)")
    q.add_argument("--sequences", nargs="+", default=None, help="only these videos")
    q.add_argument("--n-last-frames", type=int, default=7)
    q.add_argument("--topk", type=int, default=5)
    q.add_argument("--radius", type=int, default=12,
                   help="neighbourhood half-size in patches (size_mask_neighborhood)")
    q.add_argument("--temperature", type=float, default=0.1)
    q.add_argument("--short-side", type=int, default=480)
    common(q, "default <output>/results.json")
    q.set_defaults(func=_model_args_fixup(_cmd_eval_davis))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# ------------------------------------------------------------ demo, export
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    res = run_demo(args.out, steps=args.steps, train_images=args.train_images,
                   bank=args.bank, test=args.test, queries=args.queries,
                   threads=args.threads, seed=args.seed, data_root=args.data,
                   compare_shipped=not args.no_shipped, progress=not args.no_progress)
    print(res.summary())
    print(f"wrote {res.out_dir}/: neighbours.png, attention/, model.safetensors, train.idx, "
          f"results.json ({res.total_seconds / 60:.1f} min in all)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_model
    out = Path(args.out)
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}[args.format]
    if out.suffix.lower() != suffix and not (args.format == "torchscript" and
                                             out.suffix.lower() in (".ts", ".torchscript")):
        raise UserError(f"--out for --format {args.format} must end in {suffix}, got {out}")
    args.device = "cpu"
    model = _load_model_arg(args)
    if not model.is_vit:
        raise UserError(f"export supports ViTs; {model.name} is not one")
    small = [s for s in args.check_size or [] if s < model.patch_size]
    if small:
        raise UserError(f"--check-size {small[0]} is smaller than one {model.patch_size}-pixel "
                        "patch")
    report = export_model(model, out, args.format, attention=args.attention,
                          check_sizes=args.check_size or None)
    print(f"exported {model.name} ({args.format}, outputs: {', '.join(report.outputs)}; "
          "dynamic batch and image size) to " + str(out))
    shapes = ", ".join("x".join(map(str, s)) for s in report.checked_shapes)
    print(f"parity with PyTorch (inputs {shapes}): max abs difference " +
          ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diff.items()))
    return 0


def _add_misc_commands(sub) -> None:
    """demo, export."""
    d = sub.add_parser(
        "demo", help="offline demo: DINO learns on Fashion-MNIST in a few minutes on a CPU",
        description="Pretrain a small ViT with DINO on unlabelled Fashion-MNIST photos (a "
                    "few minutes on a CPU), build a k-NN index of labelled training photos, "
                    "print the k-NN accuracy on test photos next to the same network with "
                    "random weights, search the index with a few test photos and write "
                    "their neighbours and attention maps as PNGs. Needs the Fashion-MNIST "
                    "files (apt-get install dataset-fashion-mnist); no network.")
    d.add_argument("--out", default="dinofeat-demo", help="output folder (default: %(default)s)")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps of 64 images (default: the demo recipe's 300, about 5 "
                        "minutes on 2 cores)")
    d.add_argument("--train-images", type=int, default=6000,
                   help="unlabelled photos to pretrain on (default: %(default)s)")
    d.add_argument("--bank", type=int, default=5000,
                   help="labelled training photos in the k-NN index (default: %(default)s)")
    d.add_argument("--test", type=int, default=1000,
                   help="test photos to classify (default: %(default)s)")
    d.add_argument("--queries", type=int, default=6,
                   help="test photos to search and show (default: %(default)s)")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data", default=None, metavar="DIR",
                   help="folder with the Fashion-MNIST IDX .gz files (default: "
                        "/usr/share/datasets/fashion-mnist or $DINOFEAT_FASHION_MNIST)")
    d.add_argument("--no-shipped", action="store_true",
                   help="do not also score the shipped vit_t_fmnist model")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "export", help="export a ViT to ONNX or TorchScript (dynamic batch and size)",
        description="Write a ViT as ONNX or TorchScript: input a normalised batch "
                    "[B, 3, H, W] (any batch and size), outputs the [CLS] feature, the "
                    "patch tokens and, with --attention, the last block's [CLS] attention. "
                    "The file is checked against PyTorch at export and the largest "
                    "difference printed. dinofeat.load('model.onnx') runs an ONNX export "
                    "with ONNX Runtime.")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (default; needs dinofeat[onnx]) or torchscript")
    p.add_argument("--out", required=True, help="output file (.onnx, or .pt for torchscript)")
    p.add_argument("--attention", action="store_true",
                   help="also output the last block's [CLS] attention [B, heads, 1+N]")
    p.add_argument("--check-size", type=int, action="append", default=None, metavar="PX",
                   help="image size for the parity check (repeatable; default: the "
                        "model's crop size and a larger non-square one)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, help="zoo model name (default vit_s16); with "
                   "--weights, the architecture of the file")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="weights file or training run folder instead of a zoo model")
    p.set_defaults(default_arch="vit_s16", func=_model_args_fixup(_cmd_export))


_REGISTRARS: list[Callable] = [_add_models_commands, _add_features_commands,
                               _add_index_commands, _add_train_commands,
                               _add_eval_commands, _add_misc_commands]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(
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


def _paths_safe_output() -> None:
    """File names that are not UTF-8 (kept by Python as lone surrogates) are printed as
    their original bytes, as ls and find do, instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and stream in (sys.__stdout__, sys.__stderr__) and \
                hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    _paths_safe_output()
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
