"""``kaedama train MANIFEST --out DST``: fine-tune a timm model on a split manifest.

The same arguments work for ``python -m kaedama.train`` (what ``torchrun`` and a
Kubeflow TrainJob launch), so one command runs on one CPU, N GPUs or several nodes::

    kaedama train data/split --out runs/r1 --model resnet18 --epochs 5
    torchrun --nproc_per_node=2 -m kaedama.train data/split --out runs/r1 --set lr=0.02

DST (local or ``gs://``) receives ``best.pt``, ``last.pt``, ``history.json``/``.csv``,
``result.json``, TensorBoard logs under ``tb/``, and with ``--trials N`` one folder
per trial plus ``summary.json``.

SIGTERM (what Kubernetes sends before killing a pod) or Ctrl-C stops the run at the
next step: ``last.pt`` is written, the command exits with 128 + the signal number
(143, 130) and the same command with ``--resume`` continues exactly where it stopped.
A second signal ends the process at once. Under ``torchrun``, the launcher forwards
SIGTERM to every worker; the ranks agree on the step to stop at.
"""

from __future__ import annotations

import argparse
import os
import sys

from kaedama.config import add_stage_arguments
from kaedama.config import config_from_args as stage_config
from kaedama.manifest import resolve_manifest
from kaedama.train.config import TrainConfig

HELP = "Fine-tune a timm backbone on a split manifest (one CPU, GPUs, or torchrun nodes)."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the train stage's arguments and one flag per :class:`TrainConfig` field."""
    parser.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="a split manifest (.jsonl, or the split stage's output folder holding manifest.jsonl)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="output folder (local or gs://)"
    )
    add_stage_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: defaults < ``--config`` file < ``--set`` < flags."""
    return stage_config(TrainConfig, args)


def _summary(result: dict) -> str:
    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    if "runs" in result:  # several trials
        parts = [f"{result['trials']} trials"]
        for key in ("best_val_acc", "test_acc"):
            if key in result:
                stats = result[key]
                parts.append(f"{key} {pct(stats['mean'])} ± {pct(stats['std'])}")
        return ", ".join(parts) + f" -> {result['out']}"
    line = (
        f"best epoch {result['best_epoch']}: val_acc {pct(result['best_val_acc'])}, "
        f"test_acc {pct(result.get('test_acc'))} -> {result['out']}"
    )
    init = (result.get("lineage") or {}).get("init_from")
    if init:
        changes = [f"+{c}" for c in init["classes_added"]] + [
            f"-{c}" for c in init["classes_removed"]
        ]
        line += f"\ninitialised from {init['checkpoint']}: head {init['head']}"
        line += f" (classes {' '.join(changes)})" if changes else ""
    stop = result.get("stop") or {}
    if stop.get("reason") == "time_budget":
        line += f"\nstopped: time budget spent after {stop['epochs_done']} full epoch(s)"
    elif stop.get("reason") == "no_improvement":
        line += (
            f"\nstopped: no val improvement in {stop['early_stop_patience']} epochs "
            f"(after {stop['epochs_done']})"
        )
    if stop.get("budget_left_s") is not None:
        line += f"; {stop['budget_left_s']:.0f} s of the time budget left"
    unknown = result.get("unknown_label_images", 0)
    if unknown:
        labels = ", ".join(sorted(result.get("unknown_labels", {})))
        line += (
            f"\nnote: {unknown} val/test image(s) with labels absent from train ({labels}) "
            "were left out of val/test accuracy"
        )
    return line


def run(args: argparse.Namespace) -> int:
    """Build the config, train, and print a one-line summary (rank 0 only).

    Returns 0, or ``128 + signal`` (143 for SIGTERM) when a stop signal ended the run
    early after writing a resumable checkpoint.
    """
    from kaedama.train.loop import train
    from kaedama.train.runtime import Preempted

    cfg = config_from_args(args)
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(resolve_manifest(args.manifest), args.out, cfg)
    except Preempted as exc:
        if main:
            print(f"kaedama train: {exc}", file=sys.stderr)
        return exc.exit_code
    if main:
        print(_summary(result))
    return 0
