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
import time
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
    "open_label_image",
    "read_image",
    "list_images",
    "to_rgb",
    "pil_to_tensor",
    "as_uint8_image",
    "check_in_memory_image",
    "rgb_to_gray3",
    "ImageTransform",
    "normalize_batch",
    "ImageSource",
    "SkippedImage",
    "resolve_images",
    "ImageBatch",
    "DECODE_MODES",
    "DecodePlan",
    "plan_decoding",
    "split_cores",
    "cpu_cores",
    "image_loader",
    "ThreadedBatches",
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

#: How :func:`image_loader` decodes files: ``"reduced"`` decodes a JPEG at the smallest
#: of libjpeg's 1/2, 1/4, 1/8 scales that is still at least the size the preprocessing
#: resizes to (only where that size is at most half the image); ``"full"`` decodes every
#: pixel. Both end with the same exact resize.
DECODE_MODES = ("reduced", "full")


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


def open_label_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Read an image file in its own mode (no conversion, no EXIF rotation), for label
    maps and masks whose palette indices are the data; the same decompression-bomb limit
    and :class:`ImageReadError` as :func:`open_image`."""
    img = _open_pil(_read_bytes(path), path, max_pixels)
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(path, _reason(e)) from None
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> ``uint8`` tensor ``[3, H, W]``."""
    arr = np.asarray(img if img.mode == "RGB" else to_rgb(img))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _draft(img: Image.Image, reduce_to: Callable[[int, int], tuple[int, int]] | None) -> bool:
    """Ask Pillow to decode a JPEG at a reduced DCT scale (1/2, 1/4 or 1/8): the smallest
    one whose result is still at least ``reduce_to(height, width)``, and only when that is
    at most half the image in both directions. Returns whether a reduction was set up."""
    if reduce_to is None or img.format != "JPEG":
        return False
    w, h = img.size
    need_h, need_w = reduce_to(h, w)
    if need_h < 1 or need_w < 1 or 2 * need_h > h or 2 * need_w > w:
        return False
    try:  # Pillow picks the largest scale s with w // s >= need_w and h // s >= need_h
        img.draft(None, (int(need_w), int(need_h)))
    except Exception:  # noqa: BLE001 - an odd JPEG: decode it in full, as before
        return False
    return img.size != (w, h)


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               reduce_to: Callable[[int, int], tuple[int, int]] | None = None
               ) -> torch.Tensor:
    """Read an image file as an RGB ``uint8`` tensor ``[3, H, W]`` (EXIF-rotated).

    Plain 8-bit RGB/greyscale JPEGs and PNGs (and 16-bit RGB PNGs) are decoded by
    ``torchvision.io.decode_image`` (libjpeg-turbo/libpng straight into a tensor);
    everything else (transparency, palettes, CMYK, 16-bit greyscale, other formats) goes
    through Pillow and :func:`to_rgb`. Both paths give the same pixels for the files the
    fast one takes (tested). Raises :class:`ImageReadError` naming the file.

    ``reduce_to``: a function ``(height, width) -> (height, width)`` giving the smallest
    size the caller will resize the image to (e.g. :meth:`ImageTransform.decode_size`).
    When it is at most half a JPEG's size, the JPEG is decoded by Pillow at a reduced
    DCT scale (libjpeg's scaled decoding: 1/2, 1/4 or 1/8, whichever is the smallest
    still at least that size), which costs a fraction of a full decode; the result is
    then smaller than the file's size. The size limit (:data:`MAX_PIXELS`) applies to the
    file's full size; EXIF rotation, modes and errors are as for full decoding."""
    data = _read_bytes(path)
    img = _open_pil(data, path, max_pixels)
    if _draft(img, reduce_to):
        return pil_to_tensor(_decode_pil(img, path))
    if img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") \
            and "transparency" not in img.info:
        from torchvision.io import ImageReadMode, decode_image
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
                warnings.simplefilter("ignore", DeprecationWarning)
                t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            t = None  # damaged: Pillow below gives the error message (or copes)
        if t is not None:
            if t.dtype != torch.uint8:  # 16-bit PNG: keep the high byte, as Pillow does
                t = (t.to(torch.int32) >> 8).to(torch.uint8)
            return t.contiguous()
    return pil_to_tensor(_decode_pil(img, path))


def check_in_memory_image(obj: Any, *, name: str = "image") -> None:
    """Raise ``ValueError``/``TypeError`` unless :func:`as_uint8_image` accepts ``obj``
    (cheap: looks at type, dtype and shape only)."""
    if isinstance(obj, Image.Image):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise ValueError(f"{name}: arrays must be uint8 H x W x C images (0-255), got "
                             f"dtype {obj.dtype}; convert with (a * 255).round().astype('uint8')")
        shape = obj.shape + ((1,) if obj.ndim == 2 else ())
        if len(shape) != 3 or shape[2] not in (1, 3, 4) or 0 in shape[:2]:
            raise ValueError(f"{name}: arrays must be H x W, H x W x 1, H x W x 3 or "
                             f"H x W x 4, got shape {tuple(obj.shape)}")
        return
    if isinstance(obj, torch.Tensor):
        if obj.dtype != torch.uint8 or obj.ndim != 3 or obj.shape[0] not in (1, 3) \
                or 0 in obj.shape[1:]:
            raise ValueError(f"{name}: image tensors must be uint8 [3, H, W] or [1, H, W] "
                             f"(channels first), got {obj.dtype} {tuple(obj.shape)}")
        return
    raise TypeError(f"{name}: cannot use a {type(obj).__name__} as an image (give a path, "
                    "a folder, a PIL image, a uint8 numpy array or a tensor)")


def as_uint8_image(obj: Any, *, name: str = "image") -> torch.Tensor:
    """An in-memory image -> RGB ``uint8`` tensor ``[3, H, W]``.

    Accepts a ``PIL.Image`` (any mode, EXIF orientation applied), a ``numpy`` ``uint8``
    array ``H x W`` (grey), ``H x W x 1``, ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA,
    composited on white), or a ``uint8`` tensor ``[3, H, W]`` / ``[1, H, W]``.
    """
    check_in_memory_image(obj, name=name)
    if isinstance(obj, Image.Image):
        try:
            return pil_to_tensor(to_rgb(ImageOps.exif_transpose(obj) or obj))
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(name, _reason(e)) from None
    if isinstance(obj, np.ndarray):
        if obj.ndim == 2:
            obj = obj[:, :, None]
        if obj.shape[2] == 4:
            return pil_to_tensor(to_rgb(Image.fromarray(np.ascontiguousarray(obj), "RGBA")))
        arr = np.ascontiguousarray(obj)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
        return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()
    obj = obj.detach().cpu()
    return obj.expand(3, -1, -1).contiguous() if obj.shape[0] == 1 else obj.contiguous()


# ---------------------------------------------------------------- preprocessing
def rgb_to_gray3(img: torch.Tensor) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB -> ``uint8 [3, H, W]`` grey repeated three times, with
    Pillow's ``convert("L")`` integer formula (ITU-R 601-2 luma), so it matches exactly."""
    r, g, b = img.to(torch.int32).unbind(0)
    gray = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)
    return gray.unsqueeze(0).expand(3, -1, -1).contiguous()


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


class ImageTransform:
    """A model's preprocessing on ``uint8`` tensors: ``[3, H, W]`` -> ``[3, h, w]``.

    ``mode="dino"``: resize the short side to ``resize_size`` (bicubic, antialiased),
    centre-crop ``crop_size`` (the paper's 256 -> 224). ``size`` sets the crop and scales
    the resize with it (``resize = round(size * resize_size / crop_size)``).

    ``mode="whole"``: the whole image, resized so that its long side is ``size``
    (default ``crop_size``), each side then rounded down to a multiple of the patch size
    (at least one patch); nothing is cropped, the aspect ratio changes by under a patch.

    ``grayscale=True`` turns the image grey (three equal channels) before resizing.
    Normalisation is not done here: see :func:`normalize_batch`.
    """

    def __init__(self, preprocessing, patch_size: int | None = None, size: int | None = None):
        from .zoo import Preprocessing
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"expected a dinofeat.zoo.Preprocessing, got {type(preprocessing)}")
        if preprocessing.mode not in ("dino", "whole"):
            raise ValueError(f"preprocessing mode must be 'dino' or 'whole', got "
                             f"{preprocessing.mode!r}")
        if preprocessing.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {preprocessing.interpolation!r}; use one "
                             f"of {', '.join(_INTERPOLATIONS)}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.preprocessing = preprocessing
        self.patch_size = patch_size or 1
        if preprocessing.mode == "dino":
            self.crop_size = size or preprocessing.crop_size
            self.resize_size = (preprocessing.resize_size if size is None else
                                round(size * preprocessing.resize_size / preprocessing.crop_size))
        else:
            self.crop_size = None
            self.resize_size = size or preprocessing.crop_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the result for an ``height x width`` image."""
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        scale = self.resize_size / max(height, width)
        p = self.patch_size
        h = max(p, int(round(height * scale)) // p * p)
        w = max(p, int(round(width * scale)) // p * p)
        return h, w

    def decode_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the image right after resizing (before any crop) for an
        ``height x width`` input: the fewest pixels a decoder must deliver for the result
        to be the same resize from a larger image (:func:`read_image`'s ``reduce_to``).
        The same for an image and its transpose, so EXIF rotation does not change it."""
        if self.crop_size is None:
            return self.output_size(height, width)
        short, long_ = min(height, width), max(height, width)
        other = -(-self.resize_size * long_ // short)  # ceil: never below the target
        return (self.resize_size, other) if height <= width else (other, self.resize_size)

    def _resize(self, img: torch.Tensor, size: list[int]) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        mode = TF.InterpolationMode(self.preprocessing.interpolation)
        if mode in (TF.InterpolationMode.BILINEAR, TF.InterpolationMode.BICUBIC):
            return TF.resize(img, size, interpolation=mode, antialias=True)
        # torchvision's tensor resize has no lanczos/box/hamming: use Pillow for those.
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        target = (size[1], size[0]) if len(size) == 2 else None
        if target is None:
            h, w = img.shape[-2:]
            s = size[0] / min(h, w)
            target = (int(w * s), size[0]) if h <= w else (size[0], int(h * s))
        resample = getattr(Image.Resampling, self.preprocessing.interpolation.upper())
        return pil_to_tensor(pil.resize(target, resample))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.preprocessing.grayscale:
            img = rgb_to_gray3(img)
        if self.crop_size is not None:
            import torchvision.transforms.v2.functional as TF
            if min(img.shape[-2:]) != self.resize_size:
                img = self._resize(img, [self.resize_size])
            return TF.center_crop(img, [self.crop_size, self.crop_size]).contiguous()
        h, w = self.output_size(*img.shape[-2:])
        if (h, w) != tuple(img.shape[-2:]):
            img = self._resize(img, [h, w])
        return img.contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(mode={self.preprocessing.mode!r}, resize={self.resize_size}, "
                f"crop={self.crop_size}, patch={self.patch_size}, "
                f"grayscale={self.preprocessing.grayscale})")


def normalize_batch(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                    device: torch.device | str | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format
                    ) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> normalised ``float32 [B, 3, H, W]`` on ``device``:
    ``(x / 255 - mean) / std``. The last step of preprocessing, done where the model is
    (the ``uint8`` batch is four times smaller to move)."""
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects uint8 images, got {batch.dtype}")
    x = batch.to(device or batch.device, non_blocking=True).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    x.sub_(m).div_(s)  # x is a new float tensor: in place saves two passes over the batch
    return x.contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ImageSource:
    """One input image: ``key`` is its path (file inputs) or its position (in-memory
    inputs); ``item`` is what gets decoded (a ``Path``, ``PIL.Image``, array or tensor)."""

    key: Path | int
    item: Any

    @property
    def name(self) -> str:
        return str(self.key) if isinstance(self.key, Path) else f"image #{self.key}"


@dataclass(frozen=True)
class SkippedImage:
    """An input that could not be read: ``position`` in the input list, ``key`` (path or
    position) and ``reason``."""

    position: int
    key: Path | int
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


@dataclass
class ResolvedImages:
    """What :func:`resolve_images` made of the user's input."""

    sources: list[ImageSource]
    tensor: torch.Tensor | None = None  # an already-normalised float batch, used as is
    from_folder: bool = False  # a folder was given: unreadable files are skipped

    def __len__(self) -> int:
        return len(self.sources) if self.tensor is None else int(self.tensor.shape[0])


def _resolve_one(obj: Any, out: list, folder_flag: list[bool]) -> None:
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise FileNotFoundError(f"no image files in folder {p} (looked for "
                                        f"{', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)")
            out.extend(files)
            folder_flag[0] = True
        else:
            out.append(p)
    else:
        if isinstance(obj, torch.Tensor) and obj.dtype.is_floating_point:
            raise TypeError("float tensors are normalised model input and must come alone "
                            "as one [N, 3, H, W] batch, not inside a list")
        check_in_memory_image(obj, name=f"image #{len(out)}")
        out.append(obj)


def resolve_images(images: Any) -> ResolvedImages:
    """Turn any supported input into a list of :class:`ImageSource`.

    * a path to a file: that image; a path to a folder: :func:`list_images` of it (sorted,
      recursive); a list/tuple mixing paths, folders, PIL images, arrays, uint8 tensors;
    * a ``PIL.Image``; a ``uint8`` array ``H x W [x C]`` (one image) or ``N x H x W x C``
      (a batch);
    * a ``uint8`` tensor ``[3, H, W]`` (one image) or ``[N, 3, H, W]``: raw RGB pixels,
      preprocessed like files;
    * a **float** tensor ``[N, 3, H, W]`` (or ``[3, H, W]``) is taken to be model input
      that is **already preprocessed and normalised** (what ``model(x)`` takes): it is
      used as is, without resizing, cropping or normalisation.

    A single path that does not exist raises ``FileNotFoundError``.
    """
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point:
        t = images.unsqueeze(0) if images.ndim == 3 else images
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"a float image tensor must be [N, 3, H, W] (normalised model "
                             f"input), got shape {tuple(images.shape)}")
        return ResolvedImages([ImageSource(i, None) for i in range(t.shape[0])], tensor=t)
    if isinstance(images, (str, os.PathLike)) and not Path(images).exists():
        raise FileNotFoundError(f"no such image file or folder: {images}")
    items: list[Any] = []
    folder = [False]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        for t in images.unbind(0):
            _resolve_one(t, items, folder)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        for a in images:
            _resolve_one(a, items, folder)
    elif isinstance(images, (list, tuple)):
        for obj in images:
            _resolve_one(obj, items, folder)
    else:
        _resolve_one(images, items, folder)
    if not items:
        raise ValueError("no images given")
    sources = [ImageSource(it if isinstance(it, Path) else i, it) for i, it in enumerate(items)]
    return ResolvedImages(sources, from_folder=folder[0])


# ---------------------------------------------------------------------- loading
def load_source(source: ImageSource, *, max_pixels: int | None = None,
                reduce_to: Callable[[int, int], tuple[int, int]] | None = None
                ) -> torch.Tensor:
    """Decode one :class:`ImageSource` to an RGB ``uint8`` tensor ``[3, H, W]``
    (``reduce_to``: see :func:`read_image`; in-memory images are used as they are)."""
    if isinstance(source.item, Path):
        return read_image(source.item, max_pixels=max_pixels, reduce_to=reduce_to)
    return as_uint8_image(source.item, name=source.name)


@dataclass
class ImageBatch:
    """A batch as the loader delivers it: images grouped by size (one group in "dino"
    mode, possibly several in "whole" mode), still ``uint8``, plus the inputs that failed.

    ``groups``: ``[(positions, uint8 [B_g, 3, H_g, W_g]), ...]``, positions ascending
    within a group; ``failed``: ``[(position, reason), ...]``; ``positions``: every
    position of the batch in input order.
    """

    positions: list[int]
    groups: list[tuple[list[int], torch.Tensor]]
    failed: list[tuple[int, str]]

    def pin_memory(self) -> "ImageBatch":
        return ImageBatch(self.positions, [(p, t.pin_memory()) for p, t in self.groups],
                          self.failed)


def _reduce_fn(transform: Callable | None, decode: str):
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return getattr(transform, "decode_size", None) if decode == "reduced" else None


class _SourceDataset(torch.utils.data.Dataset):
    def __init__(self, sources: Sequence[ImageSource], transform: Callable | None,
                 max_pixels: int | None, decode: str = "reduced"):
        self.sources = sources
        self.transform = transform
        self.max_pixels = max_pixels
        self.reduce_to = _reduce_fn(transform, decode)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            img = load_source(self.sources[i], max_pixels=self.max_pixels,
                              reduce_to=self.reduce_to)
            if self.transform is not None:
                img = self.transform(img)
            return i, img, None
        except (ImageReadError, ValueError, TypeError) as e:
            return i, None, e.reason if isinstance(e, ImageReadError) else str(e)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    failed = []
    for i, img, err in items:
        if img is None:
            failed.append((i, err))
        else:
            by_shape.setdefault(tuple(img.shape), []).append((i, img))
    groups = [([i for i, _ in g], torch.stack([t for _, t in g])) for g in by_shape.values()]
    return ImageBatch([i for i, _, _ in items], groups, failed)


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodePlan:
    """How decoding and the model share the CPU cores, chosen by :func:`plan_decoding`
    from the measured ``decode_s`` and estimated ``model_s`` (core-seconds per image).

    ``mode="processes"``: ``workers`` decoding processes run alongside the model's
    ``threads`` intra-op threads. ``mode="turns"``: decoding and the model take turns on
    every core: each batch is decoded by ``workers`` threads of this process (Pillow and
    torch release the GIL while they work), then the model runs it with ``threads``
    threads (:class:`ThreadedBatches`)."""

    workers: int
    threads: int
    decode_s: float | None = None
    model_s: float | None = None
    cores: int = 1
    mode: str = "processes"

    @property
    def decode_share(self) -> float | None:
        if self.decode_s is None or self.model_s is None:
            return None
        return self.decode_s / max(self.decode_s + self.model_s, 1e-12)


def split_cores(cores: int, decode_s: float, model_s: float) -> tuple[int, int]:
    """``(workers, threads)`` for ``cores`` CPU cores when decoding one image costs
    ``decode_s`` and the model ``model_s`` core-seconds: the decoders get the share
    ``f = decode_s / (decode_s + model_s)`` of the cores, rounded up to whole processes
    (at least one, at most ``cores``), and the model keeps every core decoding does not
    fill for good (``cores - floor(cores * f)``, at least one). On 2 cores with the model
    dominating that is 1 worker and 2 model threads: the worker fills the model's gaps
    instead of taking a core from it."""
    cores = max(1, int(cores))
    f = decode_s / max(decode_s + model_s, 1e-12)
    workers = max(1, min(cores, math.ceil(cores * f - 1e-9)))
    threads = max(1, cores - math.floor(cores * f + 1e-9))
    return workers, threads


def decode_seconds(sources: Sequence[ImageSource], transform: Callable | None = None, *,
                   decode: str = "reduced", samples: int = 2,
                   max_pixels: int | None = None) -> float | None:
    """Measured seconds to decode and preprocess one image (one thread): the median of
    the first ``samples`` readable files of ``sources``; ``None`` when none could be read
    or the inputs are in memory (nothing to decode)."""
    reduce_to = _reduce_fn(transform, decode)
    times = []
    for src in sources[: max(samples * 2, samples)]:
        if not isinstance(src.item, Path):
            continue
        t0 = time.perf_counter()
        try:
            img = load_source(src, max_pixels=max_pixels, reduce_to=reduce_to)
            if transform is not None:
                transform(img)
        except (ImageReadError, ValueError, TypeError):
            continue
        times.append(time.perf_counter() - t0)
        if len(times) >= samples:
            break
    return sorted(times)[len(times) // 2] if times else None


#: Up to this many cores, :func:`plan_decoding` lets decoding and the model take turns on
#: every core (``mode="turns"``) instead of running decoding processes beside the model.
TURNS_MAX_CORES = 4


def plan_decoding(sources: Sequence[ImageSource], transform: Callable | None = None, *,
                  batch_size: int = 64, model_s: float | None = None,
                  decode: str = "reduced", num_workers: int | None = None,
                  cores: int | None = None, device_type: str = "cpu") -> DecodePlan:
    """Decoding workers and model threads for a run over ``sources``.

    No worker for a single batch or in-memory inputs (decoding in the main process costs
    no more than starting one). Otherwise the cost of decoding is measured on the first
    files (:func:`decode_seconds`) and, with the model's cost per image ``model_s``
    (core-seconds, e.g. from :func:`dinofeat.accel.model_seconds_per_image`), split with
    :func:`split_cores`. Without ``model_s`` one worker per two cores is used and the
    model keeps every core. ``num_workers`` given: used as is."""
    cores = cores or cpu_cores()
    threads = torch.get_num_threads()
    if num_workers is not None:
        return DecodePlan(num_workers, threads, cores=cores)
    if not any(isinstance(s.item, Path) for s in sources[:4]):
        return DecodePlan(0, threads, cores=cores)
    if device_type == "cpu" and cores <= TURNS_MAX_CORES:
        # few cores: a decoding process beside the model's threads leaves one of them
        # waiting at every parallel step; taking turns keeps every core on one job
        return DecodePlan(min(cores, batch_size, len(sources)), threads, None, model_s,
                          cores, "turns")
    if len(sources) <= batch_size:
        return DecodePlan(0, threads, cores=cores)
    d = decode_seconds(sources, transform, decode=decode)
    if d is None or model_s is None:
        return DecodePlan(max(1, cores // 2), threads, d, model_s, cores)
    workers, threads = split_cores(cores, d, model_s)
    return DecodePlan(workers, threads, d, model_s, cores)


class ThreadedBatches:
    """:class:`ImageBatch` es of ``sources`` in input order, each decoded and
    preprocessed by ``threads`` threads of this process when the caller asks for it (no
    work ahead): with the model run between two batches, decoding and the model take
    turns on the cores instead of competing for them. Unreadable inputs come back in
    ``ImageBatch.failed``, as with :func:`image_loader`."""

    def __init__(self, sources: Sequence[ImageSource], transform: Callable | None = None, *,
                 batch_size: int = 64, threads: int = 1, max_pixels: int | None = None,
                 decode: str = "reduced"):
        if batch_size < 1 or threads < 1:
            raise ValueError(f"batch_size and threads must be at least 1, got {batch_size} "
                             f"and {threads}")
        self.dataset = _SourceDataset(sources, transform, max_pixels, decode)
        self.batch_size = batch_size
        self.threads = threads

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[ImageBatch]:
        from concurrent.futures import ThreadPoolExecutor
        n = len(self.dataset)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="dinofeat-decode") as pool:
            for lo in range(0, n, self.batch_size):
                idx = range(lo, min(lo + self.batch_size, n))
                yield _collate(list(pool.map(self.dataset.__getitem__, idx)))


def default_num_workers(num_images: int, batch_size: int) -> int:
    """Worker processes for decoding without measurements: none for a single batch, else
    one per two cores (at least one). :func:`plan_decoding` chooses from measured costs."""
    if num_images <= batch_size:
        return 0
    return max(1, cpu_cores() // 2)


def image_loader(sources: Sequence[ImageSource], transform: Callable | None = None, *,
                 batch_size: int = 64, num_workers: int | None = None,
                 pin_memory: bool = False, max_pixels: int | None = None,
                 decode: str = "reduced") -> torch.utils.data.DataLoader:
    """A ``DataLoader`` that decodes and preprocesses ``sources`` in worker processes and
    yields :class:`ImageBatch` es in input order (``uint8`` until
    :func:`normalize_batch`). Unreadable inputs never stop it: they come back in
    ``ImageBatch.failed``; the caller decides whether to raise or skip.

    ``decode="reduced"`` (default) lets JPEGs be decoded at a reduced scale when
    ``transform`` (an :class:`ImageTransform`) resizes them to at most half their size
    (see :func:`read_image`); ``"full"`` decodes every pixel first (the paper's
    evaluations use it, so published numbers reproduce exactly)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers is None:
        num_workers = default_num_workers(len(sources), batch_size)
    return torch.utils.data.DataLoader(
        _SourceDataset(sources, transform, max_pixels, decode), batch_size=batch_size,
        shuffle=False, num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
        persistent_workers=False)
