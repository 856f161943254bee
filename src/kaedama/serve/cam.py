"""Class activation maps from the exported feature map, with NumPy and Pillow.

For a global-average-pool + linear head, the CAM of class k is
``sum_c W[k, c] * F[c]`` (Zhou et al., 2016), which equals Grad-CAM's map for that
head. kaedama's evaluation uses the grad-cam library on torch; the service has no
torch, and for these heads one matrix product is the whole method.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kaedama.preprocess import Preprocess

# Jet-like colour ramp: (position, (r, g, b)).
_RAMP = np.array(
    [
        (0.00, 0, 0, 128),
        (0.15, 0, 0, 255),
        (0.40, 0, 255, 255),
        (0.60, 255, 255, 0),
        (0.85, 255, 0, 0),
        (1.00, 128, 0, 0),
    ],
    dtype=np.float32,
)


def cam_grid(features: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """The ``(h, w)`` map of ``class_index`` in [0, 1] (ReLU, then scaled by its maximum)."""
    grid = np.tensordot(weight[class_index], features, axes=(0, 0))
    grid = np.maximum(grid, 0.0)
    top = float(grid.max())
    return (grid / top if top > 0 else grid).astype(np.float32)


def colorize(grid: np.ndarray) -> np.ndarray:
    """``(h, w)`` values in [0, 1] -> ``(h, w, 3)`` uint8 colours on the ramp."""
    channels = [np.interp(grid, _RAMP[:, 0], _RAMP[:, i]) for i in (1, 2, 3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def model_view(array: np.ndarray, preprocess: Preprocess) -> Image.Image:
    """The crop the model saw, as an RGB image (the preprocessed input, un-normalised)."""
    mean = np.asarray(preprocess.mean, np.float32)[:, None, None]
    std = np.asarray(preprocess.std, np.float32)[:, None, None]
    pixels = np.clip((array * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels.transpose(1, 2, 0), "RGB")


def heatmap_png(grid: np.ndarray, base: Image.Image, *, alpha: float = 0.5) -> bytes:
    """The map upsampled over ``base`` and blended with it, as PNG bytes."""
    heat = Image.fromarray(colorize(grid), "RGB").resize(base.size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    Image.blend(base, heat, alpha).save(buf, "PNG")
    return buf.getvalue()
