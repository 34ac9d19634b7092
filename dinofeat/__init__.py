"""dinofeat: DINO self-supervised vision features.

Pretrained DINO ViTs from the hub, embeddings, attention maps, a faiss-backed k-NN index
and the complete DINO training core::

    import dinofeat
    model = dinofeat.load("vit_s16")
    feats = model.embed("photos/")            # [N, 384]
"""

import importlib
from typing import TYPE_CHECKING, Any

from .openblas import pin_core as _pin_openblas_core
from .version import __version__

# before any dinofeat module loads faiss: its bundled OpenBLAS falls back to generic
# kernels on CPUs newer than itself unless told which to use
_pin_openblas_core()

# Public names are imported on first use (PEP 562), so that ``import dinofeat`` and the
# command line's ``--help`` do not pay for torch, torchvision and faiss until needed.
_LAZY = {
    "KNNIndex": ".search", "AttentionMaps": ".attention", "ImageReadError": ".images",
    "list_images": ".images", "open_image": ".images", "DinoModel": ".model",
    "load": ".model", "attention_maps": ".shortcuts", "embed": ".shortcuts",
    "list_models": ".zoo", "train": ".training.loop", "TrainConfig": ".training.config",
    "OnnxModel": ".export", "export_model": ".export", "FeatureSpec": ".features",
    "FeatureModel": ".protocol",
}
_SUBMODULES = ("eval", "accel")  # dinofeat.eval.knn_classify, dinofeat.accel...

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import accel, eval  # noqa: F401
    from .attention import AttentionMaps  # noqa: F401
    from .export import OnnxModel, export_model  # noqa: F401
    from .images import ImageReadError, list_images, open_image  # noqa: F401
    from .features import FeatureSpec  # noqa: F401
    from .protocol import FeatureModel  # noqa: F401
    from .search import KNNIndex  # noqa: F401
    from .model import DinoModel, load  # noqa: F401
    from .shortcuts import attention_maps, embed  # noqa: F401
    from .training.config import TrainConfig  # noqa: F401
    from .training.loop import train  # noqa: F401
    from .zoo import list_models  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'dinofeat' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["DinoModel", "load", "list_models", "KNNIndex", "__version__",
           "embed", "attention_maps", "AttentionMaps", "open_image", "list_images",
           "ImageReadError", "train", "TrainConfig", "accel", "export_model",
           "OnnxModel", "FeatureSpec", "FeatureModel"]
