"""Cleaning on real photos with planted dirt: detection per step, then what it buys a model.

From clean photos (hymenoptera ants/bees plus ``--caltech-classes`` Caltech-101
classes, ``--per-class`` images each), each trial (seed) holds out a clean test set
per label and plants, in the training part only:

* exact copies and 50 % resized JPEG copies, within a label and across labels;
* label flips (``--flip-rate``, default 10 % of the originals moved to another label);
* unwanted images (``--unwanted-rate``, default 5 %) from unrelated Caltech classes,
  under random labels; a person's earlier removals (``--junk-examples`` other images
  of those classes) train the junk model.

Then ``kaedama dedup`` (in-process engine) and ``kaedama clean`` (embeddings of
``--model``, label errors dropped, junk model applied and dropping, outliers and
low-information flagged) run on the dirty folder, and the bench reports:

* detection precision/recall per step against the plants (dedup: planted copies
  whose copy or original is dropped; label errors: flips; outliers and the junk
  model: unwanted images; outliers also against unwanted + flips). Caltech has a few real duplicates and mislabelled
  photos of its own, so precision is a lower bound;
* test accuracy of a model trained on the original clean training set, on the
  dirty one and on the cleaned one: a linear probe (scikit-learn logistic
  regression) on the frozen embeddings, cached, so trials are cheap; and with
  ``--finetune-epochs N`` the part-1 backbone fine-tuned end to end on each set
  (``kaedama.train.loop.fit``, fixed epochs, no checkpoint chosen on the test set);
* mean +- std over ``--trials`` seeds.

Target (the project's issue): label-error recall >= 70 % at precision >= 50 % at 10 %
noise. Full run (prints JSON; a few minutes on a quiet machine, mostly embeddings)::

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/bench_cleaning.py --trials 5 \\
        --caltech-classes 12 --per-class 60 --model tf_efficientnet_lite0 \\
        --finetune-epochs 5 --finetune-size 128 --work /tmp/kaedama-bench-cleaning

Smoke (tiny, random-init model: numbers meaningless)::

    .venv/bin/python bench/bench_cleaning.py --trials 1 --caltech-classes 2 --per-class 12 \\
        --model test_efficientnet --no-pretrained --work /tmp/kaedama-bench-cleaning-smoke
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from kaedama.clean.config import CleanConfig
from kaedama.clean.embed import embed_missing, embedding_model
from kaedama.clean.embedcache import EmbeddingCache, cache_name
from kaedama.clean.job import CleanPaths, run_clean, sha256_hex
from kaedama.dedup.decide import REASONS as DEDUP_REASONS
from kaedama.dedup.decide import DedupConfig
from kaedama.dedup.job import JobPaths, default_cache_uri, run_in_process
from kaedama.manifest import read_manifest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
# Never used as a dataset class: overlaps hymenoptera (ant), background clutter, or a
# second copy of another class (Faces_easy).
EXCLUDED = {"BACKGROUND_Google", "Faces_easy", "ant"}


def pick_sources(args, rng) -> tuple[dict[str, list[Path]], list[Path]]:
    """Clean photos per label, and the pool of unrelated photos for unwanted images."""
    caltech = Path(args.datasets) / "caltech101"
    hymenoptera = Path(args.datasets) / "hymenoptera"
    if not caltech.is_dir() or not hymenoptera.is_dir():
        sys.exit(f"needs {caltech} and {hymenoptera} (the project's shared datasets)")
    labels: dict[str, list[Path]] = {}
    for name in ("ants", "bees"):
        files = sorted(hymenoptera.glob(f"*/{name}/*.jpg"))
        labels[name] = [files[i] for i in rng.permutation(len(files))[: args.per_class]]
    classes = sorted(
        d
        for d in caltech.iterdir()
        if d.is_dir() and d.name not in EXCLUDED and len(list(d.glob("*.jpg"))) >= args.per_class
    )
    order = [classes[i] for i in np.random.default_rng(0).permutation(len(classes))]
    for d in order[: args.caltech_classes]:
        files = sorted(d.glob("*.jpg"))
        labels[d.name] = [files[i] for i in rng.permutation(len(files))[: args.per_class]]
    junk = [f for d in order[args.caltech_classes :][:10] for f in sorted(d.glob("*.jpg"))]
    return labels, [junk[i] for i in rng.permutation(len(junk))]


def resized_jpeg(path: Path) -> bytes:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img = img.resize((max(1, img.width // 2), max(1, img.height // 2)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def plant(args, seed: int, root: Path) -> dict:
    """Write the dirty training folder and the clean test set; return the ground truth."""
    rng = np.random.default_rng(seed)
    labels, junk_pool = pick_sources(args, rng)
    names = sorted(labels)
    dirty, test, examples = root / "dirty", root / "test", root / "unwanted_examples"
    for d in (dirty, test, examples):
        shutil.rmtree(d, ignore_errors=True)
    truth = {"flips": {}, "copies": [], "unwanted": [], "originals": {}, "test": []}
    originals: list[tuple[Path, str]] = []
    for label, files in labels.items():
        n_test = max(1, int(round(len(files) * args.test_fraction)))
        for f in files[:n_test]:
            truth["test"].append((str(f), label))
        originals += [(f, label) for f in files[n_test:]]
    order = rng.permutation(len(originals))
    n = len(originals)
    counts = {
        k: int(round(n * r))
        for k, r in (
            ("flip", args.flip_rate),
            ("copy", args.copy_rate),
            ("unwanted", args.unwanted_rate),
        )
    }
    flip_set = set(order[: counts["flip"]].tolist())
    copy_from = order[counts["flip"] : counts["flip"] + counts["copy"]].tolist()

    def other(label: str) -> str:
        return names[(names.index(label) + 1 + int(rng.integers(len(names) - 1))) % len(names)]

    for i, (f, label) in enumerate(originals):
        given = other(label) if i in flip_set else label
        target = dirty / given / f"{label}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        truth["originals"][str(target)] = label
        if i in flip_set:
            truth["flips"][str(target)] = label
    for k, i in enumerate(copy_from):
        f, label = originals[i]
        source = dirty / label / f"{label}_{f.name}"
        kind = ("exact", "resized")[k % 2]
        across = k % 4 >= 2
        where = other(label) if across else label
        target = dirty / where / f"{label}_{f.stem}_{kind}_copy.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes() if kind == "exact" else resized_jpeg(f))
        truth["copies"].append(
            {"copy": str(target), "original": str(source), "kind": kind, "across": across}
        )
    for f in junk_pool[: counts["unwanted"]]:
        target = dirty / names[int(rng.integers(len(names)))] / f"junk_{f.parent.name}_{f.name}"
        shutil.copyfile(f, target)
        truth["unwanted"].append(str(target))
    examples.mkdir(parents=True)
    start = counts["unwanted"]
    for f in junk_pool[start : start + args.junk_examples]:
        shutil.copyfile(f, examples / f"{f.parent.name}_{f.name}")
    return truth


def pr(found: set, planted: set) -> dict:
    hit = len(found & planted)
    return {
        "found": len(found),
        "planted": len(planted),
        "recall": hit / len(planted) if planted else None,
        "precision": hit / len(found) if found else None,
    }


def probe_accuracy(train, test, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kaedama.clean.labels import normalize

    (xa, ya), (xt, yt) = train, test
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, random_state=seed)
    )
    clf.fit(normalize(xa), ya)
    return float((clf.predict(normalize(xt)) == np.array(yt)).mean())


def finetune_accuracy(args, train: list[tuple[str, str]], test, seed: int, out: Path) -> float:
    """Test accuracy of the part-1 backbone fine-tuned on ``train`` (uri, label) pairs.

    Fixed epochs and no validation split (the last epoch counts), so the clean test set
    never chooses a checkpoint; the same seed, config and test set for every training set.
    Test images of a label the training set lacks count as wrong (the loop leaves them
    out of its accuracy), so a cleaning step that removed a class cannot look better.
    """
    import os

    from kaedama.manifest import Row, write_manifest
    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    rows = [Row(uri=u, label=lab, split="train") for u, lab in train]
    rows += [Row(uri=u, label=lab, split="test") for u, lab in test]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_manifest(str(out / "manifest.jsonl"), rows)
    cfg = TrainConfig(
        model=args.model,
        pretrained=args.pretrained,
        img_size=args.finetune_size,
        epochs=args.finetune_epochs,
        batch_size=32,
        optimizer="adamw",
        lr=1e-3,
        warmup_epochs=1.0 if args.finetune_epochs > 1 else 0.0,
        workers=1,
        threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
        random_erasing=0.0,
        pca_noise=0.0,
        scale=(0.35, 1.0),
        seed=seed,
        resume=False,
    )
    result = fit(str(out / "manifest.jsonl"), str(out / "run"), cfg)
    scored = result["test_images"]
    return float(result["test_acc"]) * scored / (scored + result["unknown_label_images"])


def trial(args, seed: int, model, cache_uri: str) -> dict:
    root = Path(args.work) / f"trial{seed}"
    truth = plant(args, seed, root)
    dedup_out, clean_out = root / "dedup", root / "clean"
    shutil.rmtree(dedup_out, ignore_errors=True)
    shutil.rmtree(clean_out, ignore_errors=True)
    dconfig = DedupConfig()
    run_in_process(
        JobPaths(
            str(root / "dirty"),
            str(dedup_out),
            cache=default_cache_uri(str(Path(args.work) / "dedup"), dconfig),
        ),
        dconfig,
        workers=args.workers,
    )
    config = CleanConfig(
        embeddings=args.model,
        pretrained=args.pretrained,
        label_errors="drop",
        junk_action="drop",
        outliers=args.outliers,
    )
    summary = run_clean(
        CleanPaths(
            str(dedup_out),
            str(clean_out),
            embedding_cache=cache_uri,
            unwanted=str(root / "unwanted_examples"),
        ),
        config,
        progress=False,
    )
    dedup_rows = read_manifest(str(dedup_out / "manifest.jsonl")).rows
    rows = read_manifest(str(clean_out / "manifest.jsonl")).rows
    dropped_dedup = {
        r.uri for r in dedup_rows if r.status == "dropped" and r.reason in DEDUP_REASONS
    }
    caught = {
        c["copy"]
        for c in truth["copies"]
        if c["copy"] in dropped_dedup or c["original"] in dropped_dedup
    }
    involved = {u for c in truth["copies"] for u in (c["copy"], c["original"])}
    flagged = defaultdict(set)
    for r in rows:
        for kind in r.extra.get("clean_flags", []):
            flagged[kind].add(r.uri)
    unwanted = set(truth["unwanted"])
    detection = {
        "dedup": {
            "planted": len(truth["copies"]),
            "recall": len(caught) / max(1, len(truth["copies"])),
            "precision": len(dropped_dedup & involved) / max(1, len(dropped_dedup)),
            "dropped": len(dropped_dedup),
        },
        "label_error": pr(flagged["label_error"], set(truth["flips"])),
        # An unwanted image under any label is a wrong label too.
        "label_error_or_unwanted": pr(flagged["label_error"], set(truth["flips"]) | unwanted),
        "outlier": pr(flagged["outlier"], unwanted),
        # A flipped image is off-class in its given label, so an outlier too.
        "outlier_unwanted_or_flip": pr(flagged["outlier"], unwanted | set(truth["flips"])),
        "unwanted": pr(flagged["unwanted"], unwanted),
        "low_information": {"found": len(flagged["low_information"])},
    }
    # The model comparison: a linear probe on frozen embeddings, same test set.
    test_items = [
        (sha256_hex(Path(u).read_bytes()), Path(u).read_bytes()) for u, _ in truth["test"]
    ]
    cache = EmbeddingCache.load(cache_uri, model.key)
    embed_missing(model, test_items, cache, batch_size=32)
    cache.save(cache_uri)
    test = (cache.matrix(s for s, _ in test_items), [lab for _, lab in truth["test"]])

    def embedded(pairs):
        pairs = [(sha, lab) for sha, lab in pairs if sha in cache]
        return cache.matrix(s for s, _ in pairs), [lab for _, lab in pairs]

    by_uri = {r.uri: r for r in rows}
    original = embedded(
        (by_uri[u].sha256, lab)
        for u, lab in truth["originals"].items()
        if u in by_uri and by_uri[u].sha256
    )
    dirty = embedded((r.sha256, r.label) for r in rows if r.sha256 and r.status != "rejected")
    cleaned = embedded((r.sha256, r.label) for r in rows if r.status == "kept")
    accuracy = {
        name: probe_accuracy(train, test, seed)
        for name, train in (("original", original), ("dirty", dirty), ("cleaned", cleaned))
    }
    finetuned = {}
    if args.finetune_epochs:
        sets = {
            "original": [
                (u, lab)
                for u, lab in truth["originals"].items()
                if u in by_uri and by_uri[u].sha256
            ],
            "dirty": [(r.uri, r.label) for r in rows if r.sha256 and r.status != "rejected"],
            "cleaned": [(r.uri, r.label) for r in rows if r.status == "kept"],
        }
        finetuned = {
            name: finetune_accuracy(args, train, truth["test"], seed, root / f"finetune_{name}")
            for name, train in sets.items()
        }
    return {
        "seed": seed,
        "images": summary["before"]["input"],
        "finetuned": finetuned,
        "test_images": len(test[1]),
        "detection": detection,
        "accuracy": accuracy,
        "train_sizes": {
            "original": len(original[1]),
            "dirty": len(dirty[1]),
            "cleaned": len(cleaned[1]),
        },
    }


def aggregate(trials: list[dict]) -> dict:
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} +- {sd:.3f}"

    out = {
        "accuracy": {
            k: stat([t["accuracy"][k] for t in trials]) for k in ("original", "dirty", "cleaned")
        }
    }
    if trials[0]["finetuned"]:
        out["finetuned"] = {
            k: stat([t["finetuned"][k] for t in trials]) for k in ("original", "dirty", "cleaned")
        }
    for step in trials[0]["detection"]:
        for metric in ("recall", "precision"):
            if metric in trials[0]["detection"][step]:
                out[f"{step}_{metric}"] = stat([t["detection"][step][metric] for t in trials])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--caltech-classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--flip-rate", type=float, default=0.10)
    p.add_argument("--copy-rate", type=float, default=0.08)
    p.add_argument("--unwanted-rate", type=float, default=0.05)
    p.add_argument("--junk-examples", type=int, default=20)
    p.add_argument("--outliers", choices=["off", "flag", "drop"], default="flag")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="also fine-tune the backbone on each training set for this many epochs (0: probe only)",
    )
    p.add_argument(
        "--finetune-size", type=int, default=128, help="input size for --finetune-epochs"
    )
    p.add_argument("--work", default="/tmp/kaedama-bench-cleaning")
    p.add_argument("--datasets", default=str(DATASETS), help="folder with caltech101, hymenoptera")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    model = embedding_model(args.model, pretrained=args.pretrained)
    cache_uri = str(Path(args.work) / cache_name(model.key))
    trials = [trial(args, seed, model, cache_uri) for seed in range(args.trials)]
    print(
        json.dumps({"args": vars(args), "summary": aggregate(trials), "trials": trials}, indent=2)
    )


if __name__ == "__main__":
    main()
