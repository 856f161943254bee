"""Explanations: the target layer read from four architectures, and a case with known evidence."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from kaedama.evaluate.cam import CamError, Explainer, cam_applicable, choose_target, heat_mass, peak

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (3, 64, 64)


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize(
    ("name", "kwargs", "layout", "method", "stage_from_end"),
    [
        ("resnet18", {}, "nchw", "cam", 1),
        ("efficientnet_b0", {}, "nchw", "cam", 1),
        # A class-token ViT: the last block's patch tokens never reach the head.
        ("vit_tiny_patch16_224", {"img_size": 64}, "tokens", "gradcam", 2),
        # Swin keeps channels last; its head is norm -> average pool -> linear.
        ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, "nhwc", "cam", 1),
    ],
)
def test_target_layer_is_read_from_the_model(name, kwargs, layout, method, stage_from_end):
    model = _model(name, **kwargs)
    target = choose_target(model, SIZE)
    assert target.name == model.feature_info[-stage_from_end]["module"]
    assert target.layout == layout
    explainer = Explainer(model, SIZE)
    assert explainer.method == method
    maps = explainer(np.random.default_rng(0).normal(size=(2, *SIZE)).astype(np.float32), [0, 2])
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() == pytest.approx(1.0, abs=1e-3)
    if layout == "tokens":
        assert target.prefix_tokens == 1 and target.grid == (4, 4)
    # Grad-CAM (the grad-cam library) works on every one of them too.
    grad = Explainer(model, SIZE, "gradcam")(np.zeros((1, *SIZE), np.float32), [1])
    assert grad.shape == (1, 64, 64) and np.isfinite(grad).all()


def test_cam_is_refused_for_a_head_that_is_not_pool_and_linear():
    vit = _model("vit_tiny_patch16_224", img_size=64)
    assert not cam_applicable(vit, SIZE)
    with pytest.raises(CamError, match="gradcam"):
        Explainer(vit, SIZE, "cam")


def test_cam_equals_grad_cam_on_a_pool_and_linear_head():
    # For global average pooling + linear, Grad-CAM's channel weights are the classifier
    # row / (H*W): after normalisation both maps are the same, which checks our CAM
    # against the library's Grad-CAM.
    model = _model("resnet18")
    x = np.random.default_rng(1).normal(size=(3, *SIZE)).astype(np.float32)
    cam = Explainer(model, SIZE, "cam")(x, [0, 1, 2])
    grad = Explainer(model, SIZE, "gradcam")(x, [0, 1, 2])
    assert np.abs(cam - grad).max() < 0.02


# --------------------------------------------------------------------- known evidence

S, SQ = 40, 10


def _squares(n: int, seed: int):
    """Noise with one square each: bright (class 1) or dim (class 0), at a random place."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.35, (n, 3, S, S)).astype(np.float32)
    y = rng.integers(0, 2, n)
    boxes = []
    for i in range(n):
        t, left = (int(v) for v in rng.integers(0, S - SQ, 2))
        boxes.append((t, left, t + SQ, left + SQ))
        x[i, :, t : t + SQ, left : left + SQ] = 1.0 if y[i] == 1 else 0.5
    return torch.from_numpy((x - 0.5) / 0.25), torch.from_numpy(y), boxes


@pytest.fixture(scope="module")
def square_model():
    """A small timm ResNet (output stride 8) trained to tell a bright square from a dim one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2, output_stride=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        x, y, _ = _squares(24, seed=step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    return model.eval()


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_heat_is_on_the_bright_square(square_model, method):
    x, y, boxes = _squares(64, seed=1000)
    with torch.no_grad():
        accuracy = (square_model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95  # the model learned the task: the evidence is the square
    idx = [i for i in range(64) if y[i] == 1][:16]
    maps = Explainer(square_model, (3, S, S), method)(x[idx].numpy(), [1] * len(idx))
    on_square = 0
    masses = []
    for m, i in zip(maps, idx, strict=True):
        top, left, bottom, right = boxes[i]
        r, c = peak(m)
        on_square += top - 2 <= r < bottom + 2 and left - 2 <= c < right + 2
        masses.append(heat_mass(m, boxes[i]))
    assert on_square >= 0.75 * len(idx)
    # The square is 1/16 of the picture; it holds well over twice its share of the heat.
    assert np.mean(masses) > 2 * (SQ * SQ) / (S * S)
