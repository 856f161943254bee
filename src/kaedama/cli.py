"""The ``kaedama`` command: one sub-command per pipeline stage.

Each stage lives in ``kaedama.commands.<stage>`` and exposes ``HELP`` (one line),
``configure(parser)`` and ``run(args) -> int``. Modules are imported only when
their stage runs, so ``kaedama --help`` stays fast and a stage's heavy
dependencies (torch, Beam) load only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kaedama import __version__

# Stage name -> one-line help. The order is the order of the pipeline.
STAGES: dict[str, str] = {
    "dedup": "Hash images, find exact and near-duplicates and label conflicts; write a manifest and a review page.",
    "clean": "Find label errors, outliers, low-information and unwanted images in a manifest; flag or drop them.",
    "split": "Split a cleaned manifest into train/val/test: stratified, cluster-aware, stable as data grows.",
    "train": "Fine-tune a timm backbone on a split manifest (one CPU, GPUs, or torchrun nodes).",
    "evaluate": "Evaluate a trained model: per-class metrics, confusion matrix, CAM heatmaps, latency.",
    "export": "Export a trained model for serving (TorchScript/ONNX with its data config).",
    "serve": "Run the prediction HTTP service (KServe-style load/preprocess/predict).",
    "deploy": "Deploy an exported model to Kubernetes (KServe or plain), smoke-test it, roll back on failure.",
    "predict": "Call a prediction service with retry, backoff and jitter; print all class probabilities.",
    "predict-batch": "Predict every image of a folder, bucket or manifest with an exported model (Beam).",
    "pipeline": "Compile or submit the Kubeflow pipeline (dedup -> split -> train -> evaluate -> deploy).",
    "fixtures": "Generate a labeled image folder from real handwritten digits, with planted dirt.",
}

NOT_BUILT_EXIT = 3


def module_name(stage: str) -> str:
    """The module under ``kaedama.commands`` of a stage (``predict-batch`` -> ``predict_batch``)."""
    return stage.replace("-", "_")


def _load(stage: str):
    try:
        return importlib.import_module(f"kaedama.commands.{module_name(stage)}")
    except ModuleNotFoundError as exc:
        if exc.name == f"kaedama.commands.{module_name(stage)}":
            return None
        raise


def build_parser(stage_to_load: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``stage_to_load`` gets its full option set (lazy imports)."""
    parser = argparse.ArgumentParser(
        prog="kaedama",
        description="Self-hosted AutoML Vision: clean, split, train, evaluate and serve image classifiers.",
        epilog="Run 'kaedama STAGE --help' for the options of a stage. "
        "Paths may be local folders or gs://bucket/prefix URIs.",
    )
    parser.add_argument("--version", action="version", version=f"kaedama {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for stage, help_text in STAGES.items():
        module = _load(stage) if stage == stage_to_load else None
        p = sub.add_parser(stage, help=help_text, description=help_text)
        if module is not None:
            module.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if a in STAGES), None))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.stage:
        parser.print_help()
        return 2
    module = _load(args.stage)
    if module is None:
        print(
            f"kaedama {args.stage}: this stage is not built yet in kaedama {__version__}. "
            "See the README for the stages that are available.",
            file=sys.stderr,
        )
        return NOT_BUILT_EXIT
    from kaedama.config import ConfigError
    from kaedama.errors import KaedamaError

    try:
        return int(module.run(args) or 0)
    except KaedamaError as exc:
        hint = f" (see 'kaedama {args.stage} --help')" if isinstance(exc, ConfigError) else ""
        print(f"kaedama {args.stage}: error: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
