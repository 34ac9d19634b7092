"""A zoo of awkward and broken image files for the reliability suite.

:func:`write_zoo` lays out a folder holding every kind of input the readers must survive
and returns, for each file, whether dinofeat must be able to read it. Everything is
generated here (no downloaded samples), small enough for a shared 2-core machine.

Readable: 1x1, 100000x10 and 8x8 (smaller than one 16-pixel patch) images, 16-bit grey
and 16-bit RGB PNGs, CMYK JPEG, palette PNG with and without transparency, RGBA and LA
PNGs, JPEGs whose EXIF orientation is invalid (0, 9, 65535), a JPEG whose EXIF block is
garbage, a file whose name is not UTF-8, and a folder named ``photo.jpg`` holding an
image (a folder is walked into, never read as a file).

Unreadable: truncated JPEG and PNG, a zero-byte file, a text file named ``.jpg``, a
decompression bomb (a PNG header claiming 100000 x 100000 pixels) and a file without read
permission (``chmod 000``; see :func:`deny_read` for how this is simulated as root).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

#: A name that is not valid UTF-8 (latin-1 "cafe" with an acute e), as the OS gives it.
NON_UTF8_NAME = os.fsdecode(b"caf\xe9-latin1.png")


@dataclass(frozen=True)
class ZooFile:
    path: Path
    readable: bool
    kind: str


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth ``uint8 [h, w, 3]`` picture (different for each seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.3, 1.0, 3)
    chans = [120 * a * x / max(w, 1) + 90 * b * y / max(h, 1) + 40 * np.sin(c * (x + y) / 3 + k)
             for k in range(3)]
    return np.clip(np.stack(chans, -1) + rng.integers(0, 60, 3), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 8-bit grey pixels (10 gigapixels
    by default): a decompression bomb that must be refused before any decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" * (1 + width)  # one filtered row of zeros; the rest is missing
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row, 9)) + _png_chunk(b"IEND", b""))


def jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def jpeg_with_corrupt_exif(arr: np.ndarray) -> bytes:
    """A valid JPEG whose APP1 segment says ``Exif`` but holds garbage (a TIFF header
    pointing far outside the segment, then noise)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + bytes(
        np.random.default_rng(1).integers(0, 256, 40, dtype=np.uint8))
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app1 + data[2:]  # right after SOI


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_zoo(root: Path, *, good: int = 3, huge: bool = True) -> list[ZooFile]:
    """Write the zoo under ``root``; return every file with whether it must be readable.

    ``good`` plain photos are added (readable). ``huge=False`` leaves out the 100000x10
    image (the most expensive one to preprocess)."""
    root.mkdir(parents=True, exist_ok=True)
    out: list[ZooFile] = []

    def put(name: str, data: bytes, readable: bool, kind: str) -> None:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out.append(ZooFile(p, readable, kind))

    for i in range(good):
        put(f"good/photo{i}.jpg", _save(Image.fromarray(picture(40, 48, seed=10 + i)), "JPEG",
                                        quality=95), True, "plain JPEG")
    base = picture(36, 44, seed=3)
    jpeg = _save(Image.fromarray(base), "JPEG", quality=90)
    png = _save(Image.fromarray(base), "PNG")
    # --- unreadable
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2], False, "truncated JPEG")
    put("bad/truncated.png", png[: len(png) // 2], False, "truncated PNG")
    put("bad/zero-bytes.jpg", b"", False, "zero-byte file")
    put("bad/notes.jpg", b"These are my holiday notes, not a picture.\n" * 3, False,
        "text file named .jpg")
    put("bad/bomb.png", bomb_png(), False, "decompression bomb")
    put("bad/no-permission.png", png, False, "no read permission")
    os.chmod(root / "bad/no-permission.png", 0)
    # --- readable but awkward
    put("odd/one-pixel.png", _save(Image.fromarray(picture(1, 1, seed=4)), "PNG"), True,
        "1x1 image")
    if huge:
        put("odd/strip-100000x10.png", _save(Image.fromarray(picture(10, 100_000, seed=5)),
                                             "PNG"), True, "100000x10 image")
    put("odd/tiny-8x8.png", _save(Image.fromarray(picture(8, 8, seed=6)), "PNG"), True,
        "smaller than one patch")
    gray16 = (np.arange(30 * 34).reshape(30, 34) * 61 % 65536).astype(np.uint16)
    put("odd/gray16.png", _save(Image.fromarray(gray16), "PNG"), True, "16-bit grey PNG")
    put("odd/rgb16.png", _rgb16_png(picture(20, 24, seed=7).astype(np.uint16) * 257), True,
        "16-bit RGB PNG")
    put("odd/cmyk.jpg", _save(Image.fromarray(base).convert("CMYK"), "JPEG"), True,
        "CMYK JPEG")
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("odd/palette.png", _save(pal, "PNG"), True, "palette PNG")
    put("odd/palette-transparent.png", _save(pal, "PNG", transparency=0), True,
        "palette PNG with transparency")
    rgba = np.dstack([base, (np.arange(36 * 44).reshape(36, 44) % 256).astype(np.uint8)])
    put("odd/rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), True, "RGBA PNG")
    put("odd/la.png", _save(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"), True, "LA PNG")
    for o in (0, 9, 65535):
        put(f"odd/exif-orientation-{o}.jpg", jpeg_with_orientation(base, o), True,
            f"EXIF orientation {o}")
    put("odd/exif-corrupt.jpg", jpeg_with_corrupt_exif(base), True, "corrupt EXIF block")
    put(f"odd/{NON_UTF8_NAME}", _save(Image.fromarray(picture(28, 30, seed=9)), "PNG"), True,
        "non-UTF-8 file name")
    put("odd/photo.jpg/inside.png", _save(Image.fromarray(picture(30, 30, seed=8)), "PNG"),
        True, "image inside a folder named photo.jpg")
    return out


def _rgb16_png(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0,
                                                                    0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def deny_read(paths: list[Path]) -> Iterator[str]:
    """Make ``paths`` unreadable for this process. They are ``chmod 000`` already; as
    root that does not stop a read, so every ``open`` of them for reading is made to raise
    ``PermissionError`` (EACCES), as the kernel would for another user. Yields how the
    denial is done: ``"chmod"`` or ``"simulated (root)"``. Work must run in this process
    (``num_workers=0``) for the simulation to apply."""
    if not is_root():
        yield "chmod"
        return
    blocked = {os.path.realpath(p) for p in paths}
    real_open = builtins.open
    real_io_open = io.open

    def guard(file, *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and not isinstance(file, int):
            if os.path.realpath(os.fsdecode(file)) in blocked:
                raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kw)

    builtins.open = guard
    io.open = guard
    try:
        yield "simulated (root)"
    finally:
        builtins.open = real_open
        io.open = real_io_open
