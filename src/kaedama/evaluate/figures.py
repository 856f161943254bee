"""PNG figures (matplotlib, Agg backend) and picture helpers shared with the report.

The PNGs are the files a person opens or pastes elsewhere; the report draws the
same data as inline SVG (:mod:`kaedama.evaluate.svg`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from kaedama import storage
from kaedama.preprocess import Preprocess


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Labels in scripts the machine has no font for (CJK...) draw as boxes in the PNG;
        # the HTML report shows them in the browser's fonts. One warning per glyph is noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    storage.write_bytes(uri, buf.getvalue())


def to_rgb(pp: Preprocess, x: np.ndarray) -> np.ndarray:
    """A preprocessed ``(C, H, W)`` input back to ``(H, W, 3)`` uint8 pixels."""
    arr = x.transpose(1, 2, 0) * np.asarray(pp.std, np.float32) + np.asarray(pp.mean, np.float32)
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (``[0, 1]``, same size) in the 'jet' colour map blended over the picture."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float32)
    return (rgb.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)


def thumbnail(rgb: np.ndarray, side: int) -> np.ndarray:
    """Downscale ``(H, W, 3)`` uint8 so its longer side is ``side`` (box filter)."""
    img = Image.fromarray(rgb)
    img.thumbnail((side, side), Image.Resampling.BOX)
    return np.asarray(img)


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 picture."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def training_curves(history: Sequence[dict], uri: str) -> None:
    """Loss and accuracy per epoch (train and val) from a checkpoint's history.json."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    epochs = [h["epoch"] for h in history]
    for ax, kind in zip(axes, ("loss", "acc"), strict=True):
        for split in ("train", "val"):
            ys = [h.get(f"{split}_{kind}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, uri)


def confusion(matrix: np.ndarray, labels: Sequence[str], uri: str) -> None:
    """Row-normalised confusion matrix (in the order given), labels when they fit."""
    plt = _plt()
    n = len(labels)
    size = min(18, max(4, 0.22 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= 60:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, uri)


def reliability(bins: Sequence[dict], uri: str, title: str) -> None:
    """Reliability diagram with the diagonal of perfect calibration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    width = bins[0]["hi"] - bins[0]["lo"]
    xs = [b["lo"] for b in bins if b["accuracy"] is not None]
    ys = [b["accuracy"] for b in bins if b["accuracy"] is not None]
    ax.bar(xs, ys, width=width, align="edge", edgecolor="black", alpha=0.75, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    _save(fig, uri)


def pr_curves(curves: Sequence[dict], uri: str) -> None:
    """One-vs-rest precision-recall curves (legend up to 12 classes)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for c in curves:
        if c["recall"]:
            ax.plot(
                c["recall"],
                c["precision"],
                lw=1,
                label=f"{c['class']} (AP {c['average_precision']:.2f})",
            )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    _save(fig, uri)
