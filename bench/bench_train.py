"""Training benchmarks: loop throughput vs timm, input-pipeline efficiency, accuracy.

Sub-commands (each prints JSON lines, then a summary):

``throughput``
    Training images/s of kaedama's loop (``kaedama.train.loop.fit``) vs timm's
    training loop on the same model, batch, resolution, augmentation and real
    Caltech-101 JPEGs (an ImageFolder of symlinks for timm, a manifest for us).
    timm's ``train.py`` lives in the timm repository, not the wheel; the copy
    reachable here (commit 2aabaef of huggingface/pytorch-image-models) calls
    ``train_one_epoch`` with its default ``device=cuda`` and cannot run on CPU
    unmodified, so the reference is its CPU path rebuilt from the same timm calls:
    ``create_dataset`` + ``create_loader(use_prefetcher=False)``,
    ``create_optimizer_v2``, ``create_scheduler_v2`` stepped per update,
    ``LabelSmoothingCrossEntropy``, and ``loss.item()`` per step as train.py does.
    Each measurement runs in its own process; kaedama and timm alternate.
    images/s is taken over the second of two epochs capped at ``--steps`` steps
    (workers already started), so start-up is excluded for both alike.
``pipeline``
    kaedama's loop on real JPEGs vs the same loop fed synthetic tensors
    (no decoding, no augmentation): the ratio is the input pipeline's efficiency.
``digits`` / ``caltech``
    Accuracy from scratch vs wall time per epoch: the digits fixture, and Caltech-101
    at low resolution, cleaned and split by the stage commands (``kaedama dedup
    --in-process`` over every class but ``BACKGROUND_Google``, then ``kaedama split``
    with its defaults; cached under the work folder), or ``--manifest M``.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/bench_train.py throughput --models resnet18 efficientnet_b0 --runs 3
    nice -n 10 .venv/bin/python bench/bench_train.py pipeline --runs 3
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_train.py digits --epochs 20
    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/bench_train.py caltech --epochs 4 --size 64
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
WORK = Path(tempfile.gettempdir()) / "kaedama-bench" / "train"
EXTS = (".jpg", ".jpeg", ".png")


def _caltech_or_exit() -> Path:
    if not CALTECH.is_dir():
        sys.exit(
            f"bench_train: {CALTECH} not found; the real-photo benches need ../shared/datasets"
        )
    return CALTECH


def caltech_subset(classes: int, per_class: int) -> tuple[Path, str]:
    """An ImageFolder of symlinks (``root/train/<label>/``) and a kaedama manifest of the same files."""
    from kaedama.manifest import Row, write_manifest

    src = _caltech_or_exit()
    root = WORK / f"caltech_{classes}x{per_class}"
    labels = sorted(p.name for p in src.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    rows = []
    for label in labels[:classes]:
        files = sorted(p for p in (src / label).iterdir() if p.suffix.lower() in EXTS)
        for f in files[:per_class]:
            link = root / "train" / label / f.name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
            rows.append(Row(uri=str(f), label=label, split="train"))
    manifest = root / "manifest.jsonl"
    write_manifest(str(manifest), rows)
    return root, str(manifest)


def _cfg(model: str, size: int, batch: int, steps: int, workers: int):
    from kaedama.train.config import TrainConfig

    # Same augmentation as timm's loader below: RandomResizedCrop, flip, colour jitter.
    return TrainConfig(
        model=model,
        img_size=size,
        batch_size=batch,
        epochs=2,
        max_steps_per_epoch=steps,
        workers=workers,
        pca_noise=0.0,
        random_erasing=0.0,
        label_smoothing=0.1,
        warmup_epochs=0.0,
    )


def one_ours(args) -> dict:
    from kaedama.train.loop import fit

    _, manifest = caltech_subset(args.classes, args.per_class)
    cfg = _cfg(args.model, args.size, args.batch, args.steps, args.workers)
    with tempfile.TemporaryDirectory() as out:
        result = fit(manifest, out, cfg)
    return {"images_per_s": result["history"][1]["images_per_s"]}


def one_timm(args) -> dict:
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import AverageMeter, random_seed

    root, _ = caltech_subset(args.classes, args.per_class)
    random_seed(0, 0)
    model = timm.create_model(args.model, num_classes=args.classes)
    dc = resolve_data_config({"input_size": (3, args.size, args.size)}, model=model)
    dataset = create_dataset("", root=str(root), split="train", is_training=True)
    loader = create_loader(
        dataset,
        input_size=dc["input_size"],
        batch_size=args.batch,
        is_training=True,
        use_prefetcher=False,
        interpolation=dc["interpolation"],
        mean=dc["mean"],
        std=dc["std"],
        color_jitter=0.4,
        num_workers=args.workers,
        persistent_workers=True,
    )
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    steps = min(args.steps, len(loader))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, warmup_epochs=0, updates_per_epoch=steps
    )
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    rates = []
    updates = 0
    for _epoch in range(2):
        model.train()
        losses = AverageMeter()
        t0 = time.perf_counter()
        n = 0
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            out = model(x)
            loss = loss_fn(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.update(loss.item(), x.size(0))
            updates += 1
            scheduler.step_update(num_updates=updates, metric=losses.avg)
            n += x.size(0)
        rates.append(n / (time.perf_counter() - t0))
    return {"images_per_s": rates[1]}


def one_synthetic(args) -> dict:
    """kaedama's train_one_epoch fed random tensors: the compute-only ceiling."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from kaedama.train import augment, optim
    from kaedama.train.data import collate
    from kaedama.train.loop import StepContext, amp_dtype, init_runtime, train_one_epoch
    from kaedama.train.model import create_from_config

    cfg = _cfg(args.model, args.size, args.batch, args.steps, args.workers)
    rt = init_runtime(cfg)
    torch.manual_seed(0)
    model = create_from_config(cfg, args.classes)
    n = args.batch * args.steps
    data = TensorDataset(torch.randn(n, 3, args.size, args.size), torch.randint(args.classes, (n,)))
    loader = DataLoader(
        data,
        batch_size=args.batch,
        collate_fn=lambda items: collate([(x, int(y)) for x, y in items]),
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    optimizer = optim.build_optimizer(model, cfg)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, cfg, args.steps),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        mixer=augment.BatchMixer(cfg, args.classes),
        ema=None,
        cfg=cfg,
        rt=rt,
        dtype=amp_dtype(cfg, rt.device),
        input_hw=(args.size, args.size),
    )
    rates = []
    for epoch in range(2):
        t0 = time.perf_counter()
        progress = train_one_epoch(ctx, loader, epoch=epoch, steps=args.steps)
        rates.append(float(progress.sums[2]) / (time.perf_counter() - t0))
    return {"images_per_s": rates[1]}


IMPLS = {"ours": one_ours, "timm": one_timm, "synthetic": one_synthetic}


def _run_one(impl: str, model: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "_one",
        "--impl",
        impl,
        "--model",
        model,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--workers",
        str(args.workers),
        "--classes",
        str(args.classes),
        "--per-class",
        str(args.per_class),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"bench_train: {impl} {model} failed:\n{done.stderr[-3000:]}")
    record = {"impl": impl, "model": model, **json.loads(done.stdout.strip().splitlines()[-1])}
    print(json.dumps(record), flush=True)
    return record


def compare(args, impls: tuple[str, str], label: str) -> None:
    caltech_subset(args.classes, args.per_class)  # build the shared folder once, outside timings
    summary = {}
    for model in args.models:
        rates: dict[str, list[float]] = {i: [] for i in impls}
        for _ in range(args.runs):
            for impl in impls:
                rates[impl].append(_run_one(impl, model, args)["images_per_s"])
        med = {i: statistics.median(v) for i, v in rates.items()}
        summary[model] = {
            **{f"{i}_images_per_s": round(m, 2) for i, m in med.items()},
            "runs": {i: [round(r, 2) for r in v] for i, v in rates.items()},
            label: round(med[impls[0]] / med[impls[1]], 3),
        }
    print(json.dumps({"summary": summary, "settings": _settings(args)}, indent=2))


def _settings(args) -> dict:
    keep = ("size", "batch", "steps", "workers", "threads", "runs", "classes", "per_class")
    return {k: getattr(args, k) for k in keep if hasattr(args, k)}


# --------------------------------------------------------------------------- accuracy


def digits(args) -> None:
    from kaedama.fixtures import FixturesConfig, make_digits_folder
    from kaedama.manifest import list_image_folder, write_manifest
    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    root = WORK / f"digits_{args.per_class}"
    if not root.exists():
        make_digits_folder(root, FixturesConfig(per_class=args.per_class).clean(), progress=False)
    manifest = _split(list_image_folder(str(root)), root.with_suffix(".jsonl"), write_manifest)
    cfg = TrainConfig(
        model=args.model,
        img_size=args.size,
        epochs=args.epochs,
        batch_size=64,
        optimizer=args.optimizer,
        lr=args.lr,
        workers=args.workers,
        hflip=0.0,
        scale=(0.8, 1.0),
        rotation=10.0,
        color_jitter=0.2,
        random_erasing=0.0,
        warmup_epochs=1.0,
    )
    _accuracy_run(manifest, cfg, fit, "digits")


def caltech_split_manifest() -> str:
    """Caltech-101 cleaned and split by the stage commands, as a user would (cached in WORK).

    ``kaedama dedup`` (in-process) over a list of every photo except the
    ``BACKGROUND_Google`` clutter class, then ``kaedama split`` with its defaults
    (8/1/1, stratified, duplicate clusters kept together).
    """
    from kaedama import cli
    from kaedama.manifest import list_image_folder

    src = _caltech_or_exit()
    split = WORK / "caltech_split" / "manifest.jsonl"
    if split.exists():
        return str(split)
    listing = WORK / "caltech_list.csv"
    listing.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in list_image_folder(str(src)) if r.label != "BACKGROUND_Google"]
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        writer.writerows([r.uri, r.label] for r in rows)
    for argv in (
        ["dedup", str(listing), "--out", str(WORK / "caltech_dedup"), "--in-process"],
        ["split", str(WORK / "caltech_dedup" / "manifest.jsonl"), "--out", str(split.parent)],
    ):
        t0 = time.perf_counter()
        if cli.main(argv):
            sys.exit(f"bench_train: kaedama {' '.join(argv)} failed")
        print(json.dumps({"stage": argv[0], "seconds": round(time.perf_counter() - t0, 1)}))
    return str(split)


def caltech(args) -> None:
    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    manifest = args.manifest or caltech_split_manifest()
    cfg = TrainConfig(
        model=args.model,
        img_size=args.size,
        epochs=args.epochs,
        batch_size=64,
        optimizer=args.optimizer,
        lr=args.lr,
        workers=args.workers,
        warmup_epochs=1.0,
        random_erasing=0.0,
        pca_noise=0.0,
        scale=(0.35, 1.0),
    )
    _accuracy_run(manifest, cfg, fit, "caltech")


def _split(rows, path: Path, write_manifest) -> str:
    """70/15/15 per label, in file-name order (deterministic)."""
    seen: Counter[str] = Counter()
    for row in sorted(rows, key=lambda r: r.uri):
        k = seen[row.label] % 20
        seen[row.label] += 1
        row.split = "train" if k < 14 else "val" if k < 17 else "test"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(str(path), rows)
    return str(path)


def _accuracy_run(manifest: str, cfg, fit, name: str) -> None:
    cfg = replace(cfg, resume=False, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = WORK / f"run_{name}_{cfg.model}_{cfg.img_size}"
    t0 = time.perf_counter()
    result = fit(manifest, str(out), cfg)
    wall = 0.0
    for h in result["history"]:
        wall += h["epoch_seconds"]
        print(
            json.dumps(
                {
                    "epoch": h["epoch"],
                    "train_wall_s": round(wall, 1),
                    "train_loss": round(h["train_loss"], 4),
                    "val_acc": round(h["val_acc"], 4),
                    "images_per_s": round(h["images_per_s"], 1),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "bench": name,
                "model": cfg.model,
                "img_size": cfg.img_size,
                "best_epoch": result["best_epoch"],
                "best_val_acc": result["best_val_acc"],
                "test_acc": result.get("test_acc"),
                "test_images": result.get("test_images"),
                "total_wall_s": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p, size: int, steps: int) -> None:
        p.add_argument("--size", type=int, default=size)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
        p.add_argument("--classes", type=int, default=10)
        p.add_argument("--per-class", type=int, default=40)

    for name in ("throughput", "pipeline"):
        p = sub.add_parser(name)
        common(p, 160, 6)
        p.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_b0"])
        p.add_argument("--runs", type=int, default=3)
    one = sub.add_parser("_one")
    common(one, 160, 6)
    one.add_argument("--impl", choices=sorted(IMPLS), required=True)
    one.add_argument("--model", required=True)
    for name, size, epochs, model in (
        ("digits", 32, 15, "resnet18"),
        ("caltech", 64, 8, "resnet18"),
    ):
        p = sub.add_parser(name)
        p.add_argument("--model", default=model)
        p.add_argument("--size", type=int, default=size)
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--per-class", type=int, default=150)
        p.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw", "adabound"])
        p.add_argument("--lr", type=float, default=2e-3)
        if name == "caltech":
            p.add_argument(
                "--manifest",
                help="a split manifest to train on (default: dedup + split Caltech-101 in WORK)",
            )
    args = parser.parse_args()
    if args.cmd == "_one":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(IMPLS[args.impl](args)))
    elif args.cmd == "throughput":
        compare(args, ("ours", "timm"), "ours_over_timm")
    elif args.cmd == "pipeline":
        compare(args, ("ours", "synthetic"), "real_over_synthetic")
    elif args.cmd == "digits":
        digits(args)
    else:
        caltech(args)


if __name__ == "__main__":
    main()
