"""Short probes of Fashion-MNIST recipe options: how the recipes of dinofeat.demo were chosen.

    python benchmarks/fashion_mnist_probe.py NAME --steps 300 --chunks 6 --batch 64 \\
        --set '{"use_bn_in_head": true}' [--threads 1] [--random]

One probe: the ``bench`` recipe of :data:`dinofeat.demo.RECIPES` with the ``--set`` options
(any :class:`~dinofeat.training.TrainConfig` field, as JSON) for ``--steps`` optimiser steps,
then DINO's k-NN (k = 20, T = 0.07) of the saved teacher through ``load(...).embed`` on a
fixed random subset (10,000 training photos as the bank, 2,000 test photos), and with
``--random`` the same for the untrained network. One JSON line per probe is appended to
``benchmarks/results/fashion_mnist_probes.jsonl``; docs/benchmarks.md quotes them.

Probes are short (minutes) and their k-NN is measured on 2,000 test photos (one standard
error is about 1 point): they rank options for the longer runs, nothing more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a label for the probe")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--set", default="{}", metavar="JSON",
                   help="TrainConfig fields over the bench recipe, e.g. "
                        "'{\"use_bn_in_head\": false}'")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--random", action="store_true", help="also score the untrained network")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "fashion_mnist_probe"))
    p.add_argument("--out", default=str(HERE / "results" / "fashion_mnist_probes.jsonl"))
    args = p.parse_args(argv)

    from dinofeat.datasets import load_fashion_mnist
    from dinofeat.demo import (RECIPES, export_training_images, fashion_mnist_preprocessing,
                               fashion_mnist_stats, knn_evaluation, random_weights_model,
                               recipe_config, set_threads)
    from dinofeat.model import load
    from dinofeat.training.loop import train

    threads = set_threads(args.threads)
    overrides = json.loads(args.set)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    mean, std = fashion_mnist_stats(x_train)
    work = Path(args.work_dir)
    data = export_training_images(x_train, work / "train_png")
    recipe = dataclasses.replace(RECIPES["bench"], name=args.name, steps=args.steps,
                                 chunks=args.chunks, batch=args.batch, description="probe")
    run_dir = work / f"run_{args.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = recipe_config(recipe, data=data, output_dir=run_dir, mean=mean, std=std,
                        **overrides)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    bank = rng.choice(len(x_train), 10000, replace=False)
    test = rng.choice(len(x_test), 2000, replace=False)
    subset = (x_train[bank], y_train[bank], x_test[test], y_test[test])
    row = {"name": args.name, "steps": args.steps, "batch": args.batch, "set": overrides,
           "threads": threads, "train_s": round(train_s, 1),
           "images_per_s": round(args.steps * args.batch / train_s, 1),
           "knn_top1": knn_evaluation(load(run_dir, device="cpu"), *subset)["top1"],
           "final_loss": result.history[-1]["loss"] if result.history else None,
           "collapsed": result.collapsed}
    if args.random:
        prep = fashion_mnist_preprocessing(mean, std)
        row["random_knn_top1"] = knn_evaluation(random_weights_model(cfg.arch, prep),
                                                *subset)["top1"]
    print(json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
