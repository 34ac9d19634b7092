"""The DINO training core: configuration, multi-crop augmentation, projection head, loss,
schedules and optimisers, and the training loop.

``dinofeat.train(config, **overrides)`` is :func:`dinofeat.training.loop.train`."""

import importlib
from typing import Any

# Imported on first use (PEP 562): the command line reads the options in .config without
# paying for torch.
_LAZY = {
    "MultiCropAugmentation": "augment", "PRESETS": "config", "TrainConfig": "config",
    "add_arguments": "config", "small_data_preset": "config", "DINOHead": "head",
    "MultiCropNetwork": "head", "Predictor": "head", "WeightNormLinear": "head",
    "build_head": "head", "DINOLoss": "loss", "LARS": "optim", "apply_schedules": "optim",
    "build_optimizer": "optim", "cancel_last_layer_gradients": "optim",
    "clip_gradients": "optim", "ema_update": "optim", "param_groups": "optim",
    "Schedules": "schedules", "build_schedules": "schedules",
    "cosine_schedule": "schedules", "NonFiniteLossError": "loop", "TrainResult": "loop",
    "TrainState": "loop", "train": "loop",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # a submodule (dinofeat.training.loop), as before
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


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

