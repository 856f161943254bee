"""Training: timm transfer learning with strong augmentation, one readable loop, DDP-ready.

``TrainConfig`` imports without torch (KFP components compile against it); the
loop's entry points load torch only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from kaedama.train.config import TrainConfig

_LAZY = {
    "fit": "kaedama.train.loop",
    "train": "kaedama.train.loop",
    "load_trained": "kaedama.train.model",
    "TrainedModel": "kaedama.train.model",
}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kaedama.train' has no attribute {name!r}")
