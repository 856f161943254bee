"""Batch prediction throughput: the Beam job and the in-process engine vs the ONNX ceiling.

On the same exported model (a ``timm`` model exported by ``kaedama export``, random
weights: speed does not depend on them) and the same photos (hymenoptera, 397 JPEGs of
~500 px, or any folder with ``--images``), interleaved rounds, medians:

* ``ceiling``: ONNX Runtime on preprocessed arrays already in memory, batched, no I/O,
  no decoding (what the model alone costs on this machine);
* ``ceiling_decode``: the same plus read + decode + preprocess in this process, one
  thread (what any single-process batch predictor must pay);
* ``in_process``: ``kaedama predict-batch SRC --model M --out O`` (in process, no Beam);
* ``beam``: the Beam job on the DirectRunner's engine, one worker;
* ``beam_2proc``: the Beam job, ``--direct_num_workers 2 --direct_running_mode
  multi_processing``.

Every kaedama method is a fresh process timed start to exit (imports included) and
writes all its outputs. Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/bench_predict_batch.py --repeats 3
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
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"


def export_model(model_name: str, img_size: int, work: Path) -> Path:
    """A random-init ``model_name`` checkpoint with two classes, exported to ONNX."""
    import timm
    import torch

    from kaedama.serve.config import ExportConfig
    from kaedama.serve.export import export_checkpoint
    from kaedama.train.checkpoint import save_checkpoint
    from kaedama.train.model import resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=2).eval()
    ckpt = work / "best.pt"
    save_checkpoint(
        str(ckpt),
        {
            "model": model.state_dict(),
            "model_name": model_name,
            "classes": ["ants", "bees"],
            "data_config": resolve_data_config(model, img_size),
            "config": {},
        },
    )
    out = work / "model"
    export_checkpoint(str(ckpt), str(out), ExportConfig(name="bench", version="1"))
    return out


def ceiling(model_dir: Path, files: list[Path], decode: bool) -> float:
    """Seconds for ONNX Runtime alone (or with decoding) over ``files`` in batches of 32."""
    import numpy as np

    from kaedama.serve.batch import Predictor

    predictor = Predictor(str(model_dir))
    pre = predictor.preprocess
    data = [f.read_bytes() for f in files]
    arrays = None if decode else [pre(d) for d in data]
    predictor(np.zeros((32, *pre.input_size), np.float32))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(files), 32):
        batch = [pre(d) for d in data[i : i + 32]] if decode else arrays[i : i + 32]
        predictor(batch)
    return time.perf_counter() - start


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=HYMENOPTERA)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"no images at {args.images} (../shared/datasets is only on project machines)")
        return 1
    files = sorted(p for p in args.images.rglob("*") if p.is_file())
    work = Path(tempfile.mkdtemp(prefix="kaedama-bench-predict-"))
    model = export_model(args.model, args.img_size, work)
    base = [
        sys.executable,
        "-m",
        "kaedama",
        "predict-batch",
        str(args.images),
        "--model",
        str(model),
    ]
    beam = [
        sys.executable,
        "-m",
        "beam.predict",
        "--input",
        str(args.images),
        "--model",
        str(model),
    ]
    methods = {
        "in_process": lambda out: timed([*base, "--out", out]),
        "beam": lambda out: timed([*beam, "--output", out]),
        "beam_2proc": lambda out: timed(
            [
                *beam,
                "--output",
                out,
                "--direct_num_workers=2",
                "--direct_running_mode=multi_processing",
            ]
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in ("ceiling", "ceiling_decode", *methods)}
    for r in range(args.repeats):
        times["ceiling"].append(ceiling(model, files, decode=False))
        times["ceiling_decode"].append(ceiling(model, files, decode=True))
        for name, run in methods.items():
            times[name].append(run(str(work / f"{name}-{r}")))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    rows = {}
    top = len(files) / statistics.median(times["ceiling"])
    for name, values in times.items():
        med = statistics.median(values)
        rows[name] = {
            "median_s": round(med, 3),
            "images_per_s": round(len(files) / med, 1),
            "vs_ceiling": round(len(files) / med / top, 3),
            "runs": [round(v, 3) for v in values],
        }
    result = {"images": len(files), "model": args.model, "img_size": args.img_size, "methods": rows}
    print(json.dumps(result, indent=2))
    print(f"\n{'method':16} {'median s':>9} {'img/s':>8} {'x ceiling':>10}")
    for name, row in rows.items():
        print(
            f"{name:16} {row['median_s']:9.2f} {row['images_per_s']:8.1f} {row['vs_ceiling']:10.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
