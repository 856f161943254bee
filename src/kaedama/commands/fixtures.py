"""``kaedama fixtures OUT``: write a labeled digits folder with planted dirt and its ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kaedama.config import add_stage_arguments, config_from_args, config_to_dict

HELP = "Generate a labeled image folder from real handwritten digits, with planted dirt."


def configure(parser: argparse.ArgumentParser) -> None:
    from kaedama.fixtures import FixturesConfig

    parser.add_argument("out", metavar="OUT", help="new (or empty) local folder to write")
    parser.add_argument(
        "--truth",
        metavar="FILE",
        default="",
        help="where to write the ground truth JSON (default: OUT.truth.json next to OUT)",
    )
    add_stage_arguments(parser, FixturesConfig)


def run(args: argparse.Namespace) -> int:
    from kaedama.fixtures import FixturesConfig, make_digits_folder

    config = config_from_args(FixturesConfig, args)
    out = Path(args.out)
    truth_path = Path(args.truth) if args.truth else out.parent / f"{out.name}.truth.json"
    truth = make_digits_folder(out, config)
    truth.save(truth_path)
    summary = {
        "out": str(out),
        "truth": str(truth_path),
        "files": len(truth.labels),
        "labels": len(set(truth.labels.values())),
        "originals": len(truth.originals),
        "exact_duplicates": len(truth.exact_duplicates),
        "near_duplicates": {k: len(v) for k, v in truth.near_duplicates.items()},
        "cross_label": len(truth.cross_label_pairs),
        "corrupt": len(truth.corrupt),
        "no_extension": len(truth.no_extension),
        "config": config_to_dict(config),
    }
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0
