"""Evaluation benchmarks: throughput vs timm's validate loop, and the cost of the report and CAM.

Sub-commands (each prints JSON lines, then a summary):

``throughput``
    Images/s of ``kaedama evaluate`` with the report, CAM, latency and bootstrap off
    (read + preprocess + forward + metrics) vs timm's ``validate.py`` loop on the same
    checkpoint, images, batch size and worker count. ``validate.py`` lives in the timm
    repository, not in the wheel installed here, so its loop is rebuilt from the same
    timm calls it makes: ``create_dataset`` on an ImageFolder (of symlinks),
    ``create_loader(use_prefetcher=False)`` with the checkpoint's data config (timm's
    eval transform), ``model.eval()`` under ``torch.no_grad()``, and top-1/top-5 with
    ``timm.utils.accuracy``. Both are timed from the start of the loop to its end
    (worker start-up included for both). Each measurement runs in its own process;
    kaedama and timm alternate. Target: kaedama >= 0.9x timm.
``report``
    The cost of the report: the same evaluation with the report on (figures, thumbnails,
    CAM gallery) minus the report off, per test image, and CAM seconds per image.

The checkpoint is a random-init timm model with the subset's classes, saved as a
kaedama checkpoint (weights do not change the speed); images are Caltech-101
(``../shared/datasets``) through ``bench_train.caltech_subset``.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/bench_evaluate.py throughput --model resnet18 --size 224 --classes 101 --per-class 20 --runs 3
    nice -n 10 .venv/bin/python bench/bench_evaluate.py report --model resnet18 --size 224 --classes 101 --per-class 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_train  # noqa: E402
from bench_train import WORK, caltech_subset  # noqa: E402


def checkpoint(args) -> tuple[Path, str, Path]:
    """(checkpoint file, test manifest, ImageFolder root) for the subset, built once."""
    import torch

    from kaedama.manifest import read_manifest, write_manifest
    from kaedama.train.checkpoint import save_checkpoint
    from kaedama.train.model import create_model, resolve_data_config

    root, manifest = caltech_subset(args.classes, args.per_class)
    rows = read_manifest(manifest).rows
    for r in rows:
        r.split = "test"
    test_manifest = root / "test.jsonl"
    write_manifest(str(test_manifest), rows)
    ckpt = WORK / f"eval_{args.model}_{args.size}_{args.classes}.pt"
    if not ckpt.exists():
        classes = sorted({r.label for r in rows})
        torch.manual_seed(0)
        model = create_model(args.model, len(classes))
        save_checkpoint(
            str(ckpt),
            {
                "model": model.state_dict(),
                "model_name": args.model,
                "classes": classes,
                "data_config": resolve_data_config(model, args.size),
                "config": {},
            },
        )
    return ckpt, str(test_manifest), root


def one_ours(args) -> dict:
    from kaedama.evaluate.config import EvaluateConfig
    from kaedama.evaluate.run import evaluate

    ckpt, manifest, _ = checkpoint(args)
    report = args.what == "report"
    cfg = EvaluateConfig(
        batch_size=args.batch, workers=args.workers, report=report, cam="auto" if report else "off",
        latency=False, bootstrap=0 if not report else 1000,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        m = evaluate(str(ckpt), manifest, out, cfg)
        wall = time.perf_counter() - t0
    t = m["timing"]
    return {
        "images": t["images"],
        "images_per_s": t["images"] / wall,
        "inference_images_per_s": t["images_per_s"],
        "wall_s": wall,
        "report_s": t.get("report_seconds"),
        "cam_s_per_image": (m.get("cam") or {}).get("seconds_per_image"),
        "cam_images": (m.get("cam") or {}).get("images"),
        "accuracy": m["summary"]["accuracy"],
    }


def one_timm(args) -> dict:
    import torch
    from timm.data import create_dataset, create_loader
    from timm.utils import accuracy

    from kaedama.train.model import load_trained

    ckpt, _, root = checkpoint(args)
    tm = load_trained(str(ckpt))
    dc = tm.data_config
    dataset = create_dataset("", root=str(root), split="train", is_training=False)
    t0 = time.perf_counter()
    loader = create_loader(
        dataset, input_size=tuple(dc["input_size"]), batch_size=args.batch, is_training=False,
        use_prefetcher=False, interpolation=dc["interpolation"], mean=tuple(dc["mean"]),
        std=tuple(dc["std"]), crop_pct=dc["crop_pct"], crop_mode=dc.get("crop_mode", "center"),
        num_workers=args.workers,
    )  # fmt: skip
    n, top1 = 0, 0.0
    with torch.no_grad():
        for x, y in loader:
            out = tm.model(x)
            acc1, _ = accuracy(out, y, topk=(1, min(5, out.shape[1])))
            top1 += acc1.item() * x.shape[0] / 100
            n += x.shape[0]
    wall = time.perf_counter() - t0
    return {"images": n, "images_per_s": n / wall, "wall_s": wall, "accuracy": top1 / n}


def _spawn(args, who: str) -> dict:
    cmd = [sys.executable, __file__, args.what, "--one", who]
    for key in ("model", "size", "classes", "per_class", "batch", "workers", "threads", "caltech"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=("throughput", "report"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=101)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--caltech", default=str(bench_train.CALTECH), help="Caltech-101 folder")
    p.add_argument("--one", choices=("ours", "timm"), help=argparse.SUPPRESS)
    args = p.parse_args()
    bench_train.CALTECH = Path(args.caltech)
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = one_ours(args) if args.one == "ours" else one_timm(args)
        print(json.dumps(result))
        return
    checkpoint(args)  # build the subset and checkpoint before timing anything
    results: dict[str, list[dict]] = {"ours": [], "timm": []}
    whos = ("ours", "timm") if args.what == "throughput" else ("ours",)
    for run in range(args.runs):
        for who in whos if run % 2 == 0 else whos[::-1]:
            r = _spawn(args, who)
            results[who].append(r)
            print(json.dumps({"run": run, "who": who, **r}), flush=True)
    summary: dict = {"what": args.what, "model": args.model, "size": args.size,
                     "images": results["ours"][0]["images"], "batch": args.batch,
                     "workers": args.workers, "threads": args.threads}  # fmt: skip
    ours = statistics.median(r["images_per_s"] for r in results["ours"])
    summary["ours_images_per_s"] = ours
    if args.what == "throughput":
        theirs = statistics.median(r["images_per_s"] for r in results["timm"])
        summary.update(timm_images_per_s=theirs, ratio=ours / theirs)
    else:
        n = results["ours"][0]["images"]
        summary["report_s"] = statistics.median(r["report_s"] for r in results["ours"])
        summary["report_ms_per_test_image"] = 1000 * summary["report_s"] / n
        summary["cam_ms_per_image"] = 1000 * statistics.median(
            r["cam_s_per_image"] for r in results["ours"]
        )
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
