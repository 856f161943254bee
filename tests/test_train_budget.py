"""--time-budget and --early-stop-patience: why training stopped, and clean resumes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kaedama import cli
from kaedama.config import ConfigError
from kaedama.train.checkpoint import BEST, LAST, load_checkpoint
from kaedama.train.config import TrainConfig, parse_duration
from kaedama.train.loop import fit
from tests.test_train import FAST, _same_run
from tests.test_train import toy as toy  # the fixture: 3 labels of real digit photos

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Ticks:
    """A clock that advances one second each time it is read (the loop reads it before
    every step), so a budget of N seconds ends the run after a fixed number of steps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45), ("600", 600)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert TrainConfig(time_budget=text).budget_seconds == seconds


@pytest.mark.parametrize("text", ["ten minutes", "5x", "0s", "-3m", "m"])
def test_bad_durations_are_config_errors(text):
    with pytest.raises(ConfigError, match="time_budget"):
        TrainConfig(time_budget=text)


def test_time_budget_stops_mid_epoch_with_best_last_and_test_and_resumes(toy, tmp_path):
    _, manifest = toy
    cfg = replace(FAST, epochs=3)  # 3 steps per epoch
    straight = tmp_path / "straight"
    full = fit(manifest, str(straight), cfg)
    assert full["stop"]["reason"] == "epochs" and full["stop"]["budget_left_s"] is None

    out = tmp_path / "budget"
    result = fit(manifest, str(out), replace(cfg, time_budget="6s"), clock=Ticks())
    stop = result["stop"]
    assert stop["reason"] == "time_budget" and stop["budget_left_s"] == 0.0
    assert stop["time_budget_s"] == 6.0 and stop["epochs_done"] < 3
    state = load_checkpoint(str(out / LAST))
    assert (0, 0) < (state["epoch"], state["step"]) < (3, 0)
    assert len(state["history"]) == stop["epochs_done"]
    best = load_checkpoint(str(out / BEST))  # a proper best.pt and a test evaluation
    assert best["val_acc"] == result["best_val_acc"] is not None
    assert result["test_images"] == 9 and result["test_acc"] is not None
    assert json.loads((out / "result.json").read_text())["stop"] == stop

    # Resumed without a budget, it ends exactly as the uninterrupted run.
    again = fit(manifest, str(out), replace(cfg, resume=True))
    assert again["stop"]["reason"] == "epochs"
    _same_run(straight, out)

    # Resumed with a budget already spent, it trains nothing more and says so.
    spent = tmp_path / "spent"
    fit(manifest, str(spent), replace(cfg, time_budget="6s"), clock=Ticks())
    before = load_checkpoint(str(spent / LAST))
    redo = fit(manifest, str(spent), replace(cfg, time_budget="6s", resume=True), clock=Ticks())
    assert redo["stop"]["reason"] == "time_budget"
    after = load_checkpoint(str(spent / LAST))
    assert (after["epoch"], after["step"]) == (before["epoch"], before["step"])


def test_early_stop_patience_stops_and_a_resume_respects_it(toy, tmp_path, capsys):
    _, manifest = toy
    # A learning rate too small to change any prediction (LayerNorm model: no BatchNorm
    # statistics move either): val accuracy never improves after epoch 1.
    cfg = replace(FAST, model="test_convnext", epochs=6, lr=1e-9, warmup_epochs=0.0)
    out = tmp_path / "run"
    code = cli.main(
        [
            "train", manifest, "--out", str(out), "--model", cfg.model, "--img-size", "32",
            "--epochs", "6", "--workers", "0", "--lr", "1e-9", "--warmup-epochs", "0",
            "--early-stop-patience", "2", "--batch-size", "16",
        ]
    )  # fmt: skip
    assert code == 0
    assert "stopped: no val improvement in 2 epochs (after 3)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["stop"]["reason"] == "no_improvement"
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3] and result["best_epoch"] == 1
    assert load_checkpoint(str(out / BEST))["epoch"] == 1

    resumed = fit(manifest, str(out), replace(cfg, early_stop_patience=2, resume=True))
    assert resumed["stop"]["reason"] == "no_improvement"
    assert len(resumed["history"]) == 3  # stopped again, nothing trained
    # Without patience the same run continues to its last epoch.
    longer = fit(manifest, str(out), replace(cfg, resume=True))
    assert longer["stop"]["reason"] == "epochs" and len(longer["history"]) == 6


# --------------------------------------------------------------------------- --init-from


def test_init_from_same_classes_loads_every_weight_and_starts_fresh(toy, tmp_path, capsys):
    from kaedama.train.model import load_trained

    _, manifest = toy
    first = tmp_path / "first"
    fit(manifest, str(first), replace(FAST, max_steps_per_epoch=2))
    source = load_checkpoint(str(first / BEST))
    out = tmp_path / "second"
    argv = ["train", manifest, "--out", str(out), "--model", "test_resnet", "--img-size", "32"]
    argv += ["--epochs", "1", "--workers", "0", "--batch-size", "16", "--lr", "1e-9"]
    assert cli.main([*argv, "--warmup-epochs", "0", "--init-from", str(first / BEST)]) == 0
    assert f"initialised from {first / BEST}: head kept" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["lineage"]["init_from"]["head"] == "kept"
    assert len(result["history"]) == 1  # a fresh run: its own epochs, optimiser, schedule
    # lr ~ 0: the weights are still the source's (BatchNorm statistics aside).
    trained = load_trained(str(out / LAST)).model.state_dict()
    for key, value in source["model"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.allclose(trained[key], value, atol=1e-5), key


def test_init_from_other_classes_keeps_the_backbone_and_rebuilds_the_head(toy, tmp_path):
    from kaedama.manifest import read_manifest, write_manifest
    from kaedama.train.model import ModelError

    _, manifest = toy
    first = tmp_path / "first"
    fit(manifest, str(first), replace(FAST, max_steps_per_epoch=1))
    rows = read_manifest(manifest).rows
    for row in rows:  # γ becomes δ: one class removed, one added
        if row.label == "γ":
            row.label = "δ"
    write_manifest(str(tmp_path / "m2.jsonl"), rows)
    cfg = replace(FAST, max_steps_per_epoch=1, lr=1e-9, init_from=str(first / BEST))
    result = fit(str(tmp_path / "m2.jsonl"), str(tmp_path / "second"), cfg)
    report = result["lineage"]["init_from"]
    assert report["head"] == "rebuilt"
    assert (report["classes_added"], report["classes_removed"]) == (["δ"], ["γ"])
    assert result["classes"] == ["α", "β", "δ"]
    before = load_checkpoint(str(first / BEST))["model"]
    after = load_checkpoint(str(tmp_path / "second" / LAST))["model"]
    backbone = [k for k in before if not k.startswith("fc.") and before[k].is_floating_point()]
    backbone = [k for k in backbone if "running" not in k]  # BatchNorm statistics move
    assert len(backbone) > 10
    for key in backbone:
        assert torch.allclose(after[key], before[key], atol=1e-5), key
    assert not torch.allclose(after["fc.weight"], before["fc.weight"], atol=1e-3)

    with pytest.raises(ModelError, match="holds a 'test_resnet' model"):
        fit(manifest, str(tmp_path / "x"), replace(cfg, model="test_convnext"))
    with pytest.raises(ConfigError, match="init_from replaces the pretrained weights"):
        replace(cfg, pretrained=True)
