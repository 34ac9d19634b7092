"""The DINO training core: configuration, multi-crop augmentation, projection head, loss,
schedules and optimisers (the training loop builds on these)."""

from .config import PRESETS, TrainConfig, add_arguments, small_data_preset

__all__ = ["TrainConfig", "PRESETS", "small_data_preset", "add_arguments"]
