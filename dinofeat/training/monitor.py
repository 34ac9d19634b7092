"""Watching a run: collapse statistics of the teacher and a resident-memory probe.

DINO can collapse in two ways (paper, section 5.3 and Fig. 7): every image gets the
*uniform* distribution (centering without sharpening), or every image puts its mass on the
*same* prototype (sharpening without centering). Both make the teacher output independent
of the image. :func:`teacher_stats` measures, on a batch of teacher outputs ``[n, K]``:

* ``teacher_entropy``: mean entropy of the teacher distributions ``softmax((t - C) / tau)``,
  against ``log K`` (it tends to ``log K`` in uniform collapse);
* ``teacher_batch_entropy``: entropy of their batch mean (tends to 0 when one prototype
  takes everything); ``teacher_kl`` = batch entropy - mean entropy, the mean KL divergence
  between each image's distribution and the batch mean (0 in both collapses);
* ``teacher_std``: the per-dimension standard deviation of the raw outputs over the batch,
  averaged over dimensions, relative to their root mean square (0 when every image gives
  the same output);
* ``center_norm``: the norm of the centre ``C``.

:class:`CollapseMonitor` averages them over an epoch and flags the epoch as collapsed with
the reason; the loop logs a warning and records the flag.

A collapse need not sit at one of the two extremes. Without a momentum teacher
(``teacher="prev_iter"``) the teacher gives every image nearly the same distribution while
that distribution drifts or swings between peaked and nearly uniform, so neither entropy
settles at ``log K`` or 0 over an epoch; too slow a centre (momentum 0.999) lets the
teacher send every image to one of two or three prototypes, each image one-hot, so the
batch-mean entropy stays above 0. What the collapses share is that the teacher's target
says little about the image: ``teacher_kl`` is the mutual information between the image
and the prototype the teacher picks (estimated on the batch); it falls towards 0 when the
targets are the same for every image, and it cannot exceed the log of the number of
prototypes in use.

The thresholds come from the Fashion-MNIST grid of ``benchmarks/ablations.py`` (K = 1024,
936 steps; docs/benchmarks.md, "Ablations"): the runs that learn (k-NN above the untrained
network) keep ``teacher_kl`` at 0.8-1.7 nats (12-25% of ``log K``) and their batch-mean
entropy at 60-99% of ``log K``; without a momentum teacher ``teacher_kl`` fell to 0.25
nats (3.5%) while k-NN fell 20 points below the untrained network, and with centre momentum
0.999 the batch-mean entropy sat at 10% of ``log K`` (two prototypes in use). The monitor
flags an epoch whose ``teacher_kl`` is at most 5% of ``log K`` or whose batch-mean entropy
is at most 15% of ``log K`` (at most K^0.15 prototypes in use: 2.8 of 1024, 5.3 of 65536).
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["teacher_stats", "CollapseMonitor", "rss_bytes", "max_rss_bytes"]


@torch.no_grad()
def teacher_stats(teacher_out: torch.Tensor, center: torch.Tensor | None,
                  temperature: float) -> dict[str, float]:
    """Collapse statistics of teacher outputs ``[n, K]`` (see the module docstring)."""
    t = teacher_out.detach().float()
    c = center.detach().float().reshape(1, -1) if center is not None else torch.zeros(
        1, t.shape[1], device=t.device)
    logp = torch.log_softmax((t - c) / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1).mean()
    mean_p = p.mean(0)
    batch_entropy = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    rms = t.pow(2).mean().sqrt()
    std = t.std(0, unbiased=False).mean() / rms.clamp_min(1e-12) if t.shape[0] > 1 else \
        torch.tensor(float("nan"))
    return {
        "teacher_entropy": float(entropy),
        "teacher_batch_entropy": float(batch_entropy),
        "teacher_kl": float(batch_entropy - entropy),
        "teacher_std": float(std),
        "center_norm": float(c.norm()),
    }


@dataclass
class CollapseMonitor:
    """Per-epoch collapse check on :func:`teacher_stats` values.

    An epoch is flagged when its mean teacher entropy is at least ``uniform_fraction`` of
    ``log K`` (uniform collapse), when the entropy of the batch-mean distribution is at most
    ``single_fraction`` of ``log K`` (one or a few prototypes for every image), when the teacher
    outputs hardly vary over the batch (relative std below ``min_relative_std``), or when
    the teacher distributions hardly differ between images (mean KL divergence from their
    batch mean at most ``min_kl_fraction`` of ``log K``; see the module docstring).
    """

    out_dim: int
    uniform_fraction: float = 0.99
    single_fraction: float = 0.15
    min_relative_std: float = 1e-3
    min_kl_fraction: float = 0.05
    collapsed: bool = False
    reason: str | None = None
    _sums: dict[str, float] = field(default_factory=dict)
    _count: int = 0

    @property
    def log_k(self) -> float:
        return math.log(self.out_dim)

    def update(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if math.isfinite(v):
                self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1

    def check(self, means: dict[str, float]) -> str | None:
        """Why ``means`` look collapsed, or ``None``."""
        ent = means.get("teacher_entropy")
        bent = means.get("teacher_batch_entropy")
        std = means.get("teacher_std")
        kl = means.get("teacher_kl")
        if ent is not None and ent >= self.uniform_fraction * self.log_k:
            return (f"uniform collapse: teacher entropy {ent:.3f} is "
                    f"{100 * ent / self.log_k:.1f}% of log K = {self.log_k:.3f}")
        if bent is not None and bent <= self.single_fraction * self.log_k:
            return (f"single-prototype collapse: entropy of the batch-mean teacher "
                    f"distribution {bent:.3f} <= {self.single_fraction:g} log K (about "
                    f"{math.exp(bent):.1f} of {self.out_dim} prototypes in use)")
        if std is not None and std < self.min_relative_std:
            return (f"constant teacher output: relative std over the batch {std:.2e} < "
                    f"{self.min_relative_std:g}")
        if kl is not None and kl <= self.min_kl_fraction * self.log_k:
            return (f"image-independent teacher: the teacher distributions differ from "
                    f"their batch mean by a KL divergence of {kl:.2e} nats on average, "
                    f"<= {self.min_kl_fraction:g} log K (every image gets the same target)")
        return None

    def end_epoch(self) -> dict[str, Any]:
        """Means of the epoch, ``collapsed`` and ``collapse_reason``; resets the sums."""
        n = max(self._count, 1)
        means = {k: v / n for k, v in self._sums.items()}
        self.reason = self.check(means) if self._count else None
        self.collapsed = self.reason is not None
        self._sums, self._count = {}, 0
        return {**means, "collapsed": self.collapsed, "collapse_reason": self.reason}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "count": self._count, "collapsed": self.collapsed,
                "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = dict(state.get("sums", {}))
        self._count = int(state.get("count", 0))
        self.collapsed = bool(state.get("collapsed", False))
        self.reason = state.get("reason")


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak resident memory of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)
