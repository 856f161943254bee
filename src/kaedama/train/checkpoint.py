"""Checkpoints: written atomically to a local path or ``gs://`` through :mod:`kaedama.storage`.

An output folder holds two checkpoints:

``last.pt``
    Everything to continue a killed run: model (and EMA) weights, optimiser,
    scheduler and AMP scaler states, the epoch and step reached, the best result
    so far and the history. Written after every epoch, every
    ``checkpoint_every_steps`` steps, and at the step where SIGTERM/SIGINT stopped
    the run (same format: a step position ``step > 0`` means mid-epoch). Randomness needs no saved generator states: every
    random draw is seeded from ``(seed, epoch, step, rank)`` (see
    :mod:`kaedama.train.data`), so the counters restore it exactly.
``best.pt``
    The weights of the epoch with the best validation accuracy, with the class
    names, the data config, the model name and the training config: all that
    evaluation and serving need.

Both are plain ``torch.save`` dicts of tensors and built-in types, loaded with
``weights_only=True`` (no pickled code runs on load).
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import torch

from kaedama import storage
from kaedama.errors import KaedamaError

FORMAT = "kaedama.train/1"
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(KaedamaError):
    """A checkpoint is missing, unreadable or from an incompatible run."""


def save_checkpoint(uri: str, state: dict[str, Any]) -> None:
    """Serialise ``state`` (with the format tag added) and write it atomically to ``uri``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, unreadable data or not a kaedama checkpoint.
    """
    try:
        data = storage.read_bytes(uri)
    except storage.NotFoundError as exc:
        raise CheckpointError(f"checkpoint {uri} not found") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    # What torch.load raises for truncated or foreign bytes depends on where they break.
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        pickle.UnpicklingError,
        struct.error,
    ) as exc:
        raise CheckpointError(f"{uri} is not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{uri} is not a kaedama training checkpoint (expected format {FORMAT!r})"
        )
    return state
