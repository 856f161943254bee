"""``kaedama export CHECKPOINT --out DST``: write a serving artifact from a checkpoint.

DST (local or ``gs://``) receives ``model.onnx`` (or ``model.pt`` with
``--format torchscript``), ``cam.npz`` for CAM-capable heads, and
``kaedama-model.json`` with the classes, data config, version, temperature and
sha256 sums. ``kaedama serve DST`` serves it::

    kaedama export runs/r1/best.pt --out models/flowers
    kaedama export runs/r1/best.pt --out models/flowers --calibration runs/r1/eval/calibration.json
"""

from __future__ import annotations

import argparse

from kaedama.config import add_stage_arguments, config_from_args
from kaedama.serve.config import ExportConfig

HELP = "Export a trained model for serving (ONNX by default, or TorchScript, with its data config)."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the export stage's arguments and one flag per :class:`ExportConfig` field."""
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a kaedama best.pt (local or gs://)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="artifact folder to write (local or gs://)"
    )
    add_stage_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    """Export and print what was written."""
    from kaedama.serve.export import export_checkpoint

    config = config_from_args(ExportConfig, args)
    manifest = export_checkpoint(args.checkpoint, args.out, config)
    cam = "with CAM output" if manifest["cam"] else "no CAM output (head is not pool + linear)"
    print(
        f"exported {manifest['source']['model_name']} as {manifest['runtime']} "
        f"({len(manifest['classes'])} classes, {cam}) -> {args.out}: "
        f"name {manifest['name']}, version {manifest['version']}"
    )
    return 0
