"""Low-information images by cheap statistics: near-uniform, very dark or bright, tiny, extreme aspect.

No model: one reduced decode (JPEGs at 1/8 scale) per image, then a few numbers on a
small grayscale thumbnail. Each rule that fires adds its reason, so a person sees
why an image was flagged (``["dark", "uniform"]``), and the thresholds are fields of
:class:`LowInfoThresholds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from kaedama import images

# The statistics are computed on a thumbnail no larger than this (pixels a side).
STATS_SIZE = 64
REASONS = ("tiny", "extreme_aspect", "uniform", "dark", "bright")


@dataclass(frozen=True)
class ImageStats:
    """What the rules look at: full-size geometry and the thumbnail's luminance (0-255)."""

    width: int
    height: int
    mean: float
    std: float
    # The share of the range of grey levels that the central 98 % of pixels span.
    spread: float

    def to_json(self) -> dict[str, float]:
        return {
            "width": self.width,
            "height": self.height,
            "mean": round(self.mean, 2),
            "std": round(self.std, 2),
            "spread": round(self.spread, 3),
        }


@dataclass(frozen=True)
class LowInfoThresholds:
    """When an image counts as low-information (each rule independently).

    Attributes:
        min_side: ``tiny`` below this many pixels on the short side.
        max_aspect: ``extreme_aspect`` when long side / short side exceeds this.
        min_std: ``uniform`` when the luminance standard deviation is below this...
        min_spread: ...or the central 98 % of pixels span less than this share of 0-255.
        dark: ``dark`` when mean luminance is below this (0-255).
        bright: ``bright`` when mean luminance is above this.
    """

    min_side: int = 32
    max_aspect: float = 5.0
    min_std: float = 4.0
    min_spread: float = 0.05
    dark: float = 20.0
    bright: float = 240.0


def image_stats(
    data: bytes, *, uri: str | None = None, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> ImageStats:
    """The statistics of one image's bytes (raises :class:`kaedama.images.ImageError`)."""
    img, info = images.decode_with_info(
        data, max_pixels=max_pixels, draft=(STATS_SIZE, STATS_SIZE), uri=uri, mode="L"
    )
    img.thumbnail((STATS_SIZE, STATS_SIZE), Image.Resampling.BILINEAR)
    return stats_of_luma(np.asarray(img, dtype=np.float32), info.width, info.height)


def stats_of_luma(luma: np.ndarray, width: int, height: int) -> ImageStats:
    """:class:`ImageStats` of a grayscale array and the full-size geometry."""
    low, high = np.percentile(luma, [1, 99]) if luma.size else (0.0, 0.0)
    return ImageStats(
        width=int(width),
        height=int(height),
        mean=float(luma.mean()) if luma.size else 0.0,
        std=float(luma.std()) if luma.size else 0.0,
        spread=float(high - low) / 255.0,
    )


def low_info_reasons(stats: ImageStats, t: LowInfoThresholds = LowInfoThresholds()) -> list[str]:
    """The rules of :data:`REASONS` that this image breaks, in that order (empty: fine)."""
    reasons = []
    short, long = sorted((stats.width, stats.height))
    if short < t.min_side:
        reasons.append("tiny")
    if short and long / short > t.max_aspect:
        reasons.append("extreme_aspect")
    if stats.std < t.min_std or stats.spread < t.min_spread:
        reasons.append("uniform")
    if stats.mean < t.dark:
        reasons.append("dark")
    if stats.mean > t.bright:
        reasons.append("bright")
    return reasons
