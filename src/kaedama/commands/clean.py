"""``kaedama clean MANIFEST --out DST``: label errors, outliers, low-information and unwanted images.

Reads a manifest (usually ``kaedama dedup``'s output folder) and looks at every kept
image once. Without ``--embeddings`` only the cheap low-information statistics run;
with an embedding model (e.g. ``tf_efficientnet_lite0``) also label errors (confident
learning on k-fold linear probes), outliers within each label, and the junk model.
Each step flags by default (extra manifest columns, nothing removed without a
person's say) or drops with its reason when asked (``--label-errors drop``).

DST receives ``manifest.jsonl`` (one row per input row, counts unchanged),
``findings.jsonl`` (by step, then rank), ``summary.json`` and ``cache/`` (the
embeddings, keyed by sha256 and model); the summary is printed.
"""

from __future__ import annotations

import argparse

from kaedama.clean.config import CleanConfig
from kaedama.config import add_stage_arguments, config_from_args

HELP = (
    "Find label errors, outliers, low-information and unwanted images in a manifest; "
    "flag or drop them."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the clean stage's arguments and one flag per :class:`CleanConfig` field."""
    parser.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="a manifest.jsonl, or a stage's output folder holding one (e.g. kaedama dedup's)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="output folder (local or gs://)"
    )
    parser.add_argument(
        "--embedding-cache",
        metavar="URI",
        help="embeddings file to reuse and update, e.g. shared by several runs "
        "(default: DST/cache/embeddings-<model>.npz)",
    )
    parser.add_argument(
        "--unwanted",
        metavar="SRC",
        help="train the junk model on these unwanted examples: a folder of images, or a "
        "text file with one URI or sha256 a line; saved to --junk-model "
        "(default DST/junk_model.npz) and applied",
    )
    parser.add_argument(
        "--junk-model",
        metavar="FILE",
        help="apply this junk model (trained earlier with --unwanted); needs the same --embeddings",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    add_stage_arguments(parser, CleanConfig)


def run(args: argparse.Namespace) -> int:
    """Run the clean stage and print its summary."""
    config = config_from_args(CleanConfig, args)
    from kaedama.clean.job import CleanPaths, format_summary, run_clean

    paths = CleanPaths(
        manifest=args.manifest,
        output=args.out,
        embedding_cache=args.embedding_cache or "",
        unwanted=args.unwanted or "",
        junk_model=args.junk_model or "",
    )
    summary = run_clean(paths, config, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"\nmanifest, findings and summary: {args.out}")
    return 0
