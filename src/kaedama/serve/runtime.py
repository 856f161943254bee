"""Inference sessions for the artifact's runtimes: ONNX Runtime (no torch) or TorchScript.

Only a TorchScript artifact imports torch, and only when it is loaded; the ONNX
path needs ONNX Runtime and NumPy.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

from kaedama.serve.artifact import Artifact, ArtifactError


class Session(Protocol):
    """Runs a preprocessed batch; returns logits and, on request, the feature map."""

    def run(self, batch: np.ndarray, *, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, C, H, W)`` float32 -> ``(logits (N, K), features (N, C', h, w) or None)``."""
        ...


class OnnxSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""

    def __init__(self, artifact: Artifact, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's idle intra-op threads spin by default; here the decode threads share the
        # cores, and a spinning pool takes the CPU time they need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                artifact.model_bytes, options, providers=["CPUExecutionProvider"]
            )
        except (RuntimeError, ValueError) as exc:  # ORT raises its own Fail/InvalidGraph
            raise ArtifactError(f"ONNX Runtime cannot load {artifact.uri}: {exc}") from exc
        self._input = artifact.input_name
        self._logits = artifact.logits_output
        self._features = artifact.features_output

    def run(self, batch: np.ndarray, *, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if features and self._features:
            logits, feats = self._session.run([self._logits, self._features], {self._input: batch})
            return logits, feats
        (logits,) = self._session.run([self._logits], {self._input: batch})
        return logits, None


class TorchScriptSession:
    """A TorchScript module (imports torch: use ONNX for the small serving image)."""

    def __init__(self, artifact: Artifact, threads: int) -> None:
        try:
            import torch
        except ModuleNotFoundError as exc:
            raise ArtifactError(
                f"{artifact.uri} is a TorchScript artifact and this environment has no torch; "
                "re-export with --format onnx (the serving image has no torch) or install "
                "kaedama[train]"
            ) from exc
        self._torch = torch
        torch.set_num_threads(threads)
        self._module = torch.jit.load(io.BytesIO(artifact.model_bytes), map_location="cpu").eval()
        self._has_features = artifact.features_output is not None

    def run(self, batch: np.ndarray, *, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self._torch.inference_mode():
            out = self._module(self._torch.from_numpy(batch))
        if self._has_features:
            logits, feats = out
            return logits.numpy(), feats.numpy() if features else None
        return out.numpy(), None


def open_session(artifact: Artifact, threads: int) -> Session:
    """The session for the artifact's runtime."""
    if artifact.runtime == "onnx":
        return OnnxSession(artifact, threads)
    return TorchScriptSession(artifact, threads)
