"""Scale curve of the dedup job: wall time, memory and per-image cost at 10k, 50k, 100k images.

Datasets are built from Caltech-101 (9,145 photos) and cached under ``.bench/scale/``:

* **bases**, distinct pictures: each original, then its seven other dihedral
  transforms (mirror, flip, rotations, transposes) and two zoomed crops (centre, a
  corner), all re-encoded as JPEG; a mirrored or rotated photo has an unrelated
  64-bit pHash, so they behave as new photos (a few symmetric ones stay near);
* **near copies**, one item in ten: a base resized (40-80 %), re-encoded at JPEG
  quality 25-50, brightened (x1.1-1.3) or cropped (2-6 % off each side).

Item ``i`` of the sequence is the same for every size (seeded per item, generated in
parallel), so a dataset of ``N`` images is the sequence's first ``N`` items: about 10 %
near copies at every size, the originals first. The generated files live once in
``.bench/scale/pool-s<seed>/`` and each size is a folder of hard links to them
(``n<N>-s<seed>/<label>/<file>``), reused by later runs.

Per size, each method is a fresh process, timed from start to exit, output to a fresh
folder (no hash cache):

* ``in_process``: ``kaedama dedup SRC --out DST --in-process`` (the default engine for
  local data: forked hashing processes, one per core);
* ``beam``: ``python -m beam.dedup --input SRC --output DST --direct_num_workers 2
  --direct_running_mode multi_processing`` (the Beam job on the DirectRunner with two
  SDK worker processes);
* ``beam_dask`` (not in the default ``--methods``): the Beam job on Beam's DaskRunner
  with the ``LocalCluster`` it starts itself (one worker process per core) and
  ``--branches`` one per core, at most 4.

Memory: the process tree (the command and every descendant) is sampled with psutil
every ``--interval`` seconds (0.1); the table gives the peak over samples of the
tree's summed RSS (counts pages shared by forked workers once per process, so an
upper bound), of its summed PSS (shared pages split between the processes sharing
them: the tree's real footprint) and the largest single process's RSS. Spikes
shorter than the interval can be missed. CPU seconds are the children's user + system
time from ``resource.getrusage(RUSAGE_CHILDREN)`` (every descendant whose parent
waited for it).

Decide: the single-worker step holds every record. From the in-process run's outputs
(manifest, candidate pairs, hash cache) the bench rebuilds Decide's input exactly as
the Beam job's ``Gather`` hands it over (record tuples in chunks, rejected files,
pairs, descriptors of candidate images), measures it with ``tracemalloc``, then runs
the job's ``Decide`` function on it and takes the traced peak (inputs + working
memory + result): bytes per record, hence records per GiB of worker memory, the
size at which one Decide worker stops fitting. The pickled size of the input (what a
runner moves and decodes) is given too.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python bench/bench_scale.py --sizes 10000,50000,100000
    .venv/bin/python bench/bench_scale.py --sizes 500,1000     # smoke run
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
CACHE = REPO / ".bench" / "scale"
PY = sys.executable
GIB = 2**30
MIB = 2**20

# Distinct pictures made from each original, in the order they enter the sequence.
BASES = (
    "original",
    "mirror",
    "flip",
    "rot90",
    "rot180",
    "rot270",
    "transpose",
    "transverse",
    "zoom",
    "corner",
)
_TRANSPOSE = {
    "mirror": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip": Image.Transpose.FLIP_TOP_BOTTOM,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "transpose": Image.Transpose.TRANSPOSE,
    "transverse": Image.Transpose.TRANSVERSE,
}
NEAR = ("resize", "jpeg", "brightness", "crop")
# One item in NEAR_EVERY is a near copy of an earlier base.
NEAR_EVERY = 10
JPEG_QUALITY = 90

METHODS = {
    "in_process": lambda src, out: [
        PY,
        "-m",
        "kaedama",
        "dedup",
        str(src),
        "--out",
        str(out),
        "--in-process",
    ],
    "beam": lambda src, out: [
        PY,
        "-m",
        "beam.dedup",
        "--input",
        str(src),
        "--output",
        str(out),
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    ],
    "beam_dask": lambda src, out: [
        PY,
        "-m",
        "beam.dedup",
        "--input",
        str(src),
        "--output",
        str(out),
        "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
        # One branch per worker, at most 4: later shuffles grow with the branches.
        f"--branches={min(4, os.cpu_count() or 1)}",
    ],
}


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Item:
    """One file of the sequence: ``base`` of ``source``, then optionally a ``near`` change."""

    index: int
    source: str
    label: str
    base: str
    near: str = ""

    @property
    def name(self) -> str:
        stem = Path(self.source).stem
        if self.base == "original" and not self.near:
            return Path(self.source).name
        kind = f"{self.base}-{self.near}" if self.near else self.base
        return f"{stem}-{kind}-{self.index:06d}.jpg"

    @property
    def rel(self) -> str:
        return f"{self.label}/{self.name}"


def originals(root: Path) -> list[Path]:
    """Every file of the dataset, sorted (Caltech-101: 9,145 JPEGs in 102 folders)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def plan(sources: list[Path], n: int, seed: int) -> list[Item]:
    """The first ``n`` items of the sequence (the same prefix for every ``n``)."""
    capacity = len(sources) * len(BASES) * NEAR_EVERY // (NEAR_EVERY - 1)
    if n > capacity:
        raise SystemExit(f"at most {capacity} images can be made from {len(sources)} originals")
    order = list(sources)
    random.Random(seed).shuffle(order)
    pick = random.Random(seed + 1)
    items: list[Item] = []
    bases: list[Item] = []
    for index in range(n):
        if index % NEAR_EVERY == NEAR_EVERY - 1:
            target = bases[pick.randrange(len(bases))]
            kind = NEAR[(index // NEAR_EVERY) % len(NEAR)]
            items.append(Item(index, target.source, target.label, target.base, kind))
            continue
        k = len(bases)
        source = order[k % len(order)]
        base = Item(index, str(source), source.parent.name, BASES[k // len(order)])
        bases.append(base)
        items.append(base)
    return items


def _derive(item: Item, seed: int) -> bytes:
    """The bytes of ``item``: its base transform, its near change, JPEG-encoded."""
    data = Path(item.source).read_bytes()
    if item.base == "original" and not item.near:
        return data
    rng = random.Random(f"{seed}-{item.index}")
    with Image.open(item.source) as opened:
        image = ImageOps.exif_transpose(opened)
        image = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    if item.base in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[item.base])
    elif item.base in ("zoom", "corner"):
        w, h = image.size
        cw, ch = max(1, int(w * 0.7)), max(1, int(h * 0.7))
        if item.base == "zoom":
            x, y = (w - cw) // 2, (h - ch) // 2
        else:
            x, y = rng.choice([(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)])
        image = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
    quality = JPEG_QUALITY
    if item.near == "resize":
        scale = rng.uniform(0.4, 0.8)
        size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    elif item.near == "jpeg":
        quality = rng.randint(25, 50)
    elif item.near == "brightness":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(1.1, 1.3))
    elif item.near == "crop":
        w, h = image.size
        dx, dy = round(w * rng.uniform(0.02, 0.06)), round(h * rng.uniform(0.02, 0.06))
        image = image.crop((dx, dy, w - dx, h - dy))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _make(args: tuple[Item, Path, int]) -> int:
    item, pool, seed = args
    target = pool / item.rel
    if target.exists():
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(_derive(item, seed))
    tmp.rename(target)  # atomic: an interrupted run leaves no half-written image
    return 1


def build_dataset(items: list[Item], seed: int, workers: int) -> Path:
    """The folder of the first ``len(items)`` items, generating missing pool files first."""
    n = len(items)
    folder = CACHE / f"n{n}-s{seed}"
    done = CACHE / f"n{n}-s{seed}.done"
    if done.exists():
        return folder
    pool = CACHE / f"pool-s{seed}"
    missing = [item for item in items if not (pool / item.rel).exists()]
    if missing:
        need = len(missing) * 20_000  # ~16 KB per Caltech JPEG, with margin
        free = shutil.disk_usage(CACHE).free
        if need > free:
            raise SystemExit(f"need ~{need / GIB:.1f} GiB under {CACHE}, {free / GIB:.1f} free")
        context = multiprocessing.get_context("fork")
        with context.Pool(workers) as procs:
            jobs = procs.imap_unordered(_make, [(i, pool, seed) for i in missing], chunksize=64)
            for _ in tqdm(jobs, total=len(missing), desc=f"generate {len(missing)} images"):
                pass
    shutil.rmtree(folder, ignore_errors=True)
    for item in items:
        target = folder / item.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(pool / item.rel, target)
        except OSError:  # another filesystem: copy
            shutil.copyfile(pool / item.rel, target)
    done.write_text(json.dumps({"images": n, "seed": seed}) + "\n")
    return folder


# --------------------------------------------------------------------------- runs


class TreeSampler:
    """Peak memory of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_single = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = single = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                single = max(single, info.rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_single = max(self.peak_single, single)
            self.max_processes = max(self.max_processes, len(procs))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, src: Path, out: Path, n: int, interval: float) -> dict:
    """Run one method as a fresh process; wall, CPU, peak memory and the summary counts."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    cpu = _cpu_children()
    start = time.perf_counter()
    with open(log, "wb") as stderr:
        proc = psutil.Popen(
            METHODS[method](src, out),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
        sampler = TreeSampler(proc.pid, interval)
        rc = proc.wait()
        wall = time.perf_counter() - start
        sampler.stop()
    if rc != 0:
        tail = log.read_text("utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{method} on {n} images failed ({rc}):\n{tail}")
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    return {
        "method": method,
        "images": n,
        "wall_s": round(wall, 2),
        "ms_per_image": round(wall / n * 1000, 3),
        "cpu_s": round(_cpu_children() - cpu, 2),
        "peak_tree_rss_mib": round(sampler.peak_rss / MIB, 1),
        "peak_tree_pss_mib": round(sampler.peak_pss / MIB, 1),
        "peak_process_rss_mib": round(sampler.peak_single / MIB, 1),
        "processes": sampler.max_processes,
        "candidate_pairs": summary["candidate_pairs"],
        "clusters": summary["clusters"],
        "dropped": summary["dropped"],
        "rejected": summary["rejected"],
        # Equal across methods: the engines write byte-identical manifests.
        "manifest_sha256": hashlib.sha256((out / "manifest.jsonl").read_bytes()).hexdigest()[:16],
    }


# --------------------------------------------------------------------------- Decide memory


def gathered_from_outputs(out: Path):
    """Decide's input as the Beam job's ``Gather`` hands it over, rebuilt from a run's outputs."""
    from kaedama.dedup.decide import DedupConfig, Rejected
    from kaedama.dedup.hashcache import HashCache
    from kaedama.dedup.job import CHUNK, default_cache_uri
    from kaedama.manifest import read_manifest

    manifest = read_manifest(str(out / "manifest.jsonl"))
    records, rejected, sha_of = [], [], {}
    for row in manifest.rows:
        if row.status == "rejected":
            message = row.extra.get("message", "")
            rejected.append(Rejected(row.uri, row.label, row.reason, message, row.bytes))
            continue
        sha_of[row.uri] = row.sha256
        # kaedama.dedup.job.record_to_tuple's layout; no descriptor, mtime 0 (exact_keep first).
        records.append(
            (row.uri, row.label, row.sha256, row.bytes, row.width, row.height, row.phash, b"", 0.0)
        )
    chunks = [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)]
    pairs = []
    with open(out / "candidates.jsonl", encoding="utf-8") as lines:
        for line in lines:
            pair = json.loads(line)
            pairs.append((pair["a"], pair["b"], pair["distance"]))
    config = DedupConfig()
    cache = HashCache.load(default_cache_uri(str(out), config))
    recipe = config.recipe()
    descriptors = []
    for uri in sorted({u for a, b, _ in pairs if sha_of[a] != sha_of[b] for u in (a, b)}):
        hit = cache.get(sha_of[uri], recipe)
        descriptors.append((uri, sha_of[uri], hit.descriptor if hit else b""))
    listed = [len(manifest.rows)]  # the listing's count, as CountListed hands it over
    return {
        "records": chunks,
        "rejected": rejected,
        "pairs": pairs,
        "descriptors": descriptors,
        "listed": listed,
    }


def decide_memory(out: Path) -> dict:
    """Traced memory of Decide's input and of the Decide step on it, per record."""
    from beam.dedup import _decide
    from kaedama.dedup.decide import DedupConfig

    config = DedupConfig()
    gc.collect()
    tracemalloc.start()
    gathered = gathered_from_outputs(out)
    gc.collect()
    inputs = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = _decide(gathered, config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    start = time.perf_counter()
    _decide(gathered, config)  # untraced, for its time
    seconds = time.perf_counter() - start
    pickled = len(pickle.dumps(gathered, protocol=pickle.HIGHEST_PROTOCOL))
    records = sum(len(chunk) for chunk in gathered["records"]) + len(gathered["rejected"])
    per_record = peak / records
    return {
        "records": records,
        "pairs": len(gathered["pairs"]),
        "described": len(gathered["descriptors"]),
        "input_bytes_per_record": round(inputs / records),
        "peak_bytes_per_record": round(per_record),
        "pickled_bytes_per_record": round(pickled / records),
        "records_per_gib": int(GIB / per_record),
        "decide_s": round(seconds, 2),
    }


# --------------------------------------------------------------------------- main


def _table(runs: list[dict], decides: list[dict]) -> str:
    lines = [
        "| N | method | wall s | ms/image | CPU s | peak tree RSS MiB | peak tree PSS MiB "
        "| largest process RSS MiB | candidate pairs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['images']} | {r['method']} | {r['wall_s']} | {r['ms_per_image']} "
            f"| {r['cpu_s']} | {r['peak_tree_rss_mib']} | {r['peak_tree_pss_mib']} "
            f"| {r['peak_process_rss_mib']} | {r['candidate_pairs']} |"
        )
    lines += [
        "",
        "| N | pairs | described | Decide input B/record | Decide peak B/record "
        "| pickled B/record | records per GiB | Decide s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in decides:
        lines.append(
            f"| {d['records']} | {d['pairs']} | {d['described']} "
            f"| {d['input_bytes_per_record']} | {d['peak_bytes_per_record']} "
            f"| {d['pickled_bytes_per_record']} | {d['records_per_gib']:,} | {d['decide_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10000,50000,100000", help="dataset sizes, comma-separated"
    )
    parser.add_argument("--methods", default="in_process,beam", help=f"of {','.join(METHODS)}")
    parser.add_argument("--source", type=Path, default=CALTECH, help="folder of original photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="generation processes"
    )
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling period, s")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"{args.source} not found (the project's machines have it)", file=sys.stderr)
        return 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    sources = originals(args.source)
    sequence = plan(sources, sizes[-1], args.seed)
    runs, decides = [], []
    for n in sizes:
        src = build_dataset(sequence[:n], args.seed, args.workers)
        for method in methods:
            out = CACHE / "runs" / f"{method}-n{n}"
            run = measure(method, src, out, n, args.interval)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
            if method == methods[0]:
                decide = {"images": n, **decide_memory(out)}
                print(json.dumps(decide), file=sys.stderr, flush=True)
                decides.append(decide)
            shutil.rmtree(out)
    digests = {(r["images"], r["manifest_sha256"]) for r in runs}
    if len(digests) != len(sizes):
        print("warning: the methods wrote different manifests", file=sys.stderr)
    result = {
        "source": str(args.source),
        "originals": len(sources),
        "seed": args.seed,
        "near_share": 1 / NEAR_EVERY,
        "cpus": os.cpu_count(),
        "runs": runs,
        "decide": decides,
        "decide_workers": {
            f"{gib} GiB": int(gib * decides[-1]["records_per_gib"]) for gib in (4, 16, 64)
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(_table(runs, decides), file=sys.stderr)
    print(
        "Decide fits one worker up to about "
        + ", ".join(f"{v:,} records in {k}" for k, v in result["decide_workers"].items())
        + f" (at N={decides[-1]['images']}, {decides[-1]['pairs']} pairs)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
