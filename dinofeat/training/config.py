"""Every option of DINO training in one dataclass, with the release's defaults.

:class:`TrainConfig` is the single source of truth for training options: the training loop
reads it, ``dinofeat train --help`` is generated from it (:func:`add_arguments`), a run
folder stores it as JSON (:meth:`TrainConfig.to_dict`), and :data:`PRESETS` holds the
paper's recipes as plain override dictionaries. Field names follow the options of the
original release (``--out_dim``, ``--momentum_teacher``, ...) so its recipes carry over.

The defaults are the release's vanilla ViT-S/16 run (docs/training.md lists them). The ablation switches
of the paper (collapse avoidance, sharpening, teacher type, loss, predictor, head shape,
multi-crop) are fields too; each one's help says what the paper found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..zoo import IMAGENET_MEAN, IMAGENET_STD

# The precision names of dinofeat.runtime.PRECISIONS (the one list; tests/test_cli.py checks
# they agree), spelt here so that reading the options (``dinofeat --help``) needs no torch.
PRECISIONS = ("fp32", "bf16", "fp16")

__all__ = ["TrainConfig", "PRESETS", "small_data_preset", "add_arguments",
           "PRECISIONS", "OPTIMIZERS", "COLLAPSE_MODES", "TEACHER_MODES", "LOSSES",
           "CLI_NAMES", "cli_option"]

OPTIMIZERS = ("adamw", "sgd", "lars")
COLLAPSE_MODES = ("center", "batch_softmax", "sinkhorn", "none")
TEACHER_MODES = ("momentum", "prev_epoch", "prev_iter")
LOSSES = ("ce", "mse")

#: Above this teacher temperature the paper reports collapse (its ablation table).
MAX_STABLE_TEACHER_TEMP = 0.07


def _opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field carrying its ``--help`` text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use immutable defaults (tuples) in TrainConfig")
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options of one DINO training run (defaults: the release's vanilla ViT-S/16 recipe).

    Build one directly, from a preset (:meth:`from_preset`), from JSON (:meth:`from_dict`)
    or from parsed command-line arguments (:meth:`from_args`); :meth:`validate` checks it
    and raises a ``ValueError`` naming the bad option.
    """

    # ---------------------------------------------------------------- model
    arch: str = _opt("vit_small", "backbone architecture: vit_tiny|vit_small|vit_base "
                     "(+ --patch-size), zoo-style names such as vit_s16 or vit_b8 (the patch "
                     "in the name wins over the default patch size), resnet50, xcit_s12_16")
    patch_size: int = _opt(16, "ViT patch size in pixels; smaller patches are slower but "
                           "better (paper: /8 beats /16)")
    out_dim: int = _opt(65536, "K, the dimension of the head output (number of prototypes); "
                        "the paper's best is 65536 on ImageNet")
    norm_last_layer: bool = _opt(True, "fix the weight-norm gain of the head's last layer to "
                                 "1: more stable; the release recommends it for ViT-B and "
                                 "turning it off for ViT-S (better but less stable)")
    use_bn_in_head: bool = _opt(False, "BatchNorm in the hidden layers of the projection head "
                                "(off for ViTs: the paper keeps its ViT systems entirely "
                                "BatchNorm-free; the release's ResNet-50 run used it)")
    head_layers: int = _opt(3, "number of linear layers in the head MLP before the "
                            "bottleneck (3: in -> 2048 -> 2048 -> 256); the paper: without "
                            "the L2 bottleneck, 3-4 layer heads collapse")
    hidden_dim: int = _opt(2048, "width of the head's hidden layers")
    bottleneck_dim: int = _opt(256, "dimension of the head's bottleneck before the "
                               "weight-normalised last layer")
    l2_bottleneck: bool = _opt(True, "L2-normalise the bottleneck before the last layer; the "
                               "paper finds 3-4 layer heads collapse without it")
    predictor: bool = _opt(False, "BYOL-style predictor MLP on the student output (ablation; "
                           "the paper finds DINO works best without one: 71.8% vs 72.8% "
                           "k-NN)")
    drop_path_rate: float = _opt(0.1, "stochastic depth rate of the student backbone "
                                 "(the teacher has none)")

    # -------------------------------------------------- teacher, loss, ablations
    momentum_teacher: float = _opt(0.996, "start of the teacher EMA momentum, raised to 1 "
                                   "with a cosine; small batches want a higher start "
                                   "(release: 0.9995 at batch 256)")
    teacher: str = _opt("momentum", "teacher type: momentum (EMA of the student), "
                        "prev_epoch (student of the previous epoch: works, 66.6% vs "
                        "72.8% k-NN in the paper), prev_iter (student of the previous "
                        "iteration: collapses per the paper, 0.1% k-NN)")
    warmup_teacher_temp: float = _opt(0.04, "teacher temperature at the start of its linear "
                                      "warm-up")
    teacher_temp: float = _opt(0.04, "teacher temperature after the warm-up; above 0.07 "
                               "training is unstable per the paper (0.08 constant "
                               "collapses; a warm-up 0.04 -> 0.07 works best)")
    warmup_teacher_temp_epochs: int = _opt(0, "epochs of linear teacher-temperature warm-up "
                                           "(30 in the release's longer recipes)")
    student_temp: float = _opt(0.1, "student softmax temperature")
    sharpen: bool = _opt(True, "sharpen the teacher with its low temperature; off = the "
                         "teacher uses the student temperature (the paper: centering "
                         "without sharpening collapses to the uniform distribution)")
    collapse: str = _opt("center", "collapse avoidance: center (DINO's running centre), "
                         "batch_softmax (teacher softmax normalised over the batch), sinkhorn "
                         "(Sinkhorn-Knopp normalisation as in SwAV; the paper: as good as "
                         "centering with a momentum teacher, 72.2% vs 72.8% k-NN), none "
                         "(sharpening alone: collapses to one prototype)")
    center_momentum: float = _opt(0.9, "momentum m of the centre update C <- m C + (1-m) "
                                  "mean(teacher); 0.999 collapses per the paper")
    sinkhorn_iters: int = _opt(3, "Sinkhorn-Knopp iterations for --collapse sinkhorn")
    loss: str = _opt("ce", "ce: cross-entropy between teacher and student distributions "
                     "(DINO); mse: mean squared error between L2-normalised outputs "
                     "(ablation; the paper: 52.6% vs 72.8% k-NN)")

    # ------------------------------------------------------- optimisation
    optimizer: str = _opt("adamw", "adamw (ViTs), sgd (momentum 0.9) or lars (ResNet recipes)")
    lr: float = _opt(0.0005, "reference peak learning rate for a total batch of 256: the "
                     "actual peak is lr * total_batch / 256, reached after the warm-up")
    warmup_epochs: int = _opt(10, "epochs of linear learning-rate warm-up from 0")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = _opt(0.04, "weight decay at the start of its cosine schedule (none "
                               "on biases and 1-D parameters)")
    weight_decay_end: float = _opt(0.4, "weight decay at the end of its cosine schedule")
    clip_grad: float = _opt(3.0, "clip each parameter's gradient norm to this value on its "
                            "own (not a global norm); 0 disables clipping")
    freeze_last_layer: int = _opt(1, "epochs during which the head's last layer gets no "
                                  "gradient (helps training start)")
    batch_size_per_gpu: int = _opt(64, "images per process and step (the total batch is "
                                   "this times the number of processes)")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimiser step (the total "
                                 "batch is multiplied by it)")
    epochs: int = _opt(100, "number of training epochs")
    max_iters_per_epoch: int | None = _opt(None, "stop each epoch after this many "
                                           "iterations (quick runs, smoke tests)")
    precision: str = _opt("fp16", "fp16 (the release: autocast with loss scaling, CUDA), "
                          "bf16 (autocast, no scaling needed) or fp32. On CPU, fp16 runs "
                          "in fp32 (see TrainConfig.autocast_dtype)")
    compile: bool = _opt(False, "torch.compile the student and teacher")
    fused_optimizer: bool = _opt(True, "use the fused AdamW kernel where available (CUDA)")
    seed: int = _opt(0, "random seed (each process adds its rank)")

    # -------------------------------------------------------- augmentation
    global_crops_scale: tuple[float, float] = _opt(
        (0.4, 1.0), "area scale range of the 2 global crops; without multi-crop the "
                    "release recommends (0.14, 1)")
    local_crops_number: int = _opt(8, "number of small local crops per image; 0 disables "
                                   "multi-crop (the paper: 67.9% k-NN without vs 72.8% "
                                   "with; best: 10)")
    local_crops_scale: tuple[float, float] = _opt((0.05, 0.4), "area scale range of the "
                                                  "local crops")
    global_crop_size: int = _opt(224, "side of the global crops in pixels")
    local_crop_size: int = _opt(96, "side of the local crops in pixels")
    blur_sigma: tuple[float, float] = _opt((0.1, 2.0), "range of the Gaussian blur's sigma, "
                                           "in pixels of the output crop (the release's, "
                                           "for 224/96-px crops; scale it down with the "
                                           "crop size for small images)")
    batch_augment: bool = _opt(False, "augment whole batches of equal-size images at once "
                               "(the same random recipe per image; several times faster "
                               "for small images such as 28-px photos, crops resampled "
                               "by bicubic grid sampling without antialiasing)")
    grayscale: bool = _opt(False, "convert images to one channel repeated three times "
                           "(grayscale data such as Fashion-MNIST)")
    mean: tuple[float, float, float] = _opt(IMAGENET_MEAN, "per-channel normalisation mean")
    std: tuple[float, float, float] = _opt(IMAGENET_STD, "per-channel normalisation std")

    # ------------------------------------------------------ data and output
    data: str | None = _opt(None, "training images: a folder (searched recursively, class "
                            "sub-folders allowed and ignored) or a .txt file with one image "
                            "path per line")
    output_dir: str = _opt("runs/dino", "run folder: checkpoints, logs, config.json")
    resume: bool = _opt(True, "continue from output_dir/checkpoint.pth when it exists")
    resume_from: str | None = _opt(None, "continue pretraining from an original DINO full "
                                   "checkpoint (student, teacher, optimizer, centre, epoch); "
                                   "ignored once output_dir has its own checkpoint")
    saveckp_freq: int = _opt(20, "also keep a numbered checkpoint copy every this many "
                             "epochs (0: never)")
    save_every_iters: int = _opt(0, "also save checkpoint.pth every this many iterations "
                                 "inside an epoch (0: only at epoch ends)")
    num_workers: int = _opt(10, "data-loading worker processes per training process")
    log_every: int = _opt(10, "log training statistics every this many iterations")
    tensorboard: bool = _opt(False, "also write TensorBoard logs to output_dir/tb")
    knn_eval_data: str | None = _opt(None, "labelled ImageFolder tree (with train/ and val/) "
                                     "for periodic k-NN evaluation of the teacher")
    knn_eval_every: int = _opt(0, "run the k-NN evaluation every this many epochs (0: never)")
    device: str | None = _opt(None, "torch device; unset: CUDA when available, else CPU")

    # ------------------------------------------------------------ behaviour
    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale", "blur_sigma", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        patch = _patch_in_arch_name(self.arch)
        if patch is not None and self.patch_size == _DEFAULTS["patch_size"]:
            self.patch_size = patch  # "vit_s8": the name wins over the default patch size

    @property
    def multicrop(self) -> bool:
        """Whether local crops are used."""
        return self.local_crops_number > 0

    @property
    def ncrops(self) -> int:
        """Crops per image: 2 global + the local ones."""
        return 2 + self.local_crops_number

    def total_batch(self, world_size: int = 1) -> int:
        """Images per optimiser step over all processes."""
        return self.batch_size_per_gpu * self.grad_accum_steps * world_size

    def peak_lr(self, world_size: int = 1) -> float:
        """Learning rate at the end of the warm-up: ``lr * total_batch / 256``."""
        return self.lr * self.total_batch(world_size) / 256.0

    def autocast_dtype(self, device_type: str):
        """The autocast dtype for this precision on ``device_type`` (``None``: no autocast).

        fp16 autocast with loss scaling is the release's CUDA setting; on CPU, fp16 kernels
        are slow or missing, so fp16 honestly falls back to fp32 there (bf16 is kept: CPU
        autocast supports it).
        """
        from ..runtime import autocast_dtype
        return autocast_dtype(self.precision, device_type, cpu_fp16=False)

    def uses_loss_scaling(self, device_type: str) -> bool:
        """Whether a gradient scaler is needed (fp16 autocast on CUDA)."""
        from ..runtime import needs_loss_scaling
        return needs_loss_scaling(self.precision, device_type)

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary of every field (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from :meth:`to_dict` output (or any subset); unknown keys are an error."""
        return cls()._with(d, source="config")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a config saved as JSON (e.g. ``run/config.json``)."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of training options")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (same checks as :meth:`from_dict`)."""
        return self._with(changes, source="replace")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A paper recipe from :data:`PRESETS` with ``overrides`` on top.

        ``"small_data"`` is computed by :func:`small_data_preset` from the overrides
        themselves: ``global_crop_size`` (or ``image_size``), ``batch_size_per_gpu`` (or
        ``batch_size``), ``arch``, ``patch_size``, ``epochs`` and the non-field
        ``dataset_size`` / ``world_size`` are passed to it.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        overrides = dict(overrides)
        if name == "small_data":
            base = small_data_preset(**_small_data_arguments(overrides))
        else:
            base = dict(PRESETS[name])
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> "TrainConfig":
        """Build from arguments parsed by a parser set up with :func:`add_arguments`.

        Order: ``--config FILE`` (JSON) or ``--preset NAME`` (or the defaults), then every
        option given explicitly on the command line on top.
        """
        ns = vars(namespace)
        given = {f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns}
        config_file, preset = ns.get("config"), ns.get("preset")
        if config_file and preset:
            raise ValueError("give either --config or --preset, not both")
        if config_file:
            with open(config_file, encoding="utf-8") as f:
                explicit = set(given) | set(json.load(f))
            return cls.from_json_file(config_file).replace(**given)._fit_warmups(explicit)
        if preset:
            return cls.from_preset(preset, **given)._fit_warmups(set(given))
        return cls.from_dict(given)._fit_warmups(set(given))

    def _fit_warmups(self, explicit: set[str]) -> "TrainConfig":
        """Shorten the warm-ups (learning rate, teacher temperature) that are longer than
        ``epochs`` to a tenth of the run (at least one epoch), unless the user set them
        (``explicit``): a short trial run (``--epochs 1``) should run, not fail on the
        release's 10-epoch warm-up. Says so in one log line."""
        names = ("warmup_epochs", "warmup_teacher_temp_epochs")
        changes = {n: max(1, self.epochs // 10) for n in names
                   if getattr(self, n) > self.epochs and n not in explicit}
        if not changes:
            return self
        from ..utils import get_logger
        get_logger("dinofeat.train").info(
            "--epochs %d is shorter than the warm-up: %s (set --warmup-epochs / "
            "--warmup-teacher-temp-epochs to choose)", self.epochs, ", ".join(
                f"{'learning-rate' if n == 'warmup_epochs' else 'teacher-temperature'} "
                f"warm-up {getattr(self, n)} -> {v} epoch{'s' if v > 1 else ''}"
                for n, v in changes.items()))
        return dataclasses.replace(self, **changes)

    def _with(self, changes: Mapping[str, Any], source: str) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = [k for k in changes if k not in known]
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(map(repr, unknown))} "
                             f"in {source}; see `dinofeat train --help`")
        hints = _type_hints()
        values = {}
        for k, v in changes.items():
            values[k] = _coerce(k, v, hints[k])
        if "arch" in values and "patch_size" not in values:
            patch = _patch_in_arch_name(values["arch"])  # "vit_s8" brings its patch size
            if patch is not None:
                values["patch_size"] = patch
        return dataclasses.replace(self, **values)

    # ---------------------------------------------------------------- checks
    def validate(self) -> "TrainConfig":
        """Check every option; raise ``ValueError`` naming the first bad one.

        Settings that are legal but known from the paper to collapse or be unstable
        (teacher temperature above 0.07, centre momentum 0.999, no collapse avoidance,
        deep heads without the L2 bottleneck, ...) give a ``UserWarning`` instead.
        Returns ``self`` so that calls chain.
        """
        def bad(option: str, problem: str) -> ValueError:
            return ValueError(f"{cli_option(option)}: {problem}")

        def choice(option: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, option) not in allowed:
                raise bad(option, f"unknown value {getattr(self, option)!r}; choose one of "
                                  f"{', '.join(allowed)}")

        choice("precision", PRECISIONS)
        choice("optimizer", OPTIMIZERS)
        choice("collapse", COLLAPSE_MODES)
        choice("teacher", TEACHER_MODES)
        choice("loss", LOSSES)

        from ..backbones import parse_arch
        try:
            parse_arch(self.arch, self.patch_size)
        except ValueError as e:
            raise bad("arch", str(e)) from None

        positive_ints = ["patch_size", "out_dim", "head_layers", "hidden_dim", "bottleneck_dim",
                         "batch_size_per_gpu", "grad_accum_steps", "epochs", "global_crop_size",
                         "local_crop_size", "log_every", "sinkhorn_iters"]
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        non_negative = ["warmup_teacher_temp_epochs", "warmup_epochs", "freeze_last_layer",
                        "local_crops_number", "saveckp_freq", "save_every_iters", "num_workers",
                        "knn_eval_every", "min_lr", "weight_decay", "weight_decay_end",
                        "clip_grad", "drop_path_rate"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        for name in ("lr", "student_temp", "teacher_temp", "warmup_teacher_temp"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise bad(name, f"must be a positive number, got {v}")
        if self.max_iters_per_epoch is not None and self.max_iters_per_epoch < 1:
            raise bad("max_iters_per_epoch", "must be at least 1 (or unset)")
        if self.warmup_epochs > self.epochs:
            raise bad("warmup_epochs", f"{self.warmup_epochs} warm-up epochs exceed "
                                       f"--epochs {self.epochs}")
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise bad("warmup_teacher_temp_epochs",
                      f"{self.warmup_teacher_temp_epochs} exceeds --epochs {self.epochs}")
        if self.drop_path_rate >= 1:
            raise bad("drop_path_rate", f"must be below 1, got {self.drop_path_rate}")
        for name in ("momentum_teacher", "center_momentum"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise bad(name, f"must lie in [0, 1], got {v}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise bad("blur_sigma", f"need 0 < min <= max, got ({lo}, {hi})")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise bad(name, f"need 0 < min <= max <= 1, got ({lo}, {hi})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise bad(name, "needs three values (one per channel)")
        if min(self.std) <= 0:
            raise bad("std", f"values must be positive, got {self.std}")
        if self.knn_eval_every > 0 and not self.knn_eval_data:
            raise bad("knn_eval_every", "needs --knn-eval-data (a labelled folder)")

        warn = lambda msg: warnings.warn(msg, UserWarning, stacklevel=3)  # noqa: E731
        if self.teacher_temp > MAX_STABLE_TEACHER_TEMP:
            warn(f"--teacher-temp {self.teacher_temp} is above {MAX_STABLE_TEACHER_TEMP}: "
                 "unstable per the paper (0.08 constant collapses)")
        if self.collapse == "center" and self.center_momentum >= 0.999:
            warn(f"--center-momentum {self.center_momentum}: the paper reports collapse at "
                 "0.999")
        if self.collapse == "none":
            warn("--collapse none: no centering or normalisation of the teacher; the paper "
                 "reports collapse")
        if not self.sharpen and self.collapse == "center":
            warn("--no-sharpen with centering: the paper reports collapse to the uniform "
                 "distribution")
        if self.teacher == "prev_iter":
            warn("--teacher prev_iter: the paper reports collapse (0.1% k-NN)")
        if self.teacher == "momentum" and self.momentum_teacher == 0:
            warn("--momentum-teacher 0 makes the teacher a copy of the student: collapses")
        if not self.l2_bottleneck and self.head_layers >= 3:
            warn("--no-l2-bottleneck with a 3-4 layer head: the paper reports collapse")
        if self.local_crops_number == 0 and self.global_crops_scale[0] > 0.14:
            warn(f"no multi-crop with --global-crops-scale {self.global_crops_scale}: the "
                 "release recommends (0.14, 1) without local crops")
        return self


# ------------------------------------------------------------------ helpers
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] | None = None


def _type_hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def _patch_in_arch_name(arch: Any) -> int | None:
    """The patch size a ViT name carries (``vit_s8`` -> 8, ``vit_small`` -> None)."""
    if not isinstance(arch, str):
        return None
    a = arch.lower()
    if not (a.startswith("vit") or a.startswith("deit")):
        return None
    m = re.search(r"(?:patch|[a-z_])(\d+)$", a)
    return int(m.group(1)) if m else None


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check and convert one option value (JSON lists -> tuples, ints -> floats)."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"option {name!r} cannot be null")
    origin = typing.get_origin(base)
    if origin is tuple:
        n = len(typing.get_args(base))
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"option {name!r} needs {n} numbers, got {value!r}")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"option {name!r} needs {n} numbers, got {value!r}") from None
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"option {name!r} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"option {name!r} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"option {name!r} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            raise ValueError(f"option {name!r} must be a string, got {value!r}")
        return value
    return value


# ------------------------------------------------------------------ presets
def _round_to(x: float, multiple: int, minimum: int) -> int:
    return max(minimum, int(round(x / multiple)) * multiple)


def small_data_preset(image_size: int = 32, batch_size: int = 256, *,
                      arch: str = "vit_tiny", patch_size: int | None = None,
                      epochs: int = 100, dataset_size: int | None = None,
                      world_size: int = 1) -> dict[str, Any]:
    """Options for DINO on small images and small batches (e.g. Fashion-MNIST's 28x28
    photos upsampled to 32-64 px, batch 64-256, one machine).

    The reasoning, rule by rule:

    - **Patch size** (unless given): the largest of 16/8/4 that leaves a global grid of at
      least 8x8 patches (32 px -> 4, 64 px -> 8, 128 px -> 16). A ViT/16 on 32 px sees 4
      tokens, too few for attention to matter.
    - **Crop sizes**: the global crop is the image size rounded to the patch; the local crop
      keeps the release's 96/224 = 3/7 ratio, rounded to the patch (at least 2 patches):
      32 -> 12, 64 -> 24. Local crops on tiny images keep a larger minimum area
      (scale (0.1, 0.4) below 96 px) so that they still hold a few real pixels.
    - **out_dim** 4096 (8192 for images of 96 px and more): K is the number of prototypes;
      65536 is tuned for 1.28M ImageNet images and 1000 classes, a small data set of ~10
      classes needs far fewer, and a smaller head is cheaper on CPU.
    - **Teacher momentum**: the release anchors are 0.996 at batch 1024 and 0.9995 at 256.
      A power law through them, ``1 - m = 0.004 (batch / 1024) ** 1.5``, interpolates other
      batch sizes. With ``dataset_size`` known, the teacher's time constant ``1 / (1 - m)``
      is further capped at one epoch of iterations, so that on a small data set the teacher
      still follows the student within an epoch (on ImageNet it lags 0.2-0.4 epoch).
    - **lr** stays the release's 0.0005 per 256 images (linear scaling by the batch);
      **warm-ups** scale with the run: lr warm-up ``min(10, epochs // 10)`` epochs. The
      teacher temperature stays at a constant 0.04 (the stable vanilla setting),
      ``norm_last_layer`` stays on (stability over the last few tenths of a point).
    - ``num_workers`` 2. ``precision`` is left at the release's fp16: on GPUs that is
      autocast with loss scaling, on CPUs fp16 runs in fp32 (``--precision bf16`` is the
      fast choice on CPUs with bf16 units).
    """
    if image_size < 8:
        raise ValueError(f"small_data_preset: image_size {image_size} is too small (min 8)")
    if batch_size < 1 or world_size < 1:
        raise ValueError("small_data_preset: batch_size and world_size must be at least 1")
    if patch_size is None:
        patch_size = _patch_in_arch_name(arch)
    if patch_size is None:
        patch_size = next((p for p in (16, 8, 4) if image_size // p >= 8), 2)
    global_size = _round_to(image_size, patch_size, patch_size)
    local_size = _round_to(global_size * 3 / 7, patch_size, 2 * patch_size)
    momentum = 1 - 0.004 * (batch_size / 1024) ** 1.5
    if dataset_size is not None:
        iters_per_epoch = max(1, dataset_size // batch_size)
        momentum = min(momentum, 1 - 1 / max(iters_per_epoch, 2))
    momentum = float(min(max(momentum, 0.9), 0.9999))
    return dict(
        arch=arch,
        patch_size=patch_size,
        out_dim=8192 if global_size >= 96 else 4096,
        global_crop_size=global_size,
        local_crop_size=local_size,
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4) if global_size >= 96 else (0.1, 0.4),
        local_crops_number=8,
        batch_size_per_gpu=max(1, batch_size // world_size),
        momentum_teacher=round(momentum, 6),
        lr=0.0005,
        min_lr=1e-6,
        epochs=epochs,
        warmup_epochs=min(10, epochs // 10),
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        norm_last_layer=True,
        num_workers=2,
    )


def _small_data_arguments(overrides: dict[str, Any]) -> dict[str, Any]:
    """Pick :func:`small_data_preset`'s arguments out of preset overrides (the non-field
    ones are removed from ``overrides``)."""
    kw: dict[str, Any] = {}
    if "image_size" in overrides:
        kw["image_size"] = overrides.pop("image_size")
    elif "global_crop_size" in overrides:
        kw["image_size"] = overrides["global_crop_size"]
    if "batch_size" in overrides:
        kw["batch_size"] = overrides.pop("batch_size")
    elif "batch_size_per_gpu" in overrides:
        kw["batch_size"] = overrides["batch_size_per_gpu"] * overrides.get("world_size", 1)
    for name in ("dataset_size", "world_size"):
        if name in overrides:
            kw[name] = overrides.pop(name)
    for name in ("arch", "patch_size", "epochs"):
        if name in overrides:
            kw[name] = overrides[name]
    return kw


#: The paper's and release's recipes as overrides of the defaults. Values marked
#: "uncertain" in the comments are recollections of the released ``args.txt`` files that
#: could not be re-checked here.
PRESETS: dict[str, dict[str, Any]] = {
    # The release README's vanilla run: 100 epochs of ViT-S/16, every default.
    "vit_s16_100ep": dict(arch="vit_small", patch_size=16),
    # The README's "boosting" advice for ViT-S: 300 epochs, teacher 0.04 -> 0.07 over 30
    # epochs, free last-layer norm (the release: 76.1% linear after 300 epochs with 10 locals).
    "vit_s16_300ep": dict(arch="vit_small", patch_size=16, epochs=300, teacher_temp=0.07,
                          warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                          norm_last_layer=False),
    # The released ViT-S/16 (DeiT-S) weights: 800 epochs, 10 local crops, batch 64 x 16 GPUs.
    # Uncertain: the crop scales (0.25, 1) / (0.05, 0.25) and clip_grad 0 are recollections.
    "vit_s16_800ep": dict(arch="vit_small", patch_size=16, epochs=800, out_dim=65536,
                          teacher_temp=0.07, warmup_teacher_temp=0.04,
                          warmup_teacher_temp_epochs=30, norm_last_layer=False, lr=0.0005,
                          batch_size_per_gpu=64, local_crops_number=10, min_lr=1e-5,
                          weight_decay=0.04, weight_decay_end=0.4, clip_grad=0.0,
                          freeze_last_layer=1, global_crops_scale=(0.25, 1.0),
                          local_crops_scale=(0.05, 0.25)),
    # The released ViT-S/8: as ViT-S/16 800 epochs at patch 8 (uncertain: the release ran
    # it with a smaller per-GPU batch on more GPUs and clip 3.0).
    "vit_s8": dict(arch="vit_small", patch_size=8, epochs=800, out_dim=65536,
                   teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                   norm_last_layer=False, lr=0.0005, batch_size_per_gpu=16,
                   local_crops_number=10, min_lr=1e-5, clip_grad=3.0, freeze_last_layer=1,
                   global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25)),
    # ViT-B/16: norm_last_layer on (recommended for ViT-B), total batch 1024 (32 x 32 GPUs),
    # lr 0.00075, clip 3. Uncertain: 400 epochs, 3 frozen epochs, teacher warm-up 50 epochs,
    # min_lr 2e-6.
    "vit_b16": dict(arch="vit_base", patch_size=16, epochs=400, out_dim=65536,
                    norm_last_layer=True, batch_size_per_gpu=32, lr=0.00075, min_lr=2e-6,
                    clip_grad=3.0, freeze_last_layer=3, teacher_temp=0.07,
                    warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=50,
                    local_crops_number=10),
    # The README's ResNet-50 command: SGD, lr 0.03 per 256, constant weight decay 1e-4,
    # global scale (0.14, 1), local (0.05, 0.14). BatchNorm in the head as the released run.
    "resnet50": dict(arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4,
                     weight_decay_end=1e-4, global_crops_scale=(0.14, 1.0),
                     local_crops_scale=(0.05, 0.14), use_bn_in_head=True, drop_path_rate=0.0),
    # Small images and batches (Fashion-MNIST at 32 px, batch 256): see small_data_preset.
    "small_data": small_data_preset(),
}

# Fashion-MNIST on a CPU (28x28 grey photos; the recipes of dinofeat.demo, which set the
# run's length): the release's recipe adapted to 28-px images and runs of minutes to an
# hour on a 2-core CPU (the probes behind each choice: docs/benchmarks.md, "Fashion-MNIST"):
# - patch 7 on 28 px: a 4x4 grid (16 tokens; local crops of 14 px: 2x2). On this CPU it
#   trains 1.7x more images per second than patch 4 (49 tokens), and in runs this short
#   images seen matter more than resolution;
# - the Gaussian blur's sigma scaled to the image: the release's (0.1, 2) px is for 224-px
#   crops; on a 28-px photo a sigma of 2 px erases the garment's details, (0.1, 0.5) keeps
#   the same relative strength as the release at a quarter of ImageNet's 112-px detail;
# - BatchNorm in the head's hidden layers (the release's option for ResNets): a random
#   ViT gives nearly the same [CLS] for every photo, so the centred teacher starts almost
#   uniform and the first hundreds of steps carry little signal; normalising the head's
#   hidden units over the batch spreads the photos apart from the first step (measured:
#   +3 k-NN points over the plain head after 300 steps, the best of 7 probes);
# - head hidden width 512 (not 2048): the backbone is 192-d, and the head was a third of
#   the step's time;
# - 4 local crops instead of 8-10: 8 were not better per minute;
# - out_dim 1024: K prototypes for 10 classes and a few thousand images per chunk;
# - teacher momentum 0.99 (cosine to 1): the teacher's time constant, 100 steps, is a
#   fraction of the run; the release's 0.996-0.9995 would leave it near its random start;
# - lr 0.002 per 256 images (4x the release) with a one-chunk warm-up (3x that was worse);
# - no frozen last layer (the first chunk is already the warm-up), bf16 autocast (CPU
#   autocast is supported; ~1.4x faster on AMD, ~2x on Intel AMX), grey images;
# - the augmentation of whole batches (28-px photos all have one size): per image it is
#   about a quarter of the step's time on one core, batched ~4x less
#   (benchmarks/fashion_mnist_step.py).
FASHION_MNIST: dict[str, Any] = dict(
    arch="vit_mini7", patch_size=7, global_crop_size=28, local_crop_size=14,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), local_crops_number=4,
    blur_sigma=(0.1, 0.5), out_dim=1024, hidden_dim=512, use_bn_in_head=True,
    momentum_teacher=0.99, lr=0.002, min_lr=1e-6, warmup_epochs=1,
    freeze_last_layer=0, norm_last_layer=True, drop_path_rate=0.1, precision="bf16",
    grayscale=True, num_workers=1, saveckp_freq=0, log_every=5, batch_augment=True,
    batch_size_per_gpu=64, epochs=10, mean=(0.286,) * 3, std=(0.353,) * 3)
PRESETS["fashion_mnist"] = FASHION_MNIST


#: One line for ``train --help`` and docs/training.md: the defaults are not the paper's recipe.
PAPER_VS_DEFAULTS = ("The defaults (e.g. --arch vit_s16 alone) reproduce the release "
                     "script's defaults (100 epochs, 8 local crops, teacher temperature "
                     "0.04), not the paper's ViT-S/16 recipe; that one is --preset "
                     "vit_s16_800ep (800 epochs, 10 local crops, teacher temperature 0.04 -> "
                     "0.07, the published weights).")


# ------------------------------------------------------------------ argparse
#: Fields whose command-line name is the one every verb uses for the concept (the CLI
#: keeps the old spellings as hidden aliases).
CLI_NAMES = {"output_dir": "--out", "batch_size_per_gpu": "--batch-size"}


def cli_option(name: str) -> str:
    """The command-line spelling of a :class:`TrainConfig` field."""
    return CLI_NAMES.get(name) or f"--{name.replace('_', '-')}"


def _option_strings(name: str) -> list[str]:
    strings = [cli_option(name)]
    if "_" in name and name not in CLI_NAMES and not isinstance(_DEFAULTS[name], bool):
        strings.append(f"--{name}")  # the release's spelling
    return strings


def _parse_optional(tp):
    def parse(s: str):
        if s.lower() in ("none", "null", ""):
            return None
        return tp(s)
    parse.__name__ = tp.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser | Any) -> argparse.ArgumentParser:
    """Add one ``--option`` per :class:`TrainConfig` field (help + default shown), plus
    ``--preset NAME`` and ``--config FILE.json``.

    Options left out of the command line are absent from the parsed namespace, so
    :meth:`TrainConfig.from_args` can put the given ones on top of a preset. Both spellings
    work: ``--local-crops-number`` and the release's ``--local_crops_number``; booleans are
    ``--norm-last-layer`` / ``--no-norm-last-layer`` (dashes only); pairs take two values (``--global-crops-scale 0.14 1``).
    """
    group = parser.add_argument_group("recipe", PAPER_VS_DEFAULTS)
    group.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="start from a paper recipe (fields given explicitly override it)")
    group.add_argument("--config", default=None, metavar="FILE.json",
                       help="start from a saved config (e.g. a run's config.json)")
    hints = _type_hints()
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        base, optional = _base_type(hints[f.name])
        section = _SECTIONS.get(f.name, "training options")
        g = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        default = f.default
        shown = list(default) if isinstance(default, tuple) else default
        help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            n = len(typing.get_args(base))
            kw.update(nargs=n, type=float, metavar=("MIN", "MAX") if n == 2 else "X")
        else:
            kw["type"] = _parse_optional(base) if optional else base
            kw["metavar"] = _METAVARS.get(f.name) or {int: "N", float: "X", str: "STR"}.get(
                base, "V")
            if f.name in _CHOICES:
                kw["choices"] = _CHOICES[f.name]
                kw["metavar"] = "{" + ",".join(_CHOICES[f.name]) + "}"
        g.add_argument(*_option_strings(f.name), **kw)
    return parser


_METAVARS = {"data": "PATH", "output_dir": "DIR", "knn_eval_data": "DIR", "arch": "NAME",
             "resume_from": "FILE",
             "device": "DEVICE"}
_CHOICES = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "collapse": COLLAPSE_MODES,
            "teacher": TEACHER_MODES, "loss": LOSSES}

_SECTIONS = {name: "model and head" for name in (
    "arch", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head", "head_layers",
    "hidden_dim", "bottleneck_dim", "l2_bottleneck", "predictor", "drop_path_rate")}
_SECTIONS.update({name: "teacher, loss and ablations" for name in (
    "momentum_teacher", "teacher", "warmup_teacher_temp", "teacher_temp",
    "warmup_teacher_temp_epochs", "student_temp", "sharpen", "collapse", "center_momentum",
    "sinkhorn_iters", "loss")})
_SECTIONS.update({name: "multi-crop augmentation" for name in (
    "global_crops_scale", "local_crops_number", "local_crops_scale", "global_crop_size",
    "local_crop_size", "blur_sigma", "batch_augment", "grayscale", "mean", "std")})
_SECTIONS.update({name: "data, output and logging" for name in (
    "data", "output_dir", "resume", "resume_from", "saveckp_freq", "save_every_iters",
    "num_workers", "log_every", "tensorboard", "knn_eval_data", "knn_eval_every", "device")})
