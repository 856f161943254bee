"""The dedup job on Apache Beam: hash every file, find exact and near-duplicates, decide.

Run it with ``python -m beam.dedup --input SRC --output DST [DedupConfig flags] [Beam
options]`` or through ``kaedama dedup SRC --out DST``. The steps (named as they appear
in a runner's UI)::

    ListInputs      every file under an ImageFolder root (label = parent folder), or the
                    rows of a CSV/JSONL list, in chunks of a few hundred; spread over
                    workers
    ReadAndHash     per chunk: read, sha256, decode (reduced-size JPEG decode),
                    perceptual hash, a few files at a time per worker; unreadable files
                    and non-images go to the 'rejected' output
    ExactGroups     group identical bytes (sha256 shards): every identical pair, distance 0
    NearCandidates  each distinct file under its t + 1 hash-block keys -> GroupByKey on
                    (block, shard) -> exact Hamming check per bucket
    Describe        the second signal, only for the images of candidate pairs
    SameShot        the same-shot keypoint test of each candidate pair (same_shot
                    keypoints/combined)
    Gather          records, rejected files, pairs and descriptors to one worker (one
                    shuffle)
    Decide          kaedama.dedup.decide over all of them
    WriteOutputs    hash cache, thumbnails (in parallel) and optional copies, then manifest,
                    clusters, candidates, rejected, summary and the HTML review page

Elements are chunks of files and shards of hashes rather than single files: a
runner's cost is per element, and a few hundred files per element make it negligible
next to the hashing while thousands of chunks still spread a large dataset.

All logic lives in the core library (the job's steps in ``kaedama.dedup.job``, which
call ``kaedama.dedup.hashing``, ``kaedama.dedup.neighbors``, ``kaedama.dedup.decide`` and
``kaedama.dedup.review``); this module only wires them into transforms. Outputs go through
``kaedama.storage``, so input and output may be local or ``gs://``.

``kaedama.dedup.job.run_in_process`` runs the same step functions without Beam, for
local datasets on one machine (``kaedama dedup --in-process``); its outputs are
byte-identical to this job's (tested), it only skips the runner's overheads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from beam.common import Gather, import_runner_module, run_pipeline
from kaedama import storage
from kaedama.config import ConfigError, add_config_arguments, build_config
from kaedama.dedup.decide import DedupConfig, DedupResult, Rejected, decide, with_descriptors
from kaedama.dedup.hashcache import HashCache
from kaedama.dedup.hashing import ImageRecord
from kaedama.dedup.job import (
    CHUNK,
    DEFAULT_THUMBNAIL,
    SUMMARY_NAME,
    DedupJobError,
    Group,
    JobPaths,
    block_shards,
    cache_of,
    check_paths,
    cluster_uris,
    copy_file,
    default_cache_uri,
    describe_file,
    exact_groups,
    fingerprint_chunk,
    geometry_of,
    identical_pairs,
    list_chunks,
    person_decisions,
    plan_copies,
    record_from_tuple,
    record_to_tuple,
    require_tools,
    sha_shards,
    shard_pairs,
    thumbnail,
    update_cache,
    uri_shard,
    verify_pair,
    write_outputs,
)
from kaedama.errors import KaedamaError

if __name__ == "__main__":
    # ``python -m beam.dedup``: run the importable module instead of this __main__ copy.
    # Workers in other processes unpickle the job's classes by module name (beam.dedup),
    # and defining DedupOptions twice would clash in Beam's option parser.
    from beam.dedup import main as _main

    sys.exit(_main())

log = logging.getLogger(__name__)

# Name of ReadAndHash's output for files that are not readable images.
REJECTED = "rejected"


# --------------------------------------------------------------------------- ListInputs


def _numbered_chunks(source: str, size: int) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    yield from enumerate(list_chunks(source, size))


def _in_branch(numbered: tuple[int, Any], branch: int, branches: int) -> bool:
    return numbered[0] % branches == branch


class ListInputs(beam.PTransform):
    """Chunks of ``(uri, label)``: every file under an ImageFolder root, or every row of a list.

    ``branches`` > 1 deals the chunks into that many branches and flattens them again.
    On runners that move elements between workers by shuffling, the ``Reshuffle``
    alone spreads the chunks, and branches only add a cheap filter. Beam 2.77's
    DaskRunner ignores ``Reshuffle`` and gives each step as many Dask partitions (tasks)
    as its input has: the one listing element would make every step one task, the
    branches make them ``branches`` tasks that the cluster runs in parallel. There the
    partitions also add up at every Flatten and are never merged, so later shuffles
    grow faster than the branches: ~900 Dask tasks for the whole job at 1 branch,
    ~1,400 at 2, ~3,900 at 4, ~10,800 at 8, whatever the number of images.
    """

    def __init__(self, source: str, chunk_size: int = CHUNK, branches: int = 1) -> None:
        super().__init__()
        self.source = source
        self.chunk_size = chunk_size
        self.branches = branches

    def expand(self, pbegin):
        numbered = (
            pbegin
            | "Source" >> beam.Create([self.source])
            | "List" >> beam.FlatMap(_numbered_chunks, self.chunk_size)
        )
        if self.branches > 1:
            numbered = [
                numbered | f"Branch{k}" >> beam.Filter(_in_branch, k, self.branches)
                for k in range(self.branches)
            ] | "Join" >> beam.Flatten()
        return (
            numbered
            | "Chunks" >> beam.Map(lambda item: item[1])
            # One listing element fans out to every chunk: spread them over workers.
            | "Spread" >> beam.Reshuffle()
        )


# --------------------------------------------------------------------------- ReadAndHash


class SharedHashCache:
    """Per-process access to the hash cache file (``uri``; "" for none).

    Every DoFn given the same handle, in any thread of a worker process, uses one
    loaded copy: the job hands one handle to every step that reads the cache
    (``ReadAndHash``, ``Describe`` and ``SameShot``).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._shared = shared.Shared()

    def acquire(self) -> HashCache | None:
        if not self.uri:
            return None
        uri = self.uri
        # Read-only in effect: WriteOutputs merges every record back into the file.
        return self._shared.acquire(lambda: HashCache.load(uri), tag=uri)


def _cache_handle(cache: str | SharedHashCache) -> SharedHashCache:
    return cache if isinstance(cache, SharedHashCache) else SharedHashCache(cache)


class _PooledDoFn(beam.DoFn):
    """A DoFn with the job's recipe, the hash cache and ``config.read_threads`` threads.

    The threads run per-file work: reads are latency-bound on object storage, and
    Pillow decodes and resizes outside the GIL.
    """

    def __init__(self, config: DedupConfig, cache: SharedHashCache | None = None) -> None:
        self.config = config
        self._cache_file = cache or SharedHashCache("")

    def setup(self) -> None:
        self._recipe = self.config.recipe()
        self._cache = self._cache_file.acquire()
        self._pool = ThreadPoolExecutor(
            self.config.read_threads, thread_name_prefix=type(self).__name__
        )

    def teardown(self) -> None:
        self._pool.shutdown()


class HashChunk(_PooledDoFn):
    """Read and fingerprint a chunk of files: one ``(records, rejected)`` pair per chunk.

    ``records`` are plain tuples (:func:`kaedama.dedup.job.record_to_tuple`: cheap for
    the runner to move), ``rejected`` :class:`kaedama.dedup.Rejected` with the decoder's
    reason (or ``unreadable``). One output rather than a tagged second one: Beam 2.77's
    DaskRunner hands every output of a multi-output ParDo to every consumer.
    """

    def __init__(self, config: DedupConfig, cache: SharedHashCache | None = None) -> None:
        super().__init__(config, cache)
        self._files = Metrics.counter("dedup", "files")
        self._rejected = Metrics.counter("dedup", "rejected")

    def process(self, chunk: list[tuple[str, str]]) -> Iterator[HashedChunk]:
        self._files.inc(len(chunk))
        outs = fingerprint_chunk(chunk, self.config, self._recipe, self._cache, self._pool)
        records = [record_to_tuple(o) for o in outs if not isinstance(o, Rejected)]
        rejected = [o for o in outs if isinstance(o, Rejected)]
        self._rejected.inc(len(rejected))
        yield records, rejected


# A hashed chunk: (record tuples, rejected files).
HashedChunk = tuple[list[Any], list[Rejected]]


def _chunk_records(hashed: HashedChunk) -> list[list[Any]]:
    return [hashed[0]] if hashed[0] else []


def _chunk_rejected(hashed: HashedChunk) -> list[Rejected]:
    return hashed[1]


class ReadAndHash(beam.PTransform):
    """Chunks of ``(uri, label)`` -> ``{"records": record lists, "rejected": Rejected}``."""

    def __init__(self, config: DedupConfig, cache: str | SharedHashCache = "") -> None:
        super().__init__()
        self.config = config
        self.cache = _cache_handle(cache)

    def expand(self, inputs):
        hashed = inputs | "Hash" >> beam.ParDo(HashChunk(self.config, self.cache))
        return {
            "records": hashed | "Records" >> beam.FlatMap(_chunk_records),
            REJECTED: hashed | "Rejected" >> beam.FlatMap(_chunk_rejected),
        }


# --------------------------------------------------------------------------- ExactGroups


class ExactGroups(beam.PTransform):
    """Record lists -> one list of groups ``(sha256, hash, uris)`` per sha256 shard."""

    def expand(self, records):
        return (
            records
            | "ShardBySha" >> beam.FlatMap(lambda chunk: sha_shards(map(record_from_tuple, chunk)))
            | "GroupBySha" >> beam.GroupByKey()
            | "ToGroups" >> beam.Map(lambda item: exact_groups(item[1]))
        )


def _identical_pairs(groups: list[Group]) -> Iterator[tuple[str, str, int]]:
    for group in groups:
        yield from identical_pairs(group)


# --------------------------------------------------------------------------- NearCandidates


class _VerifyShard(beam.DoFn):
    """Exact Hamming check of every bucket in one shard; each pair comes from one bucket."""

    def __init__(self, threshold: int, bits: int, max_bucket: int) -> None:
        self.threshold = threshold
        self.bits = bits
        self.max_bucket = max_bucket

    def process(self, item: tuple[tuple[int, int], Iterable[list[tuple[int, Group]]]]):
        (block, _), entries = item
        yield from shard_pairs(block, entries, self.threshold, self.bits, self.max_bucket)


class NearCandidates(beam.PTransform):
    """Group lists -> every ``(uri_a, uri_b, distance)`` within ``threshold``, a < b, once.

    Multi-index hashing: a hash split into ``t + 1`` blocks shares at least one whole
    block with every hash within distance ``t`` (pigeonhole), so each distinct file is
    emitted under its ``t + 1`` block keys, grouped by (block, shard), and each bucket
    (equal block value) is verified exactly (``kaedama.dedup.job.shard_pairs``).
    """

    def __init__(self, threshold: int, bits: int, max_bucket: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.bits = bits
        self.max_bucket = max_bucket

    def expand(self, groups):
        return (
            groups
            | "BlockKeys" >> beam.FlatMap(block_shards, self.threshold, self.bits)
            | "GroupByShard" >> beam.GroupByKey()
            | "VerifyShards" >> beam.ParDo(_VerifyShard(self.threshold, self.bits, self.max_bucket))
        )


# --------------------------------------------------------------------------- Describe


class _DescribeShard(_PooledDoFn):
    """``(shard, uris)`` -> ``(uri, sha256, descriptor)`` once per URI, a few files at a time.

    The hash cache answers when an earlier run described the same bytes.
    """

    def process(self, item: tuple[int, Iterable[str]]):
        describe = lambda uri: describe_file(uri, self.config, self._recipe, self._cache)  # noqa: E731
        yield from self._pool.map(describe, sorted(set(item[1])))


class Describe(beam.PTransform):
    """Near pairs -> ``(uri, sha256, descriptor)`` of every image in them, once each.

    The second signal is needed only to confirm candidate pairs, so only their images
    (a few percent of a typical dataset) are decoded for it. URIs are grouped by shard,
    which also removes repeats (an image in several pairs).
    """

    def __init__(self, config: DedupConfig, cache: str | SharedHashCache = "") -> None:
        super().__init__()
        self.config = config
        self.cache = _cache_handle(cache)

    def expand(self, pairs):
        return (
            pairs
            | "PairUris" >> beam.FlatMap(lambda pair: [(uri_shard(u), u) for u in pair[:2]])
            | "GroupByShard" >> beam.GroupByKey()
            | "Describe" >> beam.ParDo(_DescribeShard(self.config, self.cache))
        )


class _SameShot(beam.DoFn):
    """A candidate pair -> its keypoint test (:func:`kaedama.dedup.job.verify_pair`).

    One output per pair, None for a pair whose files can no longer be read.
    """

    def __init__(self, config: DedupConfig, cache: SharedHashCache) -> None:
        self.config = config
        self._cache_file = cache

    def setup(self) -> None:
        self._cache = self._cache_file.acquire()

    def process(self, pair):
        yield verify_pair(pair, self.config, self._cache)


# --------------------------------------------------------------------------- Decide


def _records(gathered: dict[str, list]) -> list[ImageRecord]:
    return [record_from_tuple(t) for chunk in gathered["records"] for t in chunk]


def _decide(gathered: dict[str, list], config: DedupConfig) -> DedupResult:
    records = _records(gathered)
    log.info(
        "deciding over %d images, %d rejected, %d candidate pairs, %d described",
        len(records),
        len(gathered["rejected"]),
        len(gathered["pairs"]),
        len(gathered["descriptors"]),
    )
    descriptors = {uri: desc for uri, _, desc in gathered["descriptors"]}
    return decide(
        with_descriptors(records, descriptors),
        gathered["rejected"],
        gathered["pairs"],
        config,
        listed=sum(gathered["listed"]),
        geometry=geometry_of(gathered.get("geometry", [])),
        decisions=person_decisions(config),
    )


class Decide(beam.PTransform):
    """Call ``decide`` on the gathered records, rejected files and pairs (one worker).

    Takes the :class:`Gather` output of ``{"records", "rejected", "pairs",
    "descriptors", "listed"}`` (records as lists, one per chunk; listed as the size of
    each listed chunk); returns a
    single-element PCollection holding the :class:`kaedama.dedup.DedupResult`.
    """

    def __init__(self, config: DedupConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, gathered):
        return gathered | "Decide" >> beam.Map(_decide, self.config)


# --------------------------------------------------------------------------- WriteOutputs


def _save_cache(gathered: dict[str, list], cache_uri: str, recipe_key: str) -> dict[str, Any]:
    new = cache_of(
        _records(gathered), gathered["descriptors"], recipe_key, gathered.get("geometry", ())
    )
    return update_cache(new, cache_uri)


def _write(gathered: dict[str, list], paths: JobPaths, config: DedupConfig) -> dict[str, Any]:
    (result,) = gathered["result"]
    (cache_stats,) = gathered["cache"]
    copied = len(gathered["copied"])  # counted as copied, apart from the plan
    log.info("copied %d kept images", copied)
    thumbs = dict(gathered["thumbnails"])
    return write_outputs(result, thumbs, cache_stats, paths, config, copied=copied)


class _ThumbnailShard(_PooledDoFn):
    """``(shard, uris)`` -> ``(uri, thumbnail data URI)``, a few files at a time."""

    def __init__(self, size: int, config: DedupConfig) -> None:
        super().__init__(config)
        self.size = size

    def process(self, item: tuple[int, Iterable[str]]):
        make = lambda uri: thumbnail(uri, self.size, self.config)  # noqa: E731
        yield from self._pool.map(make, sorted(set(item[1])))


class WriteOutputs(beam.PTransform):
    """Thumbnails (parallel), hash cache and optional copies, then every output file.

    Takes ``{"result": <DedupResult>, "gathered": <Gather output with "records">}``;
    returns the summary. The final ``Write`` takes everything else as one gathered
    element, not as side inputs, so it runs last: a ``summary.json`` on disk means the
    job is done, copies included. That also keeps the job to one sink, which runners
    that compute only what the last step needs (Beam 2.77's DaskRunner) rely on, and
    away from side inputs, which that runner recomputes inside a task.
    """

    def __init__(self, paths: JobPaths, config: DedupConfig) -> None:
        super().__init__()
        self.paths = paths
        self.config = config

    def expand(self, pcolls):
        result = pcolls["result"]
        cache_stats = pcolls["gathered"] | "SaveCache" >> beam.Map(
            _save_cache, self.paths.cache, self.config.recipe().key()
        )
        thumbs = (
            result
            | "ClusterMembers"
            >> beam.FlatMap(lambda r: [(uri_shard(u), u) for u in cluster_uris(r)])
            | "GroupByShard" >> beam.GroupByKey()
            | "Thumbnails" >> beam.ParDo(_ThumbnailShard(self.paths.thumbnail_size, self.config))
        )
        copied = (
            result
            | "PlanCopies" >> beam.FlatMap(plan_copies, self.paths)
            | "SpreadCopies" >> beam.Reshuffle()
            | "CopyKept" >> beam.Map(copy_file)
        )
        final = {
            "result": result,
            "thumbnails": thumbs,
            "cache": cache_stats,
            "copied": copied,
        } | "GatherOutputs" >> Gather()
        return final | "Write" >> beam.Map(_write, self.paths, self.config)


# --------------------------------------------------------------------------- the pipeline


class Dedup(beam.PTransform):
    """The whole job as one composite: ListInputs -> ... -> WriteOutputs.

    ``branches``: see :class:`ListInputs` (for the DaskRunner; 1 elsewhere).
    """

    def __init__(self, paths: JobPaths, config: DedupConfig, branches: int = 1) -> None:
        super().__init__()
        self.paths = paths
        self.config = config
        self.branches = branches

    def expand(self, pbegin):
        config = self.config
        inputs = pbegin | "ListInputs" >> ListInputs(self.paths.input, branches=self.branches)
        cache = SharedHashCache(self.paths.cache)
        hashed = inputs | "ReadAndHash" >> ReadAndHash(config, cache)
        records, rejected = hashed["records"], hashed[REJECTED]
        groups = records | "ExactGroups" >> ExactGroups()
        identical = groups | "IdenticalPairs" >> beam.FlatMap(_identical_pairs)
        near = groups | "NearCandidates" >> NearCandidates(
            config.threshold, config.recipe().bits, config.max_bucket
        )
        descriptors = near | "Describe" >> Describe(config, cache)
        pairs = (identical, near) | "AllPairs" >> beam.Flatten()
        # Counted where listed, apart from the rows, for the kept + dropped + rejected check.
        listed = inputs | "CountListed" >> beam.Map(len)
        inputs = {
            "records": records,
            "rejected": rejected,
            "pairs": pairs,
            "descriptors": descriptors,
            "listed": listed,
        }
        if config.verifies_keypoints:
            # Pairs spread over workers; each reads and matches its two images, unless
            # the hash cache holds the pair's test from an earlier run.
            inputs["geometry"] = (
                near
                | "SpreadPairs" >> beam.Reshuffle()
                | "SameShot" >> beam.ParDo(_SameShot(config, cache))
            )
        gathered = inputs | "Gather" >> Gather()
        result = gathered | "Decide" >> Decide(config)
        return {"result": result, "gathered": gathered} | "WriteOutputs" >> WriteOutputs(
            self.paths, config
        )


# --------------------------------------------------------------------------- options and run


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
        parser.add_argument(
            "--branches",
            type=int,
            default=1,
            help="deal the listed chunks into N branches (default 1). Beam's DaskRunner runs "
            "a step as one task per input partition and ignores Reshuffle: N branches let "
            "N workers hash at once, at the cost of more shuffle tasks (about 900 at 1, "
            "1,400 at 2, 3,900 at 4). Other runners need none",
        )
        add_config_arguments(parser, DedupConfig, underscore_aliases=True)


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
    pipeline: beam.Pipeline, paths: JobPaths, config: DedupConfig, branches: int = 1
) -> beam.PCollection:
    """Add the dedup job to ``pipeline``; returns the single-element summary PCollection."""
    check_paths(paths)
    if branches < 1:
        raise DedupJobError(f"--branches must be at least 1, got {branches}")
    require_tools(config)
    person_decisions(config)  # a bad decisions file fails before the job starts
    return pipeline | "Dedup" >> Dedup(paths, config, branches)


def run_job(
    paths: JobPaths, config: DedupConfig, pipeline_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Build and run the job to completion; returns the summary read back from the output.

    Args:
        paths: input, output, cache and optional materialize prefix.
        config: the dedup settings.
        pipeline_args: standard Beam options (``--runner``, ``--direct_num_workers``,
            ``--project``, ``--setup_file``, ...) and the job's ``--branches``. Without
            ``--runner`` the DirectRunner's batch engine runs in this process.
    """
    branches = PipelineOptions(list(pipeline_args)).view_as(DedupOptions).branches

    def build(pipeline: beam.Pipeline) -> None:
        build_pipeline(pipeline, paths, config, branches)

    run_pipeline(pipeline_args, build)
    return json.loads(storage.read_text(storage.join(paths.output, SUMMARY_NAME)))


def parse_args(argv: Sequence[str]) -> tuple[JobPaths, DedupConfig, list[str]]:
    """Split ``argv`` into the job's paths, its DedupConfig and the remaining Beam options."""
    options = PipelineOptions(list(argv))
    import_runner_module(options)
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
