"""Online k-NN evaluation during training, shared by all the processes of the job.

Each process embeds its own share of the labelled ``train/`` and ``val/`` class folders
with the teacher backbone, the training features are gathered on every process (on its
device), each process votes for its share of the validation images with
:func:`dinofeat.eval.knn.knn_classify` (the weighted vote: k = 20, T = 0.07), and the hit
counts are summed over processes. The work is divided by the number of processes, and a
failure on any process (an unreadable folder, an out-of-memory error) is raised on every
process instead of leaving the others waiting in a collective operation until the
timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import runtime
from ..zoo import Preprocessing
from . import distributed as D

__all__ = ["OnlineKnnError", "online_knn"]


class OnlineKnnError(RuntimeError):
    """The online k-NN evaluation failed on some process (raised on every process)."""


def _agree(step: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; then every process learns whether any process failed, and all raise
    together (the failing process its own exception, the others :class:`OnlineKnnError`
    naming it)."""
    error: BaseException | None = None
    value = None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
        error = e
    reports = D.all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if error is not None:
        raise error
    if failed:
        rank, msg = failed[0]
        raise OnlineKnnError(f"online k-NN ({step}) failed on process {rank}: {msg}")
    return value


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n_r, ...]`` of every process in rank order (the ``n_r`` may
    differ), on ``x``'s device."""
    if not runtime.is_distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts)
    padded = x.new_zeros((pad, *x.shape[1:]))
    padded[:x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)])


@torch.no_grad()
def _embed_share(backbone: nn.Module, folder: Path, prep: Preprocessing, device: torch.device,
                 autocast_dtype, batch_size: int, num_workers: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features ``[n, D]`` (fp32, on ``device``), labels ``[n]`` and the class names of
    this process's share (every ``world``-th image from its rank) of ``folder``."""
    from ..images import ImageTransform, normalize_batch
    from ..datasets import LabeledImageDataset

    ds = LabeledImageDataset(folder, ImageTransform(prep), prep.crop_size)
    share = torch.utils.data.Subset(ds, range(D.get_rank(), len(ds), D.get_world_size()))
    loader = torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator())
    feats, labels = [], []
    for x, y, ok in loader:
        x = normalize_batch(x[ok], prep.mean, prep.std, device=device)
        with runtime.autocast(device, dtype=autocast_dtype):
            feats.append(backbone(x).float())
        labels.append(y[ok].to(device))
    dim = None
    if not feats:  # an empty share still takes part in the gathers
        dim = int(getattr(backbone, "embed_dim", getattr(backbone, "num_features", 0)))
    f = torch.cat(feats) if feats else torch.zeros(0, dim or 0, device=device)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    return f, lab, ds.classes


@torch.no_grad()
def online_knn(backbone: nn.Module, root: str | Path, prep: Preprocessing,
               device: torch.device, autocast_dtype: torch.dtype | None = None, *,
               batch_size: int = 64, num_workers: int = 0, k: int = 20, T: float = 0.07
               ) -> dict[str, float]:
    """Weighted k-NN accuracy of ``backbone``'s features, ``root/train`` -> ``root/val``,
    computed by all processes together (call it on every process).

    Returns ``{"knn_top1", "knn_top5", "knn_k", "knn_train", "knn_val"}`` (percentages,
    the ``k`` used, and the image counts over all processes), the same on every process.
    Raises on every process when any process fails (:class:`OnlineKnnError` on the
    others)."""
    from ..eval.knn import knn_classify

    root = Path(root)
    was_training = backbone.training
    backbone.eval()
    try:
        def embed_both():
            return [_embed_share(backbone, root / split, prep, device, autocast_dtype,
                                 batch_size, num_workers) for split in ("train", "val")]
        (tr_f, tr_y, tr_classes), (va_f, va_y, va_classes) = _agree("features", embed_both)
    finally:
        backbone.train(was_training)

    def remap():
        index = {name: i for i, name in enumerate(tr_classes)}
        missing = [c for c in va_classes if c not in index]
        if missing:
            raise ValueError(f"{root}/val has classes missing from {root}/train: "
                             f"{', '.join(missing[:5])}")
        return torch.tensor([index[c] for c in va_classes], device=device)
    table = _agree("classes", remap)

    train_feats = _gather_rows(tr_f)     # every process: all training features, on device
    train_labels = _gather_rows(tr_y)
    n_train = train_feats.shape[0]
    kk = min(k, n_train)

    def vote():
        hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, count
        if va_f.shape[0] and n_train:
            scores = knn_classify(train_feats, train_labels, va_f, k=kk, T=T,
                                  num_classes=len(tr_classes))
            y = table[va_y]
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits[0] = (top[:, 0] == y).sum()
            hits[1] = (top == y[:, None]).any(dim=1).sum()
        hits[2] = va_f.shape[0]
        return hits
    hits = D.all_reduce_sum(_agree("vote", vote))
    n_val = int(hits[2].item())
    if n_val == 0 or n_train == 0:
        raise ValueError(f"online k-NN: no readable images in {root}/train or {root}/val")
    return {"knn_top1": 100.0 * float(hits[0]) / n_val, "knn_top5": 100.0 * float(hits[1]) / n_val,
            "knn_k": kk, "knn_train": int(n_train), "knn_val": n_val}
