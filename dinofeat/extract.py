"""Embedding a large collection into a file: shards, resume, several processes.

:func:`embed_to_file` is what ``dinofeat embed`` runs (and what ``dinofeat index build``
can reuse). The sorted input list is cut into shards of ``shard_size`` images; shard ``k``
holds the images ``[k * shard_size, (k + 1) * shard_size)``, whatever the number of
processes, and is written atomically (a shard file exists only once it is complete). Run
again after an interruption, the same command reuses the complete shards and embeds only
the missing ones. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) process ``r`` of ``W``
takes shards ``r, r + W, r + 2W, ...``; after a barrier, rank 0 merges every shard, in
path order, into the output file.

Feature files (:func:`save_features` / :func:`load_features`):

* ``.safetensors``: tensor ``"features"`` ``float32 [N, D]``; header metadata
  ``"dinofeat"`` holds JSON with ``paths`` (one per row, in order), ``skipped``
  (``[[path, reason], ...]``), ``model`` (``DinoModel.describe()``), ``features`` (the
  :meth:`~dinofeat.features.FeatureSpec.identity` of the vectors: weights, applied
  preprocessing, pooling, blocks, normalisation, dim) and ``embed`` (the options as
  given, with the precision). Path lists too big for a safetensors header
  (over 32 MB of JSON) go to a sidecar ``<file>.json`` instead.
* ``.npy``: the ``float32 [N, D]`` array; the same JSON in the sidecar ``<file>.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from . import runtime
from .embedding import RUN_OPTIONS
from .features import FeatureSpec, resolve_preprocessing
from .images import list_images
from .utils import atomic_path, atomic_write_json, get_logger, resolve_inside

if TYPE_CHECKING:  # pragma: no cover
    from .model import DinoModel

__all__ = ["FeatureFile", "save_features", "load_features", "sidecar_path", "shard_ranges",
           "extract_to_shards", "merge_shards", "embed_to_file", "ExtractResult",
           "FEATURE_SUFFIXES", "shard_path", "remove_shards", "distributed_setup",
           "input_paths"]

log = get_logger(__name__)

FEATURE_SUFFIXES = (".safetensors", ".npy")
_FORMAT = "dinofeat.features/1"
_HEADER_LIMIT = 32 * 2 ** 20  # bytes of JSON kept inside a safetensors header


# ------------------------------------------------------------------ feature files
@dataclass
class FeatureFile:
    """Features with the paths they came from: ``features`` ``float32 [N, D]``,
    ``paths`` (N strings), ``meta`` (model identity, options, ``skipped``)."""

    features: torch.Tensor
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(s) for s in self.meta.get("skipped", [])]


def sidecar_path(path: str | os.PathLike) -> Path:
    """``feats.npy`` -> ``feats.npy.json``: where paths and metadata go beside a file."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in FEATURE_SUFFIXES:
        raise ValueError(f"{path}: feature files must end in .safetensors or .npy")


def save_features(path: str | os.PathLike, features: torch.Tensor, paths: Sequence[str],
                  meta: dict[str, Any] | None = None) -> Path:
    """Write ``features`` ``[N, D]`` and their ``paths`` (plus ``meta``) atomically, as
    ``.safetensors`` or ``.npy`` (see the module docstring)."""
    path = Path(path)
    _check_suffix(path)
    features = features.detach().to("cpu", torch.float32).contiguous()
    if features.ndim != 2 or features.shape[0] != len(paths):
        raise ValueError(f"features {tuple(features.shape)} do not match {len(paths)} paths")
    info = {"format": _FORMAT, **(meta or {}), "count": len(paths), "dim": features.shape[1],
            "paths": [str(p) for p in paths]}
    text = json.dumps(info)
    if path.suffix.lower() == ".npy":
        atomic_write_json(sidecar_path(path), info, indent=None)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, features.numpy())
        return path
    from safetensors.torch import save_file
    side = sidecar_path(path)
    if len(text) > _HEADER_LIMIT:
        atomic_write_json(side, info, indent=None)
        header = {k: v for k, v in info.items() if k not in ("paths", "skipped")}
        header["paths_file"] = side.name
        text = json.dumps(header)
    elif side.exists():
        side.unlink()  # a stale sidecar from an earlier, larger run
    with atomic_path(path) as tmp:
        save_file({"features": features}, str(tmp), metadata={"dinofeat": text})
    return path


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read a file written by :func:`save_features` (or ``dinofeat embed``)."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such feature file: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"{path}: not a plain numeric .npy array ({type(e).__name__}: "
                             f"{e})") from None
        if not isinstance(arr, np.ndarray):  # a zip (.npz) archive, read lazily: refuse
            arr.close()
            raise ValueError(f"{path}: a zip archive (.npz or other), not a .npy array")
        side = sidecar_path(path)
        if not side.is_file():
            raise FileNotFoundError(f"{path}: its paths file {side.name} is missing")
        info = _read_json(side)
        feats = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if "features" not in f.keys():
                    raise ValueError(f"{path}: no 'features' tensor (has {list(f.keys())})")
                feats = f.get_tensor("features").float()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - SafetensorError is no OSError/RuntimeError
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if "dinofeat" not in meta:
            raise ValueError(f"{path}: no dinofeat metadata (paths) in the file")
        try:
            info = json.loads(meta["dinofeat"])
        except ValueError as e:
            raise ValueError(f"{path}: damaged dinofeat metadata ({e})") from None
        if "paths_file" in info:
            side = resolve_inside(path.parent, str(info["paths_file"]), source=str(path),
                                  key="paths_file")
            info = _read_json(side)
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be [N, D], got shape {tuple(feats.shape)}")
    paths = info.get("paths") if isinstance(info, dict) else None
    if not isinstance(paths, list) or len(paths) != feats.shape[0]:
        raise ValueError(f"{path}: {feats.shape[0]} feature rows but "
                         f"{len(paths) if isinstance(paths, list) else 'no'} paths")
    meta = {k: v for k, v in info.items() if k != "paths"}
    return FeatureFile(feats, paths, meta)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing metadata file {path}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: damaged JSON ({e})") from None


# ------------------------------------------------------------------------ shards
def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive shards covering ``num_images``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [(lo, min(lo + shard_size, num_images)) for lo in range(0, num_images, shard_size)]


def input_paths(images: Any) -> list[Path]:
    """The image files of a folder (sorted, recursive), a file or a list of them."""
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise FileNotFoundError(f"no image files in folder {p}")
            return files
        if not p.exists():
            raise FileNotFoundError(f"no such image file or folder: {p}")
        return [p]
    if isinstance(images, (list, tuple)) and all(isinstance(i, (str, os.PathLike))
                                                 for i in images):
        out: list[Path] = []
        for i in images:
            out.extend(input_paths(i) if Path(i).is_dir() else [Path(i)])
        if not out:
            raise ValueError("no images given")
        return out
    raise TypeError("extraction to files takes a folder, an image path or a list of paths")


def _run_config(model: "DinoModel", paths: Sequence[Path], shard_size: int,
                spec: FeatureSpec, precision: str) -> dict[str, Any]:
    embed = spec.to_dict()
    embed["preprocessing"] = resolve_preprocessing(model, spec.preprocessing).to_dict()
    embed["precision"] = precision
    embed["dim"] = spec.dim(model)
    # surrogateescape: file names that are not UTF-8 hash as their bytes
    digest = hashlib.sha256("\n".join(map(str, paths)).encode("utf-8", "surrogateescape")
                            ).hexdigest()
    return {"format": _FORMAT, "model": model.describe(), "features": spec.identity(model),
            "embed": embed, "num_images": len(paths), "paths_sha256": digest,
            "shard_size": shard_size}


def _config_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(shard_dir: Path, k: int) -> Path:
    """Where shard ``k`` of a run lives in ``shard_dir``."""
    return Path(shard_dir) / f"shard_{k:06d}.safetensors"


_shard_path = shard_path  # the name dinofeat.index imported before it became public


def _shard_is_complete(path: Path, config_id: str, lo: int, hi: int) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("dinofeat", "{}"))
    except Exception:  # noqa: BLE001 - a damaged shard is simply redone
        log.warning("shard %s is damaged; embedding it again", path)
        return False
    if info.get("config_id") != config_id:
        raise ValueError(
            f"{path} was written with other settings (model, options or input list); use "
            f"another --shard-dir or delete {path.parent}")
    return info.get("range") == [lo, hi]


def _split_options(options: dict[str, Any]) -> tuple[FeatureSpec, dict[str, Any]]:
    """``(spec, run options)`` of ``embed``-style keywords (``spec=`` allowed)."""
    options = dict(options)
    fields, rest = FeatureSpec.split_options(options)
    spec = FeatureSpec.from_options(rest.pop("spec", None), **fields)
    unknown = set(rest) - set(RUN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown embed option(s): {', '.join(sorted(unknown))}")
    rest.setdefault("precision", "fp32")
    return spec, rest


def extract_to_shards(model: "DinoModel", images: Any, shard_dir: str | os.PathLike, *,
                      shard_size: int = 10_000, rank: int = 0, world_size: int = 1,
                      progress: bool | None = None, **embed_options) -> dict[str, Any]:
    """Embed this process's shards of ``images`` into ``shard_dir``; return the run's
    configuration (what :func:`merge_shards` checks).

    ``images``: a folder (sorted, recursive) or a list of paths (kept in its order).
    Shard ``k`` (``shard_size`` images) is done by rank ``k % world_size``; complete shards
    already in ``shard_dir`` from the same configuration are kept, a shard from another
    configuration is an error. Unreadable files are skipped, logged and recorded.
    ``embed_options``: those of :meth:`DinoModel.embed`: ``spec`` (a
    :class:`~dinofeat.features.FeatureSpec`) or its fields (``pool``, ``normalize``,
    ``multiscale``, ``n_last_blocks``, ``avgpool``, ``layout``, ``size``,
    ``preprocessing``), and ``precision``, ``batch_size``, ``num_workers``, ``device``.
    """
    from tqdm.auto import tqdm
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    spec, run = _split_options(embed_options)
    spec.check_model(model)
    paths = input_paths(images)
    shard_dir = Path(shard_dir)
    config = _run_config(model, paths, shard_size, spec, run["precision"])
    cid = _config_id(config)
    manifest = shard_dir / "manifest.json"
    if not manifest.is_file():
        _refuse_foreign_folder(shard_dir)
    if manifest.is_file() and _read_json(manifest).get("config_id") != cid:
        if any(shard_dir.glob("shard_*.safetensors")):
            raise ValueError(
                f"{shard_dir} holds shards of another run (different model, options or "
                f"input list); use another --shard-dir or delete it")
        # a run that stopped before finishing any shard (a mistake in its options...):
        # nothing to keep, its manifest is replaced
        if rank == 0:
            atomic_write_json(manifest, {"config_id": cid, **config})
    elif not manifest.is_file() and rank == 0:
        atomic_write_json(manifest, {"config_id": cid, **config})
    ranges = shard_ranges(len(paths), shard_size)
    mine = [k for k in range(rank, len(ranges), world_size)]
    todo = [k for k in mine if not _shard_is_complete(shard_path(shard_dir, k), cid,
                                                      *ranges[k])]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shard(s) already complete in %s", rank,
                 len(mine) - len(todo), len(mine), shard_dir)
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    # By default one bar (rank 0's, on a terminal); its rate is this process's images/s.
    show = progress if progress is not None else (_isatty() and rank == 0)
    bar = tqdm(total=total, unit="img", desc=f"embed[{rank}]" if world_size > 1 else "embed",
               disable=not show or total == 0, dynamic_ncols=True, smoothing=0.1)
    from safetensors.torch import save_file
    skipped_total = 0
    try:
        for k in todo:
            lo, hi = ranges[k]
            stream = model.iter_embed(paths[lo:hi], spec=spec, progress=False,
                                      skip_unreadable=True, **run)
            stream.quiet = True  # skips are reported once for the whole run, below
            keys: list[str] = []
            chunks: list[torch.Tensor] = []
            done = 0
            for batch_keys, feats in stream:
                keys.extend(str(p) for p in batch_keys)
                chunks.append(feats)
                now = len(keys) + len(stream.skipped)
                bar.update(now - done)
                done = now
            bar.update((hi - lo) - done)
            for s in stream.skipped:  # each unreadable file named once in the log
                log.warning("skipping unreadable image %s: %s", s.key, s.reason)
            skipped_total += len(stream.skipped)
            feats = torch.cat(chunks) if chunks else torch.zeros(0, config["embed"]["dim"])
            info = {"config_id": cid, "range": [lo, hi], "paths": keys,
                    "skipped": [[str(s.key), s.reason] for s in stream.skipped]}
            with atomic_path(shard_path(shard_dir, k)) as tmp:
                save_file({"features": feats.contiguous()}, str(tmp),
                          metadata={"dinofeat": json.dumps(info)})
    finally:
        bar.close()
    if skipped_total:
        log.warning("%sskipped %d unreadable image(s) of %d",  # rank only when several
                    f"rank {rank}: " if world_size > 1 else "", skipped_total, total)
    return {"config_id": cid, **config}


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()


def _is_ours(name: str) -> bool:
    """Whether a file name is one a shard run writes: its manifest, its shards, or the
    temporary files of their atomic writes (``.<name>.<random>.tmp``)."""
    if name == "manifest.json" or _SHARD_NAME.fullmatch(name):
        return True
    return (name.startswith(".manifest.json.") or name.startswith(".shard_")) \
        and name.endswith(".tmp")


_SHARD_NAME = re.compile(r"shard_\d{6}\.safetensors")


def _refuse_foreign_folder(shard_dir: Path) -> None:
    """A shard folder without a manifest must be new or empty: the run deletes what it
    wrote there when it finishes, so it must never share a folder with other files."""
    if not shard_dir.exists():
        return
    if not shard_dir.is_dir():
        raise NotADirectoryError(f"shard folder {shard_dir} is not a folder")
    foreign = sorted(p.name for p in shard_dir.iterdir() if not _is_ours(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"shard folder {shard_dir} is not empty and holds no shard manifest ({shown}); "
            f"name a new or empty folder for the shards")


def remove_shards(shard_dir: str | os.PathLike) -> None:
    """Delete what a shard run wrote in ``shard_dir`` (its manifest and shard files), then
    the folder itself if nothing else is left in it. Other files are never touched."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        return
    for p in shard_dir.iterdir():
        if _is_ours(p.name) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something not ours stays, and so does the folder
        shard_dir.rmdir()


def merge_shards(shard_dir: str | os.PathLike, out: str | os.PathLike) -> FeatureFile:
    """Concatenate every shard of ``shard_dir`` in order into the feature file ``out``
    (``.safetensors`` or ``.npy``); a missing shard is an error naming it."""
    from safetensors import safe_open
    shard_dir = Path(shard_dir)
    manifest = _read_json(shard_dir / "manifest.json")
    cid = manifest["config_id"]
    ranges = shard_ranges(manifest["num_images"], manifest["shard_size"])
    missing = [str(shard_path(shard_dir, k)) for k, (lo, hi) in enumerate(ranges)
               if not _shard_is_complete(shard_path(shard_dir, k), cid, lo, hi)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) missing or incomplete: "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    feats, paths, skipped = [], [], []
    for k in range(len(ranges)):
        with safe_open(str(shard_path(shard_dir, k)), "pt") as f:
            info = json.loads(f.metadata()["dinofeat"])
            feats.append(f.get_tensor("features"))
        paths.extend(info["paths"])
        skipped.extend(info["skipped"])
    features = torch.cat(feats) if feats else torch.zeros(0, manifest["embed"]["dim"])
    meta = {"model": manifest["model"], "embed": manifest["embed"],
            **({"features": manifest["features"]} if "features" in manifest else {}),
            "num_images": manifest["num_images"], "skipped": skipped}
    save_features(out, features, paths, meta)
    return FeatureFile(features, paths, {**meta, "count": len(paths)})


# ------------------------------------------------------------------- all together
@dataclass
class ExtractResult:
    """What :func:`embed_to_file` did (``features`` only on rank 0)."""

    out: Path
    num_images: int
    rank: int
    world_size: int
    features: FeatureFile | None = None

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.features.skipped if self.features else []


def distributed_setup(device: str | torch.device | None) -> tuple[int, int, bool]:
    """``(rank, world_size, created)``: join the process group ``torchrun`` describes in
    the environment (gloo on CPU, NCCL on this process's GPU), if there is one."""
    # Ranks with less work wait for the others at the barrier: allow long runs.
    return runtime.init_process_group(device, timeout=timedelta(hours=24))


_distributed_setup = distributed_setup  # the name dinofeat.index imported


def embed_to_file(model: "DinoModel", images: Any, out: str | os.PathLike, *,
                  shard_size: int = 10_000, shard_dir: str | os.PathLike | None = None,
                  keep_shards: bool = False, progress: bool | None = None,
                  **embed_options) -> ExtractResult:
    """Embed ``images`` (a folder or a list of paths) into the feature file ``out``.

    Writes shards of ``shard_size`` images into ``shard_dir`` (default
    ``<out>.shards/``), resuming from the complete ones of an interrupted run, then merges
    them into ``out`` in path order and deletes them (unless ``keep_shards``). Under
    ``torchrun`` every process embeds its own shards and rank 0 merges. Returns an
    :class:`ExtractResult`; the merged :class:`FeatureFile` on rank 0.
    """
    out = Path(out)
    _check_suffix(out)
    shard_dir = Path(shard_dir) if shard_dir is not None else out.with_name(out.name + ".shards")
    rank, world, created = distributed_setup(embed_options.get("device"))
    if embed_options.get("device") is not None:  # "cuda" -> this process's GPU under torchrun
        embed_options["device"] = runtime.resolve_device(embed_options["device"])
    import torch.distributed as dist
    try:
        extract_to_shards(model, images, shard_dir, shard_size=shard_size, rank=rank,
                          world_size=world, progress=progress, **embed_options)
        if world > 1:
            dist.barrier()
        result = ExtractResult(out, 0, rank, world)
        if rank == 0:
            merged = merge_shards(shard_dir, out)
            result.features = merged
            result.num_images = merged.meta["num_images"]
            if not keep_shards:
                remove_shards(shard_dir)
        if world > 1:
            dist.barrier()  # nobody leaves before the output exists
        return result
    finally:
        if created:
            dist.destroy_process_group()
