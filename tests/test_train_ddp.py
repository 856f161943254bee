"""Data-parallel training: a real 2-process ``torchrun`` run over gloo on CPU.

The sampler deals each global batch out to the ranks and DDP averages their
gradients, so 2 ranks x batch 8 must train like 1 process x batch 16. The model
uses LayerNorm (no BatchNorm, whose statistics are per rank by design), so the
two runs agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kaedama.train.checkpoint import BEST, LAST, load_checkpoint
from kaedama.train.loop import fit
from tests.test_train import FAST, weights
from tests.test_train import toy as toy  # the fixture: 3 labels of real digit photos

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(toy, tmp_path):
    _, manifest = toy
    cfg = replace(FAST, model="test_convnext", epochs=2, batch_size=16, lr=0.01, optimizer="adamw")

    torch.set_num_threads(1)
    single = fit(manifest, str(tmp_path / "one"), cfg)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "two"
    cmd = [
        *_torchrun(),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "kaedama.train",
        manifest,
        "--out",
        str(out),
        "--model",
        "test_convnext",
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",  # per process: the same global batch of 16
        "--workers",
        "1",
        "--optimizer",
        "adamw",
        "--set",
        "lr=0.01",
        "--set",
        "warmup_epochs=0",
        "--set",
        "color_jitter=0",
        "--set",
        "pca_noise=0",
        "--set",
        "random_erasing=0",
        "--set",
        "scale=0.5,1.0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Only rank 0 prints the summary and writes the outputs.
    assert done.stdout.count("best epoch") == 1

    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    first, second = result["rank_fingerprints"]
    assert first == second  # replicas hold bit-identical weights
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["best.pt", "last.pt", "history.json", "history.csv", "result.json"]
    )

    h1, h2 = single["history"], result["history"]
    assert [h["train_images"] for h in h2] == [h["train_images"] for h in h1]
    assert [h["val_images"] for h in h2] == [h["val_images"] for h in h1]
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    w1 = weights(load_checkpoint(str(tmp_path / "one" / LAST))["model"])
    w2 = weights(load_checkpoint(str(out / LAST))["model"])
    assert torch.allclose(w1, w2, rtol=1e-3, atol=1e-5), (w1 - w2).abs().max()
    assert load_checkpoint(str(out / BEST))["classes"] == ["α", "β", "γ"]
