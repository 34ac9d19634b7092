"""Small helpers shared by every module: atomic writes, device choice, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_bytes", "default_device",
           "get_logger", "resolve_inside", "UnsafePathError", "printable"]


class UnsafePathError(ValueError):
    """A file names a path that leads outside the folder it must stay in."""


def resolve_inside(root: str | os.PathLike, name: str | os.PathLike, *, source: str = "",
                   key: str = "") -> Path:
    """``root / name`` if it stays inside ``root`` once ``..`` and symlinks are resolved.

    Names read from files (an index header, a sidecar, a dataset listing) are data written
    by someone else: an absolute name, ``../x`` or a symlink that leads out of ``root`` is
    refused with an :class:`UnsafePathError` naming ``source`` and ``key``."""
    root_real = Path(root).resolve()
    text = os.fspath(name)
    target = (root_real / text).resolve()
    if "\0" in text or not (target == root_real or root_real in target.parents):
        where = f"{source}: " if source else ""
        what = f"{key} " if key else ""
        raise UnsafePathError(f"{where}{what}{text!r} points outside {root_real}")
    return target


def printable(text: object) -> str:
    """``text`` with terminal control characters (ESC, CR, BEL ...) shown as escapes, so
    that names read from files or folders cannot rewrite a terminal when printed."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over
    ``path`` in one step, so readers see either the old file or the complete new one.
    On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that replace the file (safetensors' save_file)
        # do too: give the finished file the usual mode, as open() would.
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=False).encode())


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_logger(name: str = "dinofeat") -> logging.Logger:
    """The package logger; prints ``dinofeat: message`` to stderr unless the application
    configured logging itself."""
    logger = logging.getLogger(name)
    root = logging.getLogger("dinofeat")
    if not root.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
