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

from ..features import (FIELDS, FeatureSpec, IncompatibleFeaturesError, describe_identity,
                        identity_differences)

__all__ = ["IncompatibleFeaturesError", "features_info", "as_info", "describe", "pool_of",
           "check_compatible", "embedding_identity", "embed_options", "load_model"]


def features_info(model: Any = None, pooling: str = "cls", **extra: Any) -> dict[str, Any]:
    """The identity of a feature space as stored in an index: for a model,
    ``FeatureSpec(pool=pooling).identity(model)`` (name, weights hash, dims, the
    preprocessing, every :class:`~dinofeat.features.FeatureSpec` field) plus ``source``
    (the weights path, so that the CLI can reload the model) and anything in ``extra``;
    a dict already of this form is taken as it is; ``None`` gives an empty identity."""
    if model is None:
        info: dict[str, Any] = {}
    elif hasattr(model, "describe"):
        info = FeatureSpec(pool=pooling).identity(model)
        src = getattr(model, "source", None)
        if src and "source" not in extra:
            info["source"] = os.path.abspath(src) if os.path.exists(src) else str(src)
    elif isinstance(model, Mapping):
        info = dict(model)
    else:
        raise TypeError(f"model info must be a DinoModel or a dict, not {type(model).__name__}")
    if "pool" not in info and "pooling" not in info:
        info["pool"] = pooling
    info.update(extra)
    info.setdefault("pooling", info.get("pool", pooling))  # the key older readers use
    return json.loads(json.dumps(info))  # plain JSON types (tuples -> lists)


def as_info(obj: Any) -> dict[str, Any] | None:
    """:func:`features_info` of ``obj``, or ``None`` for ``None``."""
    if obj is None:
        return None
    return features_info(obj)


def describe(info: Mapping[str, Any]) -> str:
    """A short human description of a feature identity (name, weights, pooling)."""
    return describe_identity(info)


def pool_of(info: Mapping[str, Any] | None) -> str:
    """The pooling an identity records (``"cls"`` when none)."""
    return FeatureSpec.from_dict(info).pool


def check_compatible(index_info: Mapping[str, Any] | None, query_info: Mapping[str, Any] | None,
                     what: str = "features") -> None:
    """Raise :class:`IncompatibleFeaturesError` when two feature identities make different
    vectors: weights, preprocessing, pooling, normalisation, multi-scale averaging, the
    n-last-blocks/avgpool representation or whitening
    (:func:`dinofeat.features.identity_differences`). Nothing is checked when either side
    is unknown."""
    diffs = [_INDEX_NAMES.get(d, d) for d in identity_differences(index_info, query_info)]
    if diffs:
        raise IncompatibleFeaturesError(
            f"{what} come from a different feature space than this index ({', '.join(diffs)} "
            f"differ): the {what} are from [{describe_identity(query_info or {})}], the index "
            f"holds [{describe_identity(index_info or {})}]; embed them with the index's model "
            "and settings")


# the index format's names for two FeatureSpec fields (its headers predate the spec)
_INDEX_NAMES = {"pool": "pooling", "normalize": "normalized"}


def embedding_identity(model: Any, spec: FeatureSpec | None = None, *,
                       pool: str | None = None, **options: Any) -> dict[str, Any]:
    """:func:`features_info` for features made by ``model.embed(..., spec, pool=pool,
    **options)``: the :class:`~dinofeat.features.FeatureSpec` identity (the preprocessing
    actually applied, ``size`` folded in); options that are not spec fields (batch size,
    precision, device...) do not change the vectors and are ignored."""
    fields, _ = FeatureSpec.split_options(options)
    if pool is not None:
        fields["pool"] = pool
    info = FeatureSpec.from_options(spec, **fields).identity(model)
    src = getattr(model, "source", None)
    if src:
        info["source"] = os.path.abspath(src) if os.path.exists(src) else str(src)
    info["pooling"] = info.get("pool", "cls")  # the key older readers use
    return info


def embed_options(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``embed`` options (:class:`~dinofeat.features.FeatureSpec` fields) that make
    features of identity ``info``: pooling, normalisation, multi-scale, the n-last-blocks
    representation and the exact preprocessing recorded."""
    spec = FeatureSpec.from_dict(info)
    return {f: getattr(spec, f) for f in FIELDS if f != "size"}


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
