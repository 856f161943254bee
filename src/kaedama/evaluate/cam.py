"""Explanations for any timm model: CAM where the head allows it, Grad-CAM otherwise.

No per-architecture table. Everything is read from the model itself:

* **The target layer** is the deepest entry of timm's ``feature_info`` (the last
  stage) whose output still reaches the prediction. That is checked, not assumed:
  one backward pass from the top logit must leave a non-zero gradient on the
  layer's spatial positions. A ViT that classifies from its class token fails the
  check at its last block (its patch tokens never reach the head) and gets the
  block before, which is what Grad-CAM users pick for ViTs by hand.
* **The layout** of that output is read from its shape: ``(B, C, H, W)`` maps,
  channels-last ``(B, H, W, C)`` maps (Swin, some ConvNeXts) when the last axis
  holds the stage's ``num_chs``, and ``(B, N, C)`` tokens (ViT), whose prefix
  tokens (``num_prefix_tokens``) are dropped and the rest reshaped to the patch
  grid. The reshape is what the grad-cam library's ``reshape_transform`` takes.
* **CAM** (Zhou et al. 2016) needs a head that is exactly global average pooling
  followed by one linear layer. That too is checked on the model: the head's
  logits must equal the linear layer applied to the spatial mean of
  ``forward_features``. Then the map is the classifier row times the features,
  exact and gradient-free; otherwise Grad-CAM from the grad-cam library (MIT).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kaedama.errors import KaedamaError

log = logging.getLogger(__name__)

METHODS = ("auto", "cam", "gradcam")


class CamError(KaedamaError):
    """No explanation can be computed for this model."""


@dataclass(frozen=True)
class Target:
    """The layer explanations are computed on, and how to read its output as a map."""

    name: str
    layout: str  # "nchw", "nhwc" or "tokens"
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    names: list[str] = []
    if isinstance(info, Sequence):
        names = [f["module"] for f in info if isinstance(f, dict) and f.get("module")]
    elif info is not None and hasattr(info, "module_name"):  # timm FeatureInfo object
        names = list(info.module_name())
    if not names:
        raise CamError(
            f"{type(model).__name__} has no timm feature_info to find its last stage; "
            "explanations need a timm model (pass --cam off to skip them)"
        )
    return names


def _num_chs(model: nn.Module, name: str) -> int | None:
    for f in getattr(model, "feature_info", None) or []:
        if isinstance(f, dict) and f.get("module") == name:
            return f.get("num_chs")
    return None


def _layout(model: nn.Module, name: str, out: torch.Tensor) -> Target:
    if out.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        n = out.shape[1] - prefix
        if grid is None or grid[0] * grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise CamError(f"cannot reshape {n} tokens of {name} to a square grid")
            grid = (side, side)
        return Target(name, "tokens", prefix, (int(grid[0]), int(grid[1])))
    if out.ndim == 4:
        chs = _num_chs(model, name)
        if chs is not None and out.shape[-1] == chs and out.shape[1] != chs:
            return Target(name, "nhwc")
        return Target(name, "nchw")
    raise CamError(f"the output of {name} has shape {tuple(out.shape)}, not a spatial map")


def to_nchw(target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reshape that turns ``target``'s output into ``(B, C, H, W)`` (grad-cam's transform)."""

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if target.layout == "nhwc":
            return t.permute(0, 3, 1, 2)
        if target.layout == "tokens":
            h, w = target.grid  # type: ignore[misc]
            t = t[:, target.prefix_tokens :, :]
            return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        return t

    return reshape


def choose_target(model: nn.Module, input_size: Sequence[int]) -> Target:
    """The deepest ``feature_info`` layer whose spatial output reaches the top logit."""
    names = _feature_modules(model)
    was_training = model.training
    model.eval()
    try:
        for name in reversed(names):
            module = model.get_submodule(name)
            captured: list[torch.Tensor] = []
            handle = module.register_forward_hook(lambda _m, _i, o, keep=captured: keep.append(o))
            try:
                x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
                with torch.enable_grad():
                    logits = model(x)
                    out = captured[-1]
                    if not isinstance(out, torch.Tensor):
                        continue
                    target = _layout(model, name, out)
                    grad = torch.autograd.grad(logits[0].max(), out, allow_unused=True)[0]
            finally:
                handle.remove()
            if grad is not None and to_nchw(target)(grad).abs().sum() > 0:
                return target
            log.debug("CAM: %s does not reach the prediction, trying the stage before", name)
    finally:
        model.train(was_training)
    raise CamError(f"no feature_info layer of {type(model).__name__} reaches its prediction")


def cam_applicable(model: nn.Module, input_size: Sequence[int]) -> bool:
    """Whether the head is exactly global average pooling + one linear layer (CAM is exact)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "forward_features"):
        return False
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feats = model.forward_features(x)
        logits = model.forward_head(feats) if hasattr(model, "forward_head") else model(x)
        if feats.ndim != 4:
            return False
        for dims in ((2, 3), (1, 2)):  # NCHW, then channels-last
            pooled = feats.mean(dims)
            if pooled.shape[1] == head.in_features and torch.allclose(
                head(pooled), logits, rtol=1e-3, atol=1e-4
            ):
                return True
    return False


def _normalise(maps: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """ReLU, min-max to [0, 1] at feature resolution, then bilinear to ``size`` (grad-cam's order)."""
    maps = maps.clamp(min=0)
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    maps = (maps - lo[:, None, None]) / (hi - lo + 1e-7)[:, None, None]
    up = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


class Explainer:
    """Heatmaps in ``[0, 1]`` at input resolution for a model, by CAM or Grad-CAM."""

    def __init__(self, model: nn.Module, input_size: Sequence[int], method: str = "auto"):
        if method not in METHODS:
            raise CamError(f"unknown explanation method {method!r}; one of {METHODS}")
        self.model = model.eval()
        self.input_size = tuple(int(v) for v in input_size)
        exact = cam_applicable(model, self.input_size)
        if method == "cam" and not exact:
            raise CamError(
                "CAM needs a global-average-pool + linear head, which this model does not "
                "have; use --cam gradcam (or auto)"
            )
        self.method = "cam" if method == "cam" or (method == "auto" and exact) else "gradcam"
        self.target = choose_target(model, self.input_size)
        self._gradcam = None

    def describe(self) -> dict:
        """What was chosen, for metrics.json and the report.

        ``target_layer`` is the layer Grad-CAM uses; CAM reads the pre-pool map that
        ``forward_features`` returns with the classifier's weights.
        """
        out = {
            "method": self.method,
            "target_layer": self.target.name,
            "layout": self.target.layout,
        }
        if self.method == "cam":
            out["cam_features"] = "forward_features"
        return out

    def __call__(self, batch: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """Maps ``(N, H, W)`` of ``classes[i]`` for each input of ``batch`` ``(N, C, H, W)``."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        device = next(self.model.parameters()).device
        x = x.to(device)
        size = self.input_size[1:]
        if self.method == "cam":
            with torch.inference_mode():
                feats = self.model.forward_features(x)
                head = self.model.get_classifier()
                if feats.shape[1] != head.in_features:  # channels-last
                    feats = feats.permute(0, 3, 1, 2)
                weights = head.weight[torch.as_tensor(list(classes), device=device)]
                maps = torch.einsum("bchw,bc->bhw", feats.float(), weights.float())
            return _normalise(maps.cpu(), size)
        return self._grad_cam(x, classes)

    def _grad_cam(self, x: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self._gradcam is None:
            layer = self.model.get_submodule(self.target.name)
            self._gradcam = GradCAM(
                model=self.model, target_layers=[layer], reshape_transform=to_nchw(self.target)
            )
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        with torch.enable_grad():
            return np.asarray(self._gradcam(input_tensor=x, targets=targets), dtype=np.float32)


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of a heatmap's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))  # type: ignore[return-value]


def heat_mass(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the heatmap's total inside ``box = (top, left, bottom, right)``."""
    top, left, bottom, right = box
    total = float(heatmap.sum())
    return float(heatmap[top:bottom, left:right].sum()) / total if total > 0 else 0.0
