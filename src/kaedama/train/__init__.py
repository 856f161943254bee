"""Training: timm transfer learning with strong augmentation, one readable loop, DDP-ready."""

from kaedama.train.config import TrainConfig

__all__ = ["TrainConfig"]
