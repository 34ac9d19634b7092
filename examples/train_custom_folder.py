"""Pretrain DINO on your own unlabelled images, then use the result like any zoo model.

What it shows: a :class:`dinofeat.TrainConfig` for a folder of images from the
``small_data`` preset (``dinofeat.training.small_data_preset`` picks the patch size, crop
sizes, number of prototypes and teacher momentum from the image size, batch and data-set
size), ``dinofeat.train(config)`` (checkpoints, ``log.jsonl`` and ``config.json`` in the
run folder; rerunning resumes), then ``dinofeat.load(run_folder)`` (the teacher backbone
with the run's preprocessing) and ``model.embed``.

Run it::

    # a few thousand photos at 96 px on one GPU (or patiently on a CPU)
    python examples/train_custom_folder.py photos/ --out runs/photos --image-size 96 \\
        --arch vit_small --epochs 100 --batch-size 64
    # any TrainConfig field on top (dinofeat train --help lists them all)
    python examples/train_custom_folder.py photos/ --out runs/quick --arch vit_tiny8 \\
        --image-size 64 --epochs 2 --set out_dim=1024 --set num_workers=0

There is no ``--model`` here: this script makes the model (``--arch``: ``vit_tiny``,
``vit_small``, ``vit_base`` with a patch size such as ``vit_small16``, or ``resnet50``).
The other examples take the run folder as ``--model runs/photos``. For the paper's
ImageNet recipes, several GPUs (``torchrun``) and every option, see ``dinofeat train``.
"""

from __future__ import annotations

import argparse
import json

import dinofeat


def parse_setting(text: str) -> tuple[str, object]:
    """``"name=value"`` -> ``(name, value)``, the value read as JSON when it parses
    (numbers, true/false, lists) and kept as a string otherwise."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.strip().replace("-", "_"), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="training images (searched recursively; no labels)")
    parser.add_argument("--out", default="runs/custom", help="run folder (resumed if present)")
    parser.add_argument("--arch", default="vit_small", help="architecture to train")
    parser.add_argument("--image-size", type=int, default=96, help="global crop side, px")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--set", type=parse_setting, action="append", default=[],
                        metavar="NAME=VALUE", help="any TrainConfig field, e.g. lr=0.001")
    args = parser.parse_args(argv)

    images = dinofeat.list_images(args.folder)
    config = dinofeat.TrainConfig.from_preset(
        "small_data", arch=args.arch, image_size=args.image_size,
        batch_size=args.batch_size, epochs=args.epochs, dataset_size=len(images),
        data=args.folder, output_dir=args.out, **dict(args.set))
    print(f"training {config.arch} (patch {config.patch_size}) on {len(images)} images: "
          f"{config.epochs} epochs, crops {config.global_crop_size}/{config.local_crop_size}"
          f" px, K = {config.out_dim}")

    result = dinofeat.train(config)
    last = result.history[-1] if result.history else {}
    print(f"done: {result.epoch} epochs, {result.iteration} steps, last loss "
          f"{last.get('loss', float('nan')):.3f}; run folder {result.run_dir}")

    model = dinofeat.load(result.run_dir)  # the teacher backbone, as in the paper
    feats = model.embed(args.folder, progress=False)
    print(f"embedded {feats.shape[0]} images -> {feats.shape[1]}-d features with {model.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
