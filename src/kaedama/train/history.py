"""Training history: ``history.json``/``history.csv`` and TensorBoard scalars (rank 0 only).

TensorBoard is the optional ``tensorboard`` extra: without it the run says once
(per process) that TensorBoard logging is off and writes the history files only.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any

from kaedama import storage

log = logging.getLogger(__name__)
_told_off = False  # the "TensorBoard logging is off" note is given once per process


def _summary_writer() -> type | None:
    """TensorBoard's ``SummaryWriter``, or None (after one note) when it is not installed."""
    global _told_off
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _told_off:
            _told_off = True
            log.warning(
                "TensorBoard logging is off (%s); history.json/.csv are still written. "
                "pip install 'kaedama[tensorboard]' to get TensorBoard logs under tb/",
                exc,
            )
        return None
    return SummaryWriter


class Board:
    """TensorBoard scalars on rank 0, written locally and copied to ``gs://`` outputs."""

    def __init__(self, out_uri: str, enabled: bool):
        self.writer = None
        self.remote = None
        if not enabled:
            return
        SummaryWriter = _summary_writer()
        if SummaryWriter is None:
            return
        if storage.is_gcs(out_uri):
            # SummaryWriter writes local files only (gs:// needs TensorFlow); mirror them.
            self.local = tempfile.mkdtemp(prefix="kaedama-tb-")
            self.remote = storage.join(out_uri, "tb")
        else:
            self.local = os.path.join(out_uri, "tb")
        self.writer = SummaryWriter(self.local)

    def scalars(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, step)
        self.writer.flush()
        if self.remote is not None:
            for root, _, files in os.walk(self.local):
                for name in files:
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, self.local)
                    with open(path, "rb") as fh:
                        storage.write_bytes(storage.join(self.remote, rel), fh.read())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.remote is not None:
                shutil.rmtree(self.local, ignore_errors=True)


def write_history(out_uri: str, history: list[dict[str, Any]]) -> None:
    """``history.json`` and ``history.csv``: one record per epoch."""
    storage.write_text(storage.join(out_uri, "history.json"), json.dumps(history, indent=2))
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(out_uri, "history.csv"), buf.getvalue())
