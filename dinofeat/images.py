"""Reading images of every kind, preprocessing them, and batching them.

One reader is used everywhere in dinofeat (embedding, attention maps, the index, training
data): :func:`open_image` gives an RGB ``PIL.Image`` and :func:`read_image` an RGB
``uint8`` tensor ``[3, H, W]``; both honour EXIF orientation, refuse decompression bombs
and raise :class:`ImageReadError` (naming the file) for anything they cannot decode.

Colour conventions (every PIL mode ends up as 8-bit RGB):

* ``L``/``1``/``P``/``CMYK``/``YCbCr``/``LAB``/``HSV``: Pillow's own conversion to RGB.
* Transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a ``tRNS`` colour) is
  composited **on white**: transparent regions look as they do in a browser or a file
  viewer, which is how people saw the photo they put in the collection.
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``, 16-bit PNGs) are scaled from the
  0-65535 range to 0-255 (``round(v / 257)``, clipped); 16-bit RGB PNGs keep their high
  byte (Pillow's and torchvision's behaviour). Float images (``F``) are taken to be in
  [0, 1] when they lie in it, else in [0, 255], and are clipped.

Preprocessing (:class:`ImageTransform`) follows a model's
:class:`~dinofeat.zoo.Preprocessing` and works on ``uint8`` tensors until the very end:
resizing happens **on tensors** (torchvision, bicubic with antialiasing, which matches
PIL's bicubic resize of the original DINO code to within a few grey levels; the tests
check this), and only the last step (:func:`normalize_batch`) turns a batch into floats,
on the model's device.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageReadError",
    "open_image",
    "list_images",
    "to_rgb",
]

#: File extensions :func:`list_images` picks up (lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".heif",
})

#: Images with more pixels than this are refused as decompression bombs (Pillow's limit,
#: about 89 megapixels). Change it with ``dinofeat.images.MAX_PIXELS = ...`` or pass
#: ``max_pixels=`` to the readers.
MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

_WHITE = (255, 255, 255)


class ImageReadError(OSError, ValueError):
    """An image file could not be read. ``path`` and ``reason`` say which and why.

    Subclasses both ``OSError`` (it is a file problem) and ``ValueError`` (bad input), so
    ``except OSError`` and ``except ValueError`` both catch it.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        where = self.path if self.path is not None else "<image>"
        super().__init__(f"cannot read image {where}: {reason}")

    def __str__(self) -> str:  # OSError's own __str__ would show "[Errno ...]" forms
        return self.args[0]

    def __reduce__(self):  # picklable, so that DataLoader workers can send it back
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------- listing
def list_images(folder: str | os.PathLike,
                extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under ``folder``, recursively, sorted by path.

    Files are recognised by extension (case-insensitive, :data:`IMAGE_EXTENSIONS` by
    default); hidden files and folders (names starting with ``.``) are skipped. Sorting is
    by the path relative to ``folder``, compared folder by folder, so the order is the
    same on every machine. Symbolic links to files are followed, links to folders are not
    (no cycles). Raises ``FileNotFoundError``/``NotADirectoryError`` for a bad ``folder``.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        rel = base.relative_to(root).parts
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            p = base / name
            if p.is_file():
                found.append((rel + (name,), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


# --------------------------------------------------------------------- decoding
def _check_size(img: Image.Image, path, max_pixels: int | None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"empty image ({w}x{h})")
    if limit and w * h > limit:
        raise ImageReadError(
            path, f"{w}x{h} = {w * h} pixels is over the limit of {limit} pixels "
                  "(possible decompression bomb; raise dinofeat.images.MAX_PIXELS to allow it)")


def _open_pil(data: bytes, path, max_pixels: int | None) -> Image.Image:
    """Open (header only) and size-check an image from its bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"possible decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ImageReadError(path, _reason(e)) from None
    _check_size(img, path, max_pixels)
    return img


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image file (unknown or damaged format)"
    text = str(e).strip() or type(e).__name__
    return text.replace(" <_io.BytesIO object at", "").split(" at 0x")[0]


def _read_bytes(path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not a file") from None
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as e:
        raise ImageReadError(path, e.strerror or str(e)) from None
    if not data:
        raise ImageReadError(path, "empty file")
    return data


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit ``RGB`` (see the module docstring for the
    rules); transparent pixels are composited on ``background`` (white by default)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            finite = arr[np.isfinite(arr)]
            scale = 1.0 if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else 255.0
            gray = _scale_to_uint8(np.nan_to_num(arr), scale)
        else:
            gray = _scale_to_uint8(arr, 65535.0)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" or mode == "PA" or "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Read an image file as an RGB ``PIL.Image``: decoded fully, EXIF-rotated, every
    mode converted (:func:`to_rgb`). Raises :class:`ImageReadError` naming the file for
    a missing, empty, damaged or over-large (decompression bomb) file."""
    data = _read_bytes(path)
    img = _open_pil(data, path, max_pixels)
    return _decode_pil(img, path, background)


def _decode_pil(img: Image.Image, path, background=_WHITE) -> Image.Image:
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img, background)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(path, _reason(e)) from None
