"""``kaedama serve MODEL_DIR``: the prediction service for an exported model.

MODEL_DIR is a folder written by ``kaedama export`` (local or ``gs://``). The
process imports no torch for ONNX artifacts. Endpoints (see
:mod:`kaedama.serve.app`): the Open Inference Protocol under ``/v2``, raw-bytes
``/v1/models/NAME:predict`` and ``/predict``, ``:explain``, ``/metrics``::

    kaedama serve models/flowers --port 8080 --max-batch-size 16 --max-queue 64
"""

from __future__ import annotations

import argparse

from kaedama.config import add_stage_arguments, config_from_args
from kaedama.serve.config import ServeConfig

HELP = "Run the prediction HTTP service (KServe-style load/preprocess/predict)."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the serve stage's arguments and one flag per :class:`ServeConfig` field."""
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="artifact folder from 'kaedama export'"
    )
    add_stage_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM; 1 when the model cannot be loaded."""
    from kaedama import storage
    from kaedama.serve.artifact import MANIFEST, ArtifactError
    from kaedama.serve.server import serve

    config = config_from_args(ServeConfig, args)
    # Fail before listening when the folder is plainly not an artifact (a typo'd path);
    # the full load and sha256 check run in the background once the port is open.
    if not storage.exists(storage.join(args.model_dir, MANIFEST)):
        raise ArtifactError(
            f"{args.model_dir} holds no {MANIFEST}; pass a folder written by 'kaedama export'"
        )
    return serve(args.model_dir, config)
