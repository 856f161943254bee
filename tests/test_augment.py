"""Augmentation: per-image transforms, soft targets, mixup/CutMix (against timm), RICAP/ICAP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.mixup import Mixup, rand_bbox

from kaedama.errors import KaedamaError
from kaedama.preprocess import Preprocess
from kaedama.train.augment import (
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    BatchMixer,
    Lighting,
    build_train_transform,
    cutmix,
    cutmix_box,
    icap,
    mixup,
    one_hot_smooth,
    resolve_data_config,
    ricap,
    soft_target_cross_entropy,
)
from kaedama.train.config import TrainConfig

DATA_CONFIG = {
    "input_size": (3, 64, 64),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
NUM_CLASSES = 7


def _photo(width: int = 97, height: int = 75, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _batch(batch: int = 8, height: int = 12, width: int = 16, seed: int = 0):
    """Images whose every pixel value is unique, so copied regions can be traced back."""
    images = torch.arange(batch * 3 * height * width, dtype=torch.float32)
    images = images.view(batch, 3, height, width)
    targets = torch.from_numpy(np.random.default_rng(seed).integers(0, NUM_CLASSES, batch))
    return images, targets


# --------------------------------------------------------------------------- per image


@pytest.mark.parametrize(
    ("img_size", "size"), [(0, (97, 75)), (0, (40, 300)), (48, (97, 75)), (33, (20, 20))]
)
def test_train_transform_output_shape(img_size, size):
    cfg = TrainConfig(img_size=img_size, rotation=15.0, vflip=0.5, random_erasing=1.0)
    tf = build_train_transform(DATA_CONFIG, cfg)
    side = img_size or 64
    for seed in range(3):
        out = tf(_photo(*size, seed=seed))
        assert out.shape == (3, side, side)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_train_transform_is_reproducible_under_a_seed():
    tf = build_train_transform(DATA_CONFIG, TrainConfig(rotation=10.0))
    img = _photo()
    torch.manual_seed(3)
    a = tf(img)
    torch.manual_seed(3)
    b = tf(img)
    torch.manual_seed(4)
    c = tf(img)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_transform_normalises_with_the_data_config():
    # Everything random switched off: a uniform image must come out as (colour - mean) / std.
    cfg = TrainConfig(
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0.0,
        color_jitter=0.0,
        pca_noise=0.0,
        random_erasing=0.0,
    )
    tf = build_train_transform(DATA_CONFIG, cfg)
    out = tf(Image.new("RGB", (50, 50), (200, 100, 50)))
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(DATA_CONFIG["mean"])) / torch.tensor(
        DATA_CONFIG["std"]
    )
    torch.testing.assert_close(out, want.view(3, 1, 1).expand(3, 64, 64), atol=1e-5, rtol=0)


def test_train_transform_rejects_malformed_scale():
    with pytest.raises(KaedamaError, match="scale"):
        build_train_transform(DATA_CONFIG, TrainConfig(scale=(0.5,)))


def test_lighting_shifts_each_image_by_one_colour_along_the_pca_axes():
    img = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Lighting(0.0)(img), img)
    light = Lighting(0.1)
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC)
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL)
    gen = torch.Generator().manual_seed(1)
    alphas = []
    for _ in range(2000):
        shift = light(img, generator=gen) - img
        # One colour offset for every pixel of the image.
        torch.testing.assert_close(shift, shift[:, :1, :1].expand_as(shift))
        alphas.append(torch.linalg.solve(eigvec, shift[:, 0, 0]) / eigval)
    alphas = torch.stack(alphas)
    # alpha ~ N(0, 0.1) per axis, recovered from the shifts.
    assert alphas.mean(0).abs().max() < 0.01
    torch.testing.assert_close(alphas.std(0), torch.full((3,), 0.1), atol=0.01, rtol=0)


# --------------------------------------------------------------------------- targets and loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_one_hot_smooth_and_soft_cross_entropy_match_torch(smoothing):
    targets = torch.tensor([0, 3, 6, 3])
    soft = one_hot_smooth(targets, NUM_CLASSES, smoothing)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert soft.argmax(1).tolist() == targets.tolist()
    logits = torch.randn(4, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, soft),
        F.cross_entropy(logits, targets, label_smoothing=smoothing),
    )


# --------------------------------------------------------------------------- mixup / CutMix


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mixup_equals_timm_batch_mode(seed):
    images, targets = _batch(seed=seed)
    images = images / images.max()
    timm_mix = Mixup(
        mixup_alpha=0.4,
        cutmix_alpha=0.0,
        prob=1.0,
        mode="batch",
        label_smoothing=0.1,
        num_classes=NUM_CLASSES,
    )
    np.random.seed(seed)
    want_x, want_y = timm_mix(images.clone(), targets.clone())
    # Replay timm's draws: one uniform for the batch probability, then lam ~ Beta.
    np.random.seed(seed)
    np.random.rand()
    lam = float(np.random.beta(0.4, 0.4))
    got_x, got_y = mixup(images, targets, NUM_CLASSES, lam, smoothing=0.1)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_y, want_y)
    torch.testing.assert_close(got_y.sum(1), torch.ones(len(targets)))


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_equals_timm_batch_mode_with_corrected_lambda(seed):
    images, targets = _batch(seed=seed)
    timm_mix = Mixup(
        mixup_alpha=0.0,
        cutmix_alpha=1.0,
        prob=1.0,
        mode="batch",
        correct_lam=True,
        label_smoothing=0.1,
        num_classes=NUM_CLASSES,
    )
    np.random.seed(seed)
    want_x, want_y = timm_mix(images.clone(), targets.clone())
    np.random.seed(seed)
    np.random.rand()
    lam = float(np.random.beta(1.0, 1.0))
    box = tuple(int(v) for v in rand_bbox(images.shape, lam))
    got_x, got_y = cutmix(images, targets, NUM_CLASSES, box, smoothing=0.1)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_y, want_y)
    torch.testing.assert_close(got_y.sum(1), torch.ones(len(targets)))


def test_cutmix_label_weight_is_the_pasted_area():
    images, targets = _batch(batch=4, height=10, width=20)
    out, soft = cutmix(images, targets, NUM_CLASSES, (2, 7, 5, 9), smoothing=0.0)
    pasted = (out != images).any(1)  # [B, H, W] pixels that came from the partner
    assert pasted[:, 2:7, 5:9].all() and pasted.sum() == 4 * 5 * 4
    area = 5 * 4 / 200
    for i in range(4):
        want = torch.zeros(NUM_CLASSES)
        want[targets[i]] += 1 - area
        want[targets[3 - i]] += area
        torch.testing.assert_close(soft[i], want)


def test_cutmix_box_covers_one_minus_lambda_and_stays_inside():
    rng = np.random.default_rng(0)
    for lam in np.linspace(0.05, 0.95, 19):
        for _ in range(20):
            y0, y1, x0, x1 = cutmix_box(60, 80, float(lam), rng)
            assert 0 <= y0 <= y1 <= 60 and 0 <= x0 <= x1 <= 80
            full = int(60 * np.sqrt(1 - lam)) * int(80 * np.sqrt(1 - lam))
            assert (y1 - y0) * (x1 - x0) <= full
            # Unclipped boxes have the full size, about (1 - lam) of the image.
            if y0 > 0 and y1 < 60 and x0 > 0 and x1 < 80:
                assert (y1 - y0) * (x1 - x0) == full
                assert abs(full / 4800 - (1 - lam)) < 0.05


# --------------------------------------------------------------------------- RICAP / ICAP


def _check_geometry(images, targets, out, soft, geo, same_position):
    _, _, height, width = images.shape
    w, h = geo.boundary_x, geo.boundary_y
    sizes = [(p.width, p.height) for p in geo.patches]
    assert sizes == [(w, h), (width - w, h), (w, height - h), (width - w, height - h)]
    dsts = [(p.dst_x, p.dst_y) for p in geo.patches]
    assert dsts == [(0, 0), (w, 0), (0, h), (w, h)]
    assert sum(p.weight for p in geo.patches) == pytest.approx(1.0)
    covered = torch.zeros(height, width, dtype=torch.int64)
    want_soft = torch.zeros_like(soft)
    for p in geo.patches:
        assert sorted(p.perm.tolist()) == list(range(len(images)))
        assert 0 <= p.src_x <= width - p.width and 0 <= p.src_y <= height - p.height
        if same_position:
            assert (p.src_x, p.src_y) == (p.dst_x, p.dst_y)
        assert p.weight == pytest.approx(p.width * p.height / (width * height))
        region = out[:, :, p.dst_y : p.dst_y + p.height, p.dst_x : p.dst_x + p.width]
        source = images[p.perm][:, :, p.src_y : p.src_y + p.height, p.src_x : p.src_x + p.width]
        assert torch.equal(region, source)
        covered[p.dst_y : p.dst_y + p.height, p.dst_x : p.dst_x + p.width] += 1
        want_soft += p.weight * F.one_hot(targets[p.perm], NUM_CLASSES).float()
    assert (covered == 1).all()  # the four patches tile the image exactly
    torch.testing.assert_close(soft, want_soft)
    torch.testing.assert_close(soft.sum(1), torch.ones(len(images)))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("fn", [ricap, icap])
def test_ricap_and_icap_patch_geometry(fn, seed):
    images, targets = _batch(batch=6, height=12, width=16, seed=seed)
    out, soft, geo = fn(images, targets, NUM_CLASSES, 0.3, np.random.default_rng(seed))
    assert out.shape == images.shape
    _check_geometry(images, targets, out, soft, geo, same_position=fn is icap)


def test_icap_keeps_every_pixel_in_place():
    images, targets = _batch(batch=5, height=9, width=13)
    out, _, geo = icap(images, targets, NUM_CLASSES, 0.5, np.random.default_rng(7))
    for p in geo.patches:
        for y in range(p.dst_y, p.dst_y + p.height):
            for x in range(p.dst_x, p.dst_x + p.width):
                assert torch.equal(out[:, :, y, x], images[p.perm, :, y, x])


def test_ricap_crops_come_from_random_positions():
    images, targets = _batch(batch=4, height=32, width=32)
    offsets = set()
    for seed in range(20):
        _, _, geo = ricap(images, targets, NUM_CLASSES, 0.3, np.random.default_rng(seed))
        offsets.update((p.src_x - p.dst_x, p.src_y - p.dst_y) for p in geo.patches)
    assert len(offsets) > 5


def test_ricap_handles_degenerate_boundaries_and_smoothing():
    # A tiny Beta parameter puts the crossing point on the image border: empty patches.
    images, targets = _batch(batch=4, height=8, width=8)
    for seed in range(10):
        out, soft, geo = ricap(
            images, targets, NUM_CLASSES, 0.01, np.random.default_rng(seed), smoothing=0.2
        )
        assert out.shape == images.shape
        torch.testing.assert_close(soft.sum(1), torch.ones(4))
        assert soft.min() >= 0.2 / NUM_CLASSES - 1e-6


# --------------------------------------------------------------------------- BatchMixer


@pytest.mark.parametrize("method", ["mixup", "cutmix", "ricap", "icap"])
def test_batch_mixer_applies_the_drawn_method(method):
    cfg = dataclasses.replace(TrainConfig(), **{f"{method}_prob": 1.0}, label_smoothing=0.1)
    mixer = BatchMixer(cfg, NUM_CLASSES)
    assert mixer.enabled
    images, targets = _batch(batch=8, height=16, width=16)
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(5):
        out, soft = mixer(images, targets, generator=gen)
        assert mixer.last_method == method
        assert out.shape == images.shape and soft.shape == (8, NUM_CLASSES)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        changed += not torch.equal(out, images)
    assert changed >= 3
    # Same generator seed, same result.
    a = mixer(images, targets, generator=torch.Generator().manual_seed(5))
    b = mixer(images, targets, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_mixer_off_returns_smoothed_one_hot():
    mixer = BatchMixer(TrainConfig(label_smoothing=0.1), NUM_CLASSES)
    assert not mixer.enabled
    images, targets = _batch()
    out, soft = mixer(images, targets)
    assert out is images
    torch.testing.assert_close(soft, one_hot_smooth(targets, NUM_CLASSES, 0.1))
    assert mixer.last_method == "none"


def test_batch_mixer_draws_methods_by_probability():
    cfg = TrainConfig(mixup_prob=0.1, cutmix_prob=0.2, ricap_prob=0.3, icap_prob=0.15)
    mixer = BatchMixer(cfg, NUM_CLASSES)
    rng = np.random.default_rng(0)
    n = 20000
    counts = {m: 0 for m in ("none", "mixup", "cutmix", "ricap", "icap")}
    for _ in range(n):
        counts[mixer.choose(rng)] += 1
    want = {"none": 0.25, "mixup": 0.1, "cutmix": 0.2, "ricap": 0.3, "icap": 0.15}
    for m, p in want.items():
        assert abs(counts[m] / n - p) < 0.015, (m, counts[m] / n)


@pytest.mark.parametrize(
    "overrides",
    [
        {"mixup_prob": 0.6, "cutmix_prob": 0.6},
        {"ricap_prob": -0.1},
        {"icap_prob": 0.5, "icap_beta": 0.0},
        {"label_smoothing": 1.0},
    ],
)
def test_batch_mixer_rejects_bad_settings(overrides):
    with pytest.raises(KaedamaError):
        BatchMixer(TrainConfig(**overrides), NUM_CLASSES)


# --------------------------------------------------------------------------- real photos


@pytest.mark.shared
def test_real_photos_through_transforms_mixer_and_one_training_step(shared_datasets):
    import timm

    from kaedama.train.optim import ModelEma, build_optimizer, build_scheduler, clip_gradients

    files = sorted((shared_datasets / "hymenoptera" / "train").glob("*/*.jpg"))[::30][:8]
    assert len(files) == 8
    labels = sorted({f.parent.name for f in files})
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(labels))
    data_config = timm.data.resolve_model_data_config(model)
    cfg = TrainConfig(img_size=96, rotation=10.0, ricap_prob=0.5, cutmix_prob=0.5, clip_grad=1.0)
    train_tf = build_train_transform(data_config, cfg)
    # Evaluation goes through kaedama.preprocess (tests/test_preprocess.py matches timm).
    eval_pre = Preprocess.from_data_config(resolve_data_config(data_config, cfg))
    photos = [Image.open(f).convert("RGB") for f in files]
    images = torch.stack([train_tf(p) for p in photos])
    assert images.shape == (8, 3, 96, 96)
    assert np.stack([eval_pre.image(p) for p in photos]).shape == (8, 3, 96, 96)
    targets = torch.tensor([labels.index(f.parent.name) for f in files])

    mixer = BatchMixer(cfg, len(labels))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=1)
    ema = ModelEma(model, decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    mixed, soft = mixer(images, targets, generator=torch.Generator().manual_seed(0))
    assert mixer.last_method in ("ricap", "cutmix")
    loss = soft_target_cross_entropy(model(mixed), soft)
    loss.backward()
    assert clip_gradients(model, cfg.clip_grad) > 0
    opt.step()
    sched.step()
    ema.update(model)
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
