"""Features for the evaluations: through the model's ``embed``, with an on-disk cache.

Every evaluation gets its features from :class:`~dinofeat.embedding.EmbedStream`, the
same engine as ``embed``:

* :func:`embed_labeled` embeds labelled image files and says which were readable.
* :func:`cached_embed` does the same through a cache: features are stored as safetensors
  under a key made of the features' identity
  (:meth:`~dinofeat.features.FeatureSpec.identity`: weights hash, applied preprocessing,
  pooling, blocks, normalisation), the precision and the folder listing (relative path,
  size and modification time of every file). An unchanged folder and model reuse the
  file; any change recomputes it.
* :func:`extract_with_transform` runs a custom decoding transform (training
  augmentation, square resizing for copy detection...) and a custom feature function
  over image files, skipping unreadable ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..embedding import RUN_OPTIONS, EmbedStream
from ..features import FeatureSpec
from ..utils import atomic_path, get_logger

__all__ = ["embed_images", "embed_labeled", "cached_embed", "feature_cache_key",
           "extract_with_transform", "default_cache_dir"]

log = get_logger(__name__)

CACHE_FORMAT = "dinofeat-eval-features/2"  # /2: keyed on FeatureSpec.identity


def default_cache_dir() -> Path:
    """``$DINOFEAT_CACHE/features`` or ``~/.cache/dinofeat/features``."""
    base = os.environ.get("DINOFEAT_CACHE") or Path.home() / ".cache" / "dinofeat"
    return Path(base) / "features"


def embed_images(model, images, **embed_kw) -> torch.Tensor:
    """``model.embed(images, **embed_kw)`` where every image must be readable (an
    unreadable one raises, naming the file): one row per input, in order."""
    return model.embed(images, skip_unreadable=False, **embed_kw)


def embed_labeled(model, paths: Sequence[Path], labels: Sequence[int], **embed_kw
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embed image files, skipping unreadable ones: ``(feats [N', D], labels [N'],
    skipped ["path: reason", ...])`` in input order."""
    index = {Path(p): i for i, p in enumerate(paths)}
    stream = model.iter_embed([Path(p) for p in paths], skip_unreadable=True, **embed_kw)
    feats, keep = [], []
    for keys, f in stream:
        feats.append(f)
        keep.extend(index[Path(k)] for k in keys)
    skipped = [str(s) for s in stream.skipped]  # the stream has logged them
    if not feats:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return torch.cat(feats), torch.tensor([labels[i] for i in keep], dtype=torch.long), skipped


def _listing(paths: Sequence[Path], root: Path) -> list[list]:
    out = []
    for p in paths:
        st = Path(p).stat()
        try:
            rel = str(Path(p).relative_to(root))
        except ValueError:
            rel = str(Path(p).resolve())
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def feature_cache_key(model, paths: Sequence[Path], root: Path, labels: Sequence[int],
                      options: dict[str, Any]) -> str:
    """SHA-256 of (the identity of the features ``options`` make with ``model``, the
    precision, the listing of ``paths`` relative to ``root`` with sizes and mtimes, the
    labels). ``options``: ``embed`` keywords (``spec=`` or its fields, ``precision``);
    how the work is run (batch size, workers, device, progress) is left out."""
    fields, rest = FeatureSpec.split_options(options)
    spec = FeatureSpec.from_options(rest.get("spec"), **fields)
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "features": spec.identity(model),
                         "precision": rest.get("precision", "fp32")},
                        sort_keys=True, default=str).encode())
    h.update(json.dumps(_listing(paths, root)).encode())
    h.update(json.dumps(list(map(int, labels))).encode())
    return h.hexdigest()


def cached_embed(model, paths: Sequence[Path], labels: Sequence[int], root: str | os.PathLike,
                 *, cache_dir: str | os.PathLike | None = None, **embed_kw
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str], Path | None]:
    """:func:`embed_labeled` through the feature cache (``cache_dir=None``: the default
    folder; ``cache_dir=False``: no cache). Returns ``(feats, labels, skipped,
    cache_file)``. A damaged cache file is recomputed and replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    root = Path(root)
    options = {k: v for k, v in embed_kw.items()
               if k not in RUN_OPTIONS or k == "precision"}
    if cache_dir is False:
        return (*embed_labeled(model, paths, labels, **embed_kw), None)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = feature_cache_key(model, paths, root, labels, options)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name or "root")[:40]
    file = cache / f"{stem}-{key[:20]}.safetensors"
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("dinofeat_eval", "{}"))
                if meta.get("key") == key:
                    feats, labs = f.get_tensor("features"), f.get_tensor("labels")
                    log.info("features of %s read from the cache %s", root, file)
                    return feats, labs, list(meta.get("skipped", [])), file
        except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed
            log.warning("ignoring unreadable feature cache %s (%s)", file, e)
    feats, labs, skipped = embed_labeled(model, paths, labels, **embed_kw)
    fields, rest = FeatureSpec.split_options(options)
    identity = FeatureSpec.from_options(rest.get("spec"), **fields).identity(model)
    meta = {"format": CACHE_FORMAT, "key": key, "root": str(root), "n_images": len(paths),
            "model": model.describe(), "features": identity,
            "precision": rest.get("precision", "fp32"), "skipped": skipped}
    try:
        with atomic_path(file) as tmp:
            save_file({"features": feats.contiguous(), "labels": labs.contiguous()}, str(tmp),
                      metadata={"dinofeat_eval": json.dumps(meta, default=str)})
    except OSError as e:
        log.warning("could not write the feature cache %s: %s", file, e)
        return feats, labs, skipped, None
    return feats, labs, skipped, file


def extract_with_transform(model, paths: Sequence[Path], transform: Callable | None,
                           feature_fn: Callable[[torch.Tensor], torch.Tensor], *,
                           batch_size: int = 64, num_workers: int | None = None,
                           desc: str = "features", progress: bool = True,
                           precision: str = "fp32"
                           ) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode image files, apply ``transform`` (on ``uint8 [3, H, W]``; ``None``: the
    images as they are), normalise with the model's mean/std on its device and run
    ``feature_fn`` on each batch, as ``embed`` does (an
    :class:`~dinofeat.embedding.EmbedStream`: inference mode, ``precision``).

    Returns ``(feats [N', D] float32 on CPU, kept positions, skipped "path: reason")``;
    images of different sizes after ``transform`` are run in separate groups."""
    stream = EmbedStream(model, [Path(p) for p in paths], feature_fn,
                         transform=transform if transform is not None else _unchanged,
                         batch_size=batch_size, num_workers=num_workers, precision=precision,
                         progress=progress if progress else False, skip_unreadable=True,
                         desc=desc, positions=True)
    rows: list[torch.Tensor] = []
    kept: list[int] = []
    for positions, f in stream:
        rows.append(f)
        kept.extend(positions)
    skipped = [f"{paths[s.position]}: {s.reason}" for s in stream.skipped]
    if not rows:
        raise ValueError(f"{desc}: none of the {len(paths)} images could be read")
    return torch.cat(rows), kept, skipped


def _unchanged(image: torch.Tensor) -> torch.Tensor:
    return image
