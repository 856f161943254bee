"""The dedup job on Apache Beam: hash every file, find exact and near-duplicates, decide.

Run it with ``python -m beam.dedup --input SRC --output DST [DedupConfig flags] [Beam
options]`` or through ``kaedama dedup SRC --out DST``. The steps (named as they appear
in a runner's UI)::

    ListInputs      every file under an ImageFolder root (label = parent folder), or the
                    rows of a CSV/JSONL list; spread over workers
    ReadAndHash     read, sha256, decode (reduced-size JPEG decode), perceptual hash;
                    unreadable files and non-images go to the tagged 'rejected' output
    ExactGroups     group identical bytes (sha256): every identical pair, distance 0
    NearCandidates  each distinct file under its t + 1 hash-block keys -> GroupByKey ->
                    exact Hamming check per bucket (kaedama.neighbors.pairs_in_bucket)
    Decide          one worker: kaedama.dedup.decide over all records and pairs
    WriteOutputs    manifest, clusters, candidates, rejected, summary, hash cache and the
                    HTML review page (thumbnails made in parallel); optional copies

All logic lives in the core library (``kaedama.hashing``, ``kaedama.neighbors``,
``kaedama.dedup``, ``kaedama.report``); this module only wires it into transforms.
Outputs go through ``kaedama.storage``, so input and output may be local or ``gs://``.

:func:`run_in_process` runs the same per-file and output functions without Beam, for
local datasets on one machine (``kaedama dedup --in-process``); its outputs are
byte-identical to the Beam job's (tested), it only skips the runner's overheads.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import posixpath
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions
from apache_beam.pvalue import AsSingleton, TaggedOutput
from apache_beam.utils import shared

from beam.gcs import use_emulator_if_configured
from kaedama import storage
from kaedama.config import ConfigError, add_config_arguments, build_config
from kaedama.dedup import DedupConfig, DedupResult, Rejected, decide, manifest_header, run_local
from kaedama.errors import KaedamaError
from kaedama.hashcache import HashCache
from kaedama.hashing import HashRecipe, ImageRecord, hash_image_bytes
from kaedama.images import ImageError
from kaedama.manifest import read_input, write_manifest
from kaedama.neighbors import block_keys, pairs_in_bucket
from kaedama.report import render_report, thumbnail_data_uri

if __name__ == "__main__":
    # ``python -m beam.dedup``: run the importable module instead of this __main__ copy.
    # Workers in other processes unpickle the job's classes by module name (beam.dedup),
    # and defining DedupOptions twice would clash in Beam's option parser.
    from beam.dedup import main as _main

    sys.exit(_main())

log = logging.getLogger(__name__)

REJECTED = "rejected"
# Reason recorded for a file that is listed but cannot be read at all (storage error).
UNREADABLE = "unreadable"

MANIFEST_NAME = "manifest.jsonl"
CLUSTERS_NAME = "clusters.jsonl"
CANDIDATES_NAME = "candidates.jsonl"
REJECTED_NAME = "rejected.jsonl"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.html"
DEFAULT_THUMBNAIL = 128
# With no --runner, run the DirectRunner's batch engine directly. Beam 2.77's
# DirectRunner first tries the Prism runner, which downloads a binary from GitHub on
# first use: offline that costs a failed download on every run before it falls back.
DEFAULT_RUNNER = "FnApiRunner"


class DedupJobError(KaedamaError):
    """The job's arguments are inconsistent (e.g. the output lies inside the input)."""


@dataclass(frozen=True)
class JobPaths:
    """Where the job reads and writes.

    Attributes:
        input: ImageFolder root or CSV/JSONL list (local or gs://).
        output: folder for the outputs.
        cache: hash cache file; default ``<output>/cache/hashes-<recipe key>.npz``.
        materialize: optional prefix to copy kept images to (``<prefix>/<label>/<name>``).
        thumbnail_size: longest side of the review page's thumbnails, in pixels.
    """

    input: str
    output: str
    cache: str = ""
    materialize: str = ""
    thumbnail_size: int = DEFAULT_THUMBNAIL


def default_cache_uri(output: str, config: DedupConfig) -> str:
    """The hash cache next to the outputs, named by the hash recipe."""
    return storage.join(output, "cache", f"hashes-{config.recipe().key()}.npz")


def is_list_input(source: str) -> bool:
    """True when the input is a CSV/JSONL list of files rather than an ImageFolder root."""
    return source.lower().endswith((".csv", ".jsonl", ".ndjson")) and not source.endswith("/")


def _normal(uri: str) -> str:
    return uri.rstrip("/") if storage.is_gcs(uri) else os.path.abspath(uri)


def _inside(child: str, parent: str) -> bool:
    child, parent = _normal(child), _normal(parent)
    return child == parent or child.startswith(parent + "/")


def check_paths(paths: JobPaths) -> None:
    """Refuse outputs that would touch or be re-listed as sources.

    Raises:
        DedupJobError: the output, the cache or the materialize prefix lies inside the
            input folder (or the reverse), so a re-run would hash its own outputs.
    """
    if is_list_input(paths.input):
        # The sources are the listed URIs; plan_copies checks materialize targets against them.
        return
    targets = (
        ("--output", paths.output),
        ("--cache", paths.cache),
        ("--materialize", paths.materialize),
    )
    for name, target in targets:
        if target and (_inside(target, paths.input) or _inside(paths.input, target)):
            raise DedupJobError(
                f"{name} {target} overlaps the input folder {paths.input}: the job never "
                "writes into its sources and would list its own outputs as images next time; "
                "choose a folder outside the input"
            )


# --------------------------------------------------------------------------- ListInputs


def _list_inputs(source: str) -> list[tuple[str, str]]:
    return [(row.uri, row.label) for row in read_input(source)]


class ListInputs(beam.PTransform):
    """``(uri, label)`` for every file under an ImageFolder root, or every row of a list."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def expand(self, pbegin):
        return (
            pbegin
            | "Source" >> beam.Create([self.source])
            | "List" >> beam.FlatMap(_list_inputs)
            # One listing element fans out to every file: spread them over workers.
            | "Spread" >> beam.Reshuffle()
        )


# --------------------------------------------------------------------------- ReadAndHash


def fingerprint(
    item: tuple[str, str],
    config: DedupConfig,
    recipe: HashRecipe,
    cache: HashCache | None = None,
) -> ImageRecord | Rejected:
    """Read one file and fingerprint it, or say why it cannot be: never raises for a bad file.

    Returns:
        The :class:`ImageRecord`, or a :class:`Rejected` with the decoder's reason
        (``unreadable`` when storage could not read the file at all).
    """
    uri, label = item
    try:
        data = storage.read_bytes(uri)
        mtime = storage.stat(uri).mtime if config.exact_keep == "oldest" else 0.0
    except storage.StorageError as exc:
        return Rejected(uri, label, UNREADABLE, str(exc))
    try:
        return hash_image_bytes(
            uri, label, data, recipe, max_pixels=config.max_pixels, mtime=mtime, cache=cache
        )
    except ImageError as exc:
        return Rejected(uri, label, exc.reason, exc.message, len(data))


class HashFile(beam.DoFn):
    """Read one file and fingerprint it; unreadable files and non-images are tagged out.

    Main output: :class:`kaedama.hashing.ImageRecord`. Tagged output ``rejected``:
    :class:`kaedama.dedup.Rejected` with the decoder's reason (or ``unreadable``).
    """

    def __init__(self, config: DedupConfig, cache_uri: str = "") -> None:
        self.config = config
        self.cache_uri = cache_uri
        # One cache per worker process, shared by the DoFn instances of all its threads.
        self._shared_cache = shared.Shared()
        self._cache: HashCache | None = None
        self._files = Metrics.counter("dedup", "files")
        self._rejected = Metrics.counter("dedup", "rejected")

    def setup(self) -> None:
        self._recipe = self.config.recipe()
        if self.cache_uri:
            uri = self.cache_uri
            # Read-only in effect: WriteOutputs merges every record back into the file.
            self._cache = self._shared_cache.acquire(lambda: HashCache.load(uri), tag=uri)

    def process(self, item: tuple[str, str]) -> Iterator[Any]:
        self._files.inc()
        out = fingerprint(item, self.config, self._recipe, self._cache)
        if isinstance(out, Rejected):
            self._rejected.inc()
            yield TaggedOutput(REJECTED, out)
        else:
            yield out


class ReadAndHash(beam.PTransform):
    """``(uri, label)`` -> records (main) and ``rejected`` (tagged) outputs."""

    def __init__(self, config: DedupConfig, cache_uri: str = "") -> None:
        super().__init__()
        self.config = config
        self.cache_uri = cache_uri

    def expand(self, inputs):
        return inputs | "Hash" >> beam.ParDo(HashFile(self.config, self.cache_uri)).with_outputs(
            REJECTED, main="records"
        )


# --------------------------------------------------------------------------- ExactGroups


# A group of files with identical bytes: (sha256, hash, sorted URIs). Plain tuples
# keep Beam's coder on its fast path (no pickling) through the shuffles below.
Group = tuple[str, int, tuple[str, ...]]


def _to_group(item: tuple[str, Iterable[tuple[str, int]]]) -> Group:
    sha, members = item
    members = sorted(members)
    return (sha, members[0][1], tuple(uri for uri, _ in members))


def _identical_pairs(group: Group) -> Iterator[tuple[str, str, int]]:
    uris = group[2]
    for i, a in enumerate(uris):
        for b in uris[i + 1 :]:
            yield (a, b, 0)


class ExactGroups(beam.PTransform):
    """Records -> one group ``(sha256, hash, uris)`` per distinct sha256."""

    def expand(self, records):
        return (
            records
            | "KeyBySha" >> beam.Map(lambda r: (r.sha256, (r.uri, r.hash)))
            | "GroupBySha" >> beam.GroupByKey()
            | "ToGroup" >> beam.Map(_to_group)
        )


# --------------------------------------------------------------------------- NearCandidates


class _VerifyBucket(beam.DoFn):
    """Exact Hamming check of one bucket; each pair is reported from one bucket only."""

    def __init__(self, threshold: int, bits: int, max_bucket: int) -> None:
        self.threshold = threshold
        self.bits = bits
        self.max_bucket = max_bucket

    def process(self, item: tuple[tuple[int, int], Iterable[Group]]):
        (block, _), groups = item
        groups = list(groups)
        if len(groups) < 2:
            return
        by_sha = {sha: (h, uris) for sha, h, uris in groups}
        found = pairs_in_bucket(
            [(sha, h) for sha, (h, _) in by_sha.items()],
            self.threshold,
            max_bucket=self.max_bucket,
        )
        for sha_a, sha_b, dist in found:
            (ha, uris_a), (hb, uris_b) = by_sha[sha_a], by_sha[sha_b]
            if block and self._share_earlier_block(ha, hb, block):
                continue  # the bucket of the first shared block reports this pair
            for a in uris_a:
                for b in uris_b:
                    yield (a, b, dist) if a < b else (b, a, dist)

    def _share_earlier_block(self, ha: int, hb: int, block: int) -> bool:
        ka = block_keys(ha, self.threshold, self.bits)[:block]
        kb = block_keys(hb, self.threshold, self.bits)[:block]
        return any(x == y for x, y in zip(ka, kb, strict=True))


class NearCandidates(beam.PTransform):
    """Groups -> every ``(uri_a, uri_b, distance)`` within ``threshold``, a < b, once.

    Multi-index hashing: a hash split into ``t + 1`` blocks shares at least one whole
    block with every hash within distance ``t`` (pigeonhole), so each distinct file is
    emitted under its ``t + 1`` block keys and each bucket is verified exactly.
    """

    def __init__(self, threshold: int, bits: int, max_bucket: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.bits = bits
        self.max_bucket = max_bucket

    def expand(self, groups):
        threshold, bits = self.threshold, self.bits
        return (
            groups
            | "BlockKeys"
            >> beam.FlatMap(lambda g: ((key, g) for key in block_keys(g[1], threshold, bits)))
            | "GroupByBlock" >> beam.GroupByKey()
            | "VerifyBuckets"
            >> beam.ParDo(_VerifyBucket(self.threshold, self.bits, self.max_bucket))
        )


# --------------------------------------------------------------------------- Decide


def _decide(
    records: list[ImageRecord],
    rejected: list[Rejected],
    pairs: list[tuple[str, str, int]],
    config: DedupConfig,
) -> DedupResult:
    log.info(
        "deciding over %d images, %d rejected, %d candidate pairs",
        len(records),
        len(rejected),
        len(pairs),
    )
    return decide(records, rejected, pairs, config)


class Decide(beam.PTransform):
    """Gather records, rejected files and pairs on one worker and call ``decide``.

    Takes a dict ``{"records", "rejected", "pairs"}`` of PCollections; returns a
    single-element PCollection holding the :class:`kaedama.dedup.DedupResult`.
    """

    def __init__(self, config: DedupConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, pcolls):
        records = pcolls["records"] | "GatherRecords" >> beam.combiners.ToList()
        rejected = pcolls["rejected"] | "GatherRejected" >> beam.combiners.ToList()
        pairs = pcolls["pairs"] | "GatherPairs" >> beam.combiners.ToList()
        return records | "Decide" >> beam.Map(
            _decide, AsSingleton(rejected), AsSingleton(pairs), self.config
        )


# --------------------------------------------------------------------------- WriteOutputs


def _jsonl(items: Iterable[Any]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def _candidate_json(pair: Sequence[Any]) -> dict[str, Any]:
    a, b, dist, sim, ok = pair
    return {"a": a, "b": b, "distance": dist, "similarity": sim, "confirmed": ok}


def _rejected_json(row) -> dict[str, Any]:
    return {
        "uri": row.uri,
        "label": row.label,
        "reason": row.reason,
        "message": row.extra.get("message", ""),
        "bytes": row.bytes,
    }


def update_cache(new: HashCache, cache_uri: str) -> dict[str, Any]:
    """Merge this run's fingerprints into the cache file; returns hit/decode counts."""
    cache = HashCache.load(cache_uri)
    before = len(cache)
    hits = sum(1 for key, _ in new.items() if key in cache)
    if hits < len(new) or not storage.exists(cache_uri):
        # Rewrite the file only when something was added: it is the job's largest output.
        cache.update(new)
        cache.save(cache_uri)
    return {
        "uri": cache_uri,
        "hits": hits,
        "decoded": len(new) - hits,
        "entries_before": before,
        "entries": len(cache),
    }


class CollectCache(beam.CombineFn):
    """Records -> a :class:`HashCache` of their fingerprints (partial caches merge)."""

    def __init__(self, recipe_key: str) -> None:
        self.recipe_key = recipe_key

    def create_accumulator(self) -> HashCache:
        return HashCache()

    def add_input(self, cache: HashCache, record: ImageRecord) -> HashCache:
        cache.put(
            record.sha256,
            self.recipe_key,
            record.width,
            record.height,
            record.hash,
            record.descriptor,
        )
        return cache

    def merge_accumulators(self, caches: Iterable[HashCache]) -> HashCache:
        caches = iter(caches)
        merged = next(caches)
        for cache in caches:
            merged.update(cache)
        return merged

    def extract_output(self, cache: HashCache) -> HashCache:
        return cache


def plan_copies(result: DedupResult, paths: JobPaths) -> list[tuple[str, str]]:
    """``(source, destination)`` for every kept image under ``paths.materialize``.

    ImageFolder inputs keep their relative layout; list inputs go to
    ``<prefix>/<label>/<file name>``, with the sha256 prefixed when two names collide.
    """
    if not paths.materialize:
        return []
    folder = not is_list_input(paths.input)
    sources = {row.uri for row in result.rows}
    copies: list[tuple[str, str]] = []
    taken: set[str] = set()
    for row in result.rows:
        if row.status != "kept":
            continue
        if folder:
            rel = storage.relative_to(row.uri, paths.input)
        else:
            rel = posixpath.join(row.label, posixpath.basename(row.uri.rstrip("/")))
        if rel in taken:
            head, tail = posixpath.split(rel)
            rel = posixpath.join(head, f"{row.sha256[:12]}-{tail}")
        taken.add(rel)
        target = storage.join(paths.materialize, rel)
        if target in sources:
            raise DedupJobError(
                f"--materialize would overwrite the input file {target}; choose a prefix "
                "outside the input files' folders"
            )
        copies.append((row.uri, target))
    return copies


def write_outputs(
    result: DedupResult,
    thumbnails: dict[str, str | None],
    cache_stats: dict[str, Any],
    paths: JobPaths,
    config: DedupConfig,
) -> dict[str, Any]:
    """Write every output file of the job to ``paths.output``; returns the summary."""
    out = paths.output
    summary = dict(result.summary)
    summary["input_uri"] = paths.input
    summary["hash_cache"] = cache_stats
    if paths.materialize:
        summary["materialized"] = {"prefix": paths.materialize, "copied": summary["kept"]}
    write_manifest(storage.join(out, MANIFEST_NAME), result.rows, manifest_header(config))
    storage.write_text(storage.join(out, CLUSTERS_NAME), _jsonl(result.clusters))
    storage.write_text(
        storage.join(out, CANDIDATES_NAME), _jsonl(map(_candidate_json, result.candidate_pairs))
    )
    storage.write_text(
        storage.join(out, REJECTED_NAME),
        _jsonl(_rejected_json(r) for r in result.rows if r.status == "rejected"),
    )
    storage.write_text(
        storage.join(out, SUMMARY_NAME), json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
    )
    html = render_report(result.clusters, summary, thumbnails.get, rows=result.rows)
    storage.write_text(storage.join(out, REPORT_NAME), html)
    return summary


def _cluster_uris(result: DedupResult) -> Iterator[str]:
    for cluster in result.clusters:
        for member in cluster["members"]:
            yield member["uri"]


def thumbnail(uri: str, size: int, max_pixels: int) -> tuple[str, str | None]:
    """``(uri, data URI of its thumbnail)``; None (a placeholder on the page) if unreadable."""
    try:
        return uri, thumbnail_data_uri(storage.read_bytes(uri), size=size, max_pixels=max_pixels)
    except (storage.StorageError, ImageError) as exc:
        # The file was hashed earlier in the job, so this is rare (e.g. deleted meanwhile).
        log.warning("no thumbnail for %s: %s", uri, exc)
        return uri, None


def _copy(pair: tuple[str, str]) -> str:
    storage.copy(pair[0], pair[1])
    return pair[1]


class WriteOutputs(beam.PTransform):
    """Thumbnails (parallel), then every output file; optional copies of kept images.

    Takes ``{"result": <DedupResult>, "records": <records>}``; returns the summary.
    """

    def __init__(self, paths: JobPaths, config: DedupConfig) -> None:
        super().__init__()
        self.paths = paths
        self.config = config

    def expand(self, pcolls):
        result = pcolls["result"]
        cache_stats = (
            pcolls["records"]
            | "CollectCache" >> beam.CombineGlobally(CollectCache(self.config.recipe().key()))
            | "SaveCache" >> beam.Map(update_cache, self.paths.cache)
        )
        thumbs = (
            result
            | "ClusterMembers" >> beam.FlatMap(_cluster_uris)
            | "SpreadThumbnails" >> beam.Reshuffle()
            | "Thumbnails" >> beam.Map(thumbnail, self.paths.thumbnail_size, self.config.max_pixels)
            | "GatherThumbnails" >> beam.combiners.ToDict()
        )
        if self.paths.materialize:
            paths = self.paths
            (
                result
                | "PlanCopies" >> beam.FlatMap(plan_copies, paths)
                | "SpreadCopies" >> beam.Reshuffle()
                | "CopyKept" >> beam.Map(_copy)
            )
        return result | "Write" >> beam.Map(
            write_outputs, AsSingleton(thumbs), AsSingleton(cache_stats), self.paths, self.config
        )


# --------------------------------------------------------------------------- the pipeline


class Dedup(beam.PTransform):
    """The whole job as one composite: ListInputs -> ... -> WriteOutputs."""

    def __init__(self, paths: JobPaths, config: DedupConfig) -> None:
        super().__init__()
        self.paths = paths
        self.config = config

    def expand(self, pbegin):
        config = self.config
        inputs = pbegin | "ListInputs" >> ListInputs(self.paths.input)
        hashed = inputs | "ReadAndHash" >> ReadAndHash(config, self.paths.cache)
        records, rejected = hashed.records, hashed[REJECTED]
        groups = records | "ExactGroups" >> ExactGroups()
        identical = groups | "IdenticalPairs" >> beam.FlatMap(_identical_pairs)
        near = groups | "NearCandidates" >> NearCandidates(
            config.threshold, config.recipe().bits, config.max_bucket
        )
        pairs = (identical, near) | "AllPairs" >> beam.Flatten()
        result = {"records": records, "rejected": rejected, "pairs": pairs} | "Decide" >> Decide(
            config
        )
        return {"result": result, "records": records} | "WriteOutputs" >> WriteOutputs(
            self.paths, config
        )


# --------------------------------------------------------------------------- in process


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(config: DedupConfig, cache: HashCache) -> None:
    _WORKER_STATE.update(config=config, recipe=config.recipe(), cache=cache)


def _fingerprint_in_worker(item: tuple[str, str]) -> ImageRecord | Rejected:
    state = _WORKER_STATE
    return fingerprint(item, state["config"], state["recipe"], state["cache"])


def _is_local(uri: str) -> bool:
    return not uri or "://" not in uri


def run_in_process(paths: JobPaths, config: DedupConfig, *, workers: int = 0) -> dict[str, Any]:
    """The same job without Beam, on this machine: same core calls, identical outputs.

    For local inputs where a runner's start-up and per-element costs dominate (a few
    thousand photos on a laptop). Each step calls the function the Beam job calls:
    :func:`fingerprint` per file (in a pool of forked processes), then
    :func:`kaedama.dedup.run_local` (the in-memory exact pair search, which finds the
    same pairs as ListInputs..NearCandidates, and ``decide``), :func:`thumbnail`,
    :func:`update_cache`, :func:`write_outputs` and :func:`plan_copies`.

    Args:
        paths: local input, output, cache and materialize paths.
        config: the dedup settings.
        workers: processes for hashing and thumbnails (0 = one per core).

    Returns:
        The summary, as written to ``summary.json``.
    """
    if not all(_is_local(u) for u in (paths.input, paths.output, paths.cache, paths.materialize)):
        raise DedupJobError(
            "the in-process engine reads and writes local paths only; run the Beam job "
            "(without --in-process) for gs:// inputs or outputs"
        )
    check_paths(paths)
    clock = _PhaseClock()
    items = _list_inputs(paths.input)
    cache = HashCache.load(paths.cache)
    clock.lap("list + load cache")
    processes = max(1, workers or os.cpu_count() or 1)
    # fork: workers inherit the imported modules and the loaded cache, no re-import.
    context = multiprocessing.get_context("fork")
    with context.Pool(processes, initializer=_init_worker, initargs=(config, cache)) as pool:
        chunk = max(1, len(items) // (processes * 16))
        outs = pool.map(_fingerprint_in_worker, items, chunksize=chunk)
        records = [o for o in outs if isinstance(o, ImageRecord)]
        rejected = [o for o in outs if isinstance(o, Rejected)]
        clock.lap(f"read + hash {len(items)} files in {processes} processes")
        result = run_local(records, rejected, config)
        clock.lap("pair search + decide")
        thumbs = dict(
            pool.starmap(
                thumbnail,
                [(uri, paths.thumbnail_size, config.max_pixels) for uri in _cluster_uris(result)],
            )
        )
        pool.starmap(storage.copy, plan_copies(result, paths))
        clock.lap("thumbnails + copies")
    collect = CollectCache(config.recipe().key())
    new = collect.create_accumulator()
    for record in records:
        collect.add_input(new, record)
    summary = write_outputs(result, thumbs, update_cache(new, paths.cache), paths, config)
    clock.lap("cache + outputs")
    return summary


class _PhaseClock:
    """Logs how long each phase of the in-process engine took (where the time goes)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        log.info("%s: %.2f s", what, now - self.last)
        self.last = now


class DedupOptions(PipelineOptions):
    """``--input``/``--output`` and one option per :class:`kaedama.dedup.DedupConfig` field."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input", help="ImageFolder root (label = parent folder) or CSV/JSONL list"
        )
        parser.add_argument("--output", help="output folder (local or gs://)")
        parser.add_argument(
            "--cache",
            help="hash cache file to read and update (default: OUTPUT/cache/hashes-<recipe>.npz)",
        )
        parser.add_argument("--materialize", help="copy (never move) kept images under PREFIX")
        parser.add_argument(
            "--thumbnail_size",
            type=int,
            help=f"review page thumbnail size in pixels (default {DEFAULT_THUMBNAIL})",
        )
        parser.add_argument("--dedup_config", help="YAML file with DedupConfig fields")
        add_config_arguments(parser, DedupConfig)


def config_from_options(options: DedupOptions) -> DedupConfig:
    """The :class:`DedupConfig` given by the options (YAML file < flags)."""
    values = {k: v for k, v in options.get_all_options().items() if v is not None}
    return build_config(
        DedupConfig, file=values.get("dedup_config"), args=argparse.Namespace(**values)
    )


def paths_from_options(options: DedupOptions, config: DedupConfig) -> JobPaths:
    """The job's :class:`JobPaths`, with the default cache location filled in."""
    if not options.input or not options.output:
        raise DedupJobError("--input and --output are required")
    return JobPaths(
        input=options.input,
        output=options.output,
        cache=options.cache or default_cache_uri(options.output, config),
        materialize=options.materialize or "",
        thumbnail_size=options.thumbnail_size or DEFAULT_THUMBNAIL,
    )


def build_pipeline(
    pipeline: beam.Pipeline, paths: JobPaths, config: DedupConfig
) -> beam.PCollection:
    """Add the dedup job to ``pipeline``; returns the single-element summary PCollection."""
    check_paths(paths)
    return pipeline | "Dedup" >> Dedup(paths, config)


def run_job(
    paths: JobPaths, config: DedupConfig, pipeline_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Build and run the job to completion; returns the summary read back from the output.

    Args:
        paths: input, output, cache and optional materialize prefix.
        config: the dedup settings.
        pipeline_args: standard Beam options (``--runner``, ``--direct_num_workers``,
            ``--project``, ``--setup_file``, ...). Without ``--runner`` the DirectRunner's
            batch engine runs in this process.
    """
    options = PipelineOptions(list(pipeline_args))
    # DoFns live in this importable module; nothing from __main__ needs pickling.
    options.view_as(SetupOptions).save_main_session = False
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    use_emulator_if_configured()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, paths, config)
    result = pipeline.run()
    result.wait_until_finish()
    return json.loads(storage.read_text(storage.join(paths.output, SUMMARY_NAME)))


def parse_args(argv: Sequence[str]) -> tuple[JobPaths, DedupConfig, list[str]]:
    """Split ``argv`` into the job's paths, its DedupConfig and the remaining Beam options."""
    options = PipelineOptions(list(argv))
    dedup_options = options.view_as(DedupOptions)
    try:
        config = config_from_options(dedup_options)
    except ConfigError as exc:
        raise DedupJobError(str(exc)) from exc
    paths = paths_from_options(dedup_options, config)
    return paths, config, list(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m beam.dedup``: parse ``--input``/``--output``/DedupConfig/Beam options, run.

    Returns:
        The job's summary (``summary.json``).
    """
    paths, config, pipeline_args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(paths, config, pipeline_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: run the job; a KaedamaError is printed without a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Beam logs every string type hint it meets at INFO; keep its warnings only.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        run(argv)
    except KaedamaError as exc:
        print(f"beam.dedup: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
