"""k-NN classification of labelled photos with frozen DINO features (paper section 3.7).

What it shows: reading two ImageFolder trees (``root/<class>/<images>``) with
``dinofeat.eval.image_folder``, embedding them (``model.embed``: L2-normalised [CLS]),
voting with DINO's weighted k-NN (``dinofeat.eval.knn_classify``: the ``k`` nearest
training images by cosine similarity ``s`` vote for their class with weight
``exp(s / T)``), and scoring the votes (``dinofeat.eval.knn_accuracy``). No training: the
labelled training images are the classifier.

Run it::

    python examples/knn_classify.py data/train data/val             # ViT-S/16 from the hub
    python examples/knn_classify.py data/train data/val -k 10 --out predictions.csv
    python examples/knn_classify.py data/train data/val --model runs/exp1   # your weights

``--model`` takes anything ``dinofeat.load`` takes. ``dinofeat eval knn`` runs the same
protocol for several ``k`` at once with an on-disk feature cache
(``dinofeat.eval.evaluate_knn``); a :class:`dinofeat.KNNIndex` with labels does the same
vote for new photos (``index.classify`` / ``index.predict``).
"""

from __future__ import annotations

import argparse
import csv

import torch

import dinofeat
from dinofeat.eval import image_folder, knn_accuracy, knn_classify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", help="labelled training images: train/<class>/<images>")
    parser.add_argument("val", help="images to classify, same layout (class folders)")
    parser.add_argument("--model", default="vit_s16",
                        help="zoo name or weights file/run folder (default: vit_s16)")
    parser.add_argument("-k", type=int, default=20, help="neighbours that vote (default: 20)")
    parser.add_argument("-T", type=float, default=0.07,
                        help="temperature of the vote weights (default: 0.07)")
    parser.add_argument("--out", default="predictions.csv",
                        help="CSV of path, true class, predicted class, vote share")
    args = parser.parse_args(argv)

    model = dinofeat.load(args.model)
    train = image_folder(args.train)
    val = image_folder(args.val, classes=train.classes)
    train_feats = model.embed(train.paths, progress=False)
    val_feats = model.embed(val.paths, progress=False)

    scores = knn_classify(train_feats, torch.tensor(train.labels), val_feats,
                          k=args.k, T=args.T, num_classes=train.num_classes)
    acc = knn_accuracy(scores, torch.tensor(val.labels), topk=(1, 5))
    print(f"{model.name}: {len(train)} training images, {train.num_classes} classes, "
          f"{len(val)} classified")
    print(f"k-NN (k={args.k}, T={args.T}): top-1 {acc[1]:.1f}%, top-5 {acc[5]:.1f}%")

    share = scores / scores.sum(dim=1, keepdim=True)
    with open(args.out, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "class", "predicted", "vote_share"])
        for path, label, row in zip(val.paths, val.labels, share):
            best = int(row.argmax())
            out.writerow([path, train.classes[label], train.classes[best],
                          f"{float(row[best]):.3f}"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
