"""The dedup job's steps as plain functions, and an engine that runs them without Beam.

The Beam job (``beam/dedup.py``) wires these functions into transforms; this module
holds everything that is not wiring, so it never imports Apache Beam:

* where the job reads and writes (:class:`JobPaths`, :func:`check_paths`,
  :func:`default_cache_uri`), listing (:func:`list_inputs`);
* per chunk of files: :func:`fingerprint_chunk` (read, sha256, decode, hash, or the
  reason it cannot, with a few threads per worker);
* the distributed pair search's steps (:func:`sha_shards`, :func:`exact_groups`,
  :func:`identical_pairs`, :func:`block_shards`, :func:`shard_pairs`);
* the second signal for the images of candidate pairs only (:func:`describe_file`),
  and the same-shot keypoint test of each candidate pair (:func:`verify_pair`);
* the outputs (:func:`thumbnail`, :func:`update_cache`, :func:`plan_copies`,
  :func:`write_outputs`);
* :func:`run_in_process`: the whole job on one machine with a pool of forked
  processes (``kaedama dedup --in-process``). Its outputs are byte-identical to the
  Beam job's (tested); it only skips the runner's overheads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import threading
import time
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from kaedama import storage
from kaedama.dedup.decide import (
    DedupConfig,
    DedupResult,
    Rejected,
    decide,
    find_candidate_pairs,
    identical_file_pairs,
    manifest_header,
    near_pair_uris,
    with_descriptors,
)
from kaedama.dedup.decisions import Decision
from kaedama.dedup.decisions import load as load_decisions
from kaedama.dedup.hashcache import HashCache
from kaedama.dedup.hashing import (
    HashRecipe,
    ImageRecord,
    decode_for_description,
    describe_bytes,
    descriptor,
    hash_image_bytes,
)
from kaedama.dedup.neighbors import block_keys, pairs_in_bucket
from kaedama.dedup.review import render_report, representatives, thumbnail_data_uri
from kaedama.dedup.sameshot import Features, Geometry
from kaedama.errors import KaedamaError
from kaedama.images import ImageError
from kaedama.manifest import (
    DUPLICATE_URI,
    NO_LABEL,
    NOT_A_FILE,
    Row,
    json_line,
    normalize_label,
    read_input,
    read_list,
    write_manifest,
)

log = logging.getLogger(__name__)

# Reason recorded for a file that is listed but cannot be read at all (storage error).
UNREADABLE = "unreadable"
# Reason for a file over DedupConfig.max_bytes (the decoder's name for too many pixels).
TOO_LARGE = "too_large"
LISTING_MESSAGES = {
    NO_LABEL: "no label: put images in <root>/<label>/, or give the row a label",
    NOT_A_FILE: "not a readable file (a broken symlink, FIFO, socket or device)",
    DUPLICATE_URI: "listed more than once; the first listing is used",
}


def read_limited(uri: str, config: DedupConfig) -> bytes:
    """A file's bytes, refused (:class:`kaedama.storage.TooLargeError`) over ``max_bytes``."""
    return storage.read_bytes(uri, max_bytes=config.max_bytes)


MANIFEST_NAME = "manifest.jsonl"
CLUSTERS_NAME = "clusters.jsonl"
CANDIDATES_NAME = "candidates.jsonl"
REJECTED_NAME = "rejected.jsonl"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.html"
CACHE_FOLDER = "cache"
DEFAULT_THUMBNAIL = 128


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


def require_tools(config: DedupConfig) -> None:
    """Fail before reading any file when the settings need a library that is missing.

    Raises:
        kaedama.dedup.sameshot.OpenCVMissingError: the keypoint test needs OpenCV.
    """
    if config.verifies_keypoints:
        from kaedama.dedup import sameshot

        sameshot.require()


def person_decisions(config: DedupConfig) -> dict[str, Decision]:
    """The decisions file named by ``config.decisions`` (empty without one).

    Raises:
        kaedama.dedup.decisions.DecisionsError: it cannot be read or is invalid.
    """
    return load_decisions(config.decisions) if config.decisions else {}


def default_cache_uri(output: str, config: DedupConfig) -> str:
    """The hash cache next to the outputs, named by the hash recipe."""
    return storage.join(output, CACHE_FOLDER, f"hashes-{config.recipe().key()}.npz")


def is_list_input(source: str) -> bool:
    """True when the input is a CSV/JSONL list of files rather than an ImageFolder root."""
    return source.lower().endswith((".csv", ".jsonl", ".ndjson")) and not source.endswith("/")


def is_local(uri: str) -> bool:
    """True for a local path (or an unset one), False for ``gs://`` and other schemes."""
    return not uri or "://" not in uri


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


# A file to fingerprint: (uri, label, reason). A reason means the listing already
# rejected it (no label, not a file, listed twice): it is reported, never read.
Item = tuple[str, str, str]


def list_inputs(source: str) -> list[Item]:
    """An :data:`Item` for every entry under an ImageFolder root, or every row of a list.

    Nothing listed is left out: entries the job cannot use carry their reason
    (:data:`kaedama.manifest.NO_LABEL`, :data:`~kaedama.manifest.NOT_A_FILE`), and a
    URI listed again is rejected as :data:`~kaedama.manifest.DUPLICATE_URI` (the first
    listing counts).
    """
    items: list[Item] = []
    seen: set[str] = set()
    for row in read_input(source):
        reason = row.reason if row.status == "rejected" else ""
        if not reason and not row.label:
            reason = NO_LABEL
        if not reason and row.uri in seen:
            reason = DUPLICATE_URI
        seen.add(row.uri)
        items.append((row.uri, row.label, reason))
    return items


# Files per element of the distributed job: a runner's cost is per element, a photo's
# hashing ~1 ms, so a few hundred files per element make that cost negligible while
# thousands of chunks still spread a large dataset over many workers.
CHUNK = 256


def list_chunks(source: str, size: int = CHUNK) -> Iterator[list[Item]]:
    """:func:`list_inputs` in chunks of at most ``size`` files (the job's unit of work)."""
    items = list_inputs(source)
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- per file


def fingerprint(
    item: Item,
    config: DedupConfig,
    recipe: HashRecipe,
    cache: HashCache | None = None,
) -> ImageRecord | Rejected:
    """Read one file and fingerprint it, or say why it cannot be: never raises for a bad file.

    Returns:
        The :class:`ImageRecord`, or a :class:`Rejected` with the listing's reason, the
        decoder's reason, ``too_large`` (over ``config.max_bytes``, not read) or
        ``unreadable`` (storage could not read the file at all).
    """
    uri, label, reason = item
    if reason:
        return Rejected(uri, label, reason, LISTING_MESSAGES.get(reason, reason))
    try:
        data = read_limited(uri, config)
        mtime = storage.stat(uri).mtime if config.needs_mtime else 0.0
    except storage.TooLargeError as exc:
        return Rejected(uri, label, TOO_LARGE, str(exc), exc.size or 0)
    except storage.StorageError as exc:
        return Rejected(uri, label, UNREADABLE, str(exc))
    try:
        return hash_image_bytes(
            uri,
            label,
            data,
            recipe,
            max_pixels=config.max_pixels,
            mtime=mtime,
            cache=cache,
            keep_gps=config.keep_gps,
        )
    except ImageError as exc:
        return Rejected(uri, label, exc.reason, exc.message, len(data))


def fingerprint_chunk(
    items: Sequence[tuple[str, str]],
    config: DedupConfig,
    recipe: HashRecipe,
    cache: HashCache | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> list[ImageRecord | Rejected]:
    """:func:`fingerprint` of every file of a chunk, in input order.

    Args:
        pool: ``config.read_threads`` threads to run the files on. Object-storage
            reads are latency-bound and Pillow decodes and resizes outside the GIL, so
            a few threads per worker keep its cores busy; None runs them one by one.
    """

    def run(part: Sequence[tuple[str, str]]) -> list[ImageRecord | Rejected]:
        return [fingerprint(item, config, recipe, cache) for item in part]

    if pool is None:
        return run(items)
    # One task per thread (every n-th file), not one per file: a future costs more than
    # reading a cached file's hash.
    n = config.read_threads
    out: list[ImageRecord | Rejected] = [None] * len(items)  # type: ignore[list-item]
    for k, done in enumerate(pool.map(run, [items[k::n] for k in range(n)])):
        out[k::n] = done
    return out


def describe_file(
    uri: str, config: DedupConfig, recipe: HashRecipe, cache: HashCache | None = None
) -> tuple[str, str, bytes]:
    """``(uri, sha256, descriptor)`` of one image of a candidate pair.

    The cache answers when an earlier run described the same bytes; otherwise the file
    is read and decoded again (only candidate images pay this). A file that can no
    longer be read gives an empty descriptor: its pairs stay unconfirmed (logged).
    """
    try:
        data = read_limited(uri, config)
    except storage.StorageError as exc:
        log.warning("cannot describe %s: %s", uri, exc)
        return uri, "", b""
    sha = hashlib.sha256(data).hexdigest()
    hit = cache.get(sha, recipe) if cache is not None else None
    if hit is not None and hit.descriptor:
        return uri, sha, hit.descriptor
    try:
        return uri, sha, describe_bytes(data, max_pixels=config.max_pixels, uri=uri)
    except ImageError as exc:
        log.warning("cannot describe %s: %s", uri, exc)
        return uri, sha, b""


# One candidate pair's keypoint test as plain values: (uri_a, uri_b, sha256_a, sha256_b,
# keypoints, matches, inliers, exact, coverage), uri_a < uri_b. The sha256s are of the
# bytes the test saw, so the hash cache keeps it only under those contents.
Verified = tuple[str, str, str, str, int, int, int, int, float]
# Features kept per process, by content: an image is often in several pairs.
FEATURES_KEPT = 256
_FEATURES: OrderedDict[str, Features] = OrderedDict()
_FEATURES_LOCK = threading.Lock()  # a runner may call from several threads


def _features_of(sha: str, data: bytes, max_pixels: int, uri: str) -> Features:
    """ORB features of one file's bytes, kept per process by sha256 (a few hundred)."""
    from kaedama.dedup import sameshot  # OpenCV loads only where pairs are verified

    with _FEATURES_LOCK:
        found = _FEATURES.get(sha)
        if found is not None:
            _FEATURES.move_to_end(sha)
            return found
    found = sameshot.features(data, max_pixels=max_pixels, uri=uri)
    with _FEATURES_LOCK:
        _FEATURES[sha] = found
        if len(_FEATURES) > FEATURES_KEPT:
            _FEATURES.popitem(last=False)
    return found


def cached_pair(a: str, b: str, sha_a: str, sha_b: str, cache: HashCache | None) -> Verified | None:
    """The keypoint test of ``a`` then ``b`` from the cache (same bytes, same test), or None."""
    if cache is None or not cache.pair_count or not sha_a or not sha_b:
        return None
    from kaedama.dedup.sameshot import cache_key

    found = cache.get_pair(sha_a, sha_b, cache_key())
    return None if found is None else (a, b, sha_a, sha_b, *found)


def verify_pair(
    pair: Sequence[Any], config: DedupConfig, cache: HashCache | None = None
) -> Verified | None:
    """The same-shot keypoint test of one candidate pair ``(uri_a, uri_b, ...)``.

    Reads both files once: the cache answers when an earlier run tested the same two
    contents, else their features (the descriptor's reduced decode; kept per process by
    content) are matched. A file that can no longer be read gives None: decide then
    treats the pair as unverified (logged).
    """
    a, b = sorted(pair[:2])
    try:
        data_a, data_b = read_limited(a, config), read_limited(b, config)
        sha_a = hashlib.sha256(data_a).hexdigest()
        sha_b = hashlib.sha256(data_b).hexdigest()
        known = cached_pair(a, b, sha_a, sha_b, cache)
        if known is not None:
            return known
        fa = _features_of(sha_a, data_a, config.max_pixels, a)
        fb = _features_of(sha_b, data_b, config.max_pixels, b)
    except (storage.StorageError, ImageError) as exc:
        log.warning("cannot verify %s ~ %s: %s", a, b, exc)
        return None
    return match_pair(a, b, sha_a, sha_b, fa, fb)


def match_pair(
    a: str, b: str, sha_a: str, sha_b: str, fa: Features | None, fb: Features | None
) -> Verified | None:
    """:func:`kaedama.dedup.sameshot.match` of two images' features; None if one is missing."""
    from kaedama.dedup import sameshot

    if fa is None or fb is None:
        return None
    return (a, b, sha_a, sha_b, *sameshot.match(fa, fb).to_tuple())


def geometry_of(verified: Iterable[Verified | None]) -> dict[tuple[str, str], Geometry]:
    """:func:`verify_pair` results as the mapping :func:`kaedama.dedup.decide.decide` takes."""
    return {(v[0], v[1]): Geometry(*v[4:]) for v in verified if v is not None}


def describe_with_features(
    uri: str,
    config: DedupConfig,
    recipe: HashRecipe,
    cache: HashCache | None = None,
    features: bool = True,
) -> tuple[str, str, bytes, Features | None]:
    """:func:`describe_file` plus the image's keypoint features, from one read and decode.

    The in-process engine's path: its features equal :func:`verify_pair`'s (the same
    decode), so both engines decide alike. A file that cannot be read or decoded gives
    an empty descriptor and no features (logged). ``features=False`` (every pair of the
    image answered by the cache) is :func:`describe_file`, features None.
    """
    if not features:
        return (*describe_file(uri, config, recipe, cache), None)
    from kaedama.dedup import sameshot

    try:
        data = read_limited(uri, config)
    except storage.StorageError as exc:
        log.warning("cannot describe %s: %s", uri, exc)
        return uri, "", b"", None
    sha = hashlib.sha256(data).hexdigest()
    hit = cache.get(sha, recipe) if cache is not None else None
    try:
        image = decode_for_description(data, max_pixels=config.max_pixels, uri=uri)
    except ImageError as exc:
        log.warning("cannot describe %s: %s", uri, exc)
        return uri, sha, b"", None
    desc = hit.descriptor if hit is not None and hit.descriptor else descriptor(image)
    return uri, sha, desc, sameshot.features_of_image(image)


# --------------------------------------------------------------------------- pair search steps

# Buckets up to this many distinct hashes are verified pair by pair in Python.
SMALL_BUCKET = 32
# Keys of the pair search's two shuffles: sha256 shards for exact groups, and shards
# per hash block for the multi-index buckets ((threshold + 1) * SHARDS keys). They bound
# the parallelism of those steps and the entries one call holds: ~N * (t + 1) / 80
# (distinct hash, block value) entries of ~100 bytes, ~60 MB per call at 10M images.
SHARDS = 16

# A group of files with identical bytes: (sha256, hash as hex, sorted URIs). Plain
# tuples of str keep a runner's coders on their fast path through shuffles: Beam pickles
# any int beyond 64-bit signed range, i.e. half of all 64-bit hashes.
Group = tuple[str, str, tuple[str, ...]]

# An ImageRecord as plain values for the same reason (a dataclass is pickled element by
# element): (uri, label, sha256, bytes, width, height, hash hex, descriptor, mtime,
# taken, make, model, gps as () or (latitude, longitude)).
RecordTuple = tuple[
    str, str, str, int, int, int, str, bytes, float, str, str, str, tuple[float, ...]
]


def record_to_tuple(r: ImageRecord) -> RecordTuple:
    """An :class:`ImageRecord` as plain values (see :data:`RecordTuple`)."""
    return (
        r.uri,
        r.label,
        r.sha256,
        r.bytes,
        r.width,
        r.height,
        format(r.hash, "x"),
        r.descriptor,
        r.mtime,
        r.taken,
        r.make,
        r.model,
        tuple(r.gps) if r.gps else (),
    )


def record_from_tuple(t: RecordTuple) -> ImageRecord:
    """Inverse of :func:`record_to_tuple`."""
    uri, label, sha, size, width, height, hx, desc, mtime, taken, make, model, gps = t
    return ImageRecord(
        uri,
        label,
        sha,
        size,
        width,
        height,
        int(hx, 16),
        desc,
        mtime,
        taken=taken,
        make=make,
        model=model,
        gps=(gps[0], gps[1]) if gps else None,
    )


def uri_shard(uri: str) -> int:
    """A stable shard of a URI (the same in every worker process, unlike ``hash()``)."""
    return zlib.crc32(uri.encode("utf-8")) % SHARDS


def sha_shards(
    records: Iterable[ImageRecord],
) -> Iterator[tuple[int, list[tuple[str, str, str]]]]:
    """``(shard, [(sha256, uri, hash hex), ...])`` per sha256 shard of a chunk's records."""
    shards: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
    for r in records:
        shards[int(r.sha256[:8], 16) % SHARDS].append((r.sha256, r.uri, format(r.hash, "x")))
    yield from shards.items()


def exact_groups(entries: Iterable[Iterable[tuple[str, str, str]]]) -> list[Group]:
    """One :data:`Group` per distinct sha256 among a shard's ``(sha256, uri, hash)`` lists."""
    members: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for part in entries:
        for sha, uri, h in part:
            members[sha].append((uri, h))
    return [exact_group(sha, found) for sha, found in sorted(members.items())]


def exact_group(sha256: str, members: Iterable[tuple[str, str]]) -> Group:
    """The :data:`Group` of the ``(uri, hash hex)`` members sharing one sha256."""
    ordered = sorted(members)
    return (sha256, ordered[0][1], tuple(uri for uri, _ in ordered))


def identical_pairs(group: Group) -> Iterator[tuple[str, str, int]]:
    """A star of edges ``(first, other, 0)`` over a group's sorted URIs: n - 1, not n(n-1)/2."""
    uris = group[2]
    for other in uris[1:]:
        yield (uris[0], other, 0)


def _share_earlier_block(ha: int, hb: int, block: int, threshold: int, bits: int) -> bool:
    ka = block_keys(ha, threshold, bits)[:block]
    kb = block_keys(hb, threshold, bits)[:block]
    return any(x == y for x, y in zip(ka, kb, strict=True))


def bucket_pairs(
    block: int, groups: Sequence[Group], threshold: int, bits: int, max_bucket: int
) -> Iterator[tuple[str, str, int]]:
    """Verified ``(uri_a, uri_b, distance)`` pairs of one multi-index-hashing bucket.

    The bucket holds the groups whose hash has one value in block ``block`` (see
    :func:`kaedama.dedup.neighbors.block_keys`). A pair of hashes may share several blocks
    and so meet in several buckets; it is reported only from the bucket of the first
    block they share, so that over all buckets every pair comes out exactly once.
    """
    if len(groups) < 2:
        return
    by_sha = {sha: (int(hx, 16), uris) for sha, hx, uris in groups}
    if len(by_sha) <= SMALL_BUCKET:
        # Most buckets hold a handful of hashes: plain ints beat numpy's per-call cost.
        members = sorted((sha, h) for sha, (h, _) in by_sha.items())
        found = [
            (sa, sb, d)
            for i, (sa, ha) in enumerate(members)
            for sb, hb in members[i + 1 :]
            if (d := (ha ^ hb).bit_count()) <= threshold
        ]
    else:
        found = pairs_in_bucket(
            [(sha, h) for sha, (h, _) in by_sha.items()], threshold, max_bucket=max_bucket
        )
    for sha_a, sha_b, dist in found:
        (ha, uris_a), (hb, uris_b) = by_sha[sha_a], by_sha[sha_b]
        if block and _share_earlier_block(ha, hb, block, threshold, bits):
            continue
        # One pair per pair of contents (their first URIs): copies join through
        # identical_pairs, so n copies never multiply into n * m pairs.
        a, b = uris_a[0], uris_b[0]
        yield (a, b, dist) if a < b else (b, a, dist)


def block_shards(
    groups: Iterable[Group], threshold: int, bits: int
) -> Iterator[tuple[tuple[int, int], list[tuple[int, Group]]]]:
    """``((block, shard), [(block value, group), ...])`` for the groups' block keys.

    A distributed search groups by ``(block, shard)`` rather than by the exact block
    value: one worker call then verifies all the (mostly tiny) buckets of one shard,
    instead of one call per bucket, and ``(threshold + 1) * SHARDS`` keys still spread
    the work.
    """
    shards: dict[tuple[int, int], list[tuple[int, Group]]] = defaultdict(list)
    for group in groups:
        for block, value in block_keys(int(group[1], 16), threshold, bits):
            shards[(block, value % SHARDS)].append((value, group))
    yield from shards.items()


def shard_pairs(
    block: int,
    entries: Iterable[Iterable[tuple[int, Group]]],
    threshold: int,
    bits: int,
    max_bucket: int,
) -> Iterator[tuple[str, str, int]]:
    """:func:`bucket_pairs` over every bucket (block value) of one shard of a block."""
    buckets: dict[int, list[Group]] = defaultdict(list)
    for part in entries:
        for value, group in part:
            buckets[value].append(group)
    for members in buckets.values():
        yield from bucket_pairs(block, members, threshold, bits, max_bucket)


# --------------------------------------------------------------------------- outputs


def _jsonl(items: Iterable[Any]) -> str:
    return "".join(json_line(item) + "\n" for item in items)


def _candidate_json(pair: Sequence[Any]) -> dict[str, Any]:
    a, b, dist, sim, ok, keypoints = pair
    return {
        "a": a,
        "b": b,
        "distance": dist,
        "similarity": sim,
        "keypoints": keypoints,
        "confirmed": ok,
    }


def _rejected_json(row) -> dict[str, Any]:
    return {
        "uri": row.uri,
        "label": row.label,
        "reason": row.reason,
        "message": row.extra.get("message", ""),
        "bytes": row.bytes,
    }


def cache_of(
    records: Iterable[ImageRecord],
    descriptors: Iterable[tuple[str, str, bytes]],
    recipe_key: str,
    verified: Iterable[Verified | None] = (),
) -> HashCache:
    """A :class:`HashCache` of this run's records under ``recipe_key``, and its pair tests.

    Args:
        records: the run's fingerprints.
        descriptors: ``(uri, sha256, descriptor)`` of the described images
            (:func:`describe_file`); they join their records by sha256.
        verified: the keypoint tests of candidate pairs (:func:`verify_pair`), kept
            under the two files' sha256s where those are the contents this run
            fingerprinted (a file that changed during the run is not cached).
    """
    by_sha = {sha: desc for _, sha, desc in descriptors if desc}
    cache = HashCache()
    sha_of: dict[str, str] = {}
    for r in records:
        desc = by_sha.get(r.sha256) or r.descriptor
        cache.put(r.sha256, recipe_key, r.width, r.height, r.hash, desc)
        sha_of[r.uri] = r.sha256
    pairs = [
        v
        for v in verified
        if v is not None and sha_of.get(v[0]) == v[2] and sha_of.get(v[1]) == v[3]
    ]
    if pairs:
        from kaedama.dedup.sameshot import cache_key

        key = cache_key()
        for _, _, sha_a, sha_b, *geometry in pairs:
            cache.put_pair(sha_a, sha_b, key, tuple(geometry))
    return cache


def update_cache(new: HashCache, cache_uri: str) -> dict[str, Any]:
    """Merge this run's fingerprints and pair tests (see :func:`cache_of`) into the cache file.

    Returns:
        ``{"uri", "hits", "decoded", "entries_before", "entries", "pairs"}`` for the
        summary (``pairs``: keypoint tests held).

    The file is rewritten only when this run added or completed an entry or a pair test
    (or it does not exist): a re-run over unchanged inputs reads it and leaves it alone.
    """
    cache = HashCache.load(cache_uri)
    before = len(cache)
    hits = sum(1 for key, _ in new.items() if key in cache)
    if cache.update(new) or not storage.exists(cache_uri):
        cache.save(cache_uri)
    return {
        "uri": cache_uri,
        "hits": hits,
        "decoded": len(new) - hits,
        "entries_before": before,
        "entries": len(cache),
        "pairs": cache.pair_count,
    }


def plan_copies(result: DedupResult, paths: JobPaths) -> list[tuple[str, str]]:
    """``(source, destination)`` for every kept image under ``paths.materialize``.

    ImageFolder inputs keep their relative layout; list inputs go to
    ``<prefix>/<label>/<file name>``, with the sha256 prefixed when two names collide.

    Raises:
        DedupJobError: a destination would overwrite one of the input files.
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
        # Labels and object names are data: "../../etc", "C:\\x" or "a/../../b" must not
        # steer a copy out of the prefix.
        rel = storage.safe_relative(rel)
        if rel in taken:
            head, tail = posixpath.split(rel)
            rel = posixpath.join(head, f"{row.sha256[:12]}-{tail}")
        taken.add(rel)
        target = storage.join(paths.materialize, rel)
        if not _inside(target, paths.materialize):
            raise DedupJobError(f"--materialize target {target} would leave the prefix")
        if target in sources:
            raise DedupJobError(
                f"--materialize would overwrite the input file {target}; choose a prefix "
                "outside the input files' folders"
            )
        copies.append((row.uri, target))
    return copies


def copy_file(pair: tuple[str, str]) -> str:
    """Copy ``(source, destination)``; returns the destination. Never deletes the source."""
    storage.copy(pair[0], pair[1])
    return pair[1]


def cluster_uris(result: DedupResult) -> Iterator[str]:
    """One URI per content of each cluster: the images the review page shows.

    Identical files share one thumbnail (see :func:`kaedama.dedup.review.render_report`),
    so a cluster of 5,000 copies costs one decode, not 5,000.
    """
    for cluster in result.clusters:
        yield from representatives(cluster).values()


def thumbnail(uri: str, size: int, config: DedupConfig) -> tuple[str, str | None]:
    """``(uri, data URI of its thumbnail)``; None (a placeholder on the page) if unreadable."""
    try:
        data = read_limited(uri, config)
        return uri, thumbnail_data_uri(data, size=size, max_pixels=config.max_pixels)
    except (storage.StorageError, ImageError) as exc:
        # The file was hashed earlier in the job, so this is rare (e.g. deleted meanwhile).
        log.warning("no thumbnail for %s: %s", uri, exc)
        return uri, None


def with_input_columns(rows: Sequence[Row], source: str) -> list[Row]:
    """The rows with what the input said of each file beyond its URI and label.

    A list's extra columns (``ml_use``, ``split``, anything else) are carried to the
    manifest (read again here, by URI: the fingerprints that reached ``decide`` carry
    only URI and label), and a label respelled in Unicode NFC keeps its listed
    spelling in ``label_raw``. Split and training read these columns.
    """
    if is_list_input(source):
        listed: dict[str, dict[str, Any]] = {}
        for row in read_list(source):
            listed.setdefault(row.uri, row.extra)
        extra_of = listed.get
    else:
        prefix = source.rstrip("/") + "/"

        def extra_of(uri: str) -> dict[str, Any] | None:
            rel = uri[len(prefix) :] if uri.startswith(prefix) else storage.relative_to(uri, source)
            raw = posixpath.basename(posixpath.dirname(rel.replace("\\", "/")))
            return None if raw == normalize_label(raw) else {"label_raw": raw}

    out = []
    for row in rows:
        extra = extra_of(row.uri)
        if extra and row.reason != DUPLICATE_URI:
            # The decision's own columns win over an input column of the same name.
            row = replace(row, extra={**extra, **row.extra})
        out.append(row)
    return out


def write_outputs(
    result: DedupResult,
    thumbnails: dict[str, str | None],
    cache_stats: dict[str, Any],
    paths: JobPaths,
    config: DedupConfig,
    *,
    copied: int = 0,
) -> dict[str, Any]:
    """Write every output file of the job to ``paths.output``; returns the summary.

    Args:
        copied: files copied under ``paths.materialize`` (counted as they were copied).
    """
    out = paths.output
    rows = with_input_columns(result.rows, paths.input)
    summary = dict(result.summary)
    summary["input_uri"] = paths.input
    summary["hash_cache"] = cache_stats
    # Labels are compared in Unicode NFC; this many rows were listed in another spelling.
    summary["labels_normalized"] = sum(1 for r in rows if "label_raw" in r.extra)
    if paths.materialize:
        summary["materialized"] = {"prefix": paths.materialize, "copied": copied}
    write_manifest(storage.join(out, MANIFEST_NAME), rows, manifest_header(config))
    storage.write_text(storage.join(out, CLUSTERS_NAME), _jsonl(result.clusters))
    storage.write_text(
        storage.join(out, CANDIDATES_NAME), _jsonl(map(_candidate_json, result.candidate_pairs))
    )
    storage.write_text(
        storage.join(out, REJECTED_NAME),
        _jsonl(_rejected_json(r) for r in rows if r.status == "rejected"),
    )
    storage.write_text(
        storage.join(out, SUMMARY_NAME), json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
    )
    html = render_report(result.clusters, summary, thumbnails.get, rows=rows)
    storage.write_text(storage.join(out, REPORT_NAME), html)
    return summary


# --------------------------------------------------------------------------- in process


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(config: DedupConfig, cache: HashCache) -> None:
    _WORKER_STATE.update(config=config, recipe=config.recipe(), cache=cache)


def _fingerprint_in_worker(item: Item) -> ImageRecord | Rejected:
    state = _WORKER_STATE
    return fingerprint(item, state["config"], state["recipe"], state["cache"])


def _describe_in_worker(uri: str) -> tuple[str, str, bytes]:
    state = _WORKER_STATE
    return describe_file(uri, state["config"], state["recipe"], state["cache"])


def _describe_with_features_in_worker(
    uri: str, features: bool
) -> tuple[str, str, bytes, Features | None]:
    state = _WORKER_STATE
    return describe_with_features(uri, state["config"], state["recipe"], state["cache"], features)


class _PhaseClock:
    """Logs how long each phase of the in-process engine took (where the time goes)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        log.info("%s: %.2f s", what, now - self.last)
        self.last = now


def run_in_process(paths: JobPaths, config: DedupConfig, *, workers: int = 0) -> dict[str, Any]:
    """The same job without Beam, on this machine: same core calls, identical outputs.

    For local inputs where a runner's start-up and per-element costs dominate (a few
    thousand photos on a laptop). Each step calls the function the Beam job calls:
    :func:`fingerprint` per file (in a pool of forked processes), then
    :func:`kaedama.dedup.decide.find_candidate_pairs` (the in-memory exact pair search, which
    finds the same pairs as the Beam job's distributed search), :func:`describe_file`
    for the candidate images (:func:`describe_with_features` when the keypoint test is
    on: one decode for both, features only for pairs the cache does not answer through
    :func:`cached_pair`, then :func:`match_pair`), ``decide``, :func:`thumbnail`,
    :func:`update_cache`, :func:`write_outputs` and :func:`plan_copies`.

    Args:
        paths: local input, output, cache and materialize paths.
        config: the dedup settings.
        workers: processes for hashing and thumbnails (0 = one per core).

    Returns:
        The summary, as written to ``summary.json``.

    Raises:
        DedupJobError: a path is not local, or the paths overlap (:func:`check_paths`).
    """
    if not all(is_local(u) for u in (paths.input, paths.output, paths.cache, paths.materialize)):
        raise DedupJobError(
            "the in-process engine reads and writes local paths only; run the Beam job "
            "(without --in-process) for gs:// inputs or outputs"
        )
    check_paths(paths)
    require_tools(config)
    person = person_decisions(config)  # a bad file fails before any image is read
    clock = _PhaseClock()
    items = list_inputs(paths.input)
    cache = HashCache.load(paths.cache)
    recipe = config.recipe()
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
        near = find_candidate_pairs(records, config)
        uris = near_pair_uris(near)
        chunk = max(1, len(uris) // 64)
        geometry = {}
        verified: list[Verified | None] = []
        if config.verifies_keypoints:
            # The cache answers pairs tested before; one read and decode per image for
            # both second signals; then each new pair's match from its two features.
            sha_of = {r.uri: r.sha256 for r in records}
            known = [cached_pair(a, b, sha_of[a], sha_of[b], cache) for a, b, _ in near]
            todo = [pair for pair, hit in zip(near, known, strict=True) if hit is None]
            need = set(near_pair_uris(todo))
            outs = pool.starmap(
                _describe_with_features_in_worker,
                [(uri, uri in need) for uri in uris],
                chunksize=chunk,
            )
            descriptors = [(uri, sha, desc) for uri, sha, desc, _ in outs]
            found = {uri: feats for uri, _, _, feats in outs}
            seen = {uri: sha for uri, sha, _, _ in outs}  # the bytes the features came from
            clock.lap(
                f"pair search + describe {len(uris)} candidate images ({len(need)} keypoints)"
            )
            verified = [hit for hit in known if hit is not None]
            verified += pool.starmap(
                match_pair,
                [(a, b, seen[a], seen[b], found.get(a), found.get(b)) for a, b, _ in todo],
                chunksize=max(1, len(todo) // 16),
            )
            geometry = geometry_of(verified)
            clock.lap(
                f"same-shot keypoint test of {len(near)} candidate pairs "
                f"({len(near) - len(todo)} from the cache)"
            )
        else:
            descriptors = pool.map(_describe_in_worker, uris, chunksize=chunk)
            clock.lap(f"pair search + describe {len(uris)} candidate images")
        described = with_descriptors(records, {uri: desc for uri, _, desc in descriptors})
        pairs = identical_file_pairs(records) + near
        result = decide(
            described,
            rejected,
            pairs,
            config,
            listed=len(items),
            geometry=geometry,
            decisions=person,
        )
        clock.lap("decide")
        thumbs = dict(
            pool.starmap(
                thumbnail,
                [(uri, paths.thumbnail_size, config) for uri in cluster_uris(result)],
            )
        )
        copied = len(pool.map(copy_file, plan_copies(result, paths)))
        clock.lap("thumbnails + copies")
    new = cache_of(records, descriptors, recipe.key(), verified)
    stats = update_cache(new, paths.cache)
    summary = write_outputs(result, thumbs, stats, paths, config, copied=copied)
    clock.lap("cache + outputs")
    return summary
