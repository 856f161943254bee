"""Data-parallel training: real 2-process ``torchrun`` runs over gloo on CPU.

The sampler deals each global batch out to the ranks and DDP averages their
gradients, so 2 ranks x batch 8 must train like 1 process x batch 16, also when
one rank's whole share of a batch is unreadable, and also when one rank is sent
SIGTERM mid-run and the job is resumed. The model uses LayerNorm (no BatchNorm,
whose statistics are per rank by design), so the runs agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kaedama.manifest import read_manifest, write_manifest
from kaedama.train.checkpoint import BEST, LAST, load_checkpoint
from kaedama.train.data import EpochSampler, load_splits
from kaedama.train.loop import fit
from tests.test_train import FAST, weights
from tests.test_train import toy as toy  # the fixture: 3 labels of real digit photos

REPO = Path(__file__).resolve().parents[1]
CFG = replace(FAST, model="test_convnext", epochs=2, batch_size=16, lr=0.01, optimizer="adamw")
PER_RANK_BATCH = 8  # 2 ranks x 8 = the single process's batch of 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(manifest: str, out: Path, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *launcher,
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "kaedama.train",
        manifest,
        "--out",
        str(out),
        "--model",
        CFG.model,
        "--img-size",
        "32",
        "--epochs",
        str(CFG.epochs),
        "--batch-size",
        str(PER_RANK_BATCH),
        "--workers",
        "1",
        "--optimizer",
        "adamw",
        *(f"--set={k}={getattr(CFG, k)}" for k in ("lr", "warmup_epochs", "color_jitter")),
        *(f"--set={k}={getattr(CFG, k)}" for k in ("pca_noise", "random_erasing")),
        "--set=scale=0.5,1.0",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def holey(toy, tmp_path_factory) -> tuple[str, int]:
    """The toy manifest with rank 1's whole share of the first global batch unreadable.

    Returns the manifest and how many training rows point at missing files.
    """
    _, manifest = toy
    base = tmp_path_factory.mktemp("holey")
    rows = read_manifest(manifest).rows
    train_rows = [r for r in rows if r.status == "kept" and r.split == "train"]
    targets = [e.target for e in load_splits(manifest).train]  # same order as train_rows
    rank1 = EpochSampler(targets, seed=CFG.seed, rank=1, world=2, batch_size=PER_RANK_BATCH)
    rank1.set_epoch(0)
    first = [index for index, _ in rank1][:PER_RANK_BATCH]
    for i in first:
        train_rows[i].uri = str(base / f"missing-{i}.jpg")
    write_manifest(str(base / "manifest.jsonl"), rows)
    return str(base / "manifest.jsonl"), len(first)


@pytest.fixture(scope="module")
def single(holey, tmp_path_factory) -> tuple[Path, dict]:
    """The 1-process reference run on the holey manifest (one thread, like the workers)."""
    out = tmp_path_factory.mktemp("single")
    before = torch.get_num_threads()
    try:
        result = fit(holey[0], str(out), replace(CFG, threads=1))
    finally:
        torch.set_num_threads(before)
    return out, result


def _matches_single(single: tuple[Path, dict], out: Path) -> dict:
    one_dir, one = single
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    first, second = result["rank_fingerprints"]
    assert first == second  # replicas hold bit-identical weights
    h1, h2 = one["history"], result["history"]
    for key in ("train_images", "train_skipped", "val_images"):
        assert [h[key] for h in h2] == [h[key] for h in h1], key
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    w1 = weights(load_checkpoint(str(one_dir / LAST))["model"])
    w2 = weights(load_checkpoint(str(out / LAST))["model"])
    assert torch.allclose(w1, w2, rtol=1e-3, atol=1e-5), (w1 - w2).abs().max()
    return result


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(holey, single, tmp_path):
    """Also with a global batch whose rank-1 half is entirely unreadable: that rank runs a
    zero-weight pass, the other rank's loss is reweighted, and the update equals 1 process's."""
    manifest, missing = holey
    out = tmp_path / "two"
    done = subprocess.run(
        _torchrun(manifest, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Only rank 0 prints the summary and writes the outputs.
    assert done.stdout.count("best epoch") == 1
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["best.pt", "last.pt", "history.json", "history.csv", "result.json"]
    )
    result = _matches_single(single, out)
    assert result["history"][0]["train_skipped"] == missing  # all in the first batch
    assert load_checkpoint(str(out / BEST))["classes"] == ["α", "β", "γ"]


def _workers(parent: int) -> dict[int, int]:
    """RANK -> pid of the worker processes a torchrun process started (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigterm_on_one_rank_stops_all_ranks_at_one_step_and_resumes(holey, single, tmp_path):
    """Only rank 1 gets SIGTERM; rank 0 must stop at the same step (else it would hang in
    the next all-reduce), rank 0 writes last.pt, and a resumed torchrun matches 1 process."""
    manifest, _ = holey
    out = tmp_path / "two"
    cmd = _torchrun(manifest, out, "--checkpoint-every-steps", "1")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        ranks: dict[int, int] = {}
        while len(ranks) < 2 and proc.poll() is None and time.monotonic() < deadline:
            ranks = _workers(proc.pid)
            time.sleep(0.05)
        while not (out / LAST).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(ranks[1], signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = (tmp_path / "log").read_text()
    assert code != 0, "the run finished before rank 1 got the signal:\n" + text[-3000:]
    # Rank 0 never received a signal but stopped on rank 1's, and says how to resume.
    assert text.count("kaedama train: stopped by SIGTERM") == 1, text[-3000:]  # rank 0 only
    assert "--resume" in text
    state = load_checkpoint(str(out / LAST))
    assert (0, 1) <= (state["epoch"], state["step"]) < (CFG.epochs, 0)
    assert not (out / "result.json").exists()

    done = subprocess.run(
        [*_torchrun(manifest, out), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming" in done.stderr
    _matches_single(single, out)


@pytest.mark.slow
def test_one_process_run_resumes_under_torchrun_with_the_same_global_batch(holey, single, tmp_path):
    """1 x 16 stopped mid-epoch, resumed as 2 x 8: the same run as the uninterrupted one."""
    from kaedama.train.runtime import Preempted
    from tests.test_train import StopAtPoll

    manifest, _ = holey
    out = tmp_path / "moved"
    before = torch.get_num_threads()
    try:
        with pytest.raises(Preempted):
            fit(manifest, str(out), replace(CFG, threads=1), stop=StopAtPoll(2))
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(str(out / LAST))["world"] == 1
    done = subprocess.run(
        _torchrun(manifest, out, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one_dir, one = single
    result = json.loads((out / "result.json").read_text())
    for a, b in zip(one["history"], result["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_acc"] == pytest.approx(a["val_acc"])
    w1 = weights(load_checkpoint(str(one_dir / LAST))["model"])
    w2 = weights(load_checkpoint(str(out / LAST))["model"])
    assert torch.allclose(w1, w2, rtol=1e-3, atol=1e-5), (w1 - w2).abs().max()
