"""``dinofeat train``: DINO pretraining.

Besides parsing, the verb fits the run to the machine for options left unset (precision,
loader workers, a batch the folder can fill), resumes with the run's own recipe, and
removes a run folder that a failing start left empty.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import UserError, add_deprecated
from .output import plural

#: Patch sizes a ViT name may carry (``vit_s16``); any other needs an explicit
#: ``--patch-size``, so that a typo such as ``vit_s17`` is not trained silently.
TRAIN_PATCHES = (2, 4, 8, 14, 16, 32)
_XCIT = ("xcit_s12_16", "xcit_s12_8", "xcit_m24_16", "xcit_m24_8")

#: Options that may change when a run resumes; any other differing from the run's
#: config.json would silently change its recipe, so it is refused.
_RESUME_FREE = {"epochs", "num_workers", "log_every", "device", "saveckp_freq",
                "save_every_iters", "tensorboard", "knn_eval_data", "knn_eval_every",
                "resume", "resume_from", "output_dir", "data", "compile"}


def check_arch(arch: str) -> None:
    """Refuse an architecture ``train`` would otherwise build by accident (``vit_s17``)."""
    from ..backbones import VIT_SIZES, parse_arch
    valid = ("valid: " + ", ".join(f"vit_{s}" for s in VIT_SIZES) + " (patch from "
             "--patch-size), "
             "vit_t|s|b|l followed by a patch size of " + ", ".join(map(str, TRAIN_PATCHES))
             + " (e.g. vit_s16, vit_b8), resnet50, " + ", ".join(_XCIT))
    try:
        family, _, _ = parse_arch(arch)
    except ValueError:
        raise UserError(f"--arch {arch!r} is not an architecture; {valid}") from None
    a = arch.lower()
    if family == "xcit" and a not in _XCIT and not a.startswith("xcit_small") \
            and not a.startswith("xcit_medium"):
        raise UserError(f"--arch {arch!r} is not an architecture; {valid}")
    if family == "vit":
        import re
        m = re.search(r"(\d+)$", a)
        if m and int(m.group(1)) not in TRAIN_PATCHES:
            raise UserError(f"--arch {arch!r}: patch {m.group(1)} is not a patch size "
                            f"dinofeat trains from a name; {valid} (any other patch: "
                            "--arch vit_small --patch-size N)")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 on x86); elsewhere
    bf16 autocast is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _count_images(data: str) -> int | None:
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".txt":  # listed files that exist
        lines = [s.strip() for s in p.read_text(errors="replace").splitlines() if s.strip()]
        return sum(1 for s in lines if Path(s).is_file() or (p.parent / s).is_file())
    if p.is_dir():
        from ..images import list_images
        return len(list_images(p))
    return None


def machine_choices(cfg, given: set[str], world_size: int = 1) -> tuple[dict, list[str]]:
    """Settings for the fields neither the command line nor the recipe set: precision
    from the device, workers from the cores, a batch the folder can fill. Returns the
    changes and their reasons, for the one line the verb prints."""
    import torch

    from ..training.config import TrainConfig
    defaults = TrainConfig()
    free = {f for f in ("precision", "num_workers", "batch_size_per_gpu")
            if f not in given and getattr(cfg, f) == getattr(defaults, f)}
    changes, why = {}, []
    if "precision" in free:
        cuda = torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")
        if cuda:
            changes["precision"], reason = "fp16", "CUDA: fp16 with loss scaling"
        elif cpu_has_bf16():
            changes["precision"], reason = "bf16", "CPU with native bf16"
        else:
            changes["precision"], reason = "fp32", "CPU without native bf16"
        why.append(f"precision {changes['precision']} ({reason})")
    if "num_workers" in free:
        cores = _cores()
        workers = max(0, min(cfg.num_workers, cores // world_size - 1))
        changes["num_workers"] = workers
        why.append(f"{plural(workers, 'loader worker')} ({plural(cores, 'core')})")
    if "batch_size_per_gpu" in free and cfg.data:
        n = _count_images(cfg.data)
        if n is not None and 0 < n < cfg.batch_size_per_gpu * world_size:
            batch = 1 << max(0, (n // world_size).bit_length() - 1)
            changes["batch_size_per_gpu"] = batch
            why.append(f"batch {batch} per process (the folder has "
                       f"{plural(n, 'image file')})")
    return changes, why


def _resume_config(args: argparse.Namespace, given: dict):
    """The saved recipe of the run being resumed, with the command line's options on top;
    ``None`` when this is a fresh run. Recipe changes are refused."""
    from ..training.config import TrainConfig, cli_option
    from ..training.loop import CHECKPOINT_NAME, CONFIG_NAME
    out = Path(given.get("output_dir") or TrainConfig().output_dir)
    if given.get("resume") is False or not (out / CHECKPOINT_NAME).is_file() \
            or not (out / CONFIG_NAME).is_file():
        return None
    saved = TrainConfig.from_json_file(out / CONFIG_NAME)
    asked = TrainConfig.from_dict({**saved.to_dict(), **given}) if not (
        args.config or args.preset) else TrainConfig.from_args(args)
    changed = [f for f in saved.to_dict()
               if f not in _RESUME_FREE and asked.to_dict()[f] != saved.to_dict()[f]]
    if changed:
        text = "; ".join(f"{cli_option(f)} {saved.to_dict()[f]!r} in the run, "
                         f"{asked.to_dict()[f]!r} now" for f in changed)
        raise UserError(f"{out} is a run with another recipe ({text}): resuming would mix "
                        "two recipes. Repeat the run's options, choose another --out, or "
                        "--no-resume to start again")
    return asked


def _cmd_train(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig
    from ..training.loop import train
    given = {k: v for k, v in vars(args).items()
             if k in {f for f in TrainConfig.__dataclass_fields__}}
    if "arch" in given:
        check_arch(given["arch"])
    cfg = _resume_config(args, given)
    resuming = cfg is not None
    if cfg is None:
        cfg = TrainConfig.from_args(args)
    if not cfg.data:
        raise UserError("--data is required: a folder of images (searched recursively) or a "
                        ".txt file with one image path per line")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    changes, why = machine_choices(cfg, set(given) | ({"batch_size_per_gpu", "precision"}
                                                      if resuming else set()), world)
    if changes:
        cfg = cfg.replace(**changes).validate()
        if int(os.environ.get("RANK", "0") or 0) == 0:
            from ..utils import get_logger
            get_logger("dinofeat.train").info(
                "chosen for this machine: %s (set --precision, --num-workers or --batch-size "
                "to choose)", ", ".join(why))
    out = Path(cfg.output_dir)
    existed = out.exists()
    try:
        result = train(cfg)
    except BaseException:
        # A start that failed (bad data, too few images) leaves no empty run folder.
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if result.history and (result.run_dir / "checkpoint.pth").exists():
        last = result.history[-1]
        knn = f", k-NN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else ""
        print(f"{result.run_dir}: {plural(result.epoch, 'epoch')}, "
              f"{plural(result.iteration, 'step')}, last loss {last['loss']:.4f}{knn}; "
              f"{plural(result.skipped_images, 'unreadable image')} skipped"
              f"{'; WARNING: the teacher looks collapsed' if result.collapsed else ''}")
        print(f"load it with: dinofeat embed DIR --model {result.run_dir} ... "
              f"(Python: dinofeat.load({str(result.run_dir)!r}))")
    return 0


def register(sub) -> None:
    from ..training.config import add_arguments
    p = sub.add_parser(
        "train", help="pretrain a DINO model on your own images",
        description="DINO self-supervised pretraining (student/teacher self-distillation "
                    "with multi-crop). Defaults are the release's ViT-S/16 recipe; "
                    "--preset NAME starts from a paper recipe and explicit options override "
                    "it. Options left unset that depend on the machine are chosen for it "
                    "and printed in one line: precision (fp16 with loss scaling on CUDA; "
                    "bf16 on a CPU with native bf16, else fp32), loader workers (one less "
                    "than the cores), and a smaller batch when the folder holds fewer "
                    "images than one batch. Running the same command again resumes from "
                    "OUT/checkpoint.pth with the run's own recipe (a different recipe is "
                    "refused). Several GPUs or machines: torchrun --nproc_per_node N -m "
                    "dinofeat train ... (see docs/training.md).")
    add_arguments(p)
    add_deprecated(p, "--output", "--output-dir", "--output_dir", new="--out",
                   dest="output_dir")
    add_deprecated(p, "--batch-size-per-gpu", "--batch_size_per_gpu", new="--batch-size",
                   dest="batch_size_per_gpu", type=int)
    p.set_defaults(func=_cmd_train)
