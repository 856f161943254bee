"""The serving artifact: a folder with the model file and ``kaedama-model.json``.

Written by :mod:`kaedama.serve.export`, read here with NumPy only (the serving
image has no torch). The JSON holds what serving needs besides the graph: class
names, the data config (the same preprocessing as training and evaluation), the
model version, the softmax temperature, the CAM head, and the sha256 of every file,
which :func:`load_artifact` checks so a half-copied or swapped model never serves.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kaedama import storage
from kaedama.errors import KaedamaError
from kaedama.preprocess import Preprocess

FORMAT = "kaedama.serve/1"
MANIFEST = "kaedama-model.json"
CAM_FILE = "cam.npz"
RUNTIMES = ("onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ArtifactError(KaedamaError):
    """A serving artifact that is missing, incomplete, altered or of another format."""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_name(name: str) -> str:
    """``name`` if it is usable in a URL path segment, else an :class:`ArtifactError`."""
    if not _NAME.match(name):
        raise ArtifactError(
            f"model name {name!r} must be 1-63 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class CamHead:
    """A global-average-pool + linear head: ``logits = W @ mean(features) + b``."""

    weight: np.ndarray  # (classes, channels)
    bias: np.ndarray  # (classes,)


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified serving artifact (the model bytes stay undecoded here)."""

    uri: str
    name: str
    version: str
    runtime: str
    model_file: str
    model_bytes: bytes
    input_name: str
    logits_output: str
    features_output: str | None
    classes: tuple[str, ...]
    data_config: dict[str, Any]
    temperature: float
    cam: CamHead | None
    meta: dict[str, Any] = field(repr=False)

    @property
    def preprocess(self) -> Preprocess:
        """The model's eval preprocessing, exactly as training and evaluation ran it."""
        return Preprocess.from_data_config(self.data_config)


def write_cam_head(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """The bytes of ``cam.npz`` (float32 weight and bias)."""
    buf = io.BytesIO()
    np.savez(buf, weight=weight.astype(np.float32), bias=bias.astype(np.float32))
    return buf.getvalue()


def _read(uri: str, what: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.NotFoundError as exc:
        raise ArtifactError(
            f"{what} {uri} not found; is this a folder written by 'kaedama export'?"
        ) from exc


@dataclass(frozen=True)
class ModelCard:
    """What ``kaedama-model.json`` says of a model, read without its model file.

    For steps that need the classes or the preprocessing but never run the model
    (a batch job's decoding and formatting workers): :func:`load_artifact` reads and
    verifies the model bytes once, where the model runs.
    """

    uri: str
    name: str
    version: str
    runtime: str
    model_file: str
    files: dict[str, str]
    classes: tuple[str, ...]
    data_config: dict[str, Any]
    temperature: float
    meta: dict[str, Any] = field(repr=False)

    @property
    def preprocess(self) -> Preprocess:
        """The model's eval preprocessing, exactly as training and evaluation ran it."""
        return Preprocess.from_data_config(self.data_config)


def read_card(uri: str) -> ModelCard:
    """Read and check ``kaedama-model.json`` of the artifact folder ``uri`` (no model bytes).

    Raises:
        ArtifactError: the JSON is missing, not JSON, of another format or incomplete.
    """
    raw = _read(storage.join(uri, MANIFEST), "model manifest")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{uri}/{MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{uri}/{MANIFEST}: expected format {FORMAT!r}")
    runtime = meta.get("runtime")
    if runtime not in RUNTIMES:
        raise ArtifactError(f"{uri}: unknown runtime {runtime!r}; one of {RUNTIMES}")
    files: dict[str, str] = dict(meta.get("files") or {})
    model_file = meta.get("model_file")
    if model_file not in files:
        raise ArtifactError(f"{uri}: the manifest lists no sha256 for {model_file}")
    classes = tuple(str(c) for c in meta.get("classes") or ())
    if not classes:
        raise ArtifactError(f"{uri}: the manifest lists no classes")
    try:
        return ModelCard(
            uri=uri,
            name=check_name(str(meta["name"])),
            version=str(meta["version"]),
            runtime=runtime,
            model_file=model_file,
            files=files,
            classes=classes,
            data_config=dict(meta["data_config"]),
            temperature=float(meta.get("temperature", 1.0)),
            meta=meta,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{uri}/{MANIFEST}: missing or bad field {exc}") from exc


def load_artifact(uri: str, *, verify: bool = True) -> Artifact:
    """Read and verify the artifact folder ``uri`` (local or ``gs://``).

    Raises:
        ArtifactError: missing files, another format, or a sha256 mismatch.
    """
    card = read_card(uri)
    meta = card.meta
    contents: dict[str, bytes] = {}
    for name, digest in card.files.items():
        data = _read(storage.join(uri, name), "artifact file")
        if verify and sha256(data) != digest:
            raise ArtifactError(
                f"{uri}/{name}: sha256 {sha256(data)[:12]}... does not match the manifest's "
                f"{digest[:12]}...; the artifact was altered or copied incompletely. Re-export it."
            )
        contents[name] = data
    cam = None
    if meta.get("cam"):
        with np.load(io.BytesIO(contents[meta["cam"]["weights_file"]])) as npz:
            cam = CamHead(weight=npz["weight"], bias=npz["bias"])
    return Artifact(
        uri=uri,
        name=card.name,
        version=card.version,
        runtime=card.runtime,
        model_file=card.model_file,
        model_bytes=contents[card.model_file],
        input_name=str(meta["input"]),
        logits_output=str(meta["outputs"]["logits"]),
        features_output=meta["outputs"].get("features") if cam is not None else None,
        classes=card.classes,
        data_config=card.data_config,
        temperature=card.temperature,
        cam=cam,
        meta=meta,
    )
