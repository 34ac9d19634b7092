"""Per-iteration schedules of DINO training: learning rate, weight decay, teacher momentum.

Every schedule is a precomputed array with one value per optimiser step, as in the release:
a linear warm-up from ``warmup_start`` to ``base`` over ``warmup_epochs`` epochs (the last
warm-up step already equals ``base``), then a half cosine from ``base`` towards ``final``
over the remaining ``I`` steps, value ``final + (base - final) (1 + cos(pi i / I)) / 2`` at
step ``i`` of the cosine part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["cosine_schedule", "Schedules", "build_schedules"]


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """One value per iteration: ``np.ndarray[epochs * iters_per_epoch]`` (float64).

    Linear warm-up ``np.linspace(warmup_start, base, warmup_epochs * iters_per_epoch)``,
    then ``final + (base - final) * (1 + cos(pi * i / I)) / 2`` for ``i = 0 .. I - 1``,
    ``I`` the number of iterations after the warm-up.
    """
    if epochs < 0 or iters_per_epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"cosine_schedule: negative length (epochs={epochs}, "
                         f"iters_per_epoch={iters_per_epoch}, warmup_epochs={warmup_epochs})")
    total = epochs * iters_per_epoch
    warmup_iters = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(warmup_start, base, warmup_iters)
    steps = np.arange(total - warmup_iters, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate([warmup, cosine])
    assert len(schedule) == total
    return schedule


@dataclass(frozen=True)
class Schedules:
    """The three per-iteration schedules of a run (each ``[epochs * iters_per_epoch]``)."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    iters_per_epoch: int

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, it: int) -> tuple[float, float, float]:
        """``(lr, weight_decay, teacher_momentum)`` at global iteration ``it`` (the last
        value is kept past the end)."""
        i = min(it, len(self.lr) - 1)
        return float(self.lr[i]), float(self.wd[i]), float(self.momentum[i])


def build_schedules(cfg, iters_per_epoch: int, total_batch: int) -> Schedules:
    """The release's schedules for ``cfg`` (a :class:`~dinofeat.training.config.TrainConfig`).

    - lr: warm-up from 0 to ``cfg.lr * total_batch / 256`` over ``cfg.warmup_epochs``, then
      cosine to ``cfg.min_lr``;
    - weight decay: cosine from ``cfg.weight_decay`` to ``cfg.weight_decay_end``;
    - teacher momentum: cosine from ``cfg.momentum_teacher`` to 1.

    ``total_batch``: images per optimiser step over all processes (and accumulation steps).
    """
    if iters_per_epoch < 1:
        raise ValueError(f"build_schedules: iters_per_epoch must be at least 1, got "
                         f"{iters_per_epoch} (is the data set smaller than one batch?)")
    if total_batch < 1:
        raise ValueError(f"build_schedules: total_batch must be at least 1, got {total_batch}")
    peak = cfg.lr * total_batch / 256.0
    lr = cosine_schedule(peak, cfg.min_lr, cfg.epochs, iters_per_epoch,
                         warmup_epochs=cfg.warmup_epochs)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch)
    momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, iters_per_epoch)
    return Schedules(lr=lr, wd=wd, momentum=momentum, iters_per_epoch=iters_per_epoch)
