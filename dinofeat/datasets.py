"""Labelled image folders, and small public datasets that are available offline.

:func:`image_folder` is dinofeat's one class-folder reader: it lists an ImageFolder tree
(``root/<class>/<images>``) as :class:`LabeledImages`, for the evaluations, the training
loop's online k-NN and the demo alike. Classes are the sorted names of the sub-folders of
``root`` (hidden ones skipped), class ``i`` being the ``i``-th name, as torchvision's
``ImageFolder`` numbers them; images are found recursively under each class folder with
:func:`dinofeat.images.list_images`. Any number of classes and images works, including
classes with a single image. :class:`LabeledImageDataset` reads such a listing as a torch
``Dataset``.

Fashion-MNIST (70,000 real 28x28 grayscale photos of clothing, 10 classes) ships as a
Debian package (``apt-get install dataset-fashion-mnist``) holding the four IDX files
under ``/usr/share/datasets/fashion-mnist/``. :func:`load_fashion_mnist` reads them into
numpy arrays; :func:`export_image_folder` writes them as PNG files in an ImageFolder tree,
the layout ``dinofeat train`` and ``dinofeat eval knn`` read.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .utils import atomic_path, get_logger

__all__ = ["LabeledImages", "LabelledImages", "LabeledImageDataset", "image_folder",
           "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist",
           "export_image_folder"]

log = get_logger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("DINOFEAT_FASHION_MNIST",
                                        "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle_boot")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class LabeledImages:
    """Images with integer labels: ``paths[i]`` belongs to ``classes[labels[i]]``."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files, once embedded

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, keep: Sequence[int]) -> "LabeledImages":
        """The images at indices ``keep`` (same classes)."""
        return LabeledImages(self.root, [self.paths[i] for i in keep],
                             [self.labels[i] for i in keep], self.classes, list(self.skipped))


def image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> LabeledImages:
    """List an ImageFolder tree.

    Args:
        root: folder whose sub-folders are the classes.
        classes: the class list to number against (e.g. the training set's, when reading a
            validation set); a sub-folder not in it is an error, classes without a folder
            here simply have no images.

    Raises ``FileNotFoundError``/``NotADirectoryError`` for a bad ``root`` and
    ``ValueError`` when it has no class folders or no images at all.
    """
    from .images import list_images
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"{root}: no class sub-folders (expected the ImageFolder layout "
                         f"{root}/<class name>/<image files>)")
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%s: %d file(s) directly in the folder are not in a class sub-folder and "
                    "are ignored (e.g. %s)", root, len(loose), loose[0])
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ValueError(f"{root}: class folder(s) {', '.join(unknown[:5])} do not exist in "
                             f"the training set ({len(classes)} classes)")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for name in found:
        files = list_images(root / name)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    if empty:
        log.warning("%s: %d class folder(s) hold no images: %s", root, len(empty),
                    ", ".join(empty[:5]))
    if not paths:
        raise ValueError(f"{root}: no image files in its {len(found)} class folder(s)")
    return LabeledImages(root, paths, labels, list(classes))


#: The British spelling, as the training package used to write it: the same class.
LabelledImages = LabeledImages


class LabeledImageDataset(torch.utils.data.Dataset):
    """``(uint8 image [3, h, w], label, readable)`` for each image of a
    :class:`LabeledImages` (or of the folder ``images`` names). ``transform`` maps a
    ``uint8 [3, H, W]`` image to its evaluation size (e.g.
    :class:`dinofeat.images.ImageTransform`). An unreadable file gives a black
    ``size x size`` image and ``readable=False``, for the caller to drop: a loader keeps
    going and the positions stay aligned with the labels."""

    def __init__(self, images: "LabeledImages | str | os.PathLike",
                 transform: Callable[[torch.Tensor], torch.Tensor], size: int):
        self.images = images if isinstance(images, LabeledImages) else image_folder(images)
        self.transform = transform
        self.size = size

    @property
    def paths(self) -> list[Path]:
        return self.images.paths

    @property
    def labels(self) -> list[int]:
        return self.images.labels

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        from .images import ImageReadError, read_image
        label = self.images.labels[index]
        try:
            return self.transform(read_image(self.images.paths[index])), label, True
        except ImageReadError:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, False


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: truncated IDX file ({len(body)} of {expected} data bytes)")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000 or "test": 10,000) as
    ``(images uint8 [N, 28, 28], labels int64 [N])``."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: install Fashion-MNIST with `apt-get install "
                "dataset-fashion-mnist` or set DINOFEAT_FASHION_MNIST to a folder with the "
                "four IDX .gz files")
    images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{img_path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def export_image_folder(images: np.ndarray, labels: np.ndarray | None, out_dir: str | os.PathLike,
                        class_names: tuple[str, ...] = FASHION_MNIST_CLASSES,
                        prefix: str = "img") -> Path:
    """Write ``images`` (uint8 [N, H, W] or [N, H, W, 3]) as PNG files:
    ``out_dir/<class>/<prefix>_<i>.png`` when labels are given, else ``out_dir/<prefix>_<i>.png``.
    Files already present are kept (the export resumes); returns ``out_dir``."""
    from PIL import Image

    out = Path(out_dir)
    width = len(str(len(images) - 1))
    for i, img in enumerate(images):
        folder = out / class_names[int(labels[i])] if labels is not None else out
        path = folder / f"{prefix}_{i:0{width}d}.png"
        if path.exists():
            continue
        # a fresh, unpredictable temporary name: a link planted at a fixed name is never
        # written through
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    return out
