"""Batch prediction over a bucket: read -> preprocess -> infer -> postprocess -> save.

The step functions here are shared by the Beam job (``beam/predict.py``: Dataflow,
Flink, Spark, Dask, DirectRunner) and the in-process engine
(:func:`predict_in_process`), so both write the same files. Each image is read
(refused over ``max_bytes`` before reading), preprocessed with the exported model's
own data config (the preprocessing of training and evaluation), run through the
exported model in batches, and written as one JSON line with **all** class
probabilities (or the top ``k``), sorted. Unreadable files never fail the job: they
go to ``rejected-*.jsonl`` with the decoder's reason. Outputs in ``OUT``:

``predictions-SSSSS-of-NNNNN.jsonl``
    ``{"uri", "label", "score", "probabilities": {class: p, ...}, "model_version"}``,
    sorted by URI within a shard (a URI's shard is a stable hash of it).
``rejected-SSSSS-of-NNNNN.jsonl``
    ``{"uri", "reason", "message"}``.
``summary.json``
    counts (listed = predicted + rejected, checked), per-label counts, the model.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from kaedama import images, storage
from kaedama.config import ConfigError, config_to_dict
from kaedama.errors import KaedamaError
from kaedama.manifest import json_line, read_input, read_manifest
from kaedama.preprocess import Preprocess

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
KINDS = ("predictions", "rejected")
# How many images one in-process batch holds (the Beam job batches with RunInference).
IN_PROCESS_BATCH = 32


class BatchPredictError(KaedamaError):
    """The batch prediction cannot run (no model, no inputs) or its counts do not add up."""


@dataclass(frozen=True)
class BatchPredictConfig:
    """Settings of ``kaedama predict-batch``; the CLI flags and Beam options mirror them."""

    top_k: int = field(
        default=0, metadata={"help": "keep the k most likely classes per image (0 = all)"}
    )
    max_batch_size: int = field(
        default=32, metadata={"help": "images per model call (RunInference batches up to this)"}
    )
    shards: int = field(
        default=1, metadata={"help": "output files per kind (predictions, rejected)"}
    )
    max_bytes: int = field(
        default=images.DEFAULT_MAX_BYTES,
        metadata={"help": "refuse larger files before reading them (reason too_large)"},
    )
    threads: int = field(
        default=0, metadata={"help": "ONNX Runtime threads per model (0 = one per core)"}
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "shards", "max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0 or self.threads < 0:
            raise ConfigError(f"top_k and threads must be >= 0 ({self.top_k}, {self.threads})")


# --------------------------------------------------------------------------- inputs


def list_sources(source: str) -> list[str]:
    """The image URIs to predict: every file under a folder (``gs://`` prefix), or the
    rows of a manifest/list (a manifest's kept rows only: dropped and rejected images
    are not worth a prediction)."""
    lowered = source.lower()
    if lowered.endswith((".jsonl", ".ndjson")) and not source.endswith("/"):
        rows = read_manifest(source).rows
        return [r.uri for r in rows if r.status == "kept"]
    if lowered.endswith(".csv"):
        return [r.uri for r in read_input(source)]
    # Broken links and FIFOs too: they are reported as unreadable, not lost.
    return sorted(info.uri for info in storage.iter_files(source, special=True))


def chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size`` (the Beam job's unit of listing work)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Example(NamedTuple):
    """One image ready for the model: its URI and its preprocessed array."""

    uri: str
    array: np.ndarray


class Unusable(NamedTuple):
    """One file that cannot be predicted, with the reason that goes to ``rejected-*.jsonl``."""

    uri: str
    reason: str
    message: str

    def record(self) -> dict[str, Any]:
        """Its line of ``rejected-*.jsonl``."""
        return rejected_record(self.uri, self.reason, self.message)


def load_example(uri: str, preprocess: Preprocess, max_bytes: int) -> Example | Unusable:
    """The file at ``uri`` read and preprocessed, or why it cannot be used.

    Never raises for a bad file: reasons are the decoder's (``truncated``,
    ``not_an_image``, ...), ``too_large`` or ``unreadable``.
    """
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except storage.TooLargeError as exc:
        return Unusable(uri, "too_large", str(exc))
    except storage.StorageError as exc:
        return Unusable(uri, "unreadable", str(exc))
    try:
        return Example(uri, preprocess(data, uri=uri))
    except images.ImageError as exc:
        return Unusable(uri, exc.reason, exc.message)


# --------------------------------------------------------------------------- outputs


def prediction_record(
    uri: str, probabilities: np.ndarray, classes: Sequence[str], version: str, top_k: int = 0
) -> dict[str, Any]:
    """One output record: every class probability (or the top ``k``), most likely first."""
    order = np.argsort(-probabilities, kind="stable")
    if top_k:
        order = order[:top_k]
    probs = {classes[i]: round(float(probabilities[i]), 6) for i in order}
    best = int(order[0])
    return {
        "uri": uri,
        "label": classes[best],
        "score": round(float(probabilities[best]), 6),
        "probabilities": probs,
        "model_version": version,
    }


def rejected_record(uri: str, reason: str, message: str) -> dict[str, Any]:
    """One line of ``rejected-*.jsonl``."""
    return {"uri": uri, "reason": reason, "message": message}


def shard_of(uri: str, shards: int) -> int:
    """The output shard of ``uri``: stable across runs, machines and runners."""
    return zlib.crc32(uri.encode("utf-8")) % shards


def shard_name(kind: str, shard: int, shards: int) -> str:
    """``predictions-00000-of-00004.jsonl``."""
    return f"{kind}-{shard:05d}-of-{shards:05d}.jsonl"


def write_shard(out: str, kind: str, shard: int, shards: int, records: Iterable[dict]) -> int:
    """Write one output file (records sorted by URI); returns how many it holds."""
    ordered = sorted(records, key=lambda r: r["uri"])
    text = "".join(json_line(r) + "\n" for r in ordered)
    storage.write_text(storage.join(out, shard_name(kind, shard, shards)), text)
    return len(ordered)


def write_summary(
    out: str,
    listed: int,
    counts: dict[str, int],
    labels: dict[str, int],
    reasons: dict[str, int],
    model: dict[str, Any],
    config: BatchPredictConfig,
) -> dict[str, Any]:
    """Check predicted + rejected = listed, then write ``summary.json``; returns it."""
    predicted, rejected = counts.get("predictions", 0), counts.get("rejected", 0)
    if predicted + rejected != listed:
        raise BatchPredictError(
            f"predicted {predicted} + rejected {rejected} != {listed} files listed; "
            "a file was lost or counted twice"
        )
    summary = {
        "listed": listed,
        "predicted": predicted,
        "rejected": rejected,
        "by_label": dict(sorted(labels.items())),
        "by_reason": dict(sorted(reasons.items())),
        "model": model,
        "config": config_to_dict(config),
    }
    storage.write_text(
        storage.join(out, SUMMARY_NAME), json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
    )
    return summary


# --------------------------------------------------------------------------- the model


def model_summary(artifact: Any) -> dict[str, Any]:
    """What ``summary.json`` records of the exported model (an ``Artifact`` or ``ModelCard``)."""
    a = artifact
    return {"uri": a.uri, "name": a.name, "version": a.version, "classes": list(a.classes)}


class Predictor:
    """An exported model (``kaedama export``) as ``arrays -> probabilities``; no torch."""

    def __init__(self, model_dir: str, threads: int = 0) -> None:
        import os

        from kaedama.serve.artifact import load_artifact
        from kaedama.serve.runtime import open_session

        self.artifact = load_artifact(model_dir)
        self.session = open_session(self.artifact, threads or os.cpu_count() or 1)

    @property
    def preprocess(self) -> Preprocess:
        """The model's own preprocessing."""
        return self.artifact.preprocess

    def describe(self) -> dict[str, Any]:
        """What the summary records of the model."""
        return model_summary(self.artifact)

    def __call__(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed inputs -> calibrated probabilities ``(N, classes)``."""
        from kaedama.serve.model import softmax

        logits, _ = self.session.run(np.asarray(batch, dtype=np.float32), features=False)
        return softmax(logits, self.artifact.temperature)


# --------------------------------------------------------------------------- in process


def predict_in_process(
    source: str, model_dir: str, out: str, config: BatchPredictConfig
) -> dict[str, Any]:
    """The same job without Beam, in this process: the in-process ceiling and local runs."""
    from tqdm import tqdm

    predictor = Predictor(model_dir, config.threads)
    pre, classes, version = (
        predictor.preprocess,
        predictor.artifact.classes,
        predictor.artifact.version,
    )
    uris = list_sources(source)
    if not uris:
        raise BatchPredictError(f"no files to predict under {source}")
    records: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tqdm(total=len(uris), desc="predict", unit="img", disable=None) as bar:
        for part in chunks(uris, config.max_batch_size):
            loaded = [load_example(uri, pre, config.max_bytes) for uri in part]
            good = [item for item in loaded if isinstance(item, Example)]
            for item in loaded:
                if isinstance(item, Unusable):
                    records["rejected"].append(item.record())
            if good:
                probs = predictor([item.array for item in good])
                for item, p in zip(good, probs, strict=True):
                    rec = prediction_record(item.uri, p, classes, version, config.top_k)
                    records["predictions"].append(rec)
            bar.update(len(part))
    counts: Counter[str] = Counter()
    for kind in KINDS:
        by_shard: dict[int, list[dict]] = {s: [] for s in range(config.shards)}
        for rec in records[kind]:
            by_shard[shard_of(rec["uri"], config.shards)].append(rec)
        for shard, recs in by_shard.items():
            counts[kind] += write_shard(out, kind, shard, config.shards, recs)
    labels = Counter(r["label"] for r in records["predictions"])
    reasons = Counter(r["reason"] for r in records["rejected"])
    return write_summary(
        out, len(uris), dict(counts), labels, reasons, predictor.describe(), config
    )
