"""Optimisation: AdaBound against the reference package, parameter groups, freezing,
layer-wise LR decay, the LR schedule, EMA and gradient clipping."""

from __future__ import annotations

import math

import adabound
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kaedama.errors import KaedamaError
from kaedama.train.config import TrainConfig
from kaedama.train.optim import (
    AdaBound,
    ModelEma,
    WarmupScheduler,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    eval_frozen_norms,
    freeze_until,
    param_groups,
)

# Tiny tensors on a shared CPU: one intra-op thread per test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- AdaBound


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def _train(model, opt, steps, lr_factors=None, start=0):
    x, y = _problem()
    base = [g["lr"] for g in opt.param_groups] if lr_factors else None
    for t in range(start, start + steps):
        if lr_factors:
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * lr_factors(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:This overload of add:UserWarning")
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 0.01, "final_lr": 0.05, "gamma": 0.01, "weight_decay": 5e-3},
        {"lr": 0.003, "betas": (0.8, 0.99), "amsbound": True, "weight_decay": 1e-3},
    ],
)
@pytest.mark.parametrize("decaying_lr", [False, True])
def test_adabound_matches_reference_package(kwargs, decaying_lr):
    ours, ref = _mlp(), _mlp()
    opt_ours = AdaBound(ours.parameters(), **kwargs)
    opt_ref = adabound.AdaBound(ref.parameters(), **kwargs)
    # A decaying lr exercises the final_lr * lr / base_lr scaling of the bounds.
    factors = (lambda t: 0.5 * (1 + math.cos(math.pi * t / 300))) if decaying_lr else None
    _train(ours, opt_ours, 300, factors)
    _train(ref, opt_ref, 300, factors)
    moved = 0.0
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), _mlp().parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-2  # the problem really trained


def test_adabound_state_dict_resume_continues_identically():
    straight = _mlp()
    opt = AdaBound(straight.parameters(), lr=0.01, final_lr=0.05)
    _train(straight, opt, 60)

    first = _mlp()
    opt1 = AdaBound(first.parameters(), lr=0.01, final_lr=0.05)
    _train(first, opt1, 30)
    saved_model, saved_opt = first.state_dict(), opt1.state_dict()
    resumed = _mlp(seed=9)
    resumed.load_state_dict(saved_model)
    opt2 = AdaBound(resumed.parameters(), lr=0.01, final_lr=0.05)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 30, start=30)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


# --------------------------------------------------------------------------- groups, freezing


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3)


def test_no_weight_decay_on_norm_and_bias():
    model = _resnet()
    groups = param_groups(model, TrainConfig(weight_decay=0.05))
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.ndim <= 1:  # BatchNorm weights/biases and the classifier bias
            assert decay_of[id(p)] == 0.0, name
        else:
            assert decay_of[id(p)] == 0.05, name
    assert len(decay_of) == len(list(model.parameters()))


def test_freeze_until_freezes_the_stem_up_to_the_named_stage():
    model = _resnet()
    frozen = freeze_until(model, "layer2")
    for name, p in model.named_parameters():
        early = name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
        assert p.requires_grad is not early, name
    assert frozen == [n for n, p in model.named_parameters() if not p.requires_grad]


def test_frozen_batch_norms_keep_their_running_statistics():
    model = _resnet()
    freeze_until(model, "layer1")
    model.train()
    switched = eval_frozen_norms(model)
    frozen_bn = [
        n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training
    ]
    assert switched == len(frozen_bn) > 0
    assert all(n.split(".")[0] in ("conv1", "bn1", "layer1") for n in frozen_bn)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32))
    for key, before in stats.items():
        frozen = key.split(".")[0] in ("conv1", "bn1", "layer1")
        assert torch.equal(model.state_dict()[key], before) is frozen, key


def test_frozen_parameters_stay_put_through_training():
    model = _resnet()
    opt = build_optimizer(model, TrainConfig(freeze_until="layer3", lr=0.1, optimizer="sgd"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    for name, p in model.named_parameters():
        trainable = name.startswith(("layer4", "fc"))
        assert (id(p) in in_opt) is trainable, name
        assert torch.equal(p, before[name]) is not trainable, name


def test_freeze_until_errors_say_what_to_do():
    with pytest.raises(KaedamaError, match="layer1"):
        param_groups(_resnet(), TrainConfig(freeze_until="stage9"))
    with pytest.raises(KaedamaError, match="no trainable parameters"):
        param_groups(_resnet(), TrainConfig(freeze_until="fc"))


def test_layer_decay_scales_lr_down_from_the_head():
    model = _resnet()
    cfg = TrainConfig(layer_decay=0.5, lr=0.1, optimizer="adamw", weight_decay=0.01)
    opt = build_optimizer(model, cfg)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"])
    names = dict(model.named_parameters())
    head, stem = scale_of[id(names["fc.weight"])], scale_of[id(names["conv1.0.weight"])]
    l1, l4 = (
        scale_of[id(names["layer1.0.conv1.weight"])],
        scale_of[id(names["layer4.0.conv1.weight"])],
    )
    assert head == 1.0
    assert stem < l1 < l4 < head
    # Consecutive distinct scales differ by the decay factor.
    distinct = sorted(set(scale_of.values()))
    for lo, hi in zip(distinct, distinct[1:], strict=False):
        assert lo / hi == pytest.approx(0.5)


def test_build_optimizer_kinds_and_settings():
    sgd = build_optimizer(_resnet(), TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in sgd.param_groups)
    adamw = build_optimizer(_resnet(), TrainConfig(optimizer="adamw", lr=3e-4), lr_scale=2.0)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([6e-4] * len(adamw.param_groups))
    ab = build_optimizer(
        _resnet(), TrainConfig(optimizer="adabound", lr=1e-3, final_lr=0.2, adabound_gamma=0.01)
    )
    assert isinstance(ab, AdaBound)
    assert all(g["final_lr"] == 0.2 and g["gamma"] == 0.01 for g in ab.param_groups)


# --------------------------------------------------------------------------- LR schedule


def _lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in sched.optimizer.param_groups])
        sched.optimizer.step()
        sched.step()
    out.append([g["lr"] for g in sched.optimizer.param_groups])
    return out


def test_warmup_is_linear_then_cosine_reaches_min_lr():
    cfg = TrainConfig(lr=0.1, warmup_epochs=2, warmup_lr=0.001, min_lr=1e-4, epochs=6)
    opt = build_optimizer(_mlp(), cfg)
    lrs = [v[0] for v in _lrs(build_scheduler(opt, cfg, steps_per_epoch=5), 30)]
    assert lrs[0] == pytest.approx(0.001)
    steps = [b - a for a, b in zip(lrs[:10], lrs[1:11], strict=True)]
    assert steps == pytest.approx([(0.1 - 0.001) / 10] * 10)
    assert lrs[10] == pytest.approx(0.1)
    after = lrs[10:]
    assert all(b < a for a, b in zip(after, after[1:], strict=False))
    assert lrs[30] == pytest.approx(1e-4)
    assert lrs[20] == pytest.approx(1e-4 + (0.1 - 1e-4) / 2)  # half way down the cosine


def test_step_schedule_decays_at_milestones():
    cfg = TrainConfig(
        lr=0.1, scheduler="step", milestones=(2, 4), step_gamma=0.1, warmup_epochs=0, epochs=6
    )
    opt = build_optimizer(_mlp(), cfg)
    lrs = [v[0] for v in _lrs(build_scheduler(opt, cfg, steps_per_epoch=3), 18)]
    assert lrs[:6] == pytest.approx([0.1] * 6)
    assert lrs[6:12] == pytest.approx([0.01] * 6)
    assert lrs[12:] == pytest.approx([0.001] * 7)


def test_constant_schedule_after_fractional_warmup():
    cfg = TrainConfig(lr=0.2, scheduler="none", warmup_epochs=0.5, warmup_lr=0.0, epochs=3)
    opt = build_optimizer(_mlp(), cfg)
    lrs = [v[0] for v in _lrs(build_scheduler(opt, cfg, steps_per_epoch=4), 12)]
    assert lrs[:3] == pytest.approx([0.0, 0.1, 0.2])
    assert lrs[2:] == pytest.approx([0.2] * 11)


def test_schedule_keeps_layer_decay_ratios():
    cfg = TrainConfig(lr=0.1, layer_decay=0.5, epochs=2, warmup_epochs=1)
    opt = build_optimizer(_resnet(), cfg)
    scales = [g["lr_scale"] for g in opt.param_groups]
    for lrs in _lrs(build_scheduler(opt, cfg, steps_per_epoch=4), 8):
        for lr, s in zip(lrs, scales, strict=True):
            assert lr == pytest.approx(lrs[-1] * s)  # the last group is the head (scale 1)


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_schedule_resumes_from_state_dict(kind):
    cfg = TrainConfig(lr=0.1, scheduler=kind, milestones=(1, 2), epochs=3, warmup_epochs=1)
    straight = build_scheduler(build_optimizer(_mlp(), cfg), cfg, steps_per_epoch=4)
    want = _lrs(straight, 12)

    first_opt = build_optimizer(_mlp(), cfg)
    first = build_scheduler(first_opt, cfg, steps_per_epoch=4)
    got = _lrs(first, 5)[:-1]
    saved_opt, saved_sched = first_opt.state_dict(), first.state_dict()
    # A fresh process: new optimiser and scheduler from the config, then the saved states,
    # in either order.
    for sched_first in (False, True):
        opt = build_optimizer(_mlp(), cfg)
        sched = build_scheduler(opt, cfg, steps_per_epoch=4)
        if sched_first:
            sched.load_state_dict(saved_sched)
            opt.load_state_dict(saved_opt)
        else:
            opt.load_state_dict(saved_opt)
            sched.load_state_dict(saved_sched)
        assert isinstance(sched, WarmupScheduler)
        assert got + _lrs(sched, 7) == want  # identical, not just close


# --------------------------------------------------------------------------- EMA, clipping


def test_model_ema_follows_the_weights_and_round_trips():
    model = _mlp()
    ema = ModelEma(model, decay=0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, m, s in zip(ema.module.parameters(), model.parameters(), start, strict=True):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * m)
        assert not e.requires_grad
    other = ModelEma(_mlp(seed=5), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.module.parameters(), ema.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(KaedamaError):
        ModelEma(model, decay=1.0)


def test_clip_gradients():
    model = _mlp()
    x, y = _problem()
    F.cross_entropy(model(x), y).backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    assert clip_gradients(model, 0.0) is None
    assert clip_gradients(model, norm / 4) == pytest.approx(norm, rel=1e-5)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    assert after == pytest.approx(norm / 4, rel=1e-4)
