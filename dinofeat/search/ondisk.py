"""IVF inverted lists kept on disk, and growing an index whose lists stay there.

An IVF index is a small trained part (the coarse quantiser, the code's parameters) and its
inverted lists (codes and ids), which are nearly all of its size. faiss can keep the lists
in a file of their own (``OnDiskInvertedLists``, memory-mapped) and merge several sets of
lists into such a file list by list (``merge_from_multiple``), which is how its
``merge_ondisk`` builds indexes larger than memory. dinofeat uses that for an index loaded
with ``mmap=True``:

- :class:`ListsGrower`: new vectors go into a small in-memory IVF with the same trained
  quantiser; the index searches the mapped lists and the new ones together, stacked
  (``HStackInvertedLists``: each list is the mapped list followed by the new one), which
  gives exactly the results of one index holding both.
- :func:`write_lists`: saving merges the stacked lists into a new lists file of the next
  generation (streamed list by list through the OS page cache; the codes are never all
  in memory) and writes the trained part, which names that file, next to it.

The lists file of a generation is never written again once published: growing writes the
next generation's file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

__all__ = ["ivf_of", "has_ondisk_lists", "can_grow", "empty_like", "ListsGrower",
           "write_lists", "check_lists", "in_memory_copy", "quiet_stdout"]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """faiss's on-disk lists print progress ("resizing ...", "updating ondisk filename")
    on the C-level standard output; send it to standard error, so that a command's output
    (``--json``) stays clean."""
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real streams (captured): leave them
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        os.dup2(err, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def ivf_of(index: faiss.Index | None) -> faiss.IndexIVF | None:
    """The index itself when it is a plain IVF index (ids held natively, nothing around
    it); ``None`` otherwise (Flat, HNSW, an id map, a pre-transform or a re-ranking
    wrapper, whose other parts would have to grow too)."""
    if index is None:
        return None
    inner = faiss.downcast_index(index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


def _lists(ivf: faiss.IndexIVF) -> faiss.InvertedLists:
    return faiss.downcast_InvertedLists(ivf.invlists)


def has_ondisk_lists(index: faiss.Index | None) -> bool:
    """Whether ``index`` is an IVF index whose lists are not plain in-memory arrays
    (on disk, or stacked by a :class:`ListsGrower`): it is saved with :func:`write_lists`."""
    ivf = ivf_of(index)
    return ivf is not None and not isinstance(_lists(ivf), faiss.ArrayInvertedLists)


def can_grow(index: faiss.Index | None) -> bool:
    """Whether :class:`ListsGrower` can add to ``index`` without reading its lists."""
    return ivf_of(index) is not None


def empty_like(ivf: faiss.IndexIVF) -> faiss.IndexIVF:
    """A trained, empty in-memory copy of ``ivf`` (same quantiser and code parameters),
    made without copying its lists."""
    old, own = ivf.invlists, ivf.own_invlists
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # swap the lists out for the copy, keep them alive
    ivf.replace_invlists(empty, False)
    try:
        out = faiss.clone_index(ivf)  # of the derived type, owned by this object
    finally:
        ivf.replace_invlists(old, False)
        ivf.own_invlists = own
    # the clone may share the swapped-in lists object (freed with ``empty``) or own a
    # copy of it: give it lists of its own either way (an empty leftover is a few bytes)
    out.own_invlists = False
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists.this.disown()
    out.replace_invlists(lists, True)
    out.ntotal = 0
    if out.direct_map.type != faiss.DirectMap.NoMap:
        out.set_direct_map_type(faiss.DirectMap.NoMap)
    return out


class ListsGrower:
    """Adds vectors to an IVF index whose lists are mapped from a file, without reading
    them: the new vectors are encoded into a small in-memory IVF with the same quantiser,
    and ``ivf`` searches both sets of lists stacked. The stacked lists are read-only; a
    save merges them into a new lists file (:func:`write_lists`)."""

    def __init__(self, ivf: faiss.IndexIVF):
        self.ivf = ivf
        self.base = ivf.invlists  # the mapped lists
        self.base_total = int(ivf.ntotal)
        self.new = empty_like(ivf)
        if ivf.direct_map.type != faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # rebuilt on demand
        parts = faiss.InvertedListsPtrVector()
        parts.push_back(self.base)
        parts.push_back(self.new.invlists)
        self.stack = faiss.HStackInvertedLists(2, parts.data())
        # this object keeps the mapped lists alive from now on (the index no longer owns
        # them), and the stack, which points into both
        if ivf.own_invlists:
            self.base.this.acquire()
        ivf.own_invlists = False
        ivf.replace_invlists(self.stack, False)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.new.add_with_ids(x, ids)  # the stack sees the new list entries directly
        self.ivf.ntotal = self.base_total + int(self.new.ntotal)
        if self.ivf.direct_map.type != faiss.DirectMap.NoMap:
            self.ivf.set_direct_map_type(faiss.DirectMap.NoMap)

    @property
    def added(self) -> int:
        return int(self.new.ntotal)


def write_lists(index: faiss.Index, lists_tmp: Path, lists_name: str,
                index_tmp: Path) -> None:
    """Write the IVF ``index`` as two files: its lists merged into a new on-disk lists
    file at ``lists_tmp`` (to be renamed ``lists_name``, in the same folder), and the
    trained part at ``index_tmp``, naming ``lists_name`` (read back with
    ``faiss.IO_FLAG_ONDISK_SAME_DIR``)."""
    ivf = ivf_of(index)
    assert ivf is not None
    with quiet_stdout():
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_tmp))
        parts = faiss.InvertedListsPtrVector()
        parts.push_back(ivf.invlists)
        ondisk.merge_from_multiple(parts.data(), 1, False, False)
    if ondisk.compute_ntotal() != ivf.ntotal:  # pragma: no cover - a faiss error
        raise RuntimeError(f"merged {ondisk.compute_ntotal()} vectors, the index has "
                           f"{ivf.ntotal}")
    ondisk.filename = lists_name  # the reader looks for it next to the index file
    out = empty_like(ivf)
    out.replace_invlists(ondisk, False)  # ``ondisk`` stays owned by its Python object
    out.ntotal = ivf.ntotal
    faiss.write_index(out, str(index_tmp))
    del out
    del ondisk  # unmaps and closes the lists file before it is renamed


def check_lists(index: faiss.Index, lists_file: Path) -> str | None:
    """What is wrong with the on-disk lists of ``index`` read from a folder (they must be
    the file ``lists_file`` and lie inside it), or ``None``."""
    ivf = ivf_of(index)
    if ivf is None:
        return "the faiss file is not an IVF index, but the header names a lists file"
    lists = _lists(ivf)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return "the faiss file does not use the lists file the header names"
    if Path(lists.filename).name != lists_file.name:
        return (f"the faiss file names the lists file {Path(lists.filename).name!r}, the "
                f"header {lists_file.name!r}")
    size = lists_file.stat().st_size
    entry = lists.code_size + 8  # code + int64 id
    for i in range(lists.lists.size()):
        item = lists.lists.at(i)
        if item.size > item.capacity or item.offset + item.capacity * entry > size:
            return f"inverted list {i} lies outside {lists_file.name} ({size} bytes)"
    return None


def in_memory_copy(index: faiss.Index) -> faiss.Index:
    """``index`` with its lists read into memory (plain arrays), for changes that need
    them there (removing vectors)."""
    ivf = ivf_of(index)
    if ivf is None or not has_ondisk_lists(index):
        return faiss.deserialize_index(faiss.serialize_index(index))
    out = empty_like(ivf)
    src = ivf.invlists
    dst = out.invlists
    for i in range(ivf.nlist):
        n = src.list_size(i)
        if n:
            codes, ids = src.get_codes(i), src.get_ids(i)
            try:
                dst.add_entries(i, n, ids, codes)
            finally:
                src.release_codes(i, codes)
                src.release_ids(i, ids)
    out.ntotal = ivf.ntotal
    return out
