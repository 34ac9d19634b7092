"""Training checkpoints: writing them atomically, reading them safely, resuming exactly.

A dinofeat training checkpoint (``run/checkpoint.pth``) is a plain dictionary of tensors,
numbers, strings and lists, so it loads with ``torch.load(weights_only=True)``
(:func:`dinofeat.weights.read_checkpoint`):

============== ===========================================================================
``student``    student state dict (``backbone.*``, ``head.*`` [, ``predictor.*``])
``teacher``    teacher state dict (same keys; :func:`dinofeat.load` reads its backbone)
``optimizer``  optimizer state dict
``scaler``     ``GradScaler`` state dict (fp16) or ``None``
``dino_loss``  the loss's buffers (``center``)
``epoch``      epoch of the next iteration to run
``iteration``  optimiser steps done so far (over all epochs)
``epoch_iter`` steps done inside ``epoch`` (0 at an epoch boundary)
``config``     :meth:`TrainConfig.to_dict`
``rng``        per-process RNG states (torch, CUDA, numpy, Python), a list by rank
``data``       data order: sampler seed, world size, batch size, unreadable-file counts
``history``    per-epoch summaries so far; ``monitor``: collapse-monitor state
``dinofeat``   ``{"name", "arch", "preprocessing", "pos_embed_interp"}``: what
               :func:`dinofeat.load` needs to rebuild the teacher backbone
============== ===========================================================================

:func:`read_release_checkpoint` turns an original DINO full checkpoint (``student``/
``teacher`` with ``module.`` prefixes, ``optimizer``, ``epoch``, ``args``, ``dino_loss``,
``fp16_scaler``) into the same layout so pretraining can continue from it.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..weights import CheckpointError, read_checkpoint
from ..utils import atomic_path

__all__ = ["CHECKPOINT_NAME", "numbered_checkpoint_name", "save_checkpoint", "load_checkpoint",
           "capture_rng_state", "restore_rng_state", "strip_prefix", "read_release_checkpoint",
           "RELEASE_ARCH_FIELDS"]

CHECKPOINT_NAME = "checkpoint.pth"

#: Keys every dinofeat training checkpoint has.
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "iteration", "config")


def numbered_checkpoint_name(epoch: int) -> str:
    """Name of the kept copy after ``epoch`` epochs: ``checkpoint0020.pth``."""
    return f"checkpoint{epoch:04d}.pth"


# ----------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and lists (no numpy objects, so the
    checkpoint stays readable with ``weights_only=True``)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # the generator of this process's GPU only (one GPU per process under torchrun)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # into the current device (this process's GPU), not GPU 0. Checkpoints of earlier
        # versions hold every visible GPU's state: take the current one's
        current = torch.cuda.current_device()
        own = cuda[current] if len(cuda) > 1 and current < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(own.cpu(), device=current)
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


# ------------------------------------------------------------------ writing, reading
def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file.

    A failed write (a full disk...) raises ``OSError`` naming the file and saying that the
    previous checkpoint is kept; temporary files that an earlier process killed in the
    middle of a write left behind are removed once a write succeeds."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(dict(state), tmp)
    except OSError as e:
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint yet"
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e} ({kept})") from e
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a dinofeat training checkpoint safely; :class:`CheckpointError` when it is not
    one (naming the file and what is missing)."""
    ckpt = read_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a dinofeat training checkpoint (missing "
                              f"{', '.join(missing)}); to continue from an original DINO "
                              "checkpoint use resume_from / --resume-from")
    return ckpt


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, Any]:
    """``sd`` with ``prefix`` removed from the keys that start with it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


#: Release ``args`` fields that fix the shape of the networks.
RELEASE_ARCH_FIELDS = ("arch", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head")


def _release_head_names(sd: dict[str, Any], expected: set[str] | None) -> dict[str, Any]:
    """Map the old ``weight_norm`` names of the release's last layer
    (``last_layer.weight_g``/``weight_v``) to the parametrization names a model built here
    uses (``last_layer.parametrizations.weight.original0``/``original1``), when needed."""
    if expected is None:
        return sd
    out = {}
    for k, v in sd.items():
        if k not in expected and (k.endswith(".weight_g") or k.endswith(".weight_v")):
            stem, kind = k.rsplit(".", 1)
            alt = f"{stem}.parametrizations.weight.original{0 if kind == 'weight_g' else 1}"
            if alt in expected:
                out[alt] = v
                continue
        out[k] = v
    return out


def read_release_checkpoint(path: str | os.PathLike,
                            expected_keys: set[str] | None = None) -> dict[str, Any]:
    """An original DINO full training checkpoint in dinofeat's layout.

    Returns ``{"student", "teacher", "optimizer", "scaler", "center", "epoch", "args"}``
    with ``module.`` prefixes stripped; ``args`` is the release's options as a dict.
    ``expected_keys`` (the state-dict keys of the network built here) lets the old
    ``weight_norm`` parameter names be renamed to the current ones.
    """
    ckpt = read_checkpoint(path)
    if "student" not in ckpt or "teacher" not in ckpt:
        raise CheckpointError(f"{path}: not a DINO full checkpoint (no student/teacher "
                              f"entries; entries: {', '.join(map(str, ckpt))}). Backbone-only "
                              "files can be loaded with dinofeat.load but not resumed from")
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    out = {
        "student": _release_head_names(strip_prefix(ckpt["student"]), expected_keys),
        "teacher": _release_head_names(strip_prefix(ckpt["teacher"]), expected_keys),
        "optimizer": ckpt.get("optimizer"),
        "scaler": ckpt.get("fp16_scaler"),
        "center": (ckpt.get("dino_loss") or {}).get("center"),
        "epoch": int(ckpt.get("epoch", 0)),
        "args": dict(args) if isinstance(args, Mapping) else {},
    }
    return out
