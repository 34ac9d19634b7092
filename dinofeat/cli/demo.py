"""``dinofeat demo``: the offline Fashion-MNIST demo."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    res = run_demo(args.out, steps=args.steps, train_images=args.train_images,
                   bank=args.bank, test=args.test, queries=args.queries,
                   threads=args.threads, seed=args.seed, data_root=args.data,
                   compare_shipped=not args.no_shipped, progress=args.progress)
    print(res.summary())
    print(f"wrote {res.out_dir}/: neighbours.png, attention/, model.safetensors, train.idx, "
          f"results.json ({res.total_seconds / 60:.1f} min in all)")
    return 0


def register(sub) -> None:
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
    d.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    d.set_defaults(func=_cmd_demo)
