"""dinofeat: DINO self-supervised vision features.

Pretrained DINO ViTs from the hub, embeddings, attention maps, a faiss-backed k-NN index
and the complete DINO training core::

    import dinofeat
    model = dinofeat.load("vit_s16")
    feats = model.embed("photos/")            # [N, 384]
"""

from .search import KNNIndex
from .attention import AttentionMaps
from .images import ImageReadError, list_images, open_image
from .model import DinoModel, load
from .shortcuts import attention_maps, embed
from .zoo import list_models
from .training.loop import train  # dinofeat.train(config, **overrides): a plain function
from .training.config import TrainConfig
from . import eval  # the paper's evaluations: dinofeat.eval.knn_classify, compute_map...
from . import accel  # the platform's fastest correct kernels (fast_inference...)
from .export import OnnxModel, export_model
from .features import FeatureSpec
from .protocol import FeatureModel

from .version import __version__

__all__ = ["DinoModel", "load", "list_models", "KNNIndex", "__version__",
           "embed", "attention_maps", "AttentionMaps", "open_image", "list_images",
           "ImageReadError", "train", "TrainConfig", "accel", "export_model",
           "OnnxModel", "FeatureSpec", "FeatureModel"]
