"""``kaedama evaluate CHECKPOINT MANIFEST --out DST``: figures, explanations and a report.

CHECKPOINT is a training output folder (its ``best.pt`` is used) or a ``.pt``
file; MANIFEST a split manifest (or the split stage's folder); all may be local
or ``gs://``. Images are preprocessed by the checkpoint's own data config, as
the prediction service does::

    kaedama evaluate runs/r1 data/split --out runs/r1/eval
    kaedama evaluate runs/r2 data/split --out runs/r2/eval --compare runs/r1/eval/metrics.json

DST receives metrics.json, kfp.json, predictions.jsonl/.csv, figures/, cam/ and
report.html (one self-contained page). With --compare the exit code stays 0; the
verdict is in compare.json (``better``, ``significant``) for a pipeline gate.
"""

from __future__ import annotations

import argparse

from kaedama.config import add_stage_arguments
from kaedama.config import config_from_args as stage_config
from kaedama.evaluate.config import EvaluateConfig

HELP = "Evaluate a trained model: per-class metrics, confusion matrix, CAM heatmaps, latency."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the evaluate stage's arguments and one flag per :class:`EvaluateConfig` field."""
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="training output folder (uses best.pt) or a checkpoint .pt file, local or gs://",
    )
    parser.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="a split manifest (.jsonl, or the split stage's output folder)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="output folder (local or gs://)"
    )
    add_stage_arguments(parser, EvaluateConfig)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The run's config: defaults < ``--config`` file < ``--set`` < flags."""
    return stage_config(EvaluateConfig, args)


def summary_line(m: dict) -> str:
    """One line for the terminal."""
    s = m["summary"]
    k = s["top_k"]
    parts = [
        f"{s['images']} {m['split']} images",
        f"accuracy {100 * s['accuracy']:.2f}%",
        f"top-{k} {100 * s[f'top{k}_accuracy']:.2f}%",
        f"macro F1 {s['macro']['f1']:.3f}",
        f"ECE {m['calibration']['ece']:.4f}",
    ]
    if m.get("latency"):
        parts.append(f"{m['latency']['batch1_ms_median']:.1f} ms/img at batch 1")
    if m.get("compare"):
        parts.append(m["compare"]["verdict"])
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print a one-line summary and where the report is."""
    from kaedama import storage
    from kaedama.evaluate.run import evaluate

    cfg = config_from_args(args)
    metrics = evaluate(args.checkpoint, args.manifest, args.out, cfg)
    print(summary_line(metrics))
    if cfg.report:
        print(f"report: {storage.join(args.out, 'report.html')}")
    return 0
