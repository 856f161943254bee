"""The clean stage's configuration: one frozen dataclass, mirrored by ``kaedama clean`` flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kaedama.clean.lowinfo import LowInfoThresholds
from kaedama.config import ConfigError

Action = Literal["off", "flag", "drop"]


@dataclass(frozen=True)
class CleanConfig:
    """What ``kaedama clean`` looks for and what it does with what it finds.

    Each step's action is ``off``, ``flag`` (extra manifest columns, nothing removed:
    the default, so nothing is dropped without a person's say) or ``drop`` (status
    ``dropped`` with the step's reason). Steps that need embeddings run only when
    ``embeddings`` names a model.
    """

    embeddings: str = field(
        default="",
        metadata={
            "help": "timm model for image embeddings, e.g. tf_efficientnet_lite0 (empty: "
            "no embeddings, so no label-error, outlier or junk steps)"
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={"help": "ImageNet weights for the embedding model (--no-pretrained: random)"},
    )
    batch_size: int = field(default=32, metadata={"help": "images per embedding batch"})
    label_errors: Action = field(
        default="flag", metadata={"help": "label errors (confident learning on linear probes)"}
    )
    folds: int = field(default=5, metadata={"help": "label errors: k of the k-fold probes"})
    probe_c: float = field(
        default=0.1,
        metadata={"help": "label errors: inverse L2 strength of the logistic-regression probes"},
    )
    outliers: Action = field(
        default="flag", metadata={"help": "images far from the rest of their label"}
    )
    outlier_k: int = field(default=5, metadata={"help": "outliers: neighbours per image"})
    outlier_z: float = field(
        default=3.5, metadata={"help": "outliers: robust z-score above which an image is one"}
    )
    low_info: Action = field(
        default="flag",
        metadata={"help": "near-uniform, very dark/bright, tiny or extreme-aspect images"},
    )
    min_side: int = field(default=32, metadata={"help": "low-info: tiny below this (pixels)"})
    max_aspect: float = field(default=5.0, metadata={"help": "low-info: long/short side limit"})
    min_std: float = field(
        default=4.0, metadata={"help": "low-info: uniform below this luminance std (0-255)"}
    )
    dark: float = field(default=20.0, metadata={"help": "low-info: dark below this mean (0-255)"})
    bright: float = field(
        default=240.0, metadata={"help": "low-info: bright above this mean (0-255)"}
    )
    junk_threshold: float = field(
        default=0.0,
        metadata={
            "help": "junk model: unwanted at this probability or above (0: the model's own, "
            "the F1-best cut on its held-out folds, recorded when it was trained)"
        },
    )
    junk_action: Literal["flag", "drop"] = field(
        default="flag", metadata={"help": "what to do with images the junk model calls unwanted"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the k-fold splits"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.probe_c <= 0:
            raise ConfigError(f"probe_c must be > 0, got {self.probe_c}")
        if self.outlier_k < 1:
            raise ConfigError(f"outlier_k must be >= 1, got {self.outlier_k}")
        if not 0.0 <= self.junk_threshold < 1.0:
            raise ConfigError(f"junk_threshold must be in [0, 1), got {self.junk_threshold}")
        if self.min_side < 0 or self.max_aspect < 1:
            raise ConfigError("min_side must be >= 0 and max_aspect >= 1")

    def thresholds(self) -> LowInfoThresholds:
        """The low-information rules these settings describe."""
        return LowInfoThresholds(
            min_side=self.min_side,
            max_aspect=self.max_aspect,
            min_std=self.min_std,
            dark=self.dark,
            bright=self.bright,
        )
