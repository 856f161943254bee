"""Latency and throughput of a model, with what they were measured on.

Figures without their conditions mean nothing, so each result records the
device, torch's thread count, the model and the input size. Latency is the median
of ``runs`` timed batch-1 forward passes after warm-up (and the preprocessing of
real images on its own); throughput is images/s of forward passes at a larger batch.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from kaedama.evaluate.inference import forward
from kaedama.preprocess import Preprocess


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, runs: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure(
    model: torch.nn.Module,
    pp: Preprocess,
    *,
    device: torch.device,
    model_name: str,
    batch: int = 32,
    runs: int = 20,
    images: Sequence[bytes] = (),
) -> dict:
    """Batch-1 latency (ms, median and p90), batched images/s, and preprocessing ms per image."""
    model.eval()
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, *pp.input_size)).astype(np.float32)
    many = rng.standard_normal((batch, *pp.input_size)).astype(np.float32)
    for _ in range(3):  # warm-up: allocator, kernels, lazy init
        forward(model, one, device)
    forward(model, many, device)
    single = _timed(lambda: forward(model, one, device), runs, device)
    batched = _timed(lambda: forward(model, many, device), max(3, runs // 4), device)
    out = {
        "model": model_name,
        "input_size": list(pp.input_size),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "runs": runs,
        "batch1_ms_median": 1000 * statistics.median(single),
        "batch1_ms_p90": 1000 * float(np.quantile(single, 0.9)),
        "batch": batch,
        "images_per_s": batch / statistics.median(batched),
    }
    if images:
        prep = _timed(lambda: [pp(b) for b in images], 1, torch.device("cpu"))[0]
        out["preprocess_ms_per_image"] = 1000 * prep / len(images)
    return out
