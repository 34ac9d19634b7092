"""The on-disk format of an index: a folder of generations with one commit point.

::

    photos.idx/
      index.json        header and commit point: format version, model, pooling, dims,
                        metric, factory, counts, and which generation of files is current
      index.7.faiss     faiss.write_index of the vectors
      pending.7.faiss   (only while untrained) the exact buffer
      items.7.json      ids, labels, paths, sha256 content hashes, per-item metadata
      lists.7.ivfdata   (only for an IVF index grown while memory-mapped) its inverted
                        lists, on disk; index.7.faiss then holds the trained part and
                        names this file (:mod:`dinofeat.search.ondisk`)

Saving writes a new generation of data files, then replaces ``index.json`` atomically, then
deletes older generations: a crash at any moment leaves a folder whose ``index.json`` names
complete files, and a reader that loads while a writer saves gets either the old or the new
generation, never a mix. No pickle anywhere: faiss's own format and JSON.

Index folders may come from someone else, so reading checks what the files claim: every
file the header names must resolve inside the folder (symlinks included), and faiss may
not allocate more for one stored array than the file holding it has bytes (a crafted
730-byte file declaring 2^31 codes is refused at once instead of allocating 8 GB). faiss
files are otherwise trusted like code: faiss does not promise that a hostile file only
gives an error. Saving writes only into an empty folder or a dinofeat index folder.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import faiss

from ..utils import UnsafePathError, atomic_path, atomic_write_json, resolve_inside
from . import ondisk

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HEADER_NAME", "IndexFormatError",
           "generation_of", "read_header", "write_generation", "read_generation",
           "StoredGeneration", "read_faiss_bounded", "named_file", "read_index_file"]

FORMAT_NAME = "dinofeat.KNNIndex"
FORMAT_VERSION = 1
HEADER_NAME = "index.json"


class IndexFormatError(ValueError):
    """An index folder is missing, corrupt, inconsistent or from a newer format."""


def generation_of(name: str) -> int:
    """The generation number of a data file name (``index.7.faiss`` -> 7), 0 for others."""
    m = re.fullmatch(r"(?:index|pending)\.(\d+)\.faiss|items\.(\d+)\.json|"
                     r"lists\.(\d+)\.ivfdata", name)
    if not m:
        return 0
    return int(m.group(1) or m.group(2) or m.group(3))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header (``index.json``) of a saved index, without loading any vectors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such index: {path}")
    header_path = path / HEADER_NAME
    if not path.is_dir() or not header_path.is_file():
        raise IndexFormatError(f"{path} is not a dinofeat index (expected a folder with "
                               f"{HEADER_NAME}, as written by KNNIndex.save)")
    try:
        header = json.loads(header_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{header_path}: not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{header_path}: not a dinofeat index header")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(f"{path}: index format version {version} is newer than this "
                               f"dinofeat reads ({FORMAT_VERSION}); upgrade dinofeat")
    return header


def write_generation(path: str | os.PathLike, *, index: faiss.Index | None,
                     pending: faiss.Index | None, items: dict[str, Any],
                     header: Callable[[int, dict[str, str | None]], dict[str, Any]]) -> Path:
    """Write one generation into the folder ``path`` (created if needed): the faiss files,
    the items, then ``header(generation, files)`` as ``index.json`` (the commit point);
    then delete older generations' files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; an index is saved as a folder")
    header_path = path / HEADER_NAME
    if path.is_dir() and any(path.iterdir()) and not header_path.exists():
        raise FileExistsError(f"{path} is a non-empty folder that is not a dinofeat index; "
                              "refusing to write into it")
    if header_path.exists() or header_path.is_symlink():
        try:
            old = read_header(path)
        except (IndexFormatError, OSError) as e:
            raise FileExistsError(f"{header_path} is not the header of a dinofeat index "
                                  f"({str(e).splitlines()[0]}); refusing to write into "
                                  f"{path}") from None
        if header_path.is_symlink():
            raise FileExistsError(f"{header_path} is a symbolic link; refusing to write "
                                  f"into {path}")
    else:
        old = None
    path.mkdir(parents=True, exist_ok=True)
    gen = 1 + max([generation_of(p.name) for p in path.iterdir()] + [0])
    if old is not None:
        try:
            gen = max(gen, int(old["generation"]) + 1)
        except (ValueError, KeyError, TypeError):
            pass
    files: dict[str, str | None] = {"faiss_file": None, "pending_file": None,
                                    "items_file": f"items.{gen}.json"}
    if index is not None and ondisk.has_ondisk_lists(index):
        # lists on disk (or stacked with new ones): merged into this generation's own
        # lists file, streamed; both files complete before the header names them
        files["faiss_file"] = f"index.{gen}.faiss"
        files["lists_file"] = f"lists.{gen}.ivfdata"
        with atomic_path(path / files["lists_file"]) as lists_tmp, \
                atomic_path(path / files["faiss_file"]) as tmp:
            ondisk.write_lists(index, lists_tmp, files["lists_file"], tmp)
    elif index is not None:
        files["faiss_file"] = f"index.{gen}.faiss"
        with atomic_path(path / files["faiss_file"]) as tmp:
            faiss.write_index(index, str(tmp))
    if pending is not None:
        files["pending_file"] = f"pending.{gen}.faiss"
        with atomic_path(path / files["pending_file"]) as tmp:
            faiss.write_index(pending, str(tmp))
    atomic_write_json(path / files["items_file"],
                      {"format": FORMAT_NAME, "generation": gen, **items}, indent=None)
    atomic_write_json(header_path, header(gen, files))  # the commit point
    keep = {f for f in files.values() if f} | {HEADER_NAME}
    for p in path.iterdir():
        if p.name not in keep and generation_of(p.name) > 0:
            p.unlink(missing_ok=True)
    return path


class StoredGeneration:
    """The files of one generation as read: ``header``, ``items`` (the JSON document),
    ``index`` and ``pending`` (faiss indexes or ``None``)."""

    def __init__(self, header: dict[str, Any], items: dict[str, Any],
                 index: faiss.Index | None, pending: faiss.Index | None):
        self.header, self.items, self.index, self.pending = header, items, index, pending


def read_generation(path: str | os.PathLike, *, mmap: bool = False) -> StoredGeneration:
    """Read the current generation of the index folder ``path``; with ``mmap`` the faiss
    data (codes, inverted lists, graph) stays in the file and is paged in by the OS as
    searches touch it, so an index larger than memory can be searched. Generation files
    are never modified after they are written, so a mapping stays valid, even after a
    later save deletes the file (the mapping keeps it alive).

    A concurrent save commits a new header and then deletes the previous generation's
    files, possibly between our reading the header and opening them: read again while the
    generation keeps moving (a file missing from a stable one is an error)."""
    path = Path(path)
    attempts = 50
    for attempt in range(attempts):
        header = read_header(path)
        try:
            return _read_files(path, header, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except FileNotFoundError:
            if attempt == attempts - 1 or read_header(path).get("generation") == \
                    header.get("generation"):
                raise
            time.sleep(0.001 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def read_index_file(path: str | os.PathLike) -> faiss.Index:
    """The faiss index of the current generation of ``path`` alone (on-disk lists mapped,
    other data read), without the items."""
    path = Path(path)
    header = read_header(path)
    if not header.get("faiss_file"):
        raise IndexFormatError(f"{path}: the index holds no faiss data yet")
    return _read_faiss(path, header, "faiss_file")


# faiss's deserialization limit is one process-wide setting: set and restore it under a lock
_limit_lock = threading.Lock()


def read_faiss_bounded(f: str | os.PathLike, io_flags: int = 0) -> faiss.Index:
    """``faiss.read_index`` with every stored array bounded by the file's size, so that a
    file declaring a huge array fails fast instead of allocating it."""
    limit = max(os.path.getsize(f), 1)
    with _limit_lock:
        previous = faiss.get_deserialization_vector_byte_limit()
        faiss.set_deserialization_vector_byte_limit(limit)
        try:
            return faiss.read_index(str(f), io_flags)
        finally:
            faiss.set_deserialization_vector_byte_limit(previous)


def named_file(path: Path, header: dict[str, Any], key: str) -> Path:
    """The file the header's ``key`` names, refused unless it resolves inside ``path``."""
    name = header.get(key)
    if not isinstance(name, str) or not name:
        raise IndexFormatError(f"{path / HEADER_NAME}: {key} is not a file name: {name!r}")
    try:
        return resolve_inside(path, name, source=str(path / HEADER_NAME), key=key)
    except UnsafePathError as e:
        raise IndexFormatError(str(e)) from None


def _read_faiss(path: Path, header: dict[str, Any], key: str, io_flags: int = 0
                ) -> faiss.Index:
    f = named_file(path, header, key)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (named by {path / HEADER_NAME})")
    lists = None
    if key == "faiss_file" and header.get("lists_file"):
        lists = named_file(path, header, "lists_file")
        if not lists.is_file():
            raise FileNotFoundError(f"{lists}: missing (named by {path / HEADER_NAME})")
        # on-disk lists are mapped by faiss itself, found next to the index file
        io_flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    try:
        if lists is None:
            return read_faiss_bounded(f, io_flags)
        with ondisk.quiet_stdout():
            index = read_faiss_bounded(f, io_flags)
        problem = ondisk.check_lists(index, lists)
        if problem:
            raise IndexFormatError(f"{f}: {problem}")
        return index
    except RuntimeError as e:
        if not f.exists():  # deleted by a concurrent save after the check above
            raise FileNotFoundError(f"{f}: missing (named by {path / HEADER_NAME})") from None
        raise IndexFormatError(f"{f}: not a readable faiss index (truncated or "
                               f"corrupt?): {str(e).strip().splitlines()[-1]}") from None


def _read_files(path: Path, header: dict[str, Any], io_flags: int = 0) -> StoredGeneration:
    items_path = named_file(path, header, "items_file")
    if not items_path.is_file():
        raise FileNotFoundError(f"{items_path}: missing (named by {path / HEADER_NAME})")
    try:
        items = json.loads(items_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{items_path}: not valid JSON ({e})") from None
    if items.get("generation") != header["generation"]:
        raise IndexFormatError(f"{path}: {items_path.name} belongs to generation "
                               f"{items.get('generation')}, the header to {header['generation']}")
    index = _read_faiss(path, header, "faiss_file", io_flags) if header.get("faiss_file") \
        else None
    pending = _read_faiss(path, header, "pending_file") if header.get("pending_file") else None
    return StoredGeneration(header, items, index, pending)
