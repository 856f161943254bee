"""The whole dedup job vs imgdupes and imagededup (PHash) on Caltech-101 (9,145 photos).

Every method is one fresh process timed from start to exit (wall clock, imports
included), reading the photos from disk and finding near-duplicates at Hamming
distance <= 4 on a 64-bit pHash. All methods run interleaved in each round, so load
elsewhere on the machine hits them alike; the table reports medians over ``--repeats``
rounds and the ratio to imgdupes.

Methods (every kaedama method writes all outputs: manifest, clusters, candidates,
rejected, summary, hash cache and the HTML review page with thumbnails; a fresh output
folder each time, so no cache, except ``kaedama_beam_cached``):

* ``kaedama_beam``: ``python -m beam.dedup`` with no runner options: the DirectRunner's
  engine (FnApiRunner) with one worker in this process, each chunk of files hashed by
  ``--read_threads`` (4) threads (Pillow decodes and resizes outside the GIL).
* ``kaedama_beam_1thread``: the same with ``--read_threads=1``.
* ``kaedama_beam_2proc``: ``--direct_num_workers=2 --direct_running_mode=multi_processing
  --read_threads=2`` (two SDK worker processes).
* ``kaedama_beam_exact``: the default job with ``--hash_method=exact`` (the bit-exact
  imagehash pHash arithmetic on a colour decode: the former default recipe).
* ``kaedama_beam_cached``: the default job re-run on the same output folder: the hash
  cache answers every file (the "grown dataset" path with nothing new).
* ``kaedama_beam_floor``: the default job on a folder holding one photo: what a
  DirectRunner run of this pipeline costs before any real work (interpreter, imports,
  pipeline construction, runner start-up and shutdown).
* ``kaedama_in_process``: ``kaedama dedup DIR --out OUT --in-process``: the same steps
  and outputs (byte-identical, tested) without Beam, hashing in forked processes on
  every core; ``kaedama_in_process_exact`` with ``--hash-method exact``.
* ``kaedama_in_process_descriptor``, ``kaedama_beam_descriptor``: ``--same-shot
  descriptor``, i.e. without the keypoint test of candidate pairs (the default is
  ``combined``): what the same-shot test costs the whole job.
* ``kaedama_in_process_cached``, ``kaedama_in_process_cached_descriptor``: a re-run of
  the in-process engine on its own output folder (the hash cache answers).
* ``imgdupes``: ``imgdupes --recursive DIR phash 4 --no-cache`` (its default: one
  process, NGT index), run in a scratch folder; ``imgdupes_2proc`` adds ``--num-proc 2``.
* ``imagededup``: ``PHash().find_duplicates(image_dir=DIR, recursive=True,
  max_distance_threshold=4)`` (cpu_count() workers for encoding and search).

``--breakdown`` also times kaedama's core steps in one process, without Beam (list,
read + sha256, decode + hash, pair search, decide, report thumbnails), to show where
the job's time goes and what Beam adds.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/bench_dedup.py --repeats 3 --breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
PY = sys.executable
VENV_BIN = Path(PY).parent

BEAM_OPTIONS = {
    "kaedama_beam": [],
    "kaedama_beam_1thread": ["--read-threads=1"],
    "kaedama_beam_2proc": [
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
        "--read-threads=2",
    ],
    "kaedama_beam_exact": ["--hash-method=exact"],
    "kaedama_beam_descriptor": ["--same-shot=descriptor"],
}
IN_PROCESS_OPTIONS = {
    "kaedama_in_process": [],
    "kaedama_in_process_exact": ["--hash-method", "exact"],
    "kaedama_in_process_descriptor": ["--same-shot", "descriptor"],
}

IMAGEDEDUP_SCRIPT = """
import json, sys
from imagededup.methods import PHash
dups = PHash(verbose=False).find_duplicates(
    image_dir=sys.argv[1], recursive=True, max_distance_threshold=4)
pairs = {tuple(sorted((a, b))) for a, bs in dups.items() for b in bs}
print(json.dumps({"pairs": len(pairs), "images": len({x for p in pairs for x in p})}))
"""


def _kaedama(dataset: Path, out: Path, extra: list[str]) -> list[str]:
    return [PY, "-m", "beam.dedup", "--input", str(dataset), "--output", str(out), *extra]


def _imgdupes_groups(stdout: str) -> dict:
    groups = [g.split("\n") for g in stdout.strip().split("\n\n") if g.strip()]
    groups = [[line for line in g if line.strip()] for g in groups]
    pairs = {tuple(sorted((a, b))) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}
    return {
        "groups": len(groups),
        "pairs": len(pairs),
        "images": len({x for g in groups for x in g}),
    }


def _kaedama_counts(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    return {
        "candidate_pairs": summary["candidate_pairs"],
        "confirmed_pairs": summary["confirmed_pairs"],
        "clusters": summary["clusters"],
        "conflict_clusters": summary["conflict_clusters"],
        "dropped": summary["dropped"],
        "rejected": summary["rejected"],
        "decoded": summary["hash_cache"]["decoded"],
    }


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return wall, result.stdout


def one_round(dataset: Path, scratch: Path, methods: list[str]) -> dict[str, dict]:
    """Run every method once; returns {method: {"wall_s", ...counts}}."""
    results: dict[str, dict] = {}
    out = scratch / "kaedama"
    for method in methods:
        if method in BEAM_OPTIONS:
            shutil.rmtree(out, ignore_errors=True)
            wall, _ = _timed(_kaedama(dataset, out, BEAM_OPTIONS[method]), REPO)
            results[method] = {"wall_s": wall, **_kaedama_counts(out)}
        elif method in IN_PROCESS_OPTIONS:
            target = scratch / "in-process"
            shutil.rmtree(target, ignore_errors=True)
            cmd = [PY, "-m", "kaedama", "dedup", str(dataset), "--out", str(target), "--in-process"]
            wall, _ = _timed(cmd + IN_PROCESS_OPTIONS[method], REPO)
            results[method] = {"wall_s": wall, **_kaedama_counts(target)}
        elif method == "kaedama_beam_floor":
            one = scratch / "one-photo"
            if not one.exists():
                photo = next(p for p in sorted(dataset.rglob("*.jpg")))
                (one / "label").mkdir(parents=True)
                shutil.copy(photo, one / "label" / photo.name)
            target = scratch / "floor"
            shutil.rmtree(target, ignore_errors=True)
            wall, _ = _timed(_kaedama(one, target, []), REPO)
            results[method] = {"wall_s": wall, **_kaedama_counts(target)}
        elif method == "kaedama_beam_cached":
            cached = scratch / "cached"  # its own folder: other methods use other recipes
            if not (cached / "summary.json").exists():
                _timed(_kaedama(dataset, cached, []), REPO)
            wall, _ = _timed(_kaedama(dataset, cached, []), REPO)
            results[method] = {"wall_s": wall, **_kaedama_counts(cached)}
        elif method.startswith("kaedama_in_process_cached"):
            # A re-run over the same output folder (the hash cache answers every file).
            options = ["--same-shot", "descriptor"] if method.endswith("_descriptor") else []
            cached = scratch / method
            cmd = [PY, "-m", "kaedama", "dedup", str(dataset), "--out", str(cached)]
            cmd += ["--in-process", *options]
            if not (cached / "summary.json").exists():
                _timed(cmd, REPO)
            wall, _ = _timed(cmd, REPO)
            results[method] = {"wall_s": wall, **_kaedama_counts(cached)}
        elif method in ("imgdupes", "imgdupes_2proc"):
            cmd = [str(VENV_BIN / "imgdupes"), "--recursive", str(dataset), "phash", "4"]
            cmd.append("--no-cache")
            if method == "imgdupes_2proc":
                cmd += ["--num-proc", "2"]
            wall, stdout = _timed(cmd, scratch)
            results[method] = {"wall_s": wall, **_imgdupes_groups(stdout)}
        elif method == "imagededup":
            wall, stdout = _timed([PY, "-c", IMAGEDEDUP_SCRIPT, str(dataset)], scratch)
            results[method] = {"wall_s": wall, **json.loads(stdout.strip().splitlines()[-1])}
        else:
            raise ValueError(f"unknown method {method}")
        print(f"  {method}: {results[method]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    return results


def breakdown(dataset: Path) -> dict[str, float]:
    """kaedama's core steps in one process, no Beam: seconds per step."""
    from kaedama import storage
    from kaedama.dedup.decide import DedupConfig, Rejected, decide, near_pair_uris, with_descriptors
    from kaedama.dedup.hashing import describe_bytes, hash_image_bytes
    from kaedama.dedup.neighbors import find_pairs, hash_array
    from kaedama.dedup.review import render_report, thumbnail_data_uri
    from kaedama.images import ImageError
    from kaedama.manifest import read_input

    config = DedupConfig()
    recipe = config.recipe()
    steps: dict[str, float] = {}
    t = time.perf_counter()
    rows = read_input(str(dataset))
    steps["list"] = time.perf_counter() - t
    t = time.perf_counter()
    blobs = [(r.uri, r.label, storage.read_bytes(r.uri)) for r in rows]
    steps["read"] = time.perf_counter() - t

    def hash_all(recipe) -> tuple[list, list]:
        records, rejected = [], []
        for uri, label, data in blobs:
            try:
                records.append(hash_image_bytes(uri, label, data, recipe))
            except ImageError as exc:
                rejected.append(Rejected(uri, label, exc.reason, exc.message, len(data)))
        return records, rejected

    t = time.perf_counter()
    records, rejected = hash_all(recipe)
    steps["sha256+decode+hash"] = time.perf_counter() - t
    t = time.perf_counter()
    hash_all(DedupConfig(hash_method="exact").recipe())
    steps["sha256+decode+hash_exact"] = time.perf_counter() - t
    t = time.perf_counter()
    import imagehash

    from kaedama.images import decode

    for _, _, data in blobs:
        try:
            imagehash.phash(decode(data))
        except ImageError:
            continue
    steps["imagehash_phash_full_decode_only"] = time.perf_counter() - t
    t = time.perf_counter()
    found = find_pairs(hash_array([r.hash for r in records], recipe.bits), config.threshold)
    pairs = [(records[i].uri, records[j].uri, d) for i, j, d in found.tolist()]
    steps["pair_search"] = time.perf_counter() - t
    t = time.perf_counter()
    by_uri = {uri: data for uri, _, data in blobs}
    described = {uri: describe_bytes(by_uri[uri]) for uri in near_pair_uris(pairs)}
    records = with_descriptors(records, described)
    steps["describe_pair_images"] = time.perf_counter() - t
    t = time.perf_counter()
    result = decide(records, rejected, pairs, config)
    steps["decide"] = time.perf_counter() - t
    t = time.perf_counter()
    thumbs = {
        m["uri"]: thumbnail_data_uri(by_uri[m["uri"]])
        for c in result.clusters
        for m in c["members"]
    }
    render_report(result.clusters, result.summary, thumbs.get, rows=result.rows)
    steps["report"] = time.perf_counter() - t
    steps["images"] = len(records)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=CALTECH)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods",
        default="kaedama_beam,kaedama_beam_1thread,kaedama_beam_2proc,kaedama_beam_exact,"
        "kaedama_beam_cached,kaedama_beam_floor,kaedama_in_process,kaedama_in_process_exact,"
        "imgdupes,imgdupes_2proc,imagededup",
    )
    parser.add_argument("--breakdown", action="store_true", help="also time the core steps")
    args = parser.parse_args(argv)
    if not args.dataset.is_dir():
        print(f"dataset not found at {args.dataset} (needs ../shared/datasets)", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    available = []
    for m in methods:
        if m.startswith("imgdupes") and not (VENV_BIN / "imgdupes").exists():
            print(f"skipping {m}: imgdupes not installed", file=sys.stderr)
            continue
        if m == "imagededup" and subprocess.run([PY, "-c", "import imagededup"]).returncode:
            print("skipping imagededup: not installed", file=sys.stderr)
            continue
        available.append(m)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="kaedama-bench-dedup-") as tmp:
        for r in range(args.repeats):
            print(f"round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            rounds.append(one_round(args.dataset, Path(tmp), available))
    report: dict = {"dataset": str(args.dataset), "repeats": args.repeats, "cores": os.cpu_count()}
    medians = {m: statistics.median(r[m]["wall_s"] for r in rounds) for m in available}
    base = medians.get("imgdupes")
    report["methods"] = {
        m: {
            "median_wall_s": round(medians[m], 2),
            "runs_s": [round(r[m]["wall_s"], 2) for r in rounds],
            "vs_imgdupes": round(medians[m] / base, 2) if base else None,
            **{k: v for k, v in rounds[-1][m].items() if k != "wall_s"},
        }
        for m in available
    }
    if args.breakdown:
        report["kaedama_core_steps_s"] = {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in breakdown(args.dataset).items()
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
