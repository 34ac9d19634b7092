"""Weighted k-nearest-neighbour classification of DINO features (paper section 3.7).

For every test feature the ``k`` most similar training features by cosine similarity
``s_i`` vote for their class with weight ``exp(s_i / T)``; the class scores are the sums
of the votes, and the prediction is the class with the largest score::

    score[c] = sum_{i in top-k} exp(s_i / T) * [label_i == c]

Features are **L2-normalised inside** :func:`knn_classify` (so cosine similarity is a dot
product); passing already-normalised features changes nothing. The release normalises
before calling its k-NN routine; normalising inside makes the function safe to call on raw
features too.

Memory stays bounded on CPU and GPU whatever the sizes: test rows are processed
``chunk_size`` at a time, and training features ``train_chunk_size`` at a time with a
running top-k merge, so at most ``chunk_size x train_chunk_size`` similarities exist at
once. Everything runs on the device of ``test_feats`` (CUDA tensors stay on the GPU), where an
L2-normalised copy of the training features is kept during the call.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_classify", "knn_accuracy", "knn_topk", "evaluate_knn", "weighted_vote"]


def _as_labels(train_labels, n_train: int) -> torch.Tensor:
    labels = torch.as_tensor(train_labels)
    if labels.ndim != 1 or labels.shape[0] != n_train:
        raise ValueError(f"train_labels must be a 1-D tensor with one label per training "
                         f"feature ({n_train}), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"train_labels must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    if n_train and int(labels.min()) < 0:
        raise ValueError(f"train_labels must be >= 0, found {int(labels.min())}")
    return labels


@torch.no_grad()
def knn_topk(train_feats: torch.Tensor, test_feats: torch.Tensor, k: int, *,
             chunk_size: int = 1024, train_chunk_size: int = 65536,
             normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar training rows of every test row.

    Args:
        train_feats: ``[N_train, D]``.
        test_feats: ``[N_test, D]``; the computation runs on its device.
        k: neighbours wanted; clipped to ``N_train``.
        chunk_size: test rows per step. train_chunk_size: training rows per step.
        normalize: L2-normalise both sides first (cosine similarity).

    Returns:
        ``(similarities [N_test, k'], indices [N_test, k'])`` sorted by decreasing
        similarity, ``k' = min(k, N_train)``.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D]; got train {tuple(train_feats.shape)} "
                         f"and test {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_feats.shape[1]}, "
                         f"test {test_feats.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1 or train_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    device = test_feats.device
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    k = min(k, n_train)
    sims_out = torch.empty(n_test, k, device=device)
    idx_out = torch.empty(n_test, k, dtype=torch.long, device=device)
    if n_test == 0 or k == 0:
        return sims_out, idx_out
    train_blocks = []
    for t0 in range(0, n_train, train_chunk_size):
        block = train_feats[t0:t0 + train_chunk_size].to(device, torch.float32)
        train_blocks.append((t0, F.normalize(block, dim=1) if normalize else block))
    for q0 in range(0, n_test, chunk_size):
        q = test_feats[q0:q0 + chunk_size].to(torch.float32)
        if normalize:
            q = F.normalize(q, dim=1)
        best_s = best_i = None
        for t0, block in train_blocks:
            s = q @ block.T  # [chunk, block]
            kk = min(k, s.shape[1])
            s, i = s.topk(kk, dim=1)
            i = i + t0
            if best_s is None:
                best_s, best_i = s, i
            else:
                s = torch.cat([best_s, s], dim=1)
                i = torch.cat([best_i, i], dim=1)
                best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
                best_i = i.gather(1, pos)
        sims_out[q0:q0 + q.shape[0]] = best_s
        idx_out[q0:q0 + q.shape[0]] = best_i
    return sims_out, idx_out


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, k: int = 20, T: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024, *,
                 train_chunk_size: int = 65536, normalize: bool = True) -> torch.Tensor:
    """DINO's weighted k-NN vote (section 3.7): class scores ``[N_test, C]``.

    Args:
        train_feats: ``[N_train, D]`` features of the labelled set.
        train_labels: ``[N_train]`` integer class indices in ``[0, C)``.
        test_feats: ``[N_test, D]``; the result is on its device.
        k: neighbours that vote (20 in the paper); more than ``N_train`` means all of them.
        T: temperature of the vote weights ``exp(s / T)`` (0.07).
        num_classes: ``C``; default ``max(train_labels) + 1``.
        chunk_size: test rows per step (bounds memory). train_chunk_size: training rows
            per step.
        normalize: L2-normalise the features first (default; see the module docstring).

    Returns:
        ``[N_test, C]`` float32 scores; ``scores.argmax(1)`` is the prediction and
        ``scores.topk(5)`` the top-5. Classes no neighbour voted for score 0.
    """
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    labels = _as_labels(train_labels, train_feats.shape[0])
    if num_classes is None:
        if labels.numel() == 0:
            raise ValueError("num_classes is needed when there are no training features")
        num_classes = int(labels.max()) + 1
    elif labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"train_labels contains class {int(labels.max())} but "
                         f"num_classes={num_classes}")
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        return torch.zeros(test_feats.shape[0], num_classes, device=test_feats.device)
    # Neighbours of every test row (the training features are prepared once), then the
    # votes; sims/idx are only [N_test, k].
    sims, idx = knn_topk(train_feats, test_feats, k, chunk_size=chunk_size,
                         train_chunk_size=train_chunk_size, normalize=normalize)
    return _vote(sims, idx, labels, T, num_classes)


def weighted_vote(sims: torch.Tensor, classes: torch.Tensor, T: float, num_classes: int
                  ) -> torch.Tensor:
    """DINO's vote: class scores ``[N, C]`` (dtype of ``sims``) from the neighbours'
    cosine similarities ``sims [N, k]`` and class indices ``classes [N, k]``, each
    neighbour adding ``exp(s / T)`` to its class. A class index of -1 marks a missing
    neighbour (it votes for nothing). The one implementation of the vote:
    :func:`knn_classify` and :meth:`dinofeat.KNNIndex.classify` both use it."""
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    classes = classes.to(sims.device).long()
    valid = classes >= 0
    weights = torch.where(valid, (sims / T).exp(), torch.zeros((), dtype=sims.dtype,
                                                               device=sims.device))
    scores = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype, device=sims.device)
    return scores.scatter_add_(1, classes.clamp(min=0), weights)


def _vote(sims: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, T: float,
          num_classes: int) -> torch.Tensor:
    """Class scores ``[N, C]`` from the neighbours' similarities and indices ``[N, k]``."""
    return weighted_vote(sims, labels.to(sims.device)[idx], T, num_classes)


def knn_accuracy(scores: torch.Tensor, labels: torch.Tensor,
                 topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies in percent: ``{k: 100 * fraction of rows whose true label is among
    the k highest scores}``. ``k`` larger than the number of classes counts every row as
    correct. Ties between scores are broken by ``torch.topk`` (lowest index first on CPU)."""
    labels = torch.as_tensor(labels, device=scores.device).long()
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [N, C] and labels [N]; got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    n = scores.shape[0]
    out: dict[int, float] = {}
    if n == 0:
        return {int(k): float("nan") for k in topk}
    kmax = min(max(topk), scores.shape[1])
    pred = scores.topk(kmax, dim=1).indices
    hit = pred == labels[:, None]
    for k in topk:
        out[int(k)] = 100.0 * hit[:, :min(int(k), kmax)].any(dim=1).float().mean().item()
    return out


def evaluate_knn(model, train_dir, val_dir, *, ks: Sequence[int] = (10, 20, 100, 200),
                 T: float = 0.07, cache_dir=None, batch_size: int = 64,
                 num_workers: int | None = None, precision: str = "fp32",
                 chunk_size: int = 1024, progress: bool = True) -> dict:
    """k-NN evaluation of ``model`` on two ImageFolder trees (section 3.7).

    [CLS] features of the model's own preprocessing (resize 256, centre crop 224 for the
    zoo models), cached on disk (:func:`dinofeat.eval.features.cached_embed`;
    ``cache_dir=False`` disables the cache); classes are the training folder's
    sub-folders. Returns a JSON-able dict with top-1/top-5 (percent) for each ``k``.
    Unreadable images are skipped and counted.
    """
    from .features import cached_embed
    from .folders import image_folder
    train = image_folder(train_dir)
    val = image_folder(val_dir, classes=train.classes)
    kw = dict(pool="cls", normalize=True, batch_size=batch_size, num_workers=num_workers,
              precision=precision, progress=progress)
    tr_x, tr_y, tr_skip, tr_file = cached_embed(model, train.paths, train.labels, train.root,
                                                cache_dir=cache_dir, **kw)
    va_x, va_y, va_skip, va_file = cached_embed(model, val.paths, val.labels, val.root,
                                                cache_dir=cache_dir, **kw)
    if T <= 0 or not ks or min(ks) < 1:
        raise ValueError(f"need T > 0 and every k >= 1, got T={T}, ks={list(ks)}")
    # The neighbours of the largest k once; each k uses its first k columns (sorted).
    sims, idx = knn_topk(tr_x, va_x, max(int(k) for k in ks), chunk_size=chunk_size)
    rows = []
    for k in ks:
        scores = _vote(sims[:, :int(k)], idx[:, :int(k)], tr_y, T, train.num_classes)
        acc = knn_accuracy(scores, va_y, topk=(1, 5))
        rows.append({"k": int(k), "top1": acc[1], "top5": acc[5]})
    return {
        "task": "knn", "model": model.describe(), "T": T,
        "train": {"root": str(train.root), "images": len(tr_y), "skipped": len(tr_skip),
                  "classes": train.num_classes, "cache": str(tr_file) if tr_file else None},
        "val": {"root": str(val.root), "images": len(va_y), "skipped": len(va_skip),
                "cache": str(va_file) if va_file else None},
        "results": rows,
    }
