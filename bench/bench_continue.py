"""Continued training (``--init-from``) after the dataset grows, vs training from ImageNet again.

AutoML's "additional training": a model trained on version 1 of a dataset; version 2
adds 20% more training photos (same classes, same val/test). Compared on the same test
set, same model, same machine:

* ``v1``: from ImageNet on version 1, ``--epochs`` epochs (the model being continued);
* ``continued``: ``--init-from`` the v1 model on version 2, ``--continue-epochs`` epochs;
* ``fresh``: from ImageNet on version 2, ``--epochs`` epochs.

Data: the first ``--classes`` Caltech-101 classes, ``--per-class`` photos each, split
70/15/15 per label in file-name order; version 1 leaves out every 5th training photo.
Usage (from the repository root)::

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/bench_continue.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's helpers

from bench_train import EXTS, _split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
WORK = Path(tempfile.gettempdir()) / "kaedama-bench" / "continue"


def manifests(classes: int, per_class: int) -> tuple[str, str]:
    """Version 2 (every photo) and version 1 (every 5th training photo left out)."""
    from kaedama.manifest import Row, read_manifest, write_manifest

    labels = sorted(
        p.name for p in CALTECH.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google"
    )
    rows = [
        Row(uri=str(f), label=label)
        for label in labels[:classes]
        for f in sorted(p for p in (CALTECH / label).iterdir() if p.suffix.lower() in EXTS)[
            :per_class
        ]
    ]
    v2 = _split(rows, WORK / "v2.jsonl", write_manifest)
    kept, train_seen = [], 0
    for row in read_manifest(v2).rows:
        if row.split == "train":
            train_seen += 1
            if train_seen % 5 == 0:
                continue
        kept.append(row)
    v1 = WORK / "v1.jsonl"
    write_manifest(str(v1), kept)
    return str(v1), v2


def train(name: str, manifest: str, epochs: int, args, init_from: str = "") -> dict:
    from dataclasses import replace

    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    cfg = TrainConfig(
        model=args.model,
        pretrained=not init_from,
        init_from=init_from,
        img_size=args.size,
        epochs=epochs,
        batch_size=32,
        optimizer="adamw",
        lr=args.lr,
        warmup_epochs=0.5,
        workers=1,
        threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
        random_erasing=0.0,
        pca_noise=0.0,
        scale=(0.35, 1.0),
    )
    out = WORK / name
    start = time.perf_counter()
    result = fit(manifest, str(out), replace(cfg, resume=False))
    record = {
        "run": name,
        "epochs": epochs,
        "train_images": result["history"][-1].get("train_images"),
        "best_val_acc": result["best_val_acc"],
        "test_acc": result.get("test_acc"),
        "train_seconds": round(sum(h["epoch_seconds"] for h in result["history"]), 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--continue-epochs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not CALTECH.is_dir():
        print(f"no Caltech-101 at {CALTECH} (../shared/datasets is only on project machines)")
        return 1
    v1, v2 = manifests(args.classes, args.per_class)
    first = train("v1", v1, args.epochs, args)
    runs = [
        first,
        train("continued", v2, args.continue_epochs, args, init_from=str(WORK / "v1" / "best.pt")),
        train("fresh", v2, args.epochs, args),
    ]
    print(
        f"\n{'run':10} {'epochs':>6} {'train img':>9} {'val acc':>8} {'test acc':>8} {'train s':>8}"
    )
    for r in runs:
        print(
            f"{r['run']:10} {r['epochs']:6d} {r['train_images'] or 0:9d} {r['best_val_acc']:8.3f} "
            f"{(r['test_acc'] or 0):8.3f} {r['train_seconds']:8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
