"""Training images: where they come from, in which order, and what happens to bad files.

A training source is one of

* a folder tree in ImageFolder layout (``root/<class>/<image>``; classes are ignored),
* a flat folder (searched recursively), or
* a ``.txt`` file list: one image path per line (relative paths are relative to the list's
  folder; blank lines and lines starting with ``#`` are ignored).

Unreadable images never stop a run: :class:`TrainImages` returns the next readable image
instead and reports what failed with the sample, so the loop can log each bad file once
and count them per epoch, even when the images are decoded in worker processes.

Exact resumption: the order of the images comes from :class:`ResumableDistributedSampler`
(a ``DistributedSampler`` that can start in the middle of an epoch), and the random crops
of each image are drawn from a generator seeded by ``(seed, epoch, index)``. The samples of
an epoch therefore do not depend on worker processes, on which process decoded what, or on
whether the run was interrupted: a resumed run sees exactly the images and crops the
uninterrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..datasets import LabeledImageDataset, LabeledImages, LabelledImages, image_folder
from ..images import ImageReadError, list_images, open_image

__all__ = ["resolve_image_list", "labelled_image_folder", "TrainImages", "LabeledImages",
           "LabelledImages", "LabeledImageDataset", "image_folder",
           "ResumableDistributedSampler", "sample_seed", "collate_crops", "BatchFailures",
           "build_train_loader", "MAX_REPLACEMENT_TRIES"]

#: How many following images :class:`TrainImages` tries before giving up on a sample.
MAX_REPLACEMENT_TRIES = 64


def resolve_image_list(source: str | os.PathLike) -> list[Path]:
    """The image files of a training source (folder tree, flat folder or ``.txt`` list).

    Raises ``FileNotFoundError`` for a missing source and ``ValueError`` when it holds no
    image."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"training data not found: {src}")
    if src.is_dir():
        paths = list_images(src)
        if not paths:
            raise ValueError(f"no images found under {src} (looked recursively for "
                             ".jpg/.png/.webp/... files)")
        return paths
    if src.suffix.lower() != ".txt":
        raise ValueError(f"training data {src} is a file but not a .txt list of images; "
                         "give a folder or a .txt file with one image path per line")
    paths = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else src.parent / p)
    if not paths:
        raise ValueError(f"image list {src} holds no paths")
    return paths


def labelled_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """``(paths, labels, class_names)`` of an ImageFolder tree ``root/<class>/...``
    (:func:`dinofeat.datasets.image_folder`, the package's one class-folder reader)."""
    found = image_folder(root)
    return found.paths, found.labels, found.classes


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random crops of image ``index`` in ``epoch`` (63-bit)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch (CPU), Python and numpy global RNGs for the block, then put back their
    previous states: augmentations draw from them, the caller's stream stays untouched."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TrainImages(Dataset):
    """Images of a training source passed through ``transform`` (the multi-crop
    augmentation: ``PIL.Image -> list of [3, h, w] tensors``).

    ``dataset[(index, seed)]`` (what :class:`ResumableDistributedSampler` yields) draws the
    augmentation from ``seed``; ``dataset[index]`` uses the global RNGs. Each item is
    ``(crops, failures)``: ``failures`` lists ``"path: reason"`` for every unreadable file
    met while producing it (it was replaced by the next readable image).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike],
                 transform: Callable[[Any], Any]):
        if isinstance(source, (str, os.PathLike)):
            self.source = str(source)
            self.paths = resolve_image_list(source)
        else:
            self.source = "<list>"
            self.paths = [Path(p) for p in source]
            if not self.paths:
                raise ValueError("empty list of training images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> tuple[Any, list[str]]:
        failures: list[str] = []
        n = len(self.paths)
        for step in range(min(n, MAX_REPLACEMENT_TRIES)):
            path = self.paths[(index + step) % n]
            try:
                return open_image(path), failures
            except ImageReadError as e:
                failures.append(f"{path}: {e.reason}")
        raise RuntimeError(f"{self.source}: {len(failures)} images in a row could not be "
                           f"read, starting at {self.paths[index]}:\n  " +
                           "\n  ".join(failures))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[list[torch.Tensor], list[str]]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        img, failures = self._read(index)
        if seed is None:
            crops = self.transform(img)
        else:
            with _seeded_rngs(seed):
                crops = self.transform(img)
        return list(crops), failures


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, sample seed)`` pairs, able to begin an
    epoch after ``start`` samples (for a mid-epoch resume).

    The shuffled order of an epoch depends only on ``seed`` and the epoch
    (:meth:`set_epoch`), so it is the same after a restart."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples (of this process) of the current epoch."""
        if start < 0 or start > self.num_samples:
            raise ValueError(f"start {start} outside [0, {self.num_samples}]")
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class BatchFailures(list):
    """The ``"path: reason"`` of every unreadable file met while making a batch (a file
    tried as a replacement is listed too), and ``replaced``: how many samples of the batch
    had an unreadable image of their own. A sample's file is visited once per epoch, so
    summing ``replaced`` counts each unreadable file once, whatever else was tried."""

    replaced: int = 0


def collate_crops(batch: list[tuple[list[torch.Tensor], list[str]]]
                  ) -> tuple[list[torch.Tensor], BatchFailures]:
    """``[(crops, failures)] * B`` -> ``(crops stacked per view [B, 3, h, w], failures)``."""
    n_views = len(batch[0][0])
    crops = [torch.stack([item[0][v] for item in batch]) for v in range(n_views)]
    failures = BatchFailures(f for item in batch for f in item[1])
    # a sample has failures only when its own image was unreadable (the first listed)
    failures.replaced = sum(1 for item in batch if item[1])
    return crops, failures


def build_train_loader(dataset: TrainImages, *, batch_size: int, num_workers: int = 8,
                       seed: int = 0, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, collate_fn: Callable | None = None
                       ) -> tuple[DataLoader,
                                                          ResumableDistributedSampler]:
    """DataLoader + sampler for training: shuffled, sharded over ``world_size`` processes,
    incomplete last batches dropped, workers kept alive between epochs.

    The loader has its own random generator, so creating its iterator does not advance
    the global torch RNG (which drop-path uses): needed for an exact resume. ``collate_fn``
    replaces :func:`collate_crops` (e.g. an augmentation of whole batches)."""
    if len(dataset) < batch_size * world_size:
        raise ValueError(f"{dataset.source}: {len(dataset)} images are fewer than one batch "
                         f"({batch_size} per process x {world_size} processes); lower "
                         "--batch-size or add images")
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
    gen = torch.Generator()
    gen.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                        collate_fn=collate_fn or collate_crops, persistent_workers=num_workers > 0,
                        generator=gen, prefetch_factor=2 if num_workers > 0 else None)
    return loader, sampler
