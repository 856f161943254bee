"""``kaedama predict-batch SRC --model MODEL_DIR --out DST``: predict every image of a bucket.

SRC is a folder or ``gs://`` prefix of images, a manifest (its kept rows) or a list;
MODEL_DIR a folder written by ``kaedama export``. Like ``kaedama dedup``: without
``--runner`` and with local paths the job runs in this process (the same step
functions, no Beam); ``--runner NAME`` (or a ``gs://`` path) runs the Beam job
(``beam/predict.py``: Beam's RunInference) on that runner. DST receives
``predictions-*.jsonl`` (all class probabilities per image), ``rejected-*.jsonl``
(unreadable files with the reason) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex

from kaedama.config import add_stage_arguments, config_from_args
from kaedama.errors import KaedamaError
from kaedama.serve.batch import BatchPredictConfig

HELP = "Predict every image of a folder, bucket or manifest with an exported model (Beam)."


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments, and one flag per :class:`BatchPredictConfig` field."""
    parser.add_argument("src", metavar="SRC", help="images: folder, gs:// prefix, manifest or list")
    parser.add_argument(
        "--model", required=True, metavar="MODEL_DIR", help="'kaedama export' output"
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="output folder (local or gs://)"
    )
    parser.add_argument(
        "--runner",
        help="run the Beam job on this runner (DirectRunner, DataflowRunner, ...; default: "
        "in process for local paths, the DirectRunner for gs:// paths)",
    )
    parser.add_argument(
        "--beam-args",
        action="append",
        default=[],
        metavar="'ARGS'",
        help="more Beam pipeline options, quoted (repeatable)",
    )
    add_stage_arguments(parser, BatchPredictConfig)


def run(args: argparse.Namespace) -> int:
    """Run the batch prediction in process or as the Beam job; print the counts."""
    config = config_from_args(BatchPredictConfig, args)
    beam_args = [f"--runner={args.runner}"] if args.runner else []
    for chunk in args.beam_args:
        beam_args.extend(shlex.split(chunk))
    local = all("://" not in u for u in (args.src, args.model, args.out))
    if local and not beam_args:
        from kaedama.serve.batch import predict_in_process

        summary = predict_in_process(args.src, args.model, args.out, config)
    else:
        try:
            from beam.predict import run_job
        except ModuleNotFoundError as exc:
            raise KaedamaError(
                f"the Beam job needs Apache Beam ({exc}): pip install 'kaedama[beam]'"
            ) from exc
        summary = run_job(args.src, args.model, args.out, config, beam_args)
    print(json.dumps({k: summary[k] for k in ("listed", "predicted", "rejected")}))
    print(f"predictions: {args.out}")
    return 0
