"""``dinofeat train``: DINO pretraining."""

from __future__ import annotations

import argparse

from .common import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig
    from ..training.loop import train
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


def register(sub) -> None:
    """train (issue: training core)."""
    from ..training.config import add_arguments
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

