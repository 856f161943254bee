"""The training loop end to end on real (rendered handwritten digit) images, on CPU.

Tiny timm test models (random init) at 32 px keep every run to a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kaedama import cli, storage
from kaedama.manifest import Row, list_image_folder, read_manifest, write_manifest
from kaedama.train import augment
from kaedama.train.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from kaedama.train.config import TrainConfig
from kaedama.train.data import EpochSampler, ManifestDataset, Skipped, collate, load_splits
from kaedama.train.loop import fit
from kaedama.train.model import ModelError, create_model, load_trained
from kaedama.train.runtime import Preempted, StopSignal, init_runtime

REPO = Path(__file__).resolve().parents[1]
FAST = TrainConfig(
    model="test_resnet",
    img_size=32,
    epochs=1,
    batch_size=16,
    workers=0,
    lr=0.05,
    warmup_epochs=0.0,
    color_jitter=0.0,
    pca_noise=0.0,
    random_erasing=0.0,
    scale=(0.5, 1.0),
)


# Tiny tensors on a shared CPU: one intra-op thread per test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split_manifest(root: Path, path: Path, extra: list[Row] = ()) -> str:
    """Manifest of every file under ``root``: per label, 70% train, 20% val, 10% test."""
    rows = sorted(list_image_folder(str(root)), key=lambda r: r.uri)
    seen: Counter[str] = Counter()
    for row in rows:
        k = seen[row.label] % 10
        seen[row.label] += 1
        row.split = "train" if k < 7 else "val" if k < 9 else "test"
    write_manifest(str(path), [*rows, *extra])
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, str]:
    """Three Unicode-named classes of 30 real digit photos each, and their split manifest."""
    from kaedama.fixtures import FixturesConfig, make_digits_folder

    base = tmp_path_factory.mktemp("toy")
    config = FixturesConfig(classes=("α", "β", "γ"), per_class=30, size=40).clean()
    make_digits_folder(base / "img", config, progress=False)
    return base, split_manifest(base / "img", base / "manifest.jsonl")


def weights(model_state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in model_state.values() if v.is_floating_point()])


# --------------------------------------------------------------------------- data


def test_splits_classes_sorted_and_rows_filtered(tmp_path):
    rows = [
        Row(uri="a", label="ζ", split="train"),
        Row(uri="b", label="alpha", split="train"),
        Row(uri="c", label="beta", split="train", status="dropped"),
        Row(uri="d", label="alpha", split="val"),
        Row(uri="e", label="unseen", split="test"),
        Row(uri="f", label="ζ", split=""),
    ]
    write_manifest(str(tmp_path / "m.jsonl"), rows)
    splits = load_splits(str(tmp_path / "m.jsonl"))
    assert splits.classes == ("alpha", "ζ")
    assert [e.uri for e in splits.train] == ["a", "b"]
    assert [(e.uri, e.target) for e in splits.val] == [("d", 0)]
    assert splits.test == ()
    assert splits.unknown_labels == {"unseen": 1}


def test_sampler_shards_cover_the_global_order_and_repeat_per_epoch():
    targets = [i % 3 for i in range(23)]
    one = EpochSampler(targets, seed=7)
    one.set_epoch(4)
    order = [i for i, _ in one]
    assert sorted(order) == list(range(23))
    shards = []
    for rank in range(2):
        s = EpochSampler(targets, seed=7, rank=rank, world=2)
        s.set_epoch(4)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 12
    # Interleaving the ranks' shards gives back the 1-process order (plus one pad item).
    merged = [item for pair in zip(*shards, strict=True) for item in pair]
    assert [i for i, _ in merged][:23] == order
    assert merged[:23] == list(one)
    # Same epoch -> same order; another epoch -> another order.
    again = EpochSampler(targets, seed=7)
    again.set_epoch(4)
    assert list(again) == list(one)
    again.set_epoch(5)
    assert [i for i, _ in again] != order
    # With a batch size, the epoch is cut to whole global batches: 2 ranks x 5 = 1 x 10.
    cut = [EpochSampler(targets, seed=7, rank=r, world=2, batch_size=5) for r in range(2)]
    for s in cut:
        s.set_epoch(4)
    assert len(cut[0]) == len(cut[1]) == 10
    assert sorted(i for s in cut for i, _ in s) == sorted(order[:20])
    whole = EpochSampler(targets, seed=7, batch_size=10)
    whole.set_epoch(4)
    assert [i for i, _ in whole] == order[:20]
    # Mid-epoch resume skips exactly the items already consumed.
    again.set_epoch(4, start=10)
    assert list(again) == list(one)[10:] and len(again) == 13


@pytest.mark.parametrize("mode", ["oversample", "weighted"])
def test_balanced_sampling_evens_out_classes(mode):
    targets = [0] * 90 + [1] * 10
    counts: Counter[int] = Counter()
    for rank in range(2):
        s = EpochSampler(targets, seed=1, balance=mode, rank=rank, world=2)
        for epoch in range(5):
            s.set_epoch(epoch)
            counts.update(targets[i] for i, _ in s)
    share = counts[1] / (counts[0] + counts[1])
    assert 0.4 < share < 0.6, counts
    if mode == "oversample":
        s = EpochSampler(targets, balance=mode)
        assert sorted(Counter(targets[i] for i, _ in s).values()) == [90, 90]


def test_bad_images_are_skipped_not_raised(toy, tmp_path):
    good = sorted(str(p) for p in (toy[0] / "img").rglob("*") if p.is_file())[:2]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "trunc.jpg").write_bytes(Path(good[0]).read_bytes()[:200])
    bad = [str(tmp_path / n) for n in ("empty.jpg", "text.jpg", "trunc.jpg", "missing.jpg")]
    from kaedama.train.data import Example

    transform = augment.build_train_transform(
        {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0},
        TrainConfig(),
    )
    ds = ManifestDataset([Example(u, 0) for u in [good[0], *bad, good[1]]], transform)
    items = [ds[i] for i in range(len(ds))]
    assert [isinstance(it, Skipped) for it in items] == [False, True, True, True, True, False]
    reasons = [it.reason for it in items if isinstance(it, Skipped)]
    assert reasons[:2] == ["empty", "not_an_image"]
    assert reasons[2] in ("truncated", "corrupt")
    assert reasons[3].startswith("unreadable")
    batch = collate(items)
    assert batch.images.shape == (2, 3, 32, 32)
    assert len(batch.skipped) == 4
    assert collate(items[1:5]).images is None


# --------------------------------------------------------------------------- runs


def test_cli_one_epoch_end_to_end(toy, tmp_path, capsys):
    _, manifest = toy
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            manifest,
            "--out",
            str(out),
            "--model",
            "test_resnet",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--workers",
            "2",
            "--batch-size",
            "16",
            "--set",
            "lr=0.02",
        ]
    )
    assert code == 0
    assert "best epoch 1" in capsys.readouterr().out
    for name in (BEST, LAST, "history.json", "history.csv", "result.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1
    assert history[0]["train_images"] == 16 * (63 // 16)  # 63 train rows, full batches only
    assert history[0]["val_images"] == 18 and history[0]["train_skipped"] == 0
    result = json.loads((out / "result.json").read_text())
    assert result["classes"] == ["α", "β", "γ"] and result["test_images"] == 9
    assert 0.0 <= result["test_acc"] <= 1.0
    assert "train_loss,train_acc" in (out / "history.csv").read_text().splitlines()[0]

    trained = load_trained(str(out / BEST))
    assert trained.classes == ("α", "β", "γ")
    assert trained.model_name == "test_resnet"
    assert trained.data_config["input_size"] == [3, 32, 32]
    assert trained.config["lr"] == 0.02
    logits = trained.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 3)


def test_trains_on_the_manifest_of_the_dedup_and_split_stages(tmp_path, capsys):
    """The demo's pipeline: a dirty fixtures folder -> kaedama dedup -> kaedama split -> train.

    The dedup manifest marks the planted corrupt files as rejected and the duplicates as
    dropped, so training reads only kept rows and never meets an unreadable image.
    """
    data, dedup, split, out = (tmp_path / n for n in ("data", "dedup", "split", "run"))
    assert cli.main(["fixtures", str(data), "--per-class", "16", "--classes", "a,b,c"]) == 0
    if cli.main(["dedup", str(data), "--out", str(dedup), "--in-process", "--workers", "1"]):
        pytest.fail(capsys.readouterr().err[-2000:])
    assert cli.main(["split", str(dedup / "manifest.jsonl"), "--out", str(split)]) == 0
    code = cli.main(
        [
            "train",
            str(split),  # the split stage's folder is accepted as well as its manifest
            "--out",
            str(out),
            "--model",
            "test_resnet",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = read_manifest(str(split / "manifest.jsonl")).rows
    kept = Counter(r.split for r in rows if r.status == "kept")
    assert {r.status for r in rows} >= {"kept", "rejected"}  # corrupt files were planted
    result = json.loads((out / "result.json").read_text())
    assert result["classes"] == ["a", "b", "c"]
    history = result["history"][0]
    assert history["train_skipped"] == history["val_skipped"] == result["test_skipped"] == 0
    assert history["train_images"] == kept["train"] - kept["train"] % 4
    assert history["val_images"] == kept["val"] and result["test_images"] == kept["test"]
    # Lineage: the hash recipe the dedup stage recorded in the manifest header.
    header = read_manifest(str(split / "manifest.jsonl")).header
    assert header.get("hash_recipe")
    assert result["lineage"]["hash_recipe"] == header["hash_recipe"]
    assert load_checkpoint(str(out / BEST))["lineage"] == result["lineage"]


def test_loss_decreases_on_a_learnable_set(toy, tmp_path):
    _, manifest = toy
    cfg = replace(FAST, epochs=10, label_smoothing=0.0, hflip=0.0, scale=(0.8, 1.0))
    result = fit(manifest, str(tmp_path / "run"), cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert (losses[-1] + losses[-2]) / 2 < 0.5 * losses[0], losses
    assert result["best_val_acc"] > 0.5  # chance is 1/3


def test_bad_images_skipped_and_counted_in_a_run(toy, tmp_path):
    root, _ = toy
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    bad = [
        Row(uri=str(tmp_path / "empty.jpg"), label="α", split="train"),
        Row(uri=str(tmp_path / "text.png"), label="β", split="train"),
        Row(uri=str(tmp_path / "gone.jpg"), label="γ", split="val"),
    ]
    manifest = split_manifest(root / "img", tmp_path / "m.jsonl", extra=bad)
    cfg = replace(FAST, epochs=2, batch_size=13)
    result = fit(manifest, str(tmp_path / "run"), cfg)
    # 65 train rows -> 5 full batches of 13 = every row once per epoch, 2 of them bad.
    assert [h["train_skipped"] for h in result["history"]] == [2, 2]
    assert [h["train_images"] for h in result["history"]] == [63, 63]
    assert [h["val_skipped"] for h in result["history"]] == [1, 1]
    assert result["history"][0]["val_images"] == 18


def test_mixing_ema_clipping_and_balancing_run(toy, tmp_path):
    _, manifest = toy
    cfg = replace(
        FAST,
        epochs=2,
        max_steps_per_epoch=3,
        mixup_prob=0.5,
        cutmix_prob=0.5,
        ema_decay=0.5,
        clip_grad=1.0,
        balance="oversample",
    )
    result = fit(manifest, str(tmp_path / "run"), cfg)
    assert [h["train_images"] for h in result["history"]] == [48, 48]
    assert all(h["train_loss"] > 0 for h in result["history"])
    # The EMA weights are what gets evaluated and kept as best; they trail the trained ones.
    best = load_checkpoint(str(tmp_path / "run" / BEST))
    last = load_checkpoint(str(tmp_path / "run" / LAST))
    assert best["epoch"] == result["best_epoch"]
    assert last["ema"] is not None
    if result["best_epoch"] == 2:
        ema = {k.removeprefix("module."): v for k, v in last["ema"].items()}
        assert torch.equal(weights(best["model"]), weights(ema))
    assert not torch.equal(weights(best["model"]), weights(last["model"]))


def test_trials_report_mean_and_std(toy, tmp_path):
    _, manifest = toy
    cfg = replace(FAST, trials=2, max_steps_per_epoch=2)
    summary = fit_trials(manifest, tmp_path / "runs", cfg)
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    values = summary["test_acc"]["values"]
    assert len(values) == 2
    assert summary["test_acc"]["mean"] == pytest.approx(sum(values) / 2)
    assert (tmp_path / "runs" / "trial-1" / BEST).is_file()
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["trials"] == 2


def fit_trials(manifest: str, out: Path, cfg: TrainConfig) -> dict:
    from kaedama.train.loop import train

    return train(manifest, str(out), cfg)


def test_threads_field_sets_torch_threads():
    from kaedama.commands import train as command

    parser = __import__("argparse").ArgumentParser()
    command.configure(parser)
    cfg = command.config_from_args(parser.parse_args(["m.jsonl", "--out", "o", "--threads", "3"]))
    assert cfg.threads == 3
    init_runtime(cfg)
    assert torch.get_num_threads() == 3
    init_runtime(replace(cfg, threads=0))  # 0 leaves torch's setting alone
    assert torch.get_num_threads() == 3


def _bn_stats(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state.items()
        if k.startswith(prefix) and k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))
    }


def test_frozen_backbone_keeps_batchnorm_statistics(toy, tmp_path):
    _, manifest = toy
    source = create_model("test_resnet", 7)
    gen = torch.Generator().manual_seed(0)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # stats a training batch would move
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    cfg = replace(
        FAST,
        pretrained_path=str(tmp_path / "pretrained.pth"),
        freeze_until="layer2",
        epochs=2,
        max_steps_per_epoch=2,
    )
    fit(manifest, str(tmp_path / "run"), cfg)
    before, after = source.state_dict(), load_checkpoint(str(tmp_path / "run" / LAST))["model"]
    frozen = {k: v for p in ("bn1.", "layer1.", "layer2.") for k, v in _bn_stats(after, p).items()}
    assert len(frozen) >= 9  # stem + layer1 + layer2 batch norms, 3 buffers each
    for key, value in frozen.items():
        assert torch.equal(value, before[key]), key
    # The trained part's BatchNorm layers did update their statistics (the test can fail).
    trained = _bn_stats(after, "layer4.")
    assert trained and all(int(v) == 4 for k, v in trained.items() if "num_batches" in k)
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = create_model("test_resnet", 4)
    state = {
        "model": model.state_dict(),
        "model_name": "test_resnet",
        "classes": ["a", "b", "c", "d"],
        "data_config": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        "history": [{"epoch": 1, "val_acc": 0.5}],
    }
    uri = str(tmp_path / "sub" / BEST)
    save_checkpoint(uri, state)
    back = load_checkpoint(uri)
    assert back["classes"] == state["classes"] and back["history"] == state["history"]
    assert torch.equal(weights(back["model"]), weights(state["model"]))
    trained = load_trained(uri)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(trained.model(x), model(x))

    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a kaedama"):
        load_checkpoint(str(tmp_path / "foreign.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_pretrained_from_a_local_file_resets_the_head(tmp_path):
    source = create_model("test_resnet", 7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model("test_resnet", 3, pretrained_path=str(path))
    head = model.get_classifier()
    assert head.out_features == 3
    src = source.state_dict()
    backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert len(backbone) > 10
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in backbone)
    with pytest.raises(ModelError, match="unknown timm model"):
        create_model("resnet_nonexistent_18", 3)
    with pytest.raises(ModelError, match="not found"):
        create_model("test_resnet", 3, pretrained_path=str(tmp_path / "absent.pth"))


def _train_cmd(manifest: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kaedama.train",
        manifest,
        "--out",
        str(out),
        "--model",
        "test_resnet",
        "--img-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--warmup-epochs",
        "0.5",
        "--checkpoint-every-steps",
        "3",
        *(f"--set={k}={getattr(FAST, k)}" for k in ("color_jitter", "pca_noise", "random_erasing")),
        "--set=scale=0.5,1.0",
        "--set=lr=0.01",
        *extra,
    ]


STEPPED = replace(
    FAST, batch_size=8, epochs=2, warmup_epochs=0.5, checkpoint_every_steps=3, lr=0.01
)  # what _train_cmd runs: 7 steps per epoch, a checkpoint every 3


@pytest.fixture(scope="module")
def straight(toy, tmp_path_factory) -> Path:
    """The uninterrupted run that killed-and-resumed runs of _train_cmd must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    # One thread like the subprocesses (module fixtures run before one_torch_thread).
    before = torch.get_num_threads()
    try:
        fit(toy[1], str(out), replace(STEPPED, threads=1))
    finally:
        torch.set_num_threads(before)
    return out


def _same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = load_checkpoint(str(a_dir / LAST)), load_checkpoint(str(b_dir / LAST))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert torch.allclose(weights(a["model"]), weights(b["model"]), atol=1e-5)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
        assert ha["val_acc"] == pytest.approx(hb["val_acc"])
        assert ha["train_images"] == hb["train_images"]


def _start_and_signal(manifest: str, out: Path, sig: int) -> tuple[int, str]:
    """Start _train_cmd, send ``sig`` right after its first mid-epoch checkpoint; (code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    log = out.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            _train_cmd(manifest, out), env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        deadline = time.monotonic() + 120
        while not (out / LAST).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, log.read_text()


def _resume(manifest: str, out: Path) -> None:
    """Resume in this process (what the CLI's --resume sets; saves a second interpreter start)."""
    fit(manifest, str(out), replace(STEPPED, resume=True))


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(toy, straight, tmp_path):
    """SIGKILL a run right after its first mid-epoch checkpoint; --resume must end identically."""
    _, manifest = toy
    killed = tmp_path / "killed"
    code, _ = _start_and_signal(manifest, killed, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = load_checkpoint(str(killed / LAST))
    assert (interrupted["epoch"], interrupted["step"]) == (0, 3)
    _resume(manifest, killed)
    _same_run(straight, killed)


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resumes(toy, straight, tmp_path):
    """Kubernetes' SIGTERM: finish the step, write last.pt, exit 143; --resume ends identically."""
    _, manifest = toy
    stopped = tmp_path / "stopped"
    code, stderr = _start_and_signal(manifest, stopped, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    state = load_checkpoint(str(stopped / LAST))
    # Stopped at a step boundary at or after the step-3 checkpoint that triggered the signal.
    assert (0, 3) <= (state["epoch"], state["step"]) < (2, 0)
    where = f"at epoch {state['epoch'] + 1} step {state['step']}" if state["step"] else "after"
    assert f"stopped by SIGTERM {where}" in stderr and "--resume" in stderr
    _resume(manifest, stopped)
    _same_run(straight, stopped)


class StopAtPoll(StopSignal):
    """Reports SIGTERM from its n-th poll on, as a signal landing at a chosen point would."""

    def __init__(self, poll: int):
        super().__init__()
        self.left = poll

    def received(self) -> int:
        self.left -= 1
        return signal.SIGTERM if self.left <= 0 else super().received()


@pytest.mark.parametrize(
    ("poll", "position"),
    [
        (2, (0, 1)),  # polled before each step: stop before step 2 of epoch 1
        (4, (0, 3)),  # polled after the epoch's last step: stop before evaluating
        (5, (1, 0)),  # polled after evaluation and the epoch checkpoint
    ],
)
def test_stop_request_checkpoints_and_resume_completes_identically(toy, tmp_path, poll, position):
    _, manifest = toy
    cfg = replace(FAST, epochs=2)  # 63 train images / 16: 3 steps per epoch
    fit(manifest, str(tmp_path / "straight"), cfg)
    out = tmp_path / "stopped"
    with pytest.raises(Preempted) as info:
        fit(manifest, str(out), cfg, stop=StopAtPoll(poll))
    assert (info.value.epoch, info.value.step) == position
    assert info.value.exit_code == 143 and "--resume" in str(info.value)
    state = load_checkpoint(str(out / LAST))
    assert (state["epoch"], state["step"]) == position
    assert len(state["history"]) == position[0]
    result = fit(manifest, str(out), replace(cfg, resume=True))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    _same_run(tmp_path / "straight", out)


def test_stop_signal_handlers():
    """First signal: recorded, no exception; second: the previous handler runs; then restored."""
    # A known previous handler: a shell's background job (nohup, `&`) inherits SIGINT
    # ignored, and then a second Ctrl-C would do nothing here either.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            signal.raise_signal(signal.SIGINT)
            assert stop.received() == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_resume_refuses_a_different_model(toy, tmp_path):
    _, manifest = toy
    out = tmp_path / "run"
    fit(manifest, str(out), replace(FAST, max_steps_per_epoch=1))
    with pytest.raises(CheckpointError, match="use a fresh --out"):
        fit(manifest, str(out), replace(FAST, model="test_convnext", resume=True))


def test_gcs_manifest_and_output(toy, gcs_bucket, tmp_path):
    root, _ = toy
    rows = sorted(list_image_folder(str(root / "img")), key=lambda r: r.uri)
    for i, row in enumerate(rows):
        dst = f"{gcs_bucket}/img/{row.label}/{Path(row.uri).name}"
        storage.write_bytes(dst, Path(row.uri).read_bytes())
        row.uri = dst
        row.split = "train" if i % 3 else "val"
    write_manifest(f"{gcs_bucket}/m.jsonl", rows)
    out = f"{gcs_bucket}/run"
    result = fit(f"{gcs_bucket}/m.jsonl", out, replace(FAST, max_steps_per_epoch=2))
    assert result["history"][0]["val_images"] == 30
    assert load_trained(f"{out}/{BEST}").classes == ("α", "β", "γ")
    assert storage.exists(f"{out}/history.csv")
    assert storage.list_files(f"{out}/tb")


# --------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lr": -0.1}, "lr"),
        ({"workers": -1}, "workers"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"hflip": 1.5}, "hflip"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"scale": (0.9, 0.2)}, "scale"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"mixup_prob": 0.7, "cutmix_prob": 0.7}, "sum to"),
    ],
)
def test_config_is_validated_on_construction(overrides, field):
    from kaedama.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**overrides)
    with pytest.raises(ConfigError, match=field):  # replace() re-validates too
        replace(FAST, **overrides)


def test_cli_reports_a_bad_config_value_without_a_traceback(tmp_path, capsys):
    code = cli.main(["train", "m.jsonl", "--out", str(tmp_path), "--lr", "-1"])
    err = capsys.readouterr().err
    assert code != 0 and "lr=-1.0 must be > 0" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_img_size_builds_fixed_size_models_at_that_size(name):
    model = create_model(name, 3, img_size=160).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 160, 160)).shape == (1, 3)


def test_img_size_trains_and_reloads_a_fixed_size_model(toy, tmp_path):
    _, manifest = toy
    out = tmp_path / "vit"
    fit(manifest, str(out), replace(FAST, model="test_vit", max_steps_per_epoch=1))
    trained = load_trained(str(out / BEST))
    assert trained.data_config["input_size"] == [3, 32, 32]
    with torch.no_grad():
        assert trained.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_img_size_a_model_cannot_take_is_a_clear_error(toy, tmp_path):
    with pytest.raises(ModelError, match="cannot run at --img-size 30"):
        create_model("test_vit", 3, img_size=30)


def test_resume_refuses_another_world_size_unless_the_global_batch_is_kept(toy, tmp_path):
    from kaedama.train.runtime import Runtime

    _, manifest = toy
    out = tmp_path / "run"
    fit(manifest, str(out), replace(FAST, max_steps_per_epoch=1))  # 1 process x 16
    # 2 processes x 16 would shift the data position and the LR schedule: refused
    # before any collective runs (so a world-2 Runtime without a process group suffices).
    with pytest.raises(CheckpointError, match=r"--batch-size 8 with 2 processes keeps it"):
        fit(manifest, str(out), replace(FAST, resume=True), runtime=Runtime(world=2))
    with pytest.raises(CheckpointError, match="resume with 1 processes"):
        fit(manifest, str(out), replace(FAST, resume=True, batch_size=5), runtime=Runtime(world=3))


def test_resume_refuses_another_manifest_with_the_same_classes(toy, tmp_path):
    _, manifest = toy
    out = tmp_path / "run"
    first = fit(manifest, str(out), replace(FAST, max_steps_per_epoch=1))
    assert first["lineage"]["manifest_uri"] == manifest
    rows = read_manifest(manifest).rows
    moved = next(r for r in rows if r.split == "val")
    moved.split = "train"  # same classes, one more training row
    write_manifest(str(tmp_path / "other.jsonl"), rows)
    with pytest.raises(CheckpointError, match="other rows change the data order"):
        fit(str(tmp_path / "other.jsonl"), str(out), replace(FAST, resume=True))
    # The same manifest resumes (the last.pt of an ended 1-epoch run: nothing left to do).
    again = fit(manifest, str(out), replace(FAST, resume=True, max_steps_per_epoch=1))
    assert again["history"] == first["history"]


def test_val_test_rows_with_labels_absent_from_train_are_counted(toy, tmp_path, capsys):
    root, _ = toy
    photo = sorted((root / "img").rglob("*.*"))[0]
    extra = [
        Row(uri=str(photo), label="δ", split="val"),
        Row(uri=str(photo), label="δ", split="test"),
        Row(uri=str(photo), label="ε", split="test"),
    ]
    manifest = split_manifest(root / "img", tmp_path / "m.jsonl", extra=extra)
    out = tmp_path / "run"
    argv = ["train", manifest, "--out", str(out), "--model", "test_resnet", "--img-size", "32"]
    assert cli.main([*argv, "--epochs", "1", "--workers", "0", "--max-steps-per-epoch", "1"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["unknown_label_images"] == 3
    assert result["unknown_labels"] == {"δ": 2, "ε": 1}
    assert result["history"][0]["val_images"] == 18 and result["test_images"] == 9
    printed = capsys.readouterr().out
    assert "3 val/test image(s) with labels absent from train (δ, ε)" in printed


def test_training_runs_without_tensorboard_and_says_so_once(toy, tmp_path, monkeypatch, caplog):
    from kaedama.train import history

    # What a machine without the tensorboard extra does: the import fails.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(history, "_told_off", False)
    _, manifest = toy
    cfg = replace(FAST, max_steps_per_epoch=1, trials=2)
    with caplog.at_level("WARNING", logger="kaedama.train.history"):
        summary = fit_trials(manifest, tmp_path / "runs", cfg)
    assert len(summary["runs"]) == 2
    notes = [r for r in caplog.records if "TensorBoard logging is off" in r.getMessage()]
    assert len(notes) == 1
    assert (tmp_path / "runs" / "trial-1" / "history.csv").is_file()
    assert not (tmp_path / "runs" / "trial-0" / "tb").exists()


def test_validation_accuracy_equals_preprocess_and_the_saved_model(toy, tmp_path):
    """What training records as val accuracy is what evaluation/serving compute from best.pt:
    the same Preprocess (built from the checkpoint's data config) and the same weights."""
    import hashlib

    import numpy as np

    import kaedama
    from kaedama.preprocess import Preprocess

    _, manifest = toy
    out = tmp_path / "run"
    cfg = replace(FAST, epochs=3, max_pixels=5_000_000)
    result = fit(manifest, str(out), cfg)
    best = load_checkpoint(str(out / BEST))
    preprocess = Preprocess.from_data_config(best["data_config"])
    # The checkpoint holds the full Preprocess config, decode options included.
    assert best["data_config"] == preprocess.to_data_config()
    assert best["data_config"]["decode"] == {"draft": True, "max_pixels": 5_000_000}
    trained = load_trained(str(out / BEST))
    val = load_splits(manifest).val
    inputs = np.stack([preprocess(Path(e.uri).read_bytes(), uri=e.uri) for e in val])
    with torch.no_grad():
        predicted = trained.model(torch.from_numpy(inputs)).argmax(-1)
    targets = torch.tensor([e.target for e in val])
    accuracy = int((predicted == targets).sum()) / len(val)
    assert best["val_acc"] == result["best_val_acc"]
    assert accuracy == pytest.approx(result["best_val_acc"], abs=1e-9)
    # Lineage: which manifest (exact bytes) and which kaedama trained it.
    digest = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    for lineage in (best["lineage"], result["lineage"]):
        assert lineage["manifest_uri"] == manifest
        assert lineage["manifest_sha256"] == digest
        assert lineage["kaedama_version"] == kaedama.__version__
