"""One preprocessing function for evaluation, serving and validation: bytes in, model input out.

Built from the data config that every checkpoint saves (timm's ``input_size``,
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, plus kaedama's
decode options), so validation figures, ``kaedama evaluate`` and the prediction
service see the same pixels. It needs only NumPy and Pillow: the serving image
imports no torch. Training wraps the result with ``torch.from_numpy``.

The geometry equals timm's eval transform (``transforms_imagenet_eval``):
resize so the short side is ``floor(size / crop_pct)`` (``squash`` resizes both
sides), centre-crop to the input size, scale to [0, 1], normalise. JPEGs are
decoded at the smallest 1/2, 1/4 or 1/8 DCT scale that still covers the resize
size (``draft``), which costs a fraction of a full decode on large photos.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from kaedama import images
from kaedama.errors import KaedamaError

CROP_MODES = ("center", "squash")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class PreprocessError(KaedamaError):
    """A data config that preprocessing cannot follow."""


@dataclass(frozen=True)
class Preprocess:
    """The eval-time preprocessing of one model; call it on an image's bytes.

    Attributes:
        input_size: ``(channels, height, width)`` of the model input.
        interpolation: resampling for the resize (``bilinear``, ``bicubic``, ...).
        mean, std: per-channel normalisation on [0, 1] pixels.
        crop_pct: the centre crop's share of the resized image.
        crop_mode: ``center`` (keep aspect, crop) or ``squash`` (stretch, crop).
        draft: decode JPEGs at reduced DCT scale when larger than needed.
        max_pixels: refuse larger images (decompression bombs).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    draft: bool = True
    max_pixels: int = images.DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise PreprocessError(f"input_size must be (C, H, W) > 0, got {self.input_size}")
        if self.input_size[0] != 3:
            raise PreprocessError(f"only 3-channel models are supported, got {self.input_size}")
        if str(self.interpolation).lower() not in _RESAMPLE:
            raise PreprocessError(
                f"unknown interpolation {self.interpolation!r}; one of {sorted(_RESAMPLE)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise PreprocessError(
                f"crop_mode {self.crop_mode!r} is not supported; use {CROP_MODES}"
            )
        if not 0 < self.crop_pct <= 1:
            raise PreprocessError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PreprocessError(f"mean and std need 3 values (std > 0): {self.mean} {self.std}")

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> Preprocess:
        """Build from a checkpoint's data config; keys it does not know are ignored."""
        dc = dict(data_config)
        decode = dict(dc.get("decode") or {})
        return cls(
            input_size=tuple(int(v) for v in dc.get("input_size", cls.input_size)),
            interpolation=str(dc.get("interpolation") or "bilinear").lower(),
            mean=tuple(float(v) for v in dc.get("mean", cls.mean)),
            std=tuple(float(v) for v in dc.get("std", cls.std)),
            crop_pct=float(dc.get("crop_pct") or 1.0),
            crop_mode=str(dc.get("crop_mode") or "center"),
            draft=bool(decode.get("draft", True)),
            max_pixels=int(decode.get("max_pixels", images.DEFAULT_MAX_PIXELS)),
        )

    def to_data_config(self) -> dict[str, Any]:
        """The JSON-friendly data config this was built from (round-trips exactly)."""
        d = asdict(self)
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "decode": {"draft": d["draft"], "max_pixels": d["max_pixels"]},
        }

    @property
    def resize_size(self) -> tuple[int, int]:
        """``(height, width)`` that the resize step targets before the crop."""
        _, h, w = self.input_size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """``(width, height)`` a reduced JPEG decode must still cover, or ``None`` (full decode).

        A square of the larger resize side: both sides then stay at least that large,
        so the short side never needs upscaling.
        """
        if not self.draft:
            return None
        side = max(self.resize_size)
        return side, side

    def decode(self, data: bytes, *, uri: str | None = None) -> Image.Image:
        """Decode with this model's decode options (raises :class:`kaedama.images.ImageError`)."""
        return images.decode(data, max_pixels=self.max_pixels, draft=self.draft_size, uri=uri)

    def image(self, img: Image.Image) -> np.ndarray:
        """An RGB PIL image -> normalised ``float32`` array of shape ``input_size``."""
        _, h, w = self.input_size
        sh, sw = self.resize_size
        resample = _RESAMPLE[self.interpolation.lower()]
        if self.crop_mode == "squash" or sh != sw:
            size = (sw, sh)
        else:
            # torchvision's Resize(int): the short side becomes sh, the long side scales
            # with int() truncation, as timm's eval transform does.
            iw, ih = img.size
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_long = int(sh * long / short)
            size = (sh, new_long) if iw <= ih else (new_long, sh)
        if img.size != size:
            img = img.resize(size, resample)
        iw, ih = img.size
        # torchvision's CenterCrop: round half to even of (in - out) / 2.
        top = int(round((ih - h) / 2.0))
        left = int(round((iw - w) / 2.0))
        if top < 0 or left < 0:
            raise PreprocessError(f"resized image {img.size} is smaller than the crop {(w, h)}")
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, data: bytes, *, uri: str | None = None) -> np.ndarray:
        """Image bytes -> model input (``float32``, ``input_size``); raises ``ImageError``."""
        return self.image(self.decode(data, uri=uri))

    def batch(self, items: list[bytes]) -> np.ndarray:
        """Stack several images' inputs into one ``(N, C, H, W)`` array."""
        if not items:
            return np.zeros((0, *self.input_size), np.float32)
        return np.stack([self(item) for item in items])
