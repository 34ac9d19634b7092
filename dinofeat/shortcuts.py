"""Module-level conveniences: ``dinofeat.embed`` and ``dinofeat.attention_maps``.

They take a model name or path (loaded once, then kept for later calls) or a model
(any :class:`~dinofeat.protocol.FeatureModel`: a :class:`~dinofeat.model.DinoModel`, an
:class:`~dinofeat.export.OnnxModel`), and forward everything else to the method of the
same name::

    feats = dinofeat.embed("photos/")                  # vit_s16, [N, 384]
    maps = dinofeat.attention_maps("cat.jpg")          # vit_s8
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from .model import load
from .protocol import FeatureModel

__all__ = ["get_model", "clear_model_cache", "embed", "attention_maps", "patch_features"]

_CACHE: dict[tuple[str, str], FeatureModel] = {}
_LOCK = threading.Lock()


def get_model(model: "str | os.PathLike | FeatureModel" = "vit_s16",
              device: str | torch.device | None = None) -> FeatureModel:
    """``model`` itself if it is a model (a :class:`~dinofeat.protocol.FeatureModel`),
    else ``dinofeat.load(model)``, cached by (name or path, device) so that repeated calls
    reuse the loaded weights."""
    if not isinstance(model, (str, os.PathLike)):
        # looked up on the class: isinstance(model, FeatureModel) would evaluate every
        # property of the protocol, the weights hash included
        if all(callable(getattr(type(model), m, None)) for m in ("embed", "iter_embed",
                                                                  "attention_maps")):
            return model
        raise TypeError(f"model must be a zoo name, a weights path or a model (DinoModel, "
                        f"OnnxModel), got {type(model).__name__}")
    dev = str(torch.device(device)) if device is not None else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    key = (os.fspath(model), dev)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load(model, device=dev)
        return _CACHE[key]


def clear_model_cache() -> None:
    """Forget the models :func:`get_model` kept."""
    with _LOCK:
        _CACHE.clear()


def embed(images: Any, model: "str | os.PathLike | FeatureModel" = "vit_s16", **kwargs):
    """``get_model(model).embed(images, **kwargs)``: see :meth:`DinoModel.embed`."""
    return get_model(model, kwargs.get("device")).embed(images, **kwargs)


def patch_features(images: Any, model: "str | os.PathLike | FeatureModel" = "vit_s16", **kwargs):
    """``get_model(model).patch_features(images, **kwargs)``."""
    return get_model(model, kwargs.get("device")).patch_features(images, **kwargs)


def attention_maps(img: Any, model: "str | os.PathLike | FeatureModel" = "vit_s8", **kwargs):
    """``get_model(model).attention_maps(img, **kwargs)``: see
    :meth:`DinoModel.attention_maps`."""
    return get_model(model, kwargs.get("device")).attention_maps(img, **kwargs)
