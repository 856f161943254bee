"""Models: any timm architecture by name, pretrained from a file, a bundled package or the hub.

The model's own data config (input size, interpolation, mean/std, crop) drives
preprocessing. It is resolved once here and saved with every checkpoint, so
evaluation and serving preprocess exactly as training did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import timm
import torch
from torch import nn

from kaedama import images, storage
from kaedama.errors import KaedamaError
from kaedama.preprocess import Preprocess
from kaedama.train.config import TrainConfig
from kaedama.train.weights import bundled_state_dict, offline_hint, resolve_source

log = logging.getLogger(__name__)

# The keys of timm's data config that preprocessing needs.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ModelError(KaedamaError):
    """A model cannot be built (unknown name, weights not found or not loadable)."""


@dataclass
class TrainedModel:
    """A trained classifier with everything needed to preprocess and label its inputs."""

    model: nn.Module
    classes: tuple[str, ...]
    data_config: dict[str, Any]
    model_name: str
    config: dict[str, Any]


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(
        f"unknown timm model {name!r}.{hint} List names with "
        "python -c \"import timm; print(timm.list_models('resnet*'))\""
    )


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path for ``uri``: itself when local, else a temporary download."""
    if not storage.is_gcs(uri):
        if not os.path.isfile(uri):
            raise ModelError(f"pretrained weights file {uri!r} not found; check --pretrained-path")
        yield uri
        return
    suffix = PurePosixPath(uri).suffix  # keep .safetensors so timm picks the right reader
    with tempfile.TemporaryDirectory(prefix="kaedama-weights-") as tmp:
        path = os.path.join(tmp, "weights" + suffix)
        with open(path, "wb") as fh:
            fh.write(storage.read_bytes(uri))
        yield path


def fixed_input_size(name: str) -> int:
    """The side a fixed-size model (ViT, Swin, ...) is built for by default; 0 = any size."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not cfg.fixed_input_size:
        return 0
    return int(cfg.input_size[-1])


def _size_kwargs(name: str, img_size: int) -> dict[str, Any]:
    # Convolutional nets take any input size and their constructors reject img_size;
    # fixed-size models (position embeddings, attention windows) must be built for it.
    default = fixed_input_size(name)
    if not default or img_size <= 0 or img_size == default:
        return {}
    return {"img_size": img_size}


def _check_input_size(model: nn.Module, name: str, img_size: int) -> None:
    """One dummy forward at ``img_size``: a size the architecture cannot take fails here,
    with a message, instead of as an AssertionError in the first training step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{name} cannot run at --img-size {img_size} ({exc}); pick a size it supports "
            f"(its own is {fixed_input_size(name)}; ViT needs a multiple of the patch size) "
            "or use --img-size 0"
        ) from exc
    finally:
        model.train(was_training)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    pretrained_path: str = "",
    drop_rate: float = 0.0,
    img_size: int = 0,
) -> nn.Module:
    """Build a timm model with a fresh ``num_classes`` head.

    Args:
        name: a timm model name (``timm.list_models()``).
        num_classes: number of labels; the pretrained classifier is dropped when it differs.
        pretrained: load pretrained weights: from a bundled package for the models that
            have one (:data:`kaedama.train.weights.BUNDLED`), else from the hub.
        pretrained_path: load pretrained weights from this local or ``gs://`` file
            instead (a timm/torch state dict, a ``.safetensors`` file, or a kaedama
            checkpoint); implies ``pretrained``.
        drop_rate: dropout before the classifier.
        img_size: input side (0 = the model's own); fixed-size models such as ViT and
            Swin are built for it (timm resamples pretrained position embeddings).

    Raises:
        ModelError: unknown model name, an input size the model cannot take, or
            weights that cannot be loaded.
    """
    _check_name(name)
    size_kwargs = _size_kwargs(name, img_size)
    try:
        model = _create(name, num_classes, pretrained, pretrained_path, drop_rate, size_kwargs)
    except TypeError as exc:
        if not size_kwargs:
            raise
        raise ModelError(
            f"{name} has a fixed input size of {fixed_input_size(name)} px and timm cannot "
            f"build it for --img-size {img_size} ({exc}); use --img-size 0 or another model"
        ) from exc
    if size_kwargs:
        _check_input_size(model, name, img_size)
    return model


def _create(
    name: str,
    num_classes: int,
    pretrained: bool,
    pretrained_path: str,
    drop_rate: float,
    size_kwargs: dict[str, Any],
) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate, **size_kwargs}
    source = resolve_source(name, pretrained=pretrained, pretrained_path=pretrained_path)
    if source is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if source.kind == "file":
        with _local_copy(pretrained_path) as path:
            return _zero_fresh_head(_from_file(name, path, pretrained_path, kwargs), num_classes)
    if source.kind == "package":
        with tempfile.TemporaryDirectory(prefix="kaedama-weights-") as tmp:
            path = os.path.join(tmp, "weights.pth")
            torch.save(bundled_state_dict(name), path)
            return _zero_fresh_head(_from_file(name, path, source.location, kwargs), num_classes)
    try:
        return _zero_fresh_head(timm.create_model(name, pretrained=True, **kwargs), num_classes)
    except (RuntimeError, OSError) as exc:
        raise ModelError(
            f"cannot fetch pretrained weights for {name} from the model hub ({exc}). "
            f"Offline? {offline_hint(name)} download them once and pass --pretrained-path FILE "
            "(or check HF_HUB_OFFLINE)."
        ) from exc


def _zero_fresh_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Zero the classifier that timm re-created for a new class count on pretrained weights.

    timm's initialisation gives the new head logits of magnitude ~5 on pretrained
    features (initial loss far above ln(classes)), and the warm-up spends its steps undoing
    that. A zero head starts at uniform predictions, as BiT-style fine-tuning does:
    measured on 10-class digit photos, lite0 at 64 px, 3 epochs, val accuracy 0.31 -> 0.53.
    A head loaded with the weights (same class count as the source) is left alone.
    """
    if num_classes == (getattr(model, "pretrained_cfg", None) or {}).get("num_classes"):
        return model
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    return model


def _from_file(name: str, path: str, origin: str, kwargs: dict[str, Any]) -> nn.Module:
    # timm's own loader: it drops the pretrained classifier when num_classes differs and
    # resamples position embeddings for another img_size.
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs
        )
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load pretrained weights for {name} from {origin}: {exc}. "
            "The file must hold weights of this same architecture."
        ) from exc


def weights_source(cfg: TrainConfig) -> dict[str, str] | None:
    """Where ``cfg``'s pretrained weights come from (for lineage); None = random init."""
    source = resolve_source(
        cfg.model, pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path
    )
    return source.to_json() if source is not None else None


def create_from_config(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """:func:`create_model` with the fields of a :class:`TrainConfig`."""
    return create_model(
        cfg.model,
        num_classes,
        pretrained=cfg.pretrained or bool(cfg.pretrained_path),
        pretrained_path=cfg.pretrained_path,
        drop_rate=cfg.drop_rate,
        img_size=cfg.img_size,
    )


def resolve_data_config(
    model: nn.Module, img_size: int = 0, *, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> dict[str, Any]:
    """The model's preprocessing config: timm's, with ``img_size`` as input size when > 0.

    Returned as :meth:`kaedama.preprocess.Preprocess.to_data_config` (JSON-friendly,
    with the ``decode`` options), the form every checkpoint saves: validation,
    ``kaedama evaluate`` and serving all rebuild the same :class:`Preprocess` from it.
    """
    dc = timm.data.resolve_model_data_config(model)
    if img_size > 0:
        dc["input_size"] = (dc["input_size"][0], img_size, img_size)
    timm_keys = {k: v for k, v in dc.items() if k in DATA_CONFIG_KEYS}
    preprocess = dataclasses.replace(Preprocess.from_data_config(timm_keys), max_pixels=max_pixels)
    return preprocess.to_data_config()


def input_size(data_config: dict[str, Any]) -> tuple[int, int]:
    """``(height, width)`` of the model input."""
    _, h, w = data_config["input_size"]
    return int(h), int(w)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _head_prefix(model: nn.Module) -> str:
    """The classifier's parameter-name prefix (``fc.``, ``head.fc.``, ``classifier.``)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ""
    if not name:
        raise ModelError(f"{type(model).__name__} does not name its classifier; cannot rebuild it")
    return name + "."


def init_from_checkpoint(
    model: nn.Module, uri: str, model_name: str, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Load a kaedama checkpoint's weights into a fresh ``model`` (``--init-from``).

    Same classes in the same order: every weight. Otherwise the backbone only; the
    classifier keeps its fresh initialisation for the new class list.

    Returns:
        A report: the checkpoint, whether the head was ``kept`` or ``rebuilt``, and the
        classes added and removed.

    Raises:
        ModelError: another architecture, or weights that do not fit (e.g. a fixed-size
            model trained at another input size).
    """
    from kaedama.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(uri)
    if ckpt.get("model_name") != model_name:
        raise ModelError(
            f"--init-from {uri} holds a {ckpt.get('model_name')!r} model but this run trains "
            f"{model_name!r}; pass --model {ckpt.get('model_name')} or another checkpoint"
        )
    old = tuple(ckpt.get("classes", ()))
    weights = dict(ckpt["model"])
    same = old == classes
    if not same:
        head = _head_prefix(model)
        weights = {k: v for k, v in weights.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=same)
    except RuntimeError as exc:
        raise ModelError(f"--init-from {uri}: its weights do not fit this model ({exc})") from exc
    if not same and (unexpected or any(not k.startswith(head) for k in missing)):
        raise ModelError(
            f"--init-from {uri}: weights do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return {
        "checkpoint": uri,
        "head": "kept" if same else "rebuilt",
        "classes_added": [c for c in classes if c not in old],
        "classes_removed": [c for c in old if c not in classes],
        "reordered": not same and sorted(old) == sorted(classes),
    }


def load_trained(uri: str, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a trained model from a kaedama checkpoint (``best.pt`` or ``last.pt``).

    Raises:
        ModelError: the file is not a kaedama training checkpoint.
    """
    from kaedama.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(uri)
    missing = [k for k in ("model", "model_name", "classes", "data_config") if k not in ckpt]
    if missing:
        raise ModelError(f"{uri} is not a kaedama training checkpoint (missing {missing})")
    classes = tuple(ckpt["classes"])
    # Fixed-size models were built for the trained input size.
    _, _, side = ckpt["data_config"]["input_size"]
    model = create_model(ckpt["model_name"], len(classes), img_size=int(side))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return TrainedModel(
        model=model,
        classes=classes,
        data_config=dict(ckpt["data_config"]),
        model_name=ckpt["model_name"],
        config=dict(ckpt.get("config", {})),
    )
