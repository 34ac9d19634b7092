"""Reading small public datasets that are available offline.

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

import numpy as np

from .utils import atomic_path

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist",
           "export_image_folder"]

FASHION_MNIST_DIR = Path(os.environ.get("DINOFEAT_FASHION_MNIST",
                                        "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle_boot")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


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
