"""Dedup decisions: exact duplicates, near-duplicates and label conflicts.

Inputs are fingerprints (:class:`kaedama.dedup.hashing.ImageRecord`), the files that could
not be read (:class:`Rejected`) and candidate pairs ``(uri_a, uri_b, distance)`` from
an exact Hamming search (:mod:`kaedama.dedup.neighbors`). The output gives exactly one
manifest row per input file.

Steps
    1. Candidates: every pair within ``threshold`` bits (distance recomputed here).
    2. Confirmation: is the pair the same shot? ``same_shot`` picks the test (see
       :func:`same_shot`): ``descriptor``, the thumbnail correlation of
       :func:`kaedama.dedup.hashing.descriptor_similarity`, must reach
       ``confirm_threshold``; ``keypoints``, the share of keypoints that one RANSAC
       homography maps onto nearly identical patches
       (:attr:`kaedama.dedup.sameshot.Geometry.exact_ratio`), must reach
       ``keypoint_threshold``, over at least ``MIN_COVERAGE`` of the picture (a shared
       logo or watermark matches exactly in a corner of different pictures);
       ``combined`` (the default) asks the keypoints where both images have enough
       texture to judge and the descriptor where they have not (flat, blank or tiny
       images).
       Unconfirmed candidates are reported but never cluster, because different
       photos can share a phash (product shots on white).
    3. Clusters: connected components over identical sha256 and confirmed pairs.
    4. A cluster spanning several labels is a label conflict, resolved by
       ``conflict_policy``: ``drop_all`` drops every member; ``majority`` keeps the
       images of a strict majority label (then dedups them) and drops the rest, or
       drops all when no label has a strict majority; ``review`` keeps every label's
       images (still one per duplicate group within a label) and flags every member
       with ``extra["review"] = "label_conflict"``.
    5. Within one label, each connected group keeps one image: within identical bytes
       by ``exact_keep`` (``first`` = smallest URI, ``oldest`` = earliest time,
       ``largest`` = most bytes, which ties for identical bytes and so falls back to
       the URI), then across the group by ``near_keep`` (``largest`` = most pixels,
       ``first`` = smallest URI, ``oldest`` = earliest time: the original rather than
       an edited copy). A photo's time (:func:`photo_time`) is its EXIF capture time
       where the header records one, else the file's modification time (the order of
       ``jdupes --order=time``); a capture time without a UTC offset counts as UTC.
       Identical bytes carry identical EXIF, so among them ``oldest`` is the
       modification time. Dropped images name the kept one in
       ``duplicate_of`` with reason ``exact_duplicate`` (same bytes as the kept image)
       or ``near_duplicate``.

Every decision depends only on the set of inputs, not their order: records are
sorted by URI and ties are broken by URI. Cluster ids are ``"c"`` + the first 12 hex
digits of the smallest sha256 in the cluster.

Scaling
    Hashing is per file and parallel. The pair search is parallel too in Beam: each
    hash is emitted under its ``t + 1`` block keys, the buckets are verified in
    ``(block, shard)`` groups spread over workers (:mod:`kaedama.dedup.job`), and
    the in-memory :func:`kaedama.dedup.neighbors.find_pairs` handles a million hashes in
    seconds on one core (see BENCHMARKS.md). Buckets grow as
    N / 2^(64/(t+1)) for spread-out hashes; hashes that share blocks (blank or uniform
    images) make large buckets, which are logged and verified in bounded chunks, and
    identical hashes cost their output pairs only. The single-worker part is this
    module: :func:`decide` holds every record (about 200 bytes each; the 1,216-byte
    descriptor only for the images of candidate pairs, which the job describes after
    the search) plus the candidate pairs in memory, computes similarities in one
    vectorised pass and runs connected components (union-find) in
    O((N + P) alpha(N)). It scales linearly to about five million images per GiB of
    worker memory; beyond roughly 10^7 images
    or 10^8 candidate pairs the confirmation and component steps must move into the
    pipeline (confirm inside the bucket step, components by iterative label
    propagation) and only the per-cluster decisions stay here.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np

from kaedama import images
from kaedama.config import ConfigError, config_to_dict
from kaedama.dedup.decisions import Decision
from kaedama.dedup.hashing import (
    DESCRIPTOR_BYTES,
    DESCRIPTOR_VERSION,
    DRAFT_SIZE,
    HashingError,
    HashRecipe,
    ImageRecord,
    descriptor_similarities,
    hash_to_hex,
)
from kaedama.dedup.neighbors import LARGE_BUCKET, find_pairs, hash_array
from kaedama.dedup.sameshot import VERSION as KEYPOINTS_VERSION
from kaedama.dedup.sameshot import Geometry
from kaedama.errors import KaedamaError
from kaedama.manifest import DUPLICATE_URI, Row

log = logging.getLogger(__name__)

# Calibrated in bench/bench_planted.py (see BENCHMARKS.md): keeps 99.9% of 1,500 planted
# resize / JPEG q25 / brightness / 5% crop copies of Caltech photos (all but one crop)
# and rejects 129 of the 264 Caltech phash candidates, which are mostly different
# objects photographed alike (motorbikes on white, airliners on blue sky).
DEFAULT_CONFIRM_THRESHOLD = 0.80

# Calibrated in bench/bench_pairs.py on the 271 Caltech-101 candidate pairs labelled by
# eye (bench/sameshot_pairs.jsonl) and 300 planted copies: 7% of the keypoints matched
# exactly in place keeps 95.7% of the Caltech same-shot pairs (96.7% of the planted
# copies) and 58.6% of the near shots, and merges 3.4% of different photos (the
# descriptor alone merges 23.6%: studio shots of one motorbike model in one pose).
# Calibrated and measured on the same set: there are no held-out pairs.
DEFAULT_KEYPOINT_THRESHOLD = 0.07
# combined: below this many keypoints in either image (flat, blank, tiny) the keypoint
# test has nothing to judge by and the descriptor decides.
MIN_KEYPOINTS = 40
# keypoints/combined: the homography's inliers must span at least this share of the
# picture (convex hull): a small mark shared by two different pictures (a logo in a
# corner) cannot confirm them. Low, because a thin subject spans little: the minaret
# pair of the bench set spans 2%, every other same-shot pair over 10%.
MIN_COVERAGE = 0.01
SAME_SHOT_METHODS = ("descriptor", "keypoints", "combined")

REASONS = ("exact_duplicate", "near_duplicate", "label_conflict", "unwanted")


class DedupError(KaedamaError):
    """The dedup inputs are inconsistent (e.g. a URI listed twice)."""


@dataclass(frozen=True)
class DedupConfig:
    """Configuration of the dedup stage; the CLI flags and Beam options mirror these fields."""

    hash_algorithm: Literal["phash", "ahash", "dhash", "whash"] = field(
        default="phash", metadata={"help": "perceptual hash (imagehash-compatible bits)"}
    )
    hash_size: int = field(default=8, metadata={"help": "hash grid side; bits = hash_size^2"})
    hash_method: Literal["fast", "exact", "imagehash"] = field(
        default="fast",
        metadata={
            "help": "fast: pHash from the JPEG's luma plane with a two-step resize (~1.7x "
            "exact's speed, same recall); exact: kaedama's bit-exact implementation of "
            "imagehash's pHash; imagehash: imagehash's own functions (with "
            "reduced_decode=false: imgdupes' bits)"
        },
    )
    reduced_decode: bool = field(
        default=True,
        metadata={"help": "decode JPEGs at reduced size before hashing (faster; recipe recorded)"},
    )
    draft_size: int = field(
        default=DRAFT_SIZE,
        metadata={
            "help": "reduced decode: smallest side kept, in pixels (64 is ~2x faster on "
            "small photos, with a small recall cost: see BENCHMARKS.md)"
        },
    )
    threshold: int = field(
        default=4, metadata={"help": "near-duplicate candidates: Hamming distance <= this"}
    )
    confirm: bool = field(
        default=True,
        metadata={"help": "confirm candidates with a second signal (thumbnail correlation)"},
    )
    confirm_threshold: float = field(
        default=DEFAULT_CONFIRM_THRESHOLD,
        metadata={"help": "minimum thumbnail correlation (-1..1) for a confirmed near-duplicate"},
    )
    same_shot: Literal["descriptor", "keypoints", "combined"] = field(
        default="combined",
        metadata={
            "help": "how a candidate pair is confirmed as one shot: descriptor (thumbnail "
            "correlation), keypoints (ORB keypoints on nearly identical patches under one "
            "RANSAC homography; needs kaedama[clean]) or combined (keypoints where the "
            "images have texture, the descriptor where not)"
        },
    )
    keypoint_threshold: float = field(
        default=DEFAULT_KEYPOINT_THRESHOLD,
        metadata={"help": "keypoints/combined: minimum share (0..1) of keypoints matched exactly"},
    )
    exact_keep: Literal["first", "oldest", "largest"] = field(
        default="first",
        metadata={
            "help": "which of identical files to keep: first (URI), oldest (EXIF capture "
            "time, else the file's time) or largest"
        },
    )
    near_keep: Literal["largest", "first", "oldest"] = field(
        default="largest",
        metadata={
            "help": "which near-duplicate to keep within one label: largest (pixels), first "
            "(URI) or oldest (EXIF capture time, else the file's time)"
        },
    )
    conflict_policy: Literal["drop_all", "majority", "review"] = field(
        default="drop_all", metadata={"help": "clusters spanning several labels"}
    )
    decisions: str = field(
        default="",
        metadata={
            "help": "a decisions file downloaded from report.html (JSON keyed by sha256): "
            "not a duplicate / keep / unwanted / relabel, applied on this run"
        },
    )
    keep_gps: bool = field(
        default=False,
        metadata={
            "help": "record the EXIF GPS position in the manifest (personal data: off by "
            "default; capture time and camera are always recorded where present)"
        },
    )
    max_bucket: int = field(
        default=LARGE_BUCKET,
        metadata={"help": "log and chunk hash buckets larger than this (still exact)"},
    )
    max_pixels: int = field(
        default=images.DEFAULT_MAX_PIXELS,
        metadata={"help": "reject images with more pixels than this (decompression bombs)"},
    )
    max_bytes: int = field(
        default=images.DEFAULT_MAX_BYTES,
        metadata={
            "help": "reject files larger than this many bytes before reading them "
            "(a stray video never lands in a worker's memory); reason too_large"
        },
    )
    read_threads: int = field(
        default=4,
        metadata={
            "help": "files each Beam worker reads and hashes at once (hides object-storage "
            "latency; Pillow decodes outside the GIL, so they also share a machine's cores)"
        },
    )

    def __post_init__(self) -> None:
        try:
            recipe = self.recipe()
        except HashingError as exc:
            raise ConfigError(str(exc)) from exc
        if not 0 <= self.threshold < recipe.bits:
            raise ConfigError(f"threshold must be in [0, {recipe.bits - 1}], got {self.threshold}")
        if not -1.0 <= self.confirm_threshold <= 1.0:
            raise ConfigError(f"confirm_threshold must be in [-1, 1], got {self.confirm_threshold}")
        if not 0.0 <= self.keypoint_threshold <= 1.0:
            raise ConfigError(
                f"keypoint_threshold must be in [0, 1], got {self.keypoint_threshold}"
            )
        if self.max_bucket < 2:
            raise ConfigError(f"max_bucket must be >= 2, got {self.max_bucket}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.read_threads < 1:
            raise ConfigError(f"read_threads must be >= 1, got {self.read_threads}")

    @property
    def needs_mtime(self) -> bool:
        """True when a keep policy orders by time (the file's mtime is then read)."""
        return "oldest" in (self.exact_keep, self.near_keep)

    @property
    def verifies_keypoints(self) -> bool:
        """True when candidate pairs need the keypoint test (and so OpenCV)."""
        return self.confirm and self.same_shot != "descriptor"

    def recipe(self) -> HashRecipe:
        """The hash recipe these settings describe."""
        return HashRecipe(
            self.hash_algorithm,
            self.hash_size,
            self.reduced_decode,
            method=self.hash_method,
            draft_size=self.draft_size,
        )


@dataclass
class Rejected:
    """A file that could not be read as an image."""

    uri: str
    label: str
    reason: str
    message: str
    bytes: int = 0


@dataclass
class DedupResult:
    """Everything the dedup stage decided.

    Attributes:
        rows: one manifest row per input (records and rejected), sorted by URI.
        clusters: one dict per cluster, sorted by id::

            {"id": "c1a2b...", "labels": [...], "conflict": bool,
             "decision": "keep_one" | "drop_all" | "majority" | "no_majority" | "review",
             "kept": [uri, ...],
             "members": [{"uri", "label", "sha256", "bytes", "width", "height",
                          "decision": status, "reason", "duplicate_of"}, ...],
             "exact_groups": [[uri, ...], ...],          # identical bytes, 2+ members
             "pairs": [{"a", "b", "distance", "similarity", "confirmed"}, ...]}

        candidate_pairs: every candidate ``(a, b, distance, similarity, confirmed,
            keypoints)``; ``keypoints`` is the pair's exact-keypoint share
            (:attr:`kaedama.dedup.sameshot.Geometry.exact_ratio`) where the keypoint
            test judged it, else None.
        summary: counts (see :func:`summarise`).
    """

    rows: list[Row]
    clusters: list[dict[str, Any]]
    candidate_pairs: list[tuple[str, str, int, float, bool, float | None]]
    summary: dict[str, Any]


def manifest_header(config: DedupConfig) -> dict[str, Any]:
    """What the manifest records once: the hash recipe and the dedup settings."""
    recipe = config.recipe()
    return {
        "stage": "dedup",
        "hash_recipe": recipe.key(),
        "hash": recipe.to_dict(),
        "descriptor": {"version": DESCRIPTOR_VERSION, "bytes": DESCRIPTOR_BYTES},
        "keypoints": {"version": KEYPOINTS_VERSION},
        "dedup": config_to_dict(config),
    }


# --------------------------------------------------------------------------- keep policies


def photo_time(rec: ImageRecord) -> float:
    """POSIX seconds: the EXIF capture time (UTC when it has no offset), else the mtime."""
    if not rec.taken:
        return rec.mtime
    taken = datetime.fromisoformat(rec.taken)
    if taken.tzinfo is None:
        taken = taken.replace(tzinfo=timezone.utc)
    return taken.timestamp()


def _exact_order(rec: ImageRecord, policy: str) -> tuple:
    if policy == "oldest":
        return (photo_time(rec), rec.mtime, rec.uri)
    if policy == "largest":
        return (-rec.bytes, -rec.width * rec.height, rec.uri)
    return (rec.uri,)


def _near_order(rec: ImageRecord, policy: str) -> tuple:
    if policy == "largest":
        return (-rec.width * rec.height, -rec.bytes, rec.uri)
    if policy == "oldest":
        return (photo_time(rec), rec.uri)
    return (rec.uri,)


@dataclass
class _Decision:
    status: str = "kept"
    reason: str = ""
    duplicate_of: str = ""
    cluster: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _components(n: int, edges_a: np.ndarray, edges_b: np.ndarray) -> np.ndarray:
    """Connected-component label per node: union-find, O((n + edges) * alpha(n)).

    The label of a component is its smallest node. Edges are few (duplicates are rare),
    so a plain loop over them beats importing a graph library.
    """
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for a, b in zip(edges_a.tolist(), edges_b.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def _dedup_within_label(
    members: list[int],
    recs: list[ImageRecord],
    edges: list[tuple[int, int]],
    config: DedupConfig,
    decisions: list[_Decision],
    keep: frozenset[int] | set[int] = frozenset(),
) -> list[int]:
    """Keep one image per connected group of ``members`` (one label); returns kept indices.

    Connectivity is by content: files with the same sha256 are one node, and an edge
    between any two files joins their contents. Candidate pairs name one file per
    content (the search pairs contents, not every copy), so an edge found between
    copies under another label still joins this label's copies of the same contents.
    ``keep`` (a person's decision) wins its group and is never dropped.
    """
    local = {m: k for k, m in enumerate(members)}
    first_of_sha: dict[str, int] = {}
    a: list[int] = []
    b: list[int] = []
    for m in members:
        first = first_of_sha.setdefault(recs[m].sha256, local[m])
        if first != local[m]:
            a.append(first)
            b.append(local[m])
    for x, y in edges:
        fx, fy = first_of_sha.get(recs[x].sha256), first_of_sha.get(recs[y].sha256)
        if fx is not None and fy is not None:
            a.append(fx)
            b.append(fy)
    comp = _components(len(members), np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
    groups: dict[int, list[int]] = defaultdict(list)
    for m, c in zip(members, comp.tolist(), strict=True):
        groups[c].append(m)
    kept = []
    for group in groups.values():
        shas: dict[str, list[int]] = defaultdict(list)
        for m in group:
            shas[recs[m].sha256].append(m)
        reps = {
            sha: min(ms, key=lambda m: _exact_order(recs[m], config.exact_keep))
            for sha, ms in shas.items()
        }
        winner = min(
            reps.values(), key=lambda m: (m not in keep, _near_order(recs[m], config.near_keep))
        )
        kept.append(winner)
        for m in group:
            if m == winner or m in keep:
                continue
            same_bytes = recs[m].sha256 == recs[winner].sha256
            decisions[m].status = "dropped"
            decisions[m].reason = "exact_duplicate" if same_bytes else "near_duplicate"
            decisions[m].duplicate_of = recs[winner].uri
    return kept


# --------------------------------------------------------------------------- decide


def _candidates(
    candidate_pairs: Iterable[tuple], recs: list[ImageRecord], index: dict[str, int], config
) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Normalise candidates to unique (i, j, distance), i < j, distance recomputed."""
    found: set[tuple[int, int]] = set()
    for pair in candidate_pairs:
        a, b = pair[0], pair[1]
        if a == b:
            continue
        try:
            i, j = index[a], index[b]
        except KeyError as exc:
            raise DedupError(
                f"candidate pair names {exc.args[0]!r}, which is not among the hashed images; "
                "were the pairs computed on another input?"
            ) from exc
        found.add((min(i, j), max(i, j)))
    pairs = []
    for i, j in sorted(found):
        dist = (recs[i].hash ^ recs[j].hash).bit_count()
        if dist <= config.threshold:
            pairs.append((i, j, dist))
    sims = np.ones(len(pairs), dtype=np.float32)  # identical bytes need no second signal
    near = [k for k, (i, j, _) in enumerate(pairs) if recs[i].sha256 != recs[j].sha256]
    described = [k for k in near if recs[pairs[k][0]].descriptor and recs[pairs[k][1]].descriptor]
    if len(described) < len(near):
        # The job describes every image of a near pair; one that could not be re-read
        # (changed or deleted since it was hashed) cannot be confirmed.
        log.warning(
            "%d candidate pairs have no descriptor: left unconfirmed", len(near) - len(described)
        )
    sims[near] = -1.0
    if described:
        sims[described] = descriptor_similarities(
            [recs[pairs[k][0]].descriptor for k in described],
            [recs[pairs[k][1]].descriptor for k in described],
        )
    return pairs, sims


def same_shot(
    similarity: float, geometry: Geometry | None, config: DedupConfig
) -> tuple[bool, float | None]:
    """Whether one candidate pair of different files is the same shot, and the keypoint score.

    The rule of ``config.same_shot`` (see the module docstring). ``geometry`` is None
    when the pair was not verified (the keypoint test off, or a file no longer
    readable): ``keypoints`` then leaves it unconfirmed, ``combined`` lets the
    descriptor decide, as for images without texture.

    Returns:
        ``(confirmed, score)``: ``score`` is the exact-keypoint share where the
        keypoint test decided, else None.
    """
    by_descriptor = similarity >= config.confirm_threshold
    if config.same_shot == "descriptor":
        return by_descriptor, None
    if config.same_shot == "combined" and (geometry is None or geometry.keypoints < MIN_KEYPOINTS):
        return by_descriptor, None
    if geometry is None:
        return False, None
    score = geometry.exact_ratio
    return score >= config.keypoint_threshold and geometry.coverage >= MIN_COVERAGE, score


def _confirm(
    pairs: list[tuple[int, int, int]],
    sims: np.ndarray,
    recs: list[ImageRecord],
    config: DedupConfig,
    geometry: Mapping[tuple[str, str], Geometry],
) -> tuple[list[bool], list[float | None]]:
    """``(confirmed, keypoint score)`` per pair: identical bytes always, others by :func:`same_shot`."""
    if not config.confirm:
        return [True] * len(pairs), [None] * len(pairs)
    confirmed: list[bool] = []
    scores: list[float | None] = []
    missing = 0
    for (i, j, _), sim in zip(pairs, sims.tolist(), strict=True):
        if recs[i].sha256 == recs[j].sha256:
            confirmed.append(True)
            scores.append(None)
            continue
        found = geometry.get((recs[i].uri, recs[j].uri))
        missing += found is None
        ok, score = same_shot(sim, found, config)
        confirmed.append(ok)
        scores.append(score)
    if config.verifies_keypoints and missing:
        log.warning(
            "%d near pairs have no keypoint test (not verified, or a file is no longer "
            "readable): %s",
            missing,
            "left unconfirmed" if config.same_shot == "keypoints" else "judged by the descriptor",
        )
    return confirmed, scores


def _action(rec: ImageRecord, person: Mapping[str, Decision]) -> str:
    decision = person.get(rec.sha256)
    return decision.action if decision is not None else ""


def _kept_apart(a: ImageRecord, b: ImageRecord, person: Mapping[str, Decision]) -> bool:
    """True when a person said one of the two is no duplicate (or unwanted altogether)."""
    return bool({_action(a, person), _action(b, person)} & {"not_duplicate", "unwanted"})


def _relabelled(
    records: Iterable[ImageRecord], person: Mapping[str, Decision]
) -> list[ImageRecord]:
    """The records with a person's label decisions applied."""
    out = []
    for r in records:
        decision = person.get(r.sha256)
        if decision is not None and decision.action == "label" and decision.label != r.label:
            r = replace(r, label=decision.label)
        out.append(r)
    return out


def near_pair_uris(candidate_pairs: Iterable[tuple]) -> list[str]:
    """Sorted URIs of the images in candidate pairs: the ones to describe before deciding.

    Pass the pairs of different files: identical bytes are confirmed by their sha256.
    """
    return sorted({uri for pair in candidate_pairs for uri in pair[:2]})


def with_descriptors(
    records: Iterable[ImageRecord], descriptors: Mapping[str, bytes]
) -> list[ImageRecord]:
    """The records, each given its descriptor from ``descriptors`` (by URI) when present."""
    return [
        replace(r, descriptor=descriptors[r.uri]) if descriptors.get(r.uri) else r for r in records
    ]


def decide(
    records: Sequence[ImageRecord],
    rejected: Sequence[Rejected],
    candidate_pairs: Iterable[tuple[str, str, int]],
    config: DedupConfig,
    *,
    listed: int | None = None,
    geometry: Mapping[tuple[str, str], Geometry] | None = None,
    decisions: Mapping[str, Decision] | None = None,
) -> DedupResult:
    """Decide kept/dropped for every image; see the module docstring for the rules.

    Args:
        records: fingerprints of the readable images (unique URIs).
        rejected: the unreadable files.
        candidate_pairs: ``(uri_a, uri_b, distance)`` from the Hamming search, in any
            order and possibly repeated; the distance is recomputed from the records,
            and pairs beyond ``config.threshold`` are ignored.
        config: the stage configuration.
        listed: how many entries the listing gave, counted where they were listed
            (not from the rows): kept + dropped + rejected must equal it.
        geometry: the keypoint test of near pairs (:func:`kaedama.dedup.sameshot.match`),
            keyed by ``(uri_a, uri_b)`` with ``uri_a < uri_b``; used when
            ``config.same_shot`` is not ``descriptor``.
        decisions: a person's decisions by sha256 (:mod:`kaedama.dedup.decisions`),
            applied over the rules: relabels first, ``not_duplicate`` images join no
            near pair, ``keep`` images stay kept (and are preferred within their
            group), ``unwanted`` images are dropped. Their rows say ``decided``.

    Returns:
        The :class:`DedupResult`.

    Raises:
        DedupError: a URI appears twice (other than as a ``duplicate_uri`` rejection),
            a pair names an unknown URI, or the counts do not add up to ``listed``.
    """
    person = decisions or {}
    recs = sorted(_relabelled(records, person), key=lambda r: r.uri)
    rej = sorted(rejected, key=lambda r: (r.uri, r.reason == DUPLICATE_URI, r.label))
    seen: set[str] = set()
    for uri in [r.uri for r in recs] + [r.uri for r in rej if r.reason != DUPLICATE_URI]:
        if uri in seen:
            raise DedupError(f"{uri} is listed more than once; list every file once")
        seen.add(uri)
    index = {r.uri: i for i, r in enumerate(recs)}
    n = len(recs)
    bits = config.recipe().bits

    pairs, sims = _candidates(candidate_pairs, recs, index, config)
    confirmed, scores = _confirm(pairs, sims, recs, config, geometry or {})
    edges = [
        (i, j)
        for (i, j, _), ok in zip(pairs, confirmed, strict=True)
        if ok and not _kept_apart(recs[i], recs[j], person)
    ]

    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        if _action(r, person) != "unwanted":  # unwanted images join nothing
            by_sha[r.sha256].append(i)
    ea = [i for i, _ in edges] + [g[0] for g in by_sha.values() for _ in g[1:]]
    eb = [j for _, j in edges] + [o for g in by_sha.values() for o in g[1:]]
    comp = _components(n, np.array(ea, dtype=np.int64), np.array(eb, dtype=np.int64))

    components = comp.tolist()
    members_of: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(components):
        members_of[c].append(i)
    # Each cluster's own edges, so that deciding a cluster costs its size, not the run's.
    edges_of: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, j in edges:
        edges_of[components[i]].append((i, j))
    decided = [person.get(r.sha256) for r in recs]
    keep = {i for i, d in enumerate(decided) if d is not None and d.action == "keep"}
    decisions = [_Decision() for _ in range(n)]
    for i, d in enumerate(decided):
        if d is not None:
            decisions[i].extra["decided"] = d.action
            if d.action == "unwanted":  # joined no pair, so in no cluster
                decisions[i].status, decisions[i].reason = "dropped", "unwanted"
    clusters: list[dict[str, Any]] = []
    for root, members in members_of.items():
        if len(members) < 2:
            continue
        cluster_edges = edges_of[root]
        cid = "c" + min(recs[m].sha256 for m in members)[:12]
        for m in members:
            decisions[m].cluster = cid
        labels = Counter(recs[m].label for m in members)
        kept: list[int] = []
        if len(labels) == 1:
            decision = "keep_one"
            kept = _dedup_within_label(members, recs, cluster_edges, config, decisions, keep)
        elif config.conflict_policy == "review":
            decision = "review"
            for label in sorted(labels):
                subset = [m for m in members if recs[m].label == label]
                kept += _dedup_within_label(subset, recs, cluster_edges, config, decisions, keep)
            for m in members:
                decisions[m].extra["review"] = "label_conflict"
        else:
            top_label, top = max(labels.items(), key=lambda kv: (kv[1], kv[0]))
            majority = config.conflict_policy == "majority" and 2 * top > len(members)
            decision = "majority" if majority else "drop_all"
            if config.conflict_policy == "majority" and not majority:
                decision = "no_majority"
            for m in members:
                if (not majority or recs[m].label != top_label) and m not in keep:
                    decisions[m].status = "dropped"
                    decisions[m].reason = "label_conflict"
            if majority:
                subset = [m for m in members if recs[m].label == top_label]
                kept = _dedup_within_label(subset, recs, cluster_edges, config, decisions, keep)
        kept = sorted(set(kept) | (keep & set(members)))
        clusters.append(
            {
                "id": cid,
                "labels": sorted(labels),
                "conflict": len(labels) > 1,
                "decision": decision,
                "kept": sorted(recs[m].uri for m in kept),
                "members": [
                    {
                        "uri": recs[m].uri,
                        "label": recs[m].label,
                        "sha256": recs[m].sha256,
                        "bytes": recs[m].bytes,
                        "width": recs[m].width,
                        "height": recs[m].height,
                        "decision": decisions[m].status,
                        "reason": decisions[m].reason,
                        "duplicate_of": decisions[m].duplicate_of,
                        **({"decided": decided[m].action} if decided[m] is not None else {}),
                    }
                    for m in members
                ],
                "exact_groups": sorted(
                    sorted(recs[m].uri for m in g)
                    for g in (
                        [m for m in members if recs[m].sha256 == sha]
                        for sha in sorted({recs[m].sha256 for m in members})
                    )
                    if len(g) > 1
                ),
                "pairs": [],
            }
        )

    candidates_out = []
    pairs_by_cluster: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (i, j, dist), sim, ok, score in zip(pairs, sims.tolist(), confirmed, scores, strict=True):
        sim = round(float(sim), 6)
        score = None if score is None else round(score, 6)
        candidates_out.append((recs[i].uri, recs[j].uri, dist, sim, bool(ok), score))
        ci, cj = decisions[i].cluster, decisions[j].cluster
        if ci and ci == cj:
            pairs_by_cluster[ci].append(
                {
                    "a": recs[i].uri,
                    "b": recs[j].uri,
                    "distance": dist,
                    "similarity": sim,
                    "keypoints": score,
                    "confirmed": bool(ok),
                }
            )
    for cluster in clusters:
        cluster["pairs"] = pairs_by_cluster.get(cluster["id"], [])
    clusters.sort(key=lambda c: c["id"])

    rows = [
        Row(
            uri=r.uri,
            label=r.label,
            sha256=r.sha256,
            bytes=r.bytes,
            width=r.width,
            height=r.height,
            phash=hash_to_hex(r.hash, bits),
            cluster=d.cluster,
            status=d.status,
            reason=d.reason,
            duplicate_of=d.duplicate_of,
            extra={**exif_columns(r), **d.extra},
        )
        for r, d in zip(recs, decisions, strict=True)
    ]
    rows += [
        Row(
            uri=r.uri,
            label=r.label,
            bytes=r.bytes,
            status="rejected",
            reason=r.reason,
            extra={"message": r.message},
        )
        for r in rej
    ]
    rows.sort(key=lambda row: (row.uri, row.reason == DUPLICATE_URI, row.label))
    summary = summarise(rows, candidates_out, clusters, config, listed=listed)
    return DedupResult(rows, clusters, candidates_out, summary)


def exif_columns(rec: ImageRecord) -> dict[str, Any]:
    """The manifest's EXIF columns of one image: only the fields its header had."""
    columns: dict[str, Any] = {
        "taken": rec.taken,
        "camera_make": rec.make,
        "camera_model": rec.model,
    }
    if rec.gps is not None:
        columns["gps_latitude"], columns["gps_longitude"] = rec.gps
    return {k: v for k, v in columns.items() if v != ""}


def summarise(
    rows: Sequence[Row],
    candidate_pairs: Sequence[tuple[str, str, int, float, bool, float | None]],
    clusters: Sequence[dict[str, Any]],
    config: DedupConfig,
    *,
    listed: int | None = None,
) -> dict[str, Any]:
    """Counts for ``summary.json``; checks that kept + dropped + rejected = input.

    ``input`` is ``listed`` (counted by the listing) when given, so the check compares
    two independent counts and fails if a row was lost or made up on the way.

    Returns:
        ``{"input", "kept", "dropped", "rejected", "by_reason", "per_label":
        {label: {"before", "after", "dropped", "rejected"}}, "candidate_pairs",
        "confirmed_pairs", "clusters", "exact_duplicate_groups", "conflict_clusters",
        "review_flagged", "hash_recipe", "config"}``.
    """
    by_status = Counter(r.status for r in rows)
    by_reason = Counter(r.reason for r in rows if r.status != "kept")
    per_label: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = per_label.setdefault(
            r.label, {"before": 0, "after": 0, "dropped": 0, "rejected": 0}
        )
        entry["before"] += 1
        entry["after" if r.status == "kept" else r.status] += 1
    summary = {
        "input": len(rows) if listed is None else listed,
        "kept": by_status.get("kept", 0),
        "dropped": by_status.get("dropped", 0),
        "rejected": by_status.get("rejected", 0),
        "by_reason": dict(sorted(by_reason.items())),
        "per_label": dict(sorted(per_label.items())),
        "candidate_pairs": len(candidate_pairs),
        "confirmed_pairs": sum(1 for p in candidate_pairs if p[4]),
        "clusters": len(clusters),
        "exact_duplicate_groups": sum(len(c["exact_groups"]) for c in clusters),
        "conflict_clusters": sum(1 for c in clusters if c["conflict"]),
        "review_flagged": sum(1 for r in rows if r.extra.get("review")),
        "hash_recipe": config.recipe().key(),
        "config": config_to_dict(config),
    }
    if summary["kept"] + summary["dropped"] + summary["rejected"] != summary["input"]:
        raise DedupError(
            f"internal error: kept {summary['kept']} + dropped {summary['dropped']} + "
            f"rejected {summary['rejected']} != {summary['input']} files listed"
        )
    return summary


def _uris_by_sha(records: Iterable[ImageRecord]) -> dict[str, list[str]]:
    """The sorted URIs of each distinct content (sha256)."""
    members: dict[str, list[str]] = defaultdict(list)
    for r in records:
        members[r.sha256].append(r.uri)
    return {sha: sorted(uris) for sha, uris in members.items()}


def identical_file_pairs(records: Iterable[ImageRecord]) -> list[tuple[str, str, int]]:
    """An edge ``(first, other, 0)`` from each content's first URI to each of its copies.

    n identical files give n - 1 edges (a star), not n(n-1)/2 pairs: the clusters are
    the same, and 5,000 copies of a placeholder image stay cheap.
    """
    return [(uris[0], other, 0) for uris in _uris_by_sha(records).values() for other in uris[1:]]


def find_candidate_pairs(
    records: Sequence[ImageRecord], config: DedupConfig
) -> list[tuple[str, str, int]]:
    """``(uri_a, uri_b, distance)`` for every pair of different contents within the threshold.

    The exact search of :func:`kaedama.dedup.neighbors.find_pairs` over the distinct sha256s;
    the Beam job finds the same pairs with a distributed multi-index search.
    """
    members = _uris_by_sha(records)
    hash_of = {r.sha256: r.hash for r in records}
    shas = sorted(members)
    found = find_pairs(
        hash_array([hash_of[sha] for sha in shas], config.recipe().bits),
        config.threshold,
        max_bucket=config.max_bucket,
    )
    # One pair per pair of contents, between their first URIs: the copies join through
    # identical_file_pairs, so the clusters are those of every copy against every copy.
    pairs = []
    for i, j, d in found.tolist():
        a, b = members[shas[i]][0], members[shas[j]][0]
        pairs.append((a, b, d) if a < b else (b, a, d))
    return sorted(pairs)


def run_local(
    records: Sequence[ImageRecord],
    rejected: Sequence[Rejected],
    config: DedupConfig,
    *,
    geometry: Mapping[tuple[str, str], Geometry] | None = None,
) -> DedupResult:
    """Exact in-memory pair search plus :func:`decide`, for tests and small inputs.

    The records of near pairs need their descriptors (``hash_image_bytes(...,
    describe=True)``), or those pairs stay unconfirmed; without ``geometry`` (see
    :func:`decide`) the ``combined`` test judges them by the descriptor alone.
    """
    pairs = identical_file_pairs(records) + find_candidate_pairs(records, config)
    return decide(records, rejected, pairs, config, geometry=geometry)
