"""The served model, in KServe's custom-model shape: ``load``, ``preprocess``, ``predict``.

Like ``kserve.Model``, it is not ready until :meth:`ImageClassifier.load` has
loaded and verified the artifact and run warm-up batches (the first ONNX Runtime
runs allocate and pick kernels; a probe must not send traffic before that).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from kaedama.preprocess import Preprocess
from kaedama.serve.artifact import Artifact, load_artifact
from kaedama.serve.cam import cam_grid, heatmap_png, model_view
from kaedama.serve.config import ServeConfig
from kaedama.serve.runtime import Session, open_session

log = logging.getLogger(__name__)


class ExplainUnsupported(Exception):
    """The model has no CAM output (its head is not global-average-pool + linear)."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64, returned as float32."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class ImageClassifier:
    """One exported classifier: preprocessing, batched inference and CAM."""

    def __init__(self, model_dir: str, config: ServeConfig) -> None:
        self.model_dir = model_dir
        self.config = config
        self.name = config.name
        self.ready = False
        self.artifact: Artifact | None = None
        self._session: Session | None = None
        self._preprocess: Preprocess | None = None
        self.seconds_per_image = 0.01

    def load(self) -> None:
        """Read and verify the artifact, open the session, warm up; then ``ready``."""
        started = time.perf_counter()
        artifact = load_artifact(self.model_dir, verify=self.config.verify_sha256)
        self.artifact = artifact
        self.name = self.config.name or artifact.name
        pre = artifact.preprocess
        if self.config.max_pixels:
            pre = replace(pre, max_pixels=self.config.max_pixels)
        self._preprocess = pre
        self._session = open_session(artifact, self.config.inference_threads)
        if self.config.warmup_batches:
            batch = np.zeros((self.config.max_batch_size, *pre.input_size), np.float32)
            self.predict(batch[:1], False)
            t0 = time.perf_counter()
            for _ in range(self.config.warmup_batches):
                self.predict(batch, artifact.cam is not None)
            per = (time.perf_counter() - t0) / (self.config.warmup_batches * len(batch))
            self.seconds_per_image = per
        self.ready = True
        log.info(
            "model %s version %s (%s, %d classes) ready in %.1f s",
            self.name,
            artifact.version,
            artifact.runtime,
            len(artifact.classes),
            time.perf_counter() - started,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order."""
        assert self.artifact is not None
        return self.artifact.classes

    @property
    def version(self) -> str:
        """The artifact's version string."""
        assert self.artifact is not None
        return self.artifact.version

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one preprocessed image."""
        assert self._preprocess is not None
        return self._preprocess.input_size

    @property
    def has_cam(self) -> bool:
        """Whether :meth:`explain` can answer."""
        return self.artifact is not None and self.artifact.cam is not None

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes -> model input, through the checkpoint's own preprocessing.

        Raises:
            kaedama.images.ImageError: the decoder's reason (empty, truncated, ...).
        """
        assert self._preprocess is not None
        return self._preprocess(data)

    def predict(self, batch: np.ndarray, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A preprocessed batch -> ``(logits, feature maps or None)``; runs in one thread."""
        assert self._session is not None
        return self._session.run(batch, features=features)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (softmax at the artifact's temperature)."""
        assert self.artifact is not None
        return softmax(logits, self.artifact.temperature)

    def explain(
        self, array: np.ndarray, features: np.ndarray, class_index: int
    ) -> tuple[np.ndarray, bytes]:
        """The CAM grid of ``class_index`` and its heatmap PNG over the model's view."""
        if self.artifact is None or self.artifact.cam is None:
            raise ExplainUnsupported(self.name)
        assert self._preprocess is not None
        grid = cam_grid(features, self.artifact.cam.weight, class_index)
        return grid, heatmap_png(grid, model_view(array, self._preprocess))

    def metadata(self) -> dict:
        """The Open Inference Protocol's model metadata."""
        assert self.artifact is not None
        platform = "onnxruntime_onnx" if self.artifact.runtime == "onnx" else "pytorch_torchscript"
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": platform,
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {
                "classes": list(self.classes),
                "data_config": self.artifact.data_config,
                "temperature": self.artifact.temperature,
                "explain": self.has_cam,
            },
        }
