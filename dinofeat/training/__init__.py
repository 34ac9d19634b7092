"""The DINO training core: configuration, multi-crop augmentation, projection head, loss,
schedules and optimisers, and the training loop.

``dinofeat.train(config, **overrides)`` is :func:`dinofeat.training.loop.train`."""

from .augment import MultiCropAugmentation
from .config import PRESETS, TrainConfig, add_arguments, small_data_preset
from .head import DINOHead, MultiCropNetwork, Predictor, WeightNormLinear, build_head
from .loss import DINOLoss
from .optim import (LARS, apply_schedules, build_optimizer, cancel_last_layer_gradients,
                    clip_gradients, ema_update, param_groups)
from .schedules import Schedules, build_schedules, cosine_schedule
from .loop import NonFiniteLossError, TrainResult, TrainState, train

__all__ = [
    "TrainConfig", "PRESETS", "small_data_preset", "add_arguments",
    "MultiCropAugmentation",
    "DINOHead", "Predictor", "MultiCropNetwork", "WeightNormLinear", "build_head",
    "DINOLoss",
    "cosine_schedule", "Schedules", "build_schedules",
    "param_groups", "build_optimizer", "apply_schedules", "LARS", "clip_gradients",
    "cancel_last_layer_gradients", "ema_update",
    "train", "TrainResult", "TrainState", "NonFiniteLossError",
]

