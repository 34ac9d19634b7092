"""The identity of a feature space: which model, weights, preprocessing and pooling made a
set of vectors, the check that two sets can be compared, and reloading that model.

An index stores this identity so that queries embedded another way are refused instead of
silently returning neighbours from an incomparable space.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

__all__ = ["IncompatibleFeaturesError", "features_info", "as_info", "describe",
           "check_compatible", "embedding_identity", "embed_options", "load_model"]


class IncompatibleFeaturesError(ValueError):
    """Features from another model, pooling or dimension than the index holds."""


_IDENTITY_KEYS = ("weights_hash", "preprocessing", "pooling", "multiscale", "whitening")
_IDENTITY_DEFAULTS = {"pooling": "cls", "multiscale": False, "whitening": None}


def features_info(model: Any = None, pooling: str = "cls", **extra: Any) -> dict[str, Any]:
    """The identity of a feature space as stored in an index: ``model.describe()`` (name,
    weights hash, embed dim, patch size, preprocessing) plus the pooling
    (``"cls"``, ``"cls+gem"`` ...) and anything in ``extra`` (e.g. ``source``: the weights
    path, so that the CLI can reload the model). ``model`` may be a :class:`DinoModel`, a
    dict already of this form, or ``None``."""
    if model is None:
        info: dict[str, Any] = {}
    elif hasattr(model, "describe"):
        info = dict(model.describe())
        src = getattr(model, "source", None)
        if src and "source" not in extra:
            info["source"] = os.path.abspath(src) if os.path.exists(src) else str(src)
    elif isinstance(model, Mapping):
        info = dict(model)
    else:
        raise TypeError(f"model info must be a DinoModel or a dict, not {type(model).__name__}")
    info.setdefault("pooling", pooling)
    info.update(extra)
    return json.loads(json.dumps(info))  # plain JSON types (tuples -> lists)


def as_info(obj: Any) -> dict[str, Any] | None:
    """:func:`features_info` of ``obj``, or ``None`` for ``None``."""
    if obj is None:
        return None
    return features_info(obj)


def describe(info: Mapping[str, Any]) -> str:
    """A short human description of a feature identity (name, weights, pooling)."""
    parts = [str(info.get("name", "unnamed model"))]
    if info.get("weights_hash"):
        parts.append(f"weights {info['weights_hash']}")
    parts.append(f"pooling {info.get('pooling', 'cls')}")
    return ", ".join(parts)


def check_compatible(index_info: Mapping[str, Any] | None, query_info: Mapping[str, Any] | None,
                     what: str = "features") -> None:
    """Raise :class:`IncompatibleFeaturesError` when two feature identities differ in
    weights, preprocessing, pooling, multi-scale averaging or whitening (missing pooling
    counts as ``"cls"``, missing multiscale as off, missing whitening as none). Nothing is
    checked when either side is unknown."""
    if not index_info or not query_info:
        return
    diffs = []
    for key in _IDENTITY_KEYS:
        a = index_info.get(key, _IDENTITY_DEFAULTS.get(key))
        b = query_info.get(key, _IDENTITY_DEFAULTS.get(key))
        if key in ("weights_hash", "preprocessing") and (a is None or b is None):
            continue
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            diffs.append(key)
    if not index_info.get("weights_hash") or not query_info.get("weights_hash"):
        if index_info.get("name") and query_info.get("name") and \
                index_info["name"] != query_info["name"]:
            diffs.append("name")
    if diffs:
        raise IncompatibleFeaturesError(
            f"{what} come from a different feature space than this index ({', '.join(diffs)} "
            f"differ): the {what} are from [{describe(query_info)}], the index holds "
            f"[{describe(index_info)}]; embed them with the index's model and pooling")


def embedding_identity(model: Any, *, pool: str = "cls", preprocessing: Any = None,
                       size: int | None = None, multiscale: bool = False,
                       normalize: bool = True, **_ignored: Any) -> dict[str, Any]:
    """:func:`features_info` for features made by ``model.embed(..., pool=pool, ...)``: the
    preprocessing recorded is the one actually applied (``preprocessing`` and ``size``
    overrides included)."""
    from ..embedding import resolve_preprocessing
    pre = resolve_preprocessing(model, preprocessing)
    if size is not None:
        if pre.mode == "dino":
            pre = pre.replace(crop_size=size,
                              resize_size=round(size * pre.resize_size / pre.crop_size))
        else:
            pre = pre.replace(crop_size=size)
    extra: dict[str, Any] = {"preprocessing": pre.to_dict()}
    if multiscale:
        extra["multiscale"] = True
    if not normalize:
        extra["normalized"] = False
    return features_info(model, pooling=pool, **extra)


def embed_options(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :meth:`DinoModel.embed` options that make features of identity ``info``
    (pooling, the exact preprocessing, multi-scale)."""
    info = info or {}
    opts: dict[str, Any] = {"pool": info.get("pooling", "cls")}
    if info.get("preprocessing"):
        from ..zoo import Preprocessing
        opts["preprocessing"] = Preprocessing(**{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in info["preprocessing"].items()})
    if info.get("multiscale"):
        opts["multiscale"] = True
    if info.get("normalized") is False:
        opts["normalize"] = False
    return opts


def load_model(info: Mapping[str, Any] | None, weights: str | os.PathLike | None = None,
               device: Any = None):
    """Load the model of identity ``info``: ``weights`` if given, else its zoo name, else
    the weights file recorded at build time; its weights hash must match ``info``'s."""
    from ..model import load
    from ..zoo import MODELS
    info = info or {}
    name, source = info.get("name"), info.get("source")
    if weights is not None:
        model = load(weights, device=device)
    elif name in MODELS:
        model = load(name, device=device)
    elif source and Path(source).exists():
        model = load(source, device=device)
    elif not info:
        raise FileNotFoundError("this index records no model (it was built from "
                                "feature vectors, not images); pass the weights file "
                                "(--weights PATH / weights=)")
    else:
        raise FileNotFoundError(
            f"this index was built with model {name!r}"
            f"{f' from {source}' if source else ''}, which is not available here; pass "
            "the weights file (--weights PATH / weights=)")
    want = info.get("weights_hash")
    if want and model.weights_hash != want:
        raise IncompatibleFeaturesError(
            f"the model loaded ({model.name}, weights {model.weights_hash}) is not the "
            f"one this index was built with ({name}, weights {want})")
    return model
