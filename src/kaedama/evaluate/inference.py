"""Run a trained model over manifest rows: read, preprocess (the checkpoint's own), predict.

Images are read and preprocessed by :class:`kaedama.preprocess.Preprocess` built
from the checkpoint's data config, the function the prediction service uses, so
the figures here are the figures of the deployed model. Reading and decoding run
in a bounded thread pool (Pillow and storage reads release the GIL) ahead of the
forward passes. An image that cannot be read is skipped and listed, never fatal.

Test-time augmentation views are built from the same preprocessing: the
horizontal flip of the input, and five crops (corners and centre) of the image
resized exactly as for the centre crop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kaedama import storage
from kaedama.images import ImageError
from kaedama.manifest import Row
from kaedama.preprocess import Preprocess

log = logging.getLogger(__name__)

# TTA mode -> number of views per image.
VIEWS = {"none": 1, "flip": 2, "crops": 5, "flip_crops": 10}
TTA_MODES = tuple(VIEWS)


@dataclass
class Predictions:
    """Model outputs for the rows that could be read, in row order."""

    rows: list[Row]
    logits: np.ndarray  # (n, classes), mean over TTA views
    probs: np.ndarray  # (n, classes), mean of the views' softmax
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    views: int = 1


def five_crops(pp: Preprocess, img: Image.Image) -> list[np.ndarray]:
    """Corner and centre crops of the input size from the image resized as ``pp`` resizes it."""
    _, h, w = pp.input_size
    sh, sw = pp.resize_size
    # Same resize and normalisation, a crop as large as the resize: the five crops lie inside it.
    big = dataclasses.replace(pp, input_size=(3, sh, sw), crop_pct=1.0).image(img)
    top, left = (sh - h) // 2, (sw - w) // 2
    corners = [(0, 0), (0, sw - w), (sh - h, 0), (sh - h, sw - w), (top, left)]
    return [np.ascontiguousarray(big[:, y : y + h, x : x + w]) for y, x in corners]


def views(pp: Preprocess, img: Image.Image, tta: str = "none") -> np.ndarray:
    """The model inputs of one image for a TTA mode, stacked ``(views, C, H, W)``."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; one of {TTA_MODES}")
    base = five_crops(pp, img) if tta in ("crops", "flip_crops") else [pp.image(img)]
    if tta in ("flip", "flip_crops"):
        base = base + [np.ascontiguousarray(v[:, :, ::-1]) for v in base]
    return np.stack(base)


def pick_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU (the training runtime's rule)."""
    from kaedama.train.runtime import _device

    return _device(spec, 0)


def _load(row: Row, pp: Preprocess, tta: str) -> np.ndarray:
    data = storage.read_bytes(row.uri)
    return views(pp, pp.decode(data, uri=row.uri), tta)


def iter_inputs(
    rows: Sequence[Row], pp: Preprocess, *, tta: str = "none", workers: int = 4, ahead: int = 256
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """``(row index, views or None, error)`` in row order, read by a bounded thread pool."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kaedama-eval-read") as pool:
        pending: collections.deque[tuple[int, Future]] = collections.deque()
        it = iter(range(len(rows)))
        for i in it:
            pending.append((i, pool.submit(_load, rows[i], pp, tta)))
            if len(pending) >= ahead:
                break
        while pending:
            i, fut = pending.popleft()
            try:
                yield i, fut.result(), ""
            except (ImageError, storage.StorageError) as exc:
                yield i, None, str(exc)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load, rows[nxt], pp, tta)))


@torch.inference_mode()
def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device) -> np.ndarray:
    """Logits of a ``(N, C, H, W)`` float32 batch, as float64 NumPy."""
    x = torch.from_numpy(batch).to(device, non_blocking=True)
    return model(x).float().cpu().numpy().astype(np.float64)


def predict(
    model: torch.nn.Module,
    rows: Sequence[Row],
    pp: Preprocess,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 4,
    tta: str = "none",
    progress: bool = True,
    desc: str = "evaluate",
) -> Predictions:
    """Logits and probabilities of every readable row (TTA views averaged)."""
    from scipy.special import softmax

    model.eval()
    n_views = VIEWS[tta]
    kept: list[int] = []
    logits: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    skipped: list[dict] = []
    buf: list[np.ndarray] = []
    buf_idx: list[int] = []

    def flush() -> None:
        if not buf:
            return
        out = forward(model, np.concatenate(buf), device).reshape(len(buf), n_views, -1)
        logits.append(out.mean(1))
        probs.append(softmax(out, axis=2).mean(1))
        kept.extend(buf_idx)
        buf.clear()
        buf_idx.clear()

    started = time.perf_counter()
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, leave=False)
    for i, arr, error in iter_inputs(rows, pp, tta=tta, workers=workers, ahead=batch_size * 4):
        bar.update(1)
        if arr is None:
            skipped.append({"uri": rows[i].uri, "label": rows[i].label, "error": error})
            continue
        buf.append(arr)
        buf_idx.append(i)
        if len(buf) >= max(1, batch_size // n_views):
            flush()
    flush()
    bar.close()
    if skipped:
        log.warning("%d image(s) could not be read and were skipped", len(skipped))
    n_classes = logits[0].shape[1] if logits else 0
    return Predictions(
        rows=[rows[i] for i in kept],
        logits=np.concatenate(logits) if logits else np.zeros((0, n_classes)),
        probs=np.concatenate(probs) if probs else np.zeros((0, n_classes)),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        views=n_views,
    )
