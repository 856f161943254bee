"""``kaedama export``: a training checkpoint -> a serving artifact folder.

ONNX (the default) is served by ONNX Runtime without torch; TorchScript is an
option for runtimes that want it. The artifact also carries the class names, the
checkpoint's data config (so serving preprocesses exactly as evaluation did), a
version, the softmax temperature and the sha256 of every file
(see :mod:`kaedama.serve.artifact`).

For a global-average-pool + linear head (ResNet, EfficientNet, MobileNet, RegNet...)
the last feature map is exported as a second output and the head's weights saved
in ``cam.npz``: the server computes class activation maps with NumPy. The head is
recognised by checking the identity ``logits == W @ mean(features) + b``
numerically, not by the class name, so any timm model that satisfies it qualifies.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from kaedama import __version__, storage
from kaedama.errors import KaedamaError
from kaedama.serve.artifact import (
    CAM_FILE,
    FORMAT,
    MANIFEST,
    MODEL_FILES,
    check_name,
    sha256,
    write_cam_head,
)
from kaedama.serve.config import ExportConfig
from kaedama.train.model import TrainedModel, load_trained

log = logging.getLogger(__name__)

INPUT = "input"
LOGITS = "logits"
FEATURES = "features"
# Exported and torch outputs must agree to this (float32 rounding across kernels).
VERIFY_ATOL = 1e-3


class ExportError(KaedamaError):
    """The model cannot be exported or the export does not reproduce it."""


class _UseLegacy(Exception):
    """Internal: skip the dynamo exporter."""


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _LogitsAndFeatures(nn.Module):
    """Logits plus the last feature map, which the linear head pools."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def cam_head(model: nn.Module, sample: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W, b)`` when ``logits == W @ mean_hw(features) + b`` holds for ``model``, else None."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier) or not hasattr(model, "forward_features"):
        return None
    fc = get_classifier()
    if not isinstance(fc, nn.Linear):
        return None
    with torch.inference_mode():
        features = model.forward_features(sample)
        if features.ndim != 4 or features.shape[1] != fc.in_features:
            return None
        logits = model.forward_head(features)
        pooled = fc(features.mean(dim=(2, 3)))
    if not torch.allclose(logits, pooled, atol=1e-4, rtol=1e-4):
        return None
    bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
    return fc.weight.detach().cpu().numpy(), bias.detach().cpu().numpy()


def sample_input(data_config: dict[str, Any], n: int = 2) -> np.ndarray:
    """``n`` synthetic photos preprocessed by the model's own :class:`Preprocess`."""
    from kaedama.preprocess import Preprocess

    pre = Preprocess.from_data_config(data_config)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        coarse = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((320 + 40 * i, 240), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(pre(buf.getvalue()))
    return np.stack(out)


def _onnx_bytes(
    module: nn.Module, sample: torch.Tensor, outputs: list[str], opset: int, exporter: str
) -> bytes:
    """Export with a dynamic batch size; dynamo first unless ``exporter`` is ``legacy``."""
    path_buf = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        if exporter == "legacy":
            raise _UseLegacy
        program = torch.onnx.export(
            module,
            (sample,),
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(path_buf)
        return path_buf.getvalue()
    except _UseLegacy:
        pass
    except (RuntimeError, TypeError, ValueError) as exc:
        # Some architectures trip torch.export; the TorchScript-based exporter still works
        # for them (and is what torch.onnx used for years).
        log.warning("dynamo ONNX export failed (%s); using the TorchScript-based exporter", exc)
    path_buf = io.BytesIO()
    torch.onnx.export(
        module,
        (sample,),
        path_buf,
        input_names=[INPUT],
        output_names=outputs,
        dynamic_axes={INPUT: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        opset_version=min(opset, 17),
        dynamo=False,
    )
    return path_buf.getvalue()


def _torchscript_bytes(module: nn.Module, sample: torch.Tensor) -> bytes:
    with torch.inference_mode():
        traced = torch.jit.trace(module, sample, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def _run_exported(fmt: str, data: bytes, x: np.ndarray) -> list[np.ndarray]:
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT: x})
    module = torch.jit.load(io.BytesIO(data))
    with torch.inference_mode():
        out = module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _temperature(config: ExportConfig) -> float:
    if not config.calibration:
        return config.temperature
    try:
        value = json.loads(storage.read_text(config.calibration))["temperature"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{config.calibration} holds no 'temperature' (expected JSON like "
            '{"temperature": 1.3})'
        ) from exc
    if not isinstance(value, (int, float)) or value <= 0:
        raise ExportError(f"{config.calibration}: temperature must be a number > 0, got {value!r}")
    return float(value)


def default_name(out: str) -> str:
    """A URL-safe model name from the output folder's last component."""
    base = out.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-._")
    return name[:63] or "model"


def export_model(
    trained: TrainedModel, out: str, config: ExportConfig, *, source: str = ""
) -> dict:
    """Write the serving artifact for ``trained`` into ``out``; returns its manifest."""
    model = trained.model.eval().cpu()
    sample_np = sample_input(trained.data_config)
    sample = torch.from_numpy(sample_np)
    head = cam_head(model, sample) if config.cam else None
    module: nn.Module = _LogitsAndFeatures(model) if head is not None else _Logits(model)
    outputs = [LOGITS, FEATURES] if head is not None else [LOGITS]
    module.eval()
    if config.format == "onnx":
        data = _onnx_bytes(module, sample, outputs, config.opset, config.onnx_exporter)
    else:
        data = _torchscript_bytes(module, sample)
    verify: dict[str, Any] = {}
    if config.verify:
        with torch.inference_mode():
            expected = module(sample)
        expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        got = _run_exported(config.format, data, sample_np[:1])
        diff = float(np.max(np.abs(got[0] - expected[0][:1])))
        if not diff <= VERIFY_ATOL:
            raise ExportError(
                f"the exported {config.format} model differs from torch by {diff:.2e} "
                f"(> {VERIFY_ATOL}); try --format torchscript or another --opset"
            )
        verify = {"max_abs_diff": diff, "atol": VERIFY_ATOL}
    model_file = MODEL_FILES[config.format]
    files = {model_file: data}
    if head is not None:
        files[CAM_FILE] = write_cam_head(*head)
    digest = sha256(data)
    manifest = {
        "format": FORMAT,
        "name": check_name(config.name or default_name(out)),
        "version": config.version or digest[:12],
        "runtime": config.format,
        "model_file": model_file,
        "input": INPUT,
        "outputs": {LOGITS: LOGITS, FEATURES: FEATURES if head is not None else None},
        "classes": list(trained.classes),
        "data_config": trained.data_config,
        "temperature": _temperature(config),
        "cam": {"weights_file": CAM_FILE} if head is not None else None,
        "files": {name: sha256(blob) for name, blob in files.items()},
        "source": {
            "checkpoint": source,
            "model_name": trained.model_name,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "kaedama": __version__,
            "torch": torch.__version__,
        },
        "verify": verify,
    }
    for name, blob in files.items():
        storage.write_bytes(storage.join(out, name), blob)
    # The manifest last: a reader never sees a manifest whose files are not there yet.
    storage.write_text(
        storage.join(out, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    )
    return manifest


def export_checkpoint(checkpoint: str, out: str, config: ExportConfig) -> dict:
    """Load ``checkpoint`` (a kaedama ``best.pt``) and export it to ``out``."""
    return export_model(load_trained(checkpoint), out, config, source=checkpoint)
