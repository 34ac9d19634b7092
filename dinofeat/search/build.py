"""Building an index from image files: list and hash the files, embed the new ones, add
them; across the processes ``torchrun`` started, through :mod:`dinofeat.extract`'s shards.

These are free functions over any index object with the :class:`~dinofeat.KNNIndex`
interface; ``KNNIndex.add_images``, ``plan_images`` and ``from_images`` call them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ..utils import atomic_write_json, get_logger
from .identity import (IncompatibleFeaturesError, check_compatible, embedding_identity,
                       pool_of)
from .storage import HEADER_NAME

__all__ = ["ImagePlan", "AddReport", "image_files", "hash_files", "plan_images", "add_images",
           "add_images_distributed", "from_images", "label_function", "is_distributed"]

_log = get_logger("dinofeat.index")

#: the file of a distributed build's plan, in ``<index>.shards/``
PLAN_NAME = "plan.json"


class ImagePlan:
    """What :func:`plan_images` found: ``new`` files (paths) to embed, with their ``info``
    (path, sha256, size, mtime_ns), and the files skipped as ``already_indexed``,
    ``duplicate_content`` (same bytes as another new file) or ``unreadable``
    (``(path, reason)``)."""

    def __init__(self) -> None:
        self.new: list[str] = []
        self.info: dict[str, dict[str, Any]] = {}
        self.already_indexed: list[str] = []
        self.duplicate_content: list[str] = []
        self.unreadable: list[tuple[str, str]] = []


class AddReport:
    """What :func:`add_images` did."""

    def __init__(self, added: int = 0, already_indexed: int = 0, duplicate_content: int = 0,
                 unreadable: list[tuple[str, str]] | None = None, seconds: float = 0.0):
        self.added = added
        self.already_indexed = already_indexed
        self.duplicate_content = duplicate_content
        self.unreadable = unreadable or []
        self.seconds = seconds

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "already_indexed": self.already_indexed,
                "duplicate_content": self.duplicate_content,
                "unreadable": [list(u) for u in self.unreadable], "seconds": self.seconds}

    def __str__(self) -> str:
        return (f"added {self.added} images ({self.already_indexed} already indexed, "
                f"{self.duplicate_content} byte-identical to another new file, "
                f"{len(self.unreadable)} unreadable)")

    def __repr__(self) -> str:
        return f"AddReport({self.as_dict()})"


def image_files(images: Any) -> list[str]:
    """Absolute paths of the image files in ``images``: a folder (recursive, sorted), a
    file, or a list of folders and files."""
    from ..images import list_images
    items = images if isinstance(images, (list, tuple)) else [images]
    out: list[str] = []
    for it in items:
        if not isinstance(it, (str, os.PathLike)):
            raise TypeError(f"add_images takes image files and folders, not "
                            f"{type(it).__name__}; embed in-memory images with model.embed "
                            "and use add()")
        p = Path(it)
        if p.is_dir():
            out.extend(os.path.abspath(f) for f in list_images(p))
        elif p.exists():
            out.append(os.path.abspath(p))
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def hash_files(files: list[str], known: Mapping[str, tuple[int, int, str]],
               progress: bool | None, threads: int):
    """Yield ``(path, (size, mtime_ns), sha256, error)`` in order, hashing in threads
    (hashlib releases the GIL); files in ``known`` (path -> size, mtime_ns, sha256) that are
    unchanged are not read."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from ..weights import sha256_file

    def one(f: str):
        try:
            st = os.stat(f)
            stat = (int(st.st_size), int(st.st_mtime_ns))
            k = known.get(f)
            if k is not None and k[:2] == stat:
                return f, stat, k[2], None
            if st.st_size == 0:
                return f, stat, None, "empty file"
            return f, stat, sha256_file(f), None
        except OSError as e:
            return f, None, None, e.strerror or str(e)

    show = progress if progress is not None else (sys.stderr.isatty() and len(files) > 1000)
    with ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(files), unit="file", desc="hashing", disable=not show) as bar:
        for start in range(0, len(files), 4096):
            for r in pool.map(one, files[start:start + 4096]):
                bar.update(1)
                yield r


def _stat_cache(index: Any) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, sha256) of indexed files, to skip re-hashing them."""
    out = {}
    for rec in index.lookup(index.ids):
        p, h, e = rec["path"], rec["sha256"], rec["meta"]
        if p and h and e and "size" in e and "mtime_ns" in e:
            out[p] = (int(e["size"]), int(e["mtime_ns"]), h)
    return out


def plan_images(index: Any, images: Any, *, progress: bool | None = None,
                hash_threads: int = 4) -> ImagePlan:
    """Hash the image files of ``images`` (a folder, a file, or a list of them) and sort
    them into new files and files whose content (sha256) ``index`` already holds, or that
    repeat another new file byte for byte. Files unchanged since they were indexed (same
    path, size and mtime) are not read again."""
    files = image_files(images)
    known = _stat_cache(index)
    indexed = index.hashes
    plan = ImagePlan()
    seen: set[str] = set()
    for f, st, digest, err in hash_files(files, known, progress, hash_threads):
        if err is not None:
            plan.unreadable.append((f, err))
            _log.warning("skipping unreadable image %s: %s", f, err)
        elif digest in indexed:
            plan.already_indexed.append(f)
        elif digest in seen:
            plan.duplicate_content.append(f)
        else:
            seen.add(digest)
            plan.new.append(f)
            plan.info[f] = {"path": f, "sha256": digest, "size": st[0], "mtime_ns": st[1]}
    return plan


def label_function(labels: Any):
    """``labels`` (``None``, ``"folder"``, a callable or a mapping) as ``path -> label``."""
    if labels is None:
        return None
    if labels == "folder":
        return lambda p: Path(p).parent.name
    if callable(labels):
        return labels
    if isinstance(labels, Mapping):
        table = {os.path.abspath(k): v for k, v in labels.items()}
        return lambda p: table[p] if p in table else labels[p]
    raise TypeError("labels must be None, 'folder', a callable path -> label, or a mapping")


def _sources_text(images: Any) -> list[str]:
    items = images if isinstance(images, (list, tuple)) else [images]
    return [os.path.abspath(i) if isinstance(i, (str, os.PathLike)) else type(i).__name__
            for i in items][:20]


def _adopt_identity(index: Any, model: Any, pool: str | None, embed_kw: dict) -> tuple[str, dict]:
    pool = pool or pool_of(index.model_info)
    identity = embedding_identity(model, pool=pool, **embed_kw)
    check_compatible(index.model_info, identity, "features of these images")
    if index.model_info is None:
        index.model_info = identity
    return pool, identity


def add_images(index: Any, images: Any, model: Any, *, pool: str | None = None,
               labels: Any = None, checkpoint: str | os.PathLike | None = None,
               checkpoint_every: int = 5000, batch_size: int = 64,
               num_workers: int | None = None, progress: bool | None = None,
               plan: ImagePlan | None = None, **embed_kw: Any) -> AddReport:
    """Embed image files with ``model`` and add them to ``index``: see
    :meth:`dinofeat.KNNIndex.add_images`."""
    t0 = time.perf_counter()
    pool, _ = _adopt_identity(index, model, pool, embed_kw)
    if plan is None:
        plan = plan_images(index, images, progress=progress)
    report = AddReport(already_indexed=len(plan.already_indexed),
                       duplicate_content=len(plan.duplicate_content),
                       unreadable=list(plan.unreadable))
    label_of = label_function(labels)
    if label_of is None and index.has_labels and plan.new:
        raise ValueError("this index has labels: pass labels= ('folder', a function or "
                         "a mapping) for the new images")
    if index.dim is None and index.factory == "auto" and index.expected_size is None:
        index.expected_size = len(plan.new)
    index.build_state.update(complete=False, source=_sources_text(images))
    since = 0
    if plan.new:
        stream = model.iter_embed(plan.new, pool=pool, batch_size=batch_size,
                                  num_workers=num_workers, progress=progress,
                                  skip_unreadable=True, **embed_kw)
        for keys, feats in stream:
            paths = [str(k) for k in keys]
            index.add(feats, labels=[label_of(p) for p in paths] if label_of else None,
                      meta=[plan.info[p] for p in paths])
            report.added += len(paths)
            since += len(paths)
            if checkpoint is not None and since >= checkpoint_every:
                index.save(checkpoint)
                since = 0
        report.unreadable.extend((str(sk.key), sk.reason) for sk in stream.skipped)
    index.build_state.update(complete=True, unreadable=[list(u) for u in report.unreadable],
                             last_add=str(report))
    if checkpoint is not None:
        index.save(checkpoint)
    report.seconds = time.perf_counter() - t0
    return report


def _read_plan(plan_file: Path, identity: dict[str, Any]) -> dict | None:
    """The plan of an interrupted distributed build, if it is for the same features."""
    if not plan_file.is_file():
        return None
    try:
        doc = json.loads(plan_file.read_text())
    except ValueError:
        return None
    try:
        check_compatible(doc.get("model"), identity)
    except IncompatibleFeaturesError:
        raise ValueError(f"{plan_file.parent} holds an interrupted build with another model "
                         "or pooling; delete it or use the same options") from None
    return doc


def is_distributed() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def add_images_distributed(index: Any, images: Any, model: Any, *,
                           checkpoint: str | os.PathLike, pool: str | None = None,
                           labels: Any = None, shard_size: int = 2000, batch_size: int = 64,
                           num_workers: int | None = None, progress: bool | None = None,
                           checkpoint_every: int | None = None, **embed_kw: Any) -> AddReport:
    """:func:`add_images` across the processes ``torchrun`` started: see
    :meth:`dinofeat.KNNIndex.add_images_distributed`."""
    import torch.distributed as dist

    from ..extract import distributed_setup, extract_to_shards
    t0 = time.perf_counter()
    pool, identity = _adopt_identity(index, model, pool, embed_kw)
    rank, world, created = distributed_setup(embed_kw.get("device"))
    build_dir = Path(str(checkpoint) + ".shards")
    plan_file = build_dir / PLAN_NAME
    # extract's shards get a folder of their own: it refuses to share one with other files
    shard_dir = build_dir / "embed"
    report = AddReport()
    try:
        if rank == 0:
            plan_doc = _read_plan(plan_file, identity)
            if plan_doc is None:
                plan = plan_images(index, images, progress=progress)
                plan_doc = {"model": identity, "new": plan.new,
                            "info": [plan.info[p] for p in plan.new],
                            "already_indexed": len(plan.already_indexed),
                            "duplicate_content": len(plan.duplicate_content),
                            "unreadable": [list(u) for u in plan.unreadable]}
                build_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(plan_file, plan_doc, indent=None)
            else:
                _log.info("resuming the distributed build planned in %s", plan_file)
        if world > 1:
            dist.barrier()
        plan_doc = json.loads(plan_file.read_text())
        if plan_doc["new"]:
            extract_to_shards(model, plan_doc["new"], shard_dir, shard_size=shard_size,
                              rank=rank, world_size=world, progress=progress, pool=pool,
                              batch_size=batch_size, num_workers=num_workers,
                              **{k: v for k, v in embed_kw.items()
                                 if k in ("size", "preprocessing", "precision",
                                          "multiscale", "normalize", "device")})
        if world > 1:
            dist.barrier()
        if rank == 0:
            report = _merge_plan_shards(index, plan_doc, shard_dir, labels, checkpoint)
            report.seconds = time.perf_counter() - t0
        if world > 1:
            dist.barrier()  # nobody leaves before the index is complete
    finally:
        if created:
            dist.destroy_process_group()
    return report


def _merge_plan_shards(index: Any, plan_doc: dict, shard_dir: Path, labels: Any,
                       checkpoint: str | os.PathLike) -> AddReport:
    from safetensors import safe_open

    from ..extract import remove_shards, shard_path, shard_ranges
    report = AddReport(already_indexed=plan_doc["already_indexed"],
                       duplicate_content=plan_doc["duplicate_content"],
                       unreadable=[tuple(u) for u in plan_doc["unreadable"]])
    info = {d["path"]: d for d in plan_doc["info"]}
    label_of = label_function(labels)
    if label_of is None and index.has_labels and plan_doc["new"]:
        raise ValueError("this index has labels: pass labels= for the new images")
    index.build_state.update(complete=False)
    if index.dim is None and index.factory == "auto" and index.expected_size is None:
        index.expected_size = len(plan_doc["new"])
    if plan_doc["new"]:
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        for k, _ in enumerate(shard_ranges(len(plan_doc["new"]), manifest["shard_size"])):
            with safe_open(str(shard_path(shard_dir, k)), "pt") as f:
                meta = json.loads(f.metadata()["dinofeat"])
                feats = f.get_tensor("features")
            report.unreadable.extend(tuple(u) for u in meta["skipped"])
            indexed = index.hashes
            rows = [r for r, p in enumerate(meta["paths"])
                    if info[p]["sha256"] not in indexed]  # resumed merge
            if rows:
                paths = [meta["paths"][r] for r in rows]
                index.add(feats[rows], meta=[info[p] for p in paths],
                          labels=[label_of(p) for p in paths] if label_of else None)
                report.added += len(rows)
            index.save(checkpoint)
    index.build_state.update(complete=True, unreadable=[list(u) for u in report.unreadable],
                             last_add=str(report))
    index.save(checkpoint)
    # only what this build wrote: extract's manifest and shards, then the plan
    remove_shards(shard_dir)
    (shard_dir.parent / PLAN_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something not ours stays, and so does the folder
        shard_dir.parent.rmdir()
    return report


def from_images(cls: Any, images: Any, model: Any, out: str | os.PathLike | None = None, *,
                metric: str = "cosine", factory: str = "Flat", pool: str = "cls",
                memory: Any = None, recall: float | None = None, **kw: Any):
    """Build (or resume) an index of class ``cls`` of the image files under ``images``:
    see :meth:`dinofeat.KNNIndex.from_images`."""
    if out is not None and (Path(out) / HEADER_NAME).is_file():
        index = cls.load(out)
        _log.info("resuming index %s: %d items already in it", out, len(index))
        if index.metric != metric or index.factory != factory:
            raise ValueError(f"{out} holds a {index.metric}/{index.factory} index, not "
                             f"{metric}/{factory}: choose another output or delete it")
    else:
        index = cls(metric=metric, factory=factory,
                    **({"memory": memory, "recall": recall} if factory == "auto" else {}))
    if is_distributed():
        if out is None:
            raise ValueError("a distributed build (torchrun) needs out=: the processes "
                             "meet through its shard folder")
        add_images_distributed(index, images, model, pool=pool, checkpoint=out, **kw)
    else:
        kw.pop("shard_size", None)
        add_images(index, images, model, pool=pool, checkpoint=out, **kw)
    return index
