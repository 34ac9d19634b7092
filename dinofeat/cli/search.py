"""``dinofeat index build|add|info``, ``search`` and ``dedup``: the k-NN index verbs."""

from __future__ import annotations

import argparse

from .common import (LibraryDefault, UserError, add_decode_arg, add_deprecated,
                     add_model_args,
                     embed_options, embed_run_options,
                     features_device, load_model_arg, model_args_fixup, rank,
                     resolve_default, resolve_model_args)
from .output import plural


def _print_add_report(report, index, out) -> None:
    # Unreadable files were each named once on stderr as they were met.
    print(f"{out}: {report}; {plural(len(index), 'item')} in the index "
          f"({report.seconds:.1f} s)")


def _cmd_index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..search import KNNIndex
    if not Path(args.folder).exists():
        raise FileNotFoundError(f"no such image folder: {args.folder}")
    if args.checkpoint_every < 1 or args.shard_size < 1:
        raise UserError("--checkpoint-every and --shard-size must be at least 1")
    features_device(args)
    model = load_model_arg(args)
    opts = embed_options(args)
    auto_kw = {}
    if args.memory is not None or args.recall is not None:
        if args.factory != "auto":
            raise UserError("--memory and --recall choose the index of --factory auto")
        auto_kw = {"memory": args.memory, "recall": args.recall}
    index = KNNIndex.from_images(
        args.folder, model, args.out, metric=args.metric, factory=args.factory, **auto_kw,
        pool=args.pool, labels="folder" if args.labels_from_folders else None,
        checkpoint_every=args.checkpoint_every, shard_size=args.shard_size, **opts)
    if index.build_state.get("last_add") and rank() == 0:
        print(f"{args.out}: {index.build_state['last_add']}; {len(index)} items "
              f"({index.resolved_factory}, {index.dim}-d, {model.name}, pool={args.pool})")
    return 0


def index_model_args(q) -> None:
    """``--model PATH``: the weights an index was built with, when the recorded file moved."""
    g = q.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="the index's model, if the weights file recorded at build time "
                        "moved (default: the one recorded in the index)")
    add_deprecated(g, "--weights", new="--model", dest="weights_alias")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA "
                   "when available)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (default fp32)")


def _index_model(index, args: argparse.Namespace):
    """The model an index was built with (``--model`` if given), errors naming it."""
    resolve_model_args(args, default="")
    try:
        return index.load_model(args.model or None, device=args.device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{args.index}: {e}") from None


MMAP_HELP = ("map the index's data from disk instead of reading it into memory: for an "
             "index larger than memory (an IVF index then reads only the lists a query "
             "probes; new vectors of 'index add' join the next generation's on-disk lists)")


def _cmd_index_add(args: argparse.Namespace) -> int:
    from ..search import KNNIndex
    index = KNNIndex.load(args.index, mmap=args.mmap)
    features_device(args)
    model = _index_model(index, args)
    opts = {**index.embed_options(), **embed_run_options(args)}
    labels = "folder" if args.labels_from_folders else None
    if index.has_labels and labels is None:
        raise UserError(f"{args.index} has labels: pass --labels-from-folders")
    report = index.add_images(args.folder, model, labels=labels, checkpoint=args.index,
                              checkpoint_every=args.checkpoint_every, **opts)
    _print_add_report(report, index, args.index)
    return 0


def _cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from ..search import KNNIndex
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
        *_auto_rows(header),
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


def _auto_rows(header: dict) -> list[tuple[str, str]]:
    """What --factory auto chose and measured, for ``index info``."""
    auto = header.get("auto")
    if not auto:
        return []
    from ..search.auto import format_bytes
    budget = auto.get("memory_budget")
    rows = [("auto", f"target recall@{auto.get('k', 10)} {auto.get('recall_target')} within "
                     f"{format_bytes(budget) if budget else '?'} -> {auto.get('factory')}")]
    if auto.get("recall") is not None:
        where = auto.get("measured_on")
        where = f"on {where:,} vectors" if isinstance(where, int) else where
        rows.append(("measured recall", f"{auto['recall']} ({where}, "
                                        f"{auto.get('queries', '?')} held-out queries)"))
    elif auto.get("sample_recall") is not None:
        rows.append(("measured recall", f"{auto['sample_recall']} (on the training sample)"))
    bound = auto.get("recall_bound", auto.get("sample_recall_bound"))
    if bound is not None and auto.get("factory") != "Flat":
        # tuning stops where this bound, not the mean, reaches the target
        rows.append(("recall lower bound", f"{bound} (one-sided "
                                           f"{auto.get('confidence', 0.95):.0%} confidence)"))
    if auto.get("target_met") is False:
        rows.append(("warning", "the recall target was not met within the memory budget"))
    return rows


def _preprocessing_text(pre: dict | None) -> str:
    if not pre:
        return "unknown"
    if pre.get("mode") == "dino":
        return f"resize {pre.get('resize_size')} + centre crop {pre.get('crop_size')}"
    return f"whole image, long side {pre.get('crop_size')}"


def _cmd_search(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..search import KNNIndex
    if args.k < 1:
        raise UserError("-k must be at least 1")
    for q in args.queries:
        if not Path(q).exists():
            raise FileNotFoundError(f"no such query image: {q}")
    index = KNNIndex.load(args.index, mmap=args.mmap)
    if len(index) == 0:
        raise UserError(f"{args.index} is empty")
    model = _index_model(index, args)
    scores, ids, keys = index.search_images(list(args.queries), model, k=args.k,
                                            batch_size=args.batch_size, progress=False,
                                            precision=args.precision)
    results = []
    for q, row_s, row_i in zip(keys, scores, ids):
        hits = []
        for place, (s, i, rec) in enumerate(zip(row_s, row_i, index.lookup(row_i)), 1):
            if rec is None:
                continue
            hits.append({"rank": place, "score": round(float(s), 6), "id": int(i),
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

    from ..search.dedup import dedup_folder
    if not Path(args.folder).exists():
        raise FileNotFoundError(f"no such image folder: {args.folder}")
    args.threshold = resolve_default(args.threshold)
    if not -1 <= args.threshold <= 1:
        raise UserError("--threshold is a cosine similarity between -1 and 1")
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--out must end in .json or .csv, got {args.out}")
    if args.k is not None and args.k < 1:
        raise UserError("-k must be at least 1 (or left out: all pairs)")
    features_device(args)
    model = load_model_arg(args)
    opts = embed_options(args)
    # The library logs its summary too; the command prints it once, on stdout.
    import logging
    dedup_log = logging.getLogger("dinofeat.dedup")
    level = dedup_log.level
    dedup_log.setLevel(logging.WARNING)
    try:
        result = dedup_folder(args.folder, model, args.threshold, pool=args.pool,
                              whitening=args.whitening, k=args.k, factory=args.factory,
                              out=args.out, html_path=args.html, **opts)
    finally:
        dedup_log.setLevel(level)
    print(result)
    for n, g in enumerate(result.groups[:args.show], 1):
        print(f"group {n}: keep {g.keep}")
        for p, s in zip(g.paths[1:], g.similarity[1:]):
            print(f"    {s:.4f}  {p}")
    if len(result.groups) > args.show:
        print(f"... {plural(len(result.groups) - args.show, 'more group')}")
    for what, path in (("groups", args.out), ("review page", args.html)):
        if path:
            print(f"{what} written to {path}")
    return 0


def register(sub) -> None:
    """index build/add/info, search, dedup (issue: index)."""

    def running(q, checkpoint: bool = True) -> None:
        g = q.add_argument_group("running")
        g.add_argument("--batch-size", type=int, default=64)
        g.add_argument("--num-workers", type=int, default=None,
                       help="decoding processes (default: from the core count and the "
                            "measured decoding and model costs)")
        add_decode_arg(g)
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
    add_model_args(q, "vit_s16")
    g = q.add_argument_group("index")
    g.add_argument("--factory", default="Flat",
                   help="faiss index: Flat (exact, default), auto (exact up to 1M vectors "
                        "within --memory; beyond, the first of IVF-SQ8, IVF-fp16, IVF-Flat, "
                        "HNSW, IVF-PQ with re-ranking that fits --memory and reaches "
                        "--recall), or a faiss factory string such as IVF4096,SQ8 or HNSW32")
    g.add_argument("--memory", default=None, metavar="SIZE",
                   help="with --factory auto: memory the index may use, e.g. 8GB "
                        "(default: the memory free now)")
    g.add_argument("--recall", type=float, default=None, metavar="R",
                   help="with --factory auto: recall@10 to reach against exact search, "
                        "measured on held-out vectors of your own (default 0.95)")
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
    q.set_defaults(func=model_args_fixup(_cmd_index_build))

    q = isub.add_parser("add", help="add the new images of a folder to an index",
                        description="Embed the images under FOLDER that the index does not "
                        "hold yet (by content hash) with the index's own model and options.")
    q.add_argument("index", help="index folder")
    q.add_argument("folder", help="image folder (recursive) or file")
    index_model_args(q)
    q.add_argument("--labels-from-folders", action="store_true")
    q.add_argument("--mmap", action="store_true", help=MMAP_HELP)
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
    add_deprecated(q, "--k", new="-k", dest="k", type=int)
    q.add_argument("--json", action="store_true", help="print JSON")
    index_model_args(q)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    q.set_defaults(func=_cmd_search)

    q = sub.add_parser(
        "dedup", help="find near-duplicate and copied images in a folder",
        description="Copy detection inside a collection: [CLS] + GeM features (paper 3.8), "
        "optionally PCA-whitened, pairs above --threshold cosine similarity, grouped into "
        "connected components. Writes the groups as JSON or CSV and an HTML page with "
        "thumbnails to review. The threshold depends on the model: check the page.")
    q.add_argument("folder", help="image folder (recursive)")
    q.add_argument("--threshold", type=float,
                   default=LibraryDefault("..search.dedup", "DEFAULT_THRESHOLD"),
                   help="cosine similarity linking two images (default %(default)s)")
    q.add_argument("--out", default=None, help="groups file, .json or .csv")
    q.add_argument("--html", default=None, help="review page with thumbnails, e.g. report.html")
    q.add_argument("--whitening", default=None, metavar="FILE",
                   help="PCA-whitening from 'dinofeat eval copydetect --save-whitening'")
    q.add_argument("--pool", choices=("cls", "gem", "cls+gem"), default="cls+gem")
    q.add_argument("--size", type=int, default=None)
    q.add_argument("--preprocessing", choices=("dino", "whole"), default=None)
    q.add_argument("-k", type=int, default=None,
                   help="approximate: link only among each image's K nearest neighbours "
                        "(large collections); default: all pairs, exactly")
    add_deprecated(q, "--k", new="-k", dest="k", type=int)
    q.add_argument("--factory", default="Flat", help="faiss index for -k (default Flat)")
    q.add_argument("--show", type=int, default=10, help="groups to print (default 10)")
    add_model_args(q, "vit_s16")
    running(q, checkpoint=False)
    q.set_defaults(func=model_args_fixup(_cmd_dedup))

