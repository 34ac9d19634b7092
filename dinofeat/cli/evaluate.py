"""``dinofeat eval knn|linear|retrieval|copydetect|davis``: the paper's evaluations."""

from __future__ import annotations

import argparse
import sys

from .common import (UserError, add_deprecated, add_model_args, load_model_arg,
                     model_args_fixup)
from .output import plural, safe


def _eval_finish(args: argparse.Namespace, results: dict, default_out: str) -> int:
    from pathlib import Path

    from ..eval.report import results_table, write_results
    path = write_results(Path(getattr(args, "results", None) or args.out or default_out)
                         if "results" not in vars(args) else Path(args.results), results)
    print(safe(results_table(results)))
    print(f"results written to {safe(path)}")
    return 0


def _run_folder(args: argparse.Namespace, default: str | None) -> None:
    """linear and davis write a folder (``--out``) and a results file (``--results``,
    default ``<out>/results.json``). Their old spellings were ``--output DIR`` and
    ``--out FILE.json``; both still work."""
    old = getattr(args, "output_alias", None)
    if args.out and str(args.out).lower().endswith(".json") and (old or default):
        print("dinofeat: warning: --out FILE.json for the results is deprecated; use "
              "--results FILE.json (--out is the run folder)", file=sys.stderr)
        args.results = args.results or args.out
        args.out = None
    args.out = args.out or old or default
    if not args.out:
        raise UserError("--out DIR is required: the folder for the masks")
    from pathlib import Path
    args.results = args.results or str(Path(args.out) / "results.json")


def _cmd_eval_knn(args: argparse.Namespace) -> int:
    from ..eval import evaluate_knn
    if any(k < 1 for k in args.k) or args.temperature <= 0:
        raise UserError("-k values must be >= 1 and --temperature > 0")
    from ..eval import image_folder
    image_folder(args.val, classes=image_folder(args.train).classes)  # fail before loading
    model = load_model_arg(args)
    res = evaluate_knn(model, args.train, args.val, ks=args.k, T=args.temperature,
                       cache_dir=False if args.no_cache else args.cache_dir,
                       batch_size=args.batch_size, num_workers=args.num_workers,
                       precision=args.precision, progress=args.progress)
    for part in ("train", "val"):
        if res[part]["skipped"]:
            print(f"{part}: skipped {plural(res[part]['skipped'], 'unreadable image')}")
    return _eval_finish(args, res, "knn_results.json")


def _cmd_eval_linear(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..eval import LinearProbe, LinearProbeConfig, evaluate_linear, image_folder
    from ..eval import train_linear_probe
    _run_folder(args, "linear_probe")
    model = load_model_arg(args)
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
        return _eval_finish(args, res, str(Path(args.out) / "results.json"))
    if not args.train:
        raise UserError("--train is needed (or --evaluate HEAD to score an existing head)")
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    n, avg = args.n_last_blocks, args.avgpool
    if n is None:  # the paper's recipes: ViT-S 4 blocks; ViT-B 1 block + avgpool
        n, avg = (1, avg) if not model.is_vit else (
            (min(4, model.depth or 1), avg) if model.embed_dim < 768 else (1, True))
    cfg = LinearProbeConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            n_last_blocks=n, avgpool=avg, val_freq=args.val_freq,
                            precompute=args.precompute, num_workers=args.num_workers,
                            seed=args.seed, precision=args.precision)
    train = image_folder(args.train)
    if val is not None:
        val = image_folder(args.val, classes=train.classes)
    _, res = train_linear_probe(model, train, val, config=cfg, output_dir=args.out,
                                progress=args.progress)
    print(f"linear head saved to {safe(Path(args.out) / 'linear_head.safetensors')}")
    return _eval_finish(args, res, str(Path(args.out) / "results.json"))


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from ..eval import evaluate_retrieval
    model = load_model_arg(args)
    res = evaluate_retrieval(model, args.dataset, args.data_root, imsize=args.size,
                             multiscale=args.multiscale, num_workers=args.num_workers,
                             precision=args.precision, query_crop=args.query_crop,
                             progress=args.progress)
    return _eval_finish(args, res, f"retrieval_{args.dataset}_results.json")


def _cmd_eval_copydetect(args: argparse.Namespace) -> int:
    from ..eval import evaluate_copydetect
    model = load_model_arg(args)
    res = evaluate_copydetect(model, args.data_root, imsize=args.size,
                              distractors=args.distractors, whitening=args.whitening,
                              whitening_data=args.whitening_data,
                              whitening_dim=args.whitening_dim,
                              centered=args.centered_whitening,
                              save_whitening=args.save_whitening, topk=args.k,
                              batch_size=args.batch_size, num_workers=args.num_workers,
                              precision=args.precision, progress=args.progress)
    if args.save_whitening and res["whitening"] and not args.whitening:
        print(f"whitening saved to {safe(args.save_whitening)}")
    return _eval_finish(args, res, "copydetect_results.json")


def _cmd_eval_davis(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..eval import evaluate_davis
    _run_folder(args, None)
    model = load_model_arg(args)
    res = evaluate_davis(model, args.data_root, args.out, sequences=args.sequences,
                         split=args.split, n_last_frames=args.n_last_frames, topk=args.k,
                         temperature=args.temperature, radius=args.radius,
                         short_side=args.short_side, precision=args.precision,
                         progress=args.progress)
    print(f"masks written under {safe(args.out)}/<video>/")
    return _eval_finish(args, res, str(Path(args.out) / "results.json"))


def register(sub) -> None:
    """eval knn|linear|retrieval|copydetect|davis (issue: evaluation)."""
    p = sub.add_parser("eval", help="the paper's evaluations: knn, linear, retrieval, "
                       "copydetect, davis",
                       description="Reproduce the DINO paper's evaluations on any model. Each "
                       "prints a table and writes JSON; docs/evaluation.md lists the datasets "
                       "and the published numbers.")
    esub = p.add_subparsers(dest="eval_command", metavar="TASK", required=True)

    def common(q, out_help: str | None) -> None:
        add_model_args(q, "vit_s16")
        g = q.add_argument_group("running")
        if out_help:
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
    q.add_argument("-k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="neighbour counts (default 10 20 100 200)")
    add_deprecated(q, "--k", new="-k", dest="k", type=int, nargs="+")
    q.add_argument("--temperature", type=float, default=0.07,
                   help="vote temperature T, weight exp(similarity / T) (default 0.07)")
    add_deprecated(q, "--T", new="--temperature", dest="temperature", type=float)
    q.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default $DINOFEAT_CACHE/features or "
                        "~/.cache/dinofeat/features)")
    q.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    common(q, "default knn_results.json")
    q.set_defaults(func=model_args_fixup(_cmd_eval_knn))

    q = esub.add_parser("linear", help="linear probe on frozen features",
                        description="Train a linear classifier on frozen features (paper "
                        "3.8): SGD momentum 0.9, lr 0.001 x batch/256, cosine, no weight "
                        "decay, random resized crop + flip; centre-crop evaluation. Saves "
                        "<out>/linear_head.safetensors (+ .json) and resumes from "
                        "<out>/checkpoint.pth. --evaluate scores an existing head (ours "
                        "or a released *_linearweights.pth).")
    q.add_argument("--train", default=None, help="training ImageFolder")
    q.add_argument("--val", default=None, help="validation ImageFolder")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="run folder: head, checkpoint, results (default linear_probe)")
    q.add_argument("--results", default=None, metavar="FILE",
                   help="results JSON (default <out>/results.json)")
    add_deprecated(q, "--output", new="--out", dest="output_alias")
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
    common(q, None)
    q.set_defaults(func=model_args_fixup(_cmd_eval_linear), batch_size=256)

    q = esub.add_parser("retrieval", help="revisited Oxford / Paris image retrieval",
                        description="Revisited Oxford/Paris retrieval (paper 3.8): [CLS] "
                        "features of whole images (long side --size), queries cropped to "
                        "their box, cosine ranking; Medium and Hard mAP and mP@1/5/10.")
    q.add_argument("--dataset", required=True, choices=("roxford5k", "rparis6k"))
    q.add_argument("--data-root", required=True,
                   help="folder holding <dataset>/jpg/ and <dataset>/gnd_<dataset>.pkl")
    q.add_argument("--size", type=int, default=224,
                   help="model input: the long side of the whole image (default 224)")
    add_deprecated(q, "--imsize", new="--size", dest="size", type=int)
    q.add_argument("--multiscale", action="store_true",
                   help="average features at scales 1, 1/sqrt(2), 1/2")
    q.add_argument("--query-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="crop the queries to their bounding box (the revisited protocol; "
                        "default); --no-query-crop embeds whole queries as the release's "
                        "script behind the paper's numbers did")
    common(q, "default retrieval_<dataset>_results.json")
    q.set_defaults(func=model_args_fixup(_cmd_eval_retrieval), batch_size=16)

    q = esub.add_parser("copydetect", help="Copydays copy detection",
                        description="Copy detection on Copydays (paper 3.8): [CLS] + GeM "
                        "(p=4) features of square-resized images, PCA-whitening learnt on "
                        "distractor images, cosine ranking of originals (+ distractors), mAP "
                        "per block ('strong' is the paper's).")
    q.add_argument("--data-root", required=True,
                   help="Copydays folder: original/, strong/ (+ jpegqual/, crops/)")
    q.add_argument("--size", type=int, default=224,
                   help="model input: images resized to a square of this side (default 224)")
    add_deprecated(q, "--imsize", new="--size", dest="size", type=int)
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
    q.add_argument("-k", type=int, default=20, help="ranked list length (default 20)")
    add_deprecated(q, "--topk", new="-k", dest="k", type=int)
    common(q, "default copydetect_results.json")
    q.set_defaults(func=model_args_fixup(_cmd_eval_copydetect), batch_size=32)

    q = esub.add_parser("davis", help="DAVIS-2017 video object segmentation",
                        description="Video object segmentation by label propagation (paper "
                        "3.8): output patch features, context = first frame + previous "
                        "frames, top-k neighbours inside a square neighbourhood. Writes "
                        "indexed PNG masks and, with ground truth, J, F and J&F.")
    q.add_argument("--data-root", required=True,
                   help="DAVIS folder: JPEGImages/480p, Annotations/480p, ImageSets/2017")
    q.add_argument("--out", default=None, metavar="DIR", help="folder for the masks (required)")
    q.add_argument("--results", default=None, metavar="FILE",
                   help="results JSON (default <out>/results.json)")
    add_deprecated(q, "--output", new="--out", dest="output_alias")
    q.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default val)")
    q.add_argument("--sequences", nargs="+", default=None, help="only these videos")
    q.add_argument("--n-last-frames", type=int, default=7)
    q.add_argument("-k", type=int, default=5,
                   help="neighbours each patch takes its label from (default 5)")
    add_deprecated(q, "--topk", new="-k", dest="k", type=int)
    q.add_argument("--radius", type=int, default=12,
                   help="neighbourhood half-size in patches (size_mask_neighborhood)")
    q.add_argument("--temperature", type=float, default=0.1)
    q.add_argument("--short-side", type=int, default=480)
    common(q, None)
    q.set_defaults(func=model_args_fixup(_cmd_eval_davis))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

