"""The end-to-end demo behind ``make run``: fixtures -> dedup -> split -> train -> evaluate.

It runs the same stage commands a user runs (``kaedama fixtures/dedup/split/train/evaluate``)
on an embedded sample: real handwritten digits rendered to photos with planted
duplicates, near-duplicates, cross-label copies and corrupt files. Stages that a
release does not ship yet are reported and skipped, never faked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kaedama import cli
from kaedama.config import add_config_arguments, build_config


@dataclass(frozen=True)
class DemoConfig:
    """What the demo generates and how long it trains."""

    # From-scratch training needs enough steps: 150 photos per label reach >97% on
    # digits where 60 per label barely leave chance level (BENCHMARKS.md, Training).
    per_class: int = field(default=150, metadata={"help": "original digit photos per label"})
    model: str = field(default="resnet18", metadata={"help": "timm model trained from scratch"})
    img_size: int = field(default=32, metadata={"help": "training resolution"})
    epochs: int = field(default=15, metadata={"help": "training epochs"})
    fresh: bool = field(default=True, metadata={"help": "delete a previous demo output first"})


def stages(out: Path, config: DemoConfig) -> list[tuple[str, list[str]]]:
    """The stage command lines, in pipeline order."""
    data, dedup, split, train = out / "data", out / "dedup", out / "split", out / "train"
    evaluate = out / "evaluate"
    return [
        ("fixtures", ["fixtures", str(data), "--per-class", str(config.per_class)]),
        ("dedup", ["dedup", str(data), "--out", str(dedup)]),
        ("split", ["split", str(dedup / "manifest.jsonl"), "--out", str(split)]),
        (
            "train",
            [
                "train",
                str(split / "manifest.jsonl"),
                "--out",
                str(train),
                "--model",
                config.model,
                "--img-size",
                str(config.img_size),
                "--epochs",
                str(config.epochs),
                "--batch-size",
                "64",
                "--optimizer",
                "adamw",
                "--lr",
                "0.002",
                "--warmup-epochs",
                "1",
                # Digits are not mirror-symmetric: no flips; gentle crops and rotation.
                "--hflip",
                "0",
                "--scale",
                "0.6,1.0",
                "--rotation",
                "10",
                "--color-jitter",
                "0.2",
                "--random-erasing",
                "0",
                "--workers",
                "1",
            ],
        ),
        (
            "evaluate",
            ["evaluate", str(train), str(split / "manifest.jsonl"), "--out", str(evaluate)],
        ),
    ]


def run_demo(out: Path, config: DemoConfig) -> int:
    """Run every built stage in order; stop at the first failure."""
    if config.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for name, argv in stages(out, config):
        if cli._load(name) is None:
            print(f"demo: stage '{name}' is not built in this release; skipping it and the rest")
            break
        print(f"\n=== kaedama {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        code = cli.main(argv)
        timings[name] = round(time.perf_counter() - start, 2)
        if code != 0:
            print(f"demo: stage '{name}' failed with exit code {code}", file=sys.stderr)
            return code
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\ndemo: done in {sum(timings.values()):.1f} s; outputs under {out}")
    report = out / "dedup" / "report.html"
    if report.exists():
        print(f"demo: review the duplicates at {report}")
    evaluation = out / "evaluate" / "report.html"
    if evaluation.exists():
        print(f"demo: the model's evaluation report is at {evaluation}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kaedama.demo",
        description="Run kaedama end to end on an embedded sample of real digit photos.",
    )
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    add_config_arguments(parser, DemoConfig)
    args = parser.parse_args(argv)
    return run_demo(Path(args.out), build_config(DemoConfig, args=args))


if __name__ == "__main__":
    sys.exit(main())
