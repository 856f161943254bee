"""The frozen configs of the export and serve stages; CLI flags mirror their fields."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from kaedama.config import ConfigError


def default_threads() -> int:
    """The CPU cores this process may use (the cgroup/affinity view, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ExportConfig:
    """How ``kaedama export`` writes a serving artifact from a checkpoint."""

    format: Literal["onnx", "torchscript"] = field(
        default="onnx",
        metadata={"help": "onnx (served by ONNX Runtime, no torch) or torchscript"},
    )
    name: str = field(
        default="",
        metadata={"help": "model name in URLs (/v2/models/NAME); default: the output folder name"},
    )
    version: str = field(
        default="", metadata={"help": "model version; default: the first 12 hex of its sha256"}
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "softmax temperature (calibration from evaluation); 1 = none"},
    )
    calibration: str = field(
        default="",
        metadata={"help": "JSON file (e.g. from kaedama evaluate) holding a 'temperature' key"},
    )
    opset: int = field(default=18, metadata={"help": "ONNX opset version"})
    onnx_exporter: Literal["dynamo", "legacy"] = field(
        default="dynamo",
        metadata={
            "help": "torch's current torch.export-based ONNX exporter, or the older "
            "TorchScript-based one (faster to run; also the fallback when dynamo fails)"
        },
    )
    cam: bool = field(
        default=True,
        metadata={
            "help": "export the last feature map as a second output for CAM when the head "
            "is global-average-pool + linear"
        },
    )
    verify: bool = field(
        default=True,
        metadata={"help": "compare the exported model with torch on a sample input"},
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the prediction service needs besides the model folder."""

    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "TCP port (KServe's default is 8080)"})
    name: str = field(
        default="", metadata={"help": "model name in URLs; default: the artifact's name"}
    )
    workers: int = field(
        default=1,
        metadata={"help": "server processes (each with its own batcher and model session)"},
    )
    threads: int = field(
        default=0,
        metadata={"help": "inference threads per process; 0 = the cores divided by workers"},
    )
    decode_threads: int = field(
        default=0,
        metadata={"help": "threads decoding and preprocessing images; 0 = the cores"},
    )
    max_batch_size: int = field(default=16, metadata={"help": "largest micro-batch"})
    max_batch_wait_ms: float = field(
        default=5.0, metadata={"help": "how long a batch waits to fill before it runs"}
    )
    max_queue: int = field(
        default=64,
        metadata={
            "help": "images admitted beyond the running batch; when full, answer 429 at once"
        },
    )
    max_retry_after_s: float = field(
        default=30.0, metadata={"help": "cap on the Retry-After the server computes"}
    )
    max_body_bytes: int = field(
        default=20 * 1024 * 1024, metadata={"help": "larger request bodies get 413"}
    )
    max_images_per_request: int = field(
        default=64, metadata={"help": "images in one Open Inference Protocol request"}
    )
    max_pixels: int = field(
        default=0,
        metadata={"help": "refuse larger images (decompression bombs); 0 = the model's setting"},
    )
    read_timeout_s: float = field(
        default=30.0, metadata={"help": "a client must send its body within this (else 408)"}
    )
    keep_alive_s: float = field(default=5.0, metadata={"help": "idle keep-alive timeout"})
    drain_timeout_s: float = field(
        default=60.0,
        metadata={"help": "after SIGTERM, how long to finish accepted requests before exiting"},
    )
    warmup_batches: int = field(
        default=2, metadata={"help": "batches run at max batch size before becoming ready"}
    )
    auth_token_file: str = field(
        default="",
        metadata={"help": "file holding a bearer token required on every call but health; off"},
    )
    verify_sha256: bool = field(
        default=True, metadata={"help": "check the artifact's sha256 sums on load"}
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata={"help": "server log level"}
    )
    access_log: bool = field(default=False, metadata={"help": "log every request"})

    def __post_init__(self) -> None:
        positive = ("workers", "max_batch_size", "max_body_bytes", "max_images_per_request")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("threads", "decode_threads", "max_queue", "warmup_batches", "max_pixels"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for key in ("max_batch_wait_ms", "read_timeout_s", "drain_timeout_s", "keep_alive_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_retry_after_s < 1:
            raise ConfigError(f"max_retry_after_s must be >= 1, got {self.max_retry_after_s}")

    @property
    def inference_threads(self) -> int:
        """ONNX Runtime intra-op threads: the cores shared by the worker processes."""
        return self.threads or max(1, default_threads() // self.workers)

    @property
    def preprocess_threads(self) -> int:
        """Decode threads; Pillow releases the GIL while decoding and resizing."""
        return self.decode_threads or default_threads()

    @property
    def capacity(self) -> int:
        """Admitted images at most: the running batch plus the queue."""
        return self.max_batch_size + self.max_queue
