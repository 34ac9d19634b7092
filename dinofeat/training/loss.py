"""The DINO loss: teacher centering and sharpening, cross-entropy over crop pairs,
with the collapse-avoidance and loss ablations of the paper as switches.

For teacher global views ``q`` (2 of them) and student views ``v`` (all ``ncrops``),
``v != q``::

    loss = mean over (q, v) of  mean over images of  sum_k -P_t(q)_k log softmax(s_v / tau_s)_k

``P_t = softmax((t - C) / tau_t)`` with the running centre ``C`` (``collapse="center"``).
The alternatives are a softmax normalised over the batch (``"batch_softmax"``),
Sinkhorn-Knopp normalisation (``"sinkhorn"``) and none. ``loss="mse"`` replaces the
cross-entropy by the squared distance of L2-normalised outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime

__all__ = ["DINOLoss", "teacher_temperature_schedule", "sinkhorn_knopp", "batch_softmax"]

_COLLAPSE = ("center", "batch_softmax", "sinkhorn", "none")
_LOSSES = ("ce", "mse")


_distributed = runtime.is_distributed


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce across processes (no-op without torch.distributed)."""
    if _distributed():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def _global_logsumexp_over_batch(logits: torch.Tensor) -> torch.Tensor:
    """``log sum_i exp(logits[i, k])`` over the rows of every process: ``[N, K] -> [1, K]``."""
    m = logits.max(dim=0, keepdim=True).values
    m = _all_reduce(m.clone(), dist.ReduceOp.MAX if _distributed() else None)
    s = _all_reduce(torch.exp(logits - m).sum(dim=0, keepdim=True))
    return m + torch.log(s)


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of ``exp(logits)`` (SwAV's equipartition), in the log
    domain for stability.

    Each iteration first makes every column (prototype) carry the same total mass over the
    global batch (all processes), then makes every row (image) a distribution. Returns
    ``[N, K]`` probabilities: rows sum to 1 exactly, columns to ``N / K`` approximately
    (closer with more iterations).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp: iters must be at least 1, got {iters}")
    log_q = logits.float()
    for _ in range(iters):
        log_q = log_q - _global_logsumexp_over_batch(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.exp(log_q)


def batch_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the batch dimension (all processes), each row then renormalised into a
    distribution over the ``K`` outputs: one Sinkhorn-Knopp iteration. ``[N, K] -> [N, K]``.
    """
    return sinkhorn_knopp(logits, iters=1)


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: ``np.linspace(warmup, final, W)`` for the first ``W``
    epochs, then ``final`` (the release's schedule; the warm-up's last epoch already reaches
    ``final``). Length ``max(nepochs, W)``."""
    warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    rest = np.full(max(nepochs - warmup_teacher_temp_epochs, 0), teacher_temp)
    return np.concatenate([warm, rest]) if len(warm) + len(rest) else np.array([teacher_temp])


class DINOLoss(nn.Module):
    """DINO's self-distillation loss with centering (buffer ``center`` ``[1, out_dim]``).

    ``forward(student_out [ncrops*B, K], teacher_out [2*B, K], epoch) -> scalar``: the rows of
    ``student_out`` are crop-major (all images' crop 0, then crop 1, ...; the two global
    crops first), ``teacher_out`` holds the teacher's two global crops in the same order.
    The teacher side gets no gradient. With ``collapse="center"`` the centre is updated after
    the loss (:meth:`update_center`). Monitoring statistics of the step are kept in
    :attr:`last_stats`.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 collapse: str = "center", sharpen: bool = True, loss: str = "ce",
                 sinkhorn_iters: int = 3):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss: ncrops must be at least 2 (two global crops), got "
                             f"{ncrops}")
        if collapse not in _COLLAPSE:
            raise ValueError(f"DINOLoss: unknown collapse mode {collapse!r}; choose one of "
                             f"{', '.join(_COLLAPSE)}")
        if loss not in _LOSSES:
            raise ValueError(f"DINOLoss: unknown loss {loss!r}; choose ce or mse")
        self.out_dim, self.ncrops = out_dim, ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.collapse, self.sharpen, self.loss_type = collapse, sharpen, loss
        self.sinkhorn_iters = sinkhorn_iters
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._stats: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "DINOLoss":
        """The loss a :class:`~dinofeat.training.config.TrainConfig` describes."""
        return cls(cfg.out_dim, cfg.ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                   cfg.warmup_teacher_temp_epochs, cfg.epochs, student_temp=cfg.student_temp,
                   center_momentum=cfg.center_momentum, collapse=cfg.collapse,
                   sharpen=cfg.sharpen, loss=cfg.loss, sinkhorn_iters=cfg.sinkhorn_iters)

    @property
    def n_terms(self) -> int:
        """Number of (teacher view, student view) pairs averaged: ``2 * ncrops - 2``."""
        return 2 * self.ncrops - 2

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature at ``epoch`` (the student temperature when ``sharpen`` is off)."""
        if not self.sharpen:
            return float(self.student_temp)
        i = min(max(int(epoch), 0), len(self.teacher_temp_schedule) - 1)
        return float(self.teacher_temp_schedule[i])

    @torch.no_grad()
    def teacher_distribution(self, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        """The teacher's target distributions ``[2B, K]`` (fp32, rows sum to 1)."""
        temp = self.teacher_temperature(epoch)
        if self.collapse == "center":
            return F.softmax((teacher_out.detach().float() - self.center) / temp, dim=-1)
        t = teacher_out.detach().float() / temp
        if self.collapse == "batch_softmax":
            return batch_softmax(t)
        if self.collapse == "sinkhorn":
            return sinkhorn_knopp(t, self.sinkhorn_iters)
        return F.softmax(t, dim=-1)

    def _mse_targets(self, teacher_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        t = teacher_out.detach().float()
        if self.collapse == "center":
            return t - self.center
        if self.collapse == "none":
            return t
        return probs  # batch-softmax / Sinkhorn targets are defined as distributions

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                epoch: int) -> torch.Tensor:
        # computed in fp32 even inside an autocast region (sums over 65536 outputs)
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            return self._forward(student_out, teacher_out, epoch)

    def _forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                 epoch: int) -> torch.Tensor:
        n_teacher, k = teacher_out.shape
        if k != self.out_dim or student_out.shape[-1] != self.out_dim:
            raise ValueError(f"DINOLoss: expected outputs of dimension {self.out_dim}, got "
                             f"student {tuple(student_out.shape)}, teacher "
                             f"{tuple(teacher_out.shape)}")
        if n_teacher % 2:
            raise ValueError(f"DINOLoss: teacher_out must hold 2 global crops per image, got "
                             f"{n_teacher} rows")
        b = n_teacher // 2
        if student_out.shape[0] != self.ncrops * b:
            raise ValueError(f"DINOLoss: student_out has {student_out.shape[0]} rows, expected "
                             f"ncrops * B = {self.ncrops} * {b}")
        probs = self.teacher_distribution(teacher_out, epoch)           # [2B, K]
        p_t = probs.view(2, b, k)
        log_p_s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_p_s = log_p_s.view(self.ncrops, b, k)
        # ce[q, v] = mean_b sum_k -p_t[q, b, k] log p_s[v, b, k]
        ce = -torch.einsum("qbk,vbk->qv", p_t, log_p_s) / b            # [2, ncrops]
        pair = torch.ones(2, self.ncrops, dtype=torch.bool, device=ce.device)
        pair[0, 0] = pair[1, 1] = False                                 # same view: skipped
        # torch.where, not ce[pair]: boolean-mask indexing waits for the GPU every step
        if self.loss_type == "ce":
            loss = torch.where(pair, ce, 0.0).sum() / self.n_terms
        else:
            t_n = F.normalize(self._mse_targets(teacher_out, probs), dim=-1).view(2, b, k)
            s_n = F.normalize(student_out.float(), dim=-1).view(self.ncrops, b, k)
            # ||s - t||^2 = 2 - 2 <s, t> for unit vectors
            mse = 2.0 - 2.0 * torch.einsum("qbk,vbk->qv", t_n, s_n) / b
            loss = torch.where(pair, mse, 0.0).sum() / self.n_terms
        self._record_stats(probs, ce.detach(), pair, loss.detach(), epoch)
        if self.collapse == "center":
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``C <- m C + (1 - m) mean(teacher_out)``, the mean over the global batch (summed
        over processes, divided by the total number of rows)."""
        t = teacher_out.detach().float()
        total = _all_reduce(t.sum(dim=0, keepdim=True))
        count = t.shape[0] * (dist.get_world_size() if _distributed() else 1)
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype),
                                                    alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def _record_stats(self, probs: torch.Tensor, ce: torch.Tensor, pair: torch.Tensor,
                      loss: torch.Tensor, epoch: int) -> None:
        entropy_rows = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)  # [2B]
        b = probs.shape[0] // 2
        entropy_per_view = entropy_rows.view(2, b).mean(dim=1)                   # [2]
        kl = torch.where(pair, ce - entropy_per_view[:, None], 0.0).sum() / self.n_terms
        self._stats = {
            "loss": loss,
            "teacher_entropy": entropy_rows.mean(),
            "kl": kl,
            "center_norm": torch.linalg.vector_norm(self.center),
            "teacher_prob_std": probs.std(dim=0).mean() if probs.shape[0] > 1
            else probs.new_zeros(()),
            "teacher_max_prob": probs.max(dim=-1).values.mean(),
            "teacher_temp": torch.tensor(self.teacher_temperature(epoch)),
        }

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last forward (read lazily: no device sync unless asked):
        ``loss``, ``teacher_entropy`` (mean entropy of the teacher distributions, nats;
        ``log K`` = uniform collapse, 0 = one-hot collapse), ``kl`` (mean KL divergence
        between teacher and student over the loss pairs), ``center_norm``,
        ``teacher_prob_std`` (per-output std of the teacher probabilities over the batch,
        averaged over outputs; near 0 when every image gets the same target),
        ``teacher_max_prob`` and ``teacher_temp``. The centre norm is taken before the
        centre update of that step."""
        return {k: float(v) for k, v in self._stats.items()}
