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


from ..features import IncompatibleFeaturesError  # one error for every feature mismatch


_IDENTITY_KEYS = ("weights_hash", "preprocessing", "pooling", "multiscale", "whitening",
                  "normalized", "n_last_blocks", "avgpool", "layout")
# older records lack the block settings: they were made with the defaults
_IDENTITY_DEFAULTS = {"pooling": "cls", "multiscale": False, "whitening": None,
                      "normalized": True, "n_last_blocks": 1, "avgpool": False, "layout": None}


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
        # a FeatureSpec.identity record: this index format names two of its keys otherwise
        for key, ours in (("pool", "pooling"), ("normalize", "normalized")):
            if key in info:
                info.setdefault(ours, info.pop(key))
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
                       normalize: bool = True, n_last_blocks: int = 1, avgpool: bool = False,
                       layout: str | None = None, spec: Any = None,
                       **_ignored: Any) -> dict[str, Any]:
    """:func:`features_info` for features made by ``model.embed(..., pool=pool, ...)``
    (or ``spec=``, a :class:`~dinofeat.features.FeatureSpec`): the preprocessing recorded
    is the one actually applied (``preprocessing`` and ``size`` overrides included), and
    every setting that changes the vectors is recorded."""
    from ..features import FeatureSpec
    if spec is None:
        spec = FeatureSpec(pool=pool, normalize=normalize, multiscale=multiscale,
                           n_last_blocks=n_last_blocks, avgpool=avgpool, layout=layout,
                           preprocessing=preprocessing, size=size)
    extra: dict[str, Any] = {"preprocessing": spec.effective_preprocessing(model).to_dict()}
    if spec.multiscale:
        extra["multiscale"] = True
    if not spec.normalize:
        extra["normalized"] = False
    if spec.n_last_blocks != 1:
        extra["n_last_blocks"] = spec.n_last_blocks
    if spec.avgpool:
        extra.update(avgpool=True, layout=spec.layout)
    return features_info(model, pooling=spec.pool, **extra)


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
    for key in ("n_last_blocks", "avgpool", "layout"):
        if info.get(key) not in (None, _IDENTITY_DEFAULTS[key]):
            opts[key] = info[key]
    return opts


def load_model(info: Mapping[str, Any] | None, weights: str | os.PathLike | None = None,
               device: Any = None, *, folder: str | os.PathLike | None = None):
    """Load the model of identity ``info``: ``weights`` if given, else its zoo name, else
    the weights file recorded at build time (``source``) if it lies inside ``folder`` (the
    index folder); its weights hash must match ``info``'s.

    A recorded source outside the folder is not followed: an index folder may come from
    someone else, and its header must not make dinofeat read files elsewhere. The error
    names the file to pass as ``weights`` (``--model`` on the command line) instead."""
    from ..model import load
    from ..utils import UnsafePathError, resolve_inside
    from ..zoo import MODELS
    info = info or {}
    name, source = info.get("name"), info.get("source")
    inside = None
    if source and folder is not None:
        try:
            inside = resolve_inside(folder, source, source=str(Path(folder) / "index.json"),
                                    key="model.source")
        except UnsafePathError:
            inside = None
    if weights is not None:
        model = load(weights, device=device)
    elif name in MODELS:
        model = load(name, device=device)
    elif inside is not None and inside.is_file():
        model = load(inside, device=device)
    elif source and Path(source).exists():
        raise FileNotFoundError(
            f"this index was built with the weights file {source} (model.source in its "
            "index.json), which is outside the index folder and is not loaded without your "
            f"say-so; pass it as --model {source} (weights=)")
    elif not info:
        raise FileNotFoundError("this index records no model (it was built from "
                                "feature vectors, not images); pass the weights file "
                                "(--model PATH / weights=)")
    else:
        raise FileNotFoundError(
            f"this index was built with model {name!r}"
            f"{f' from {source}' if source else ''}, which is not available here; pass "
            "the weights file (--model PATH / weights=)")
    want = info.get("weights_hash")
    if want and model.weights_hash != want:
        raise IncompatibleFeaturesError(
            f"the model loaded ({model.name}, weights {model.weights_hash}) is not the "
            f"one this index was built with ({name}, weights {want})")
    return model
