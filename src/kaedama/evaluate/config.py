"""The evaluate stage's one frozen config; CLI flags and KFP parameters mirror its fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything an evaluation needs besides the checkpoint, the manifest and the output."""

    split: Literal["train", "val", "test"] = field(
        default="test", metadata={"help": "manifest split to evaluate"}
    )
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    workers: int = field(default=4, metadata={"help": "threads that read and preprocess images"})
    threads: int = field(
        default=0, metadata={"help": "torch intra-op threads; 0 = torch's default"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    top_k: int = field(default=5, metadata={"help": "k of the top-k accuracy"})
    predictions_top_k: int = field(
        default=0,
        metadata={"help": "per-image file keeps the top-k probabilities; 0 = all classes"},
    )
    bins: int = field(default=15, metadata={"help": "confidence bins for ECE/MCE"})
    bootstrap: int = field(
        default=1000, metadata={"help": "bootstrap resamples for the calibration intervals"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap and the CAM sample"})
    fit_temperature: bool = field(
        default=False,
        metadata={
            "help": "fit a temperature on the val split and save temperature.json beside the "
            "checkpoint for serving"
        },
    )
    tta: Literal["none", "flip", "crops", "flip_crops"] = field(
        default="none",
        metadata={"help": "test-time augmentation: horizontal flip and/or 5 crops, averaged"},
    )
    measure_tta: bool = field(
        default=False,
        metadata={"help": "also run the other TTA setting to report its gain and cost"},
    )
    cam: Literal["auto", "cam", "gradcam", "off"] = field(
        default="auto",
        metadata={"help": "explanations: auto = CAM for global-pool + linear heads, else Grad-CAM"},
    )
    cam_per_class: int = field(
        default=2, metadata={"help": "CAM overlays per class for correct and for wrong images"}
    )
    cam_max: int = field(default=60, metadata={"help": "cap on CAM overlays in the report"})
    latency: bool = field(
        default=True, metadata={"help": "measure batch-1 latency and batched throughput"}
    )
    latency_batch: int = field(
        default=32, metadata={"help": "batch size of the throughput measurement"}
    )
    latency_runs: int = field(
        default=20, metadata={"help": "timed runs of the latency measurement"}
    )
    report: bool = field(
        default=True, metadata={"help": "write figures and report.html (off: metrics only)"}
    )
    worst: int = field(default=24, metadata={"help": "confident mistakes listed in the report"})
    pair_examples: int = field(
        default=3, metadata={"help": "example images per most-confused class pair"}
    )
    compare: str = field(
        default="",
        metadata={
            "help": "another model's metrics.json on the same test set (its predictions.jsonl "
            "beside it): per-class deltas and a McNemar test"
        },
    )
    alpha: float = field(default=0.05, metadata={"help": "significance level of the comparison"})

    def __post_init__(self) -> None:
        from kaedama.config import ConfigError

        for name in ("batch_size", "top_k", "bins", "latency_batch", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
