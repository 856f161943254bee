"""Split a cleaned manifest into train/val/test: stratified, cluster-aware, stable.

How a split is made
    1. Rows are grouped into *units*: every row sharing a non-empty ``cluster``, an
       identical ``sha256`` or a ``duplicate_of`` link lands in one unit (dropped
       members included), so near-duplicates never straddle splits.
    2. Some units are *fixed* before anything else: an explicit ``split``/``ml_use``
       column (as in AutoML), the split a row had in the ``previous`` dataset
       version, or a forced ``test`` because the unit duplicates an image of a
       reference test set (same sha256, or a phash within the dedup threshold that
       the thumbnail correlation of both images confirms, as dedup does).
    3. Each label gets largest-remainder targets from the ratios over its kept rows
       (raised to ``min_per_split`` per split where the label is big enough).
    4. The free units are taken largest first, ties in the order of a seeded sha256
       of a stable key (the unit's smallest image sha256, or URI), and each goes to
       the split with the largest deficit relative to its target for the unit's
       majority label. No random generator is involved, so the same input gives the
       same split on every machine, and a growing dataset only fills deficits.

The functions here are pure: rows and manifests in, rows and a JSON-friendly
summary out. :mod:`kaedama.commands.split` does the reading and writing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from kaedama import images, storage
from kaedama.dedup.decide import DEFAULT_CONFIRM_THRESHOLD
from kaedama.dedup.hashing import HashingError, HashRecipe, descriptor, descriptor_similarity
from kaedama.dedup.neighbors import find_pairs, hash_array
from kaedama.errors import KaedamaError
from kaedama.manifest import SPLITS, Manifest, Row
from kaedama.storage import StorageError

log = logging.getLogger(__name__)

# AutoML's ml_use spellings (any case) and kaedama's own split names -> split.
ML_USE = {
    "training": "train",
    "train": "train",
    "validation": "val",
    "val": "val",
    "test": "test",
}
# AutoML leaves a row to the automatic split with these values.
ML_USE_UNASSIGNED = ("", "unassigned")
REFERENCE_REASON = "reference_test_duplicate"
# Near-duplicate radius against reference test images when neither the config nor the
# manifest header (the dedup threshold) says; matches the dedup default.
DEFAULT_MAX_DISTANCE = 4
# Near matches per new image whose images are read to confirm them, nearest first.
MAX_CONFIRM = 5

# (uri_a, uri_b) pairs -> thumbnail correlation in [-1, 1], or None where unreadable.
Similarity = Callable[[Sequence[tuple[str, str]]], Sequence[float | None]]
# Where a fixed unit's rows disagree, the more held-out split wins the tie.
_TIE_ORDER = {"test": 0, "val": 1, "train": 2}


class SplitError(KaedamaError):
    """The split cannot be made as asked (bad config, bad override, incomparable hashes)."""


@dataclass(frozen=True)
class SplitConfig:
    """How to split a manifest; CLI flags and KFP parameters mirror these fields."""

    ratios: tuple[float, ...] = field(
        default=(8.0, 1.0, 1.0),
        metadata={"help": "train,val[,test] weights, e.g. 8,1,1 or 7,2,1; two values = no test"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the hash order; another seed draws another split"}
    )
    key: Literal["sha256", "uri"] = field(
        default="sha256",
        metadata={"help": "stable key hashed to order units (sha256 survives renames)"},
    )
    min_per_split: int = field(
        default=1,
        metadata={"help": "minimum images of each label in every split; fewer gets a warning"},
    )
    overrides: bool = field(
        default=True, metadata={"help": "honour a split or ml_use column in the input"}
    )
    reference_action: Literal["test", "drop"] = field(
        default="test",
        metadata={"help": "what to do with a new image that duplicates a reference test image"},
    )
    max_distance: int | None = field(
        default=None,
        metadata={
            "help": "perceptual-hash Hamming distance that counts as a near-duplicate of a "
            "reference test image; none = the dedup threshold recorded in the manifest "
            f"({DEFAULT_MAX_DISTANCE} if absent), -1 = exact (sha256) matches only"
        },
    )

    confirm: bool = field(
        default=True,
        metadata={
            "help": "confirm a phash match with a reference test image by the thumbnail "
            "correlation of both images (reads them), as dedup does"
        },
    )
    confirm_threshold: float | None = field(
        default=None,
        metadata={
            "help": "thumbnail correlation that confirms a near match; none = the dedup "
            f"setting recorded in the manifest ({DEFAULT_CONFIRM_THRESHOLD} if absent)"
        },
    )

    def __post_init__(self) -> None:
        if len(self.ratios) not in (2, 3):
            raise SplitError(
                f"ratios must have 2 (train,val) or 3 (train,val,test) values, got {self.ratios!r}"
            )
        if any(not math.isfinite(r) or r < 0 for r in self.ratios):
            raise SplitError(f"ratios must be finite and >= 0, got {self.ratios!r}")
        if self.ratios[0] <= 0:
            raise SplitError(f"the train ratio must be > 0, got {self.ratios!r}")
        if self.max_distance is not None and self.max_distance < -1:
            raise SplitError(f"max_distance must be >= -1, got {self.max_distance}")
        if self.confirm_threshold is not None and not -1 <= self.confirm_threshold <= 1:
            raise SplitError(f"confirm_threshold must be in [-1, 1], got {self.confirm_threshold}")
        if self.min_per_split < 0:
            raise SplitError(f"min_per_split must be >= 0, got {self.min_per_split}")

    @property
    def weights(self) -> dict[str, float]:
        """Normalised weight of each split (a missing test ratio is 0)."""
        values = [float(r) for r in self.ratios] + [0.0] * (3 - len(self.ratios))
        total = sum(values)
        return {s: v / total for s, v in zip(SPLITS, values, strict=True)}

    @property
    def active(self) -> tuple[str, ...]:
        """The splits with a positive ratio, in SPLITS order."""
        return tuple(s for s, w in self.weights.items() if w > 0)


@dataclass
class SplitResult:
    """The rows with ``split`` filled in, the summary, and the output header."""

    rows: list[Row]
    summary: dict[str, Any]
    header: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Targets


def targets_for(n: int, config: SplitConfig, label: str = "") -> dict[str, int]:
    """Largest-remainder counts of ``n`` images over the splits.

    Remainders are exact fractions; equal remainders are ordered by a seeded hash of
    the label, so over many labels neither val nor test collects every extra image.
    A single image goes to train. Splits below ``min_per_split`` are raised, in
    split order, by taking from the largest split while that keeps the minimum.
    """
    if n <= 1:
        return {s: (n if s == "train" else 0) for s in SPLITS}
    ratios = [Fraction(r) for r in config.ratios] + [Fraction(0)] * (3 - len(config.ratios))
    total = sum(ratios)
    exact = {s: n * r / total for s, r in zip(SPLITS, ratios, strict=True)}
    out = {s: math.floor(v) for s, v in exact.items()}
    rest = n - sum(out.values())

    def tiebreak(s: str) -> str:
        return hashlib.sha256(f"{config.seed}\0{label}\0{s}".encode()).hexdigest()

    by_remainder = sorted(SPLITS, key=lambda s: (-(exact[s] - out[s]), tiebreak(s)))
    for s in by_remainder[:rest]:
        out[s] += 1
    # Raise splits below the minimum (val before test), taking from the largest split
    # while it stays at the minimum itself: a label of 2 at 8:1:1 becomes 1/1/0.
    active = config.active
    floor = config.min_per_split
    for s in active:
        while out[s] < floor:
            donor = max(active, key=lambda d: (out[d], -SPLITS.index(d)))
            if out[donor] - 1 < floor:
                break
            out[donor] -= 1
            out[s] += 1
    return out


def _choose(target: Mapping[str, int], current: Mapping[str, int], size: int, active) -> str:
    """The split a unit of ``size`` images of one label goes to.

    Among splits whose deficit holds the whole unit, the largest deficit relative
    to target wins; when none holds it, the least overshoot (train on ties).
    """
    fits = [s for s in active if target[s] - current[s] >= size]
    if fits:
        return max(fits, key=lambda s: ((target[s] - current[s]) / target[s], -SPLITS.index(s)))
    return min(active, key=lambda s: (size - (target[s] - current[s]), SPLITS.index(s)))


# ---------------------------------------------------------------------------
# Units


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_units(rows: Sequence[Row]) -> list[list[int]]:
    """Row indices grouped into units: shared cluster, identical sha256, duplicate_of links.

    Returns:
        Units as sorted lists of row indices, ordered by their first index.
    """
    uf = _UnionFind(len(rows))
    first: dict[tuple[str, str], int] = {}
    by_uri: dict[str, int] = {}
    for i, row in enumerate(rows):
        by_uri.setdefault(row.uri, i)
        for kind, value in (("cluster", row.cluster), ("sha256", row.sha256)):
            if value:
                uf.union(first.setdefault((kind, value), i), i)
    for i, row in enumerate(rows):
        target = by_uri.get(row.duplicate_of) if row.duplicate_of else None
        if target is not None:
            uf.union(target, i)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        groups[uf.find(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def unit_order(rows: Sequence[Row], unit: Sequence[int], config: SplitConfig) -> str:
    """The seeded hash that orders a unit: sha256 of the seed and the unit's stable key."""
    shas = [rows[i].sha256 for i in unit if rows[i].sha256]
    if config.key == "sha256" and shas:
        key = "sha256:" + min(shas)
    else:
        key = "uri:" + min(rows[i].uri for i in unit)
    return hashlib.sha256(f"{config.seed}\0{key}".encode()).hexdigest()


# ---------------------------------------------------------------------------
# Overrides and the previous version


def override_of(row: Row, position: int) -> str:
    """The split a row's ``split``/``ml_use`` column fixes, or "" for none.

    Raises:
        SplitError: an unknown ml_use value, or split and ml_use disagree.
    """
    raw = row.extra.get("ml_use", "")
    ml_use = ""
    if raw is not None:
        if not isinstance(raw, str) or raw.strip().lower() not in (*ML_USE, *ML_USE_UNASSIGNED):
            raise SplitError(
                f"row {position} ({row.uri}): ml_use {raw!r} is not one of "
                "training, validation, test (any case) or unassigned"
            )
        ml_use = ML_USE.get(raw.strip().lower(), "")
    if row.split and ml_use and row.split != ml_use:
        raise SplitError(
            f"row {position} ({row.uri}): split {row.split!r} and ml_use {raw!r} disagree; "
            "keep one of the two columns"
        )
    return row.split or ml_use


def previous_lookup(previous: Iterable[Row]) -> tuple[dict[str, str], dict[str, str]]:
    """Maps from URI and from sha256 to the split a row had in the previous version.

    A sha256 maps only where all its previous rows agree, so a renamed image keeps
    its split but an ambiguous one does not pick a side.
    """
    by_uri: dict[str, str] = {}
    by_sha: dict[str, set[str]] = defaultdict(set)
    for row in previous:
        if not row.split:
            continue
        by_uri[row.uri] = row.split
        if row.sha256:
            by_sha[row.sha256].add(row.split)
    return by_uri, {sha: next(iter(s)) for sha, s in by_sha.items() if len(s) == 1}


# ---------------------------------------------------------------------------
# Reference test sets


def recipe_key(header: Mapping[str, Any] | None) -> Any:
    """The perceptual-hash recipe a manifest header records (its ``key`` where present)."""
    recipe = (header or {}).get("hash_recipe")
    if isinstance(recipe, Mapping):
        return recipe.get("key", dict(recipe))
    return recipe


def parse_hashes(hexes: Sequence[str], what: str) -> np.ndarray:
    """Hex perceptual hashes -> the uint64 array :func:`kaedama.dedup.neighbors.find_pairs` takes.

    Raises:
        SplitError: a hash is not hexadecimal, or the hashes differ in length.
    """
    lengths = {len(h) for h in hexes}
    if len(lengths) > 1:
        raise SplitError(f"{what}: perceptual hashes of different lengths {sorted(lengths)}")
    try:
        values = [int(h, 16) for h in hexes]
    except ValueError as exc:
        raise SplitError(f"{what}: a phash is not hexadecimal ({exc})") from exc
    return hash_array(values, 4 * (lengths.pop() if lengths else 16))


def cross_matches(
    queries: np.ndarray, refs: np.ndarray, max_distance: int
) -> list[tuple[int, int, int]]:
    """``(query, ref, distance)`` for every query-reference pair within ``max_distance`` bits.

    Uses the exact block search of :func:`kaedama.dedup.neighbors.find_pairs` on both sets
    together and keeps the pairs that cross between them.
    """
    if len(queries) == 0 or len(refs) == 0:
        return []
    pairs = find_pairs(np.concatenate([queries, refs]), max_distance)
    n = len(queries)
    cross = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]
    return [(int(i), int(j) - n, int(d)) for i, j, d in cross]


def near_radius(config: SplitConfig, header: Mapping[str, Any] | None) -> int:
    """The Hamming radius for reference matching: the config's, else the dedup threshold."""
    if config.max_distance is not None:
        return config.max_distance
    threshold = ((header or {}).get("dedup") or {}).get("threshold")
    return threshold if isinstance(threshold, int) else DEFAULT_MAX_DISTANCE


def _reference_test_rows(manifest: Manifest) -> tuple[list[Row], bool]:
    """The test rows of a reference manifest; a manifest without splits is all test."""
    rows = [r for r in manifest.rows if r.status == "kept" or r.split]
    if any(r.split for r in rows):
        return [r for r in rows if r.split == "test"], False
    return [r for r in rows if r.status == "kept"], True


def find_reference_matches(
    rows: Sequence[Row],
    candidates: Sequence[int],
    references: Mapping[str, Manifest],
    config: SplitConfig,
    header: Mapping[str, Any] | None,
    similarity: Similarity | None = None,
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Reference-test matches of the candidate rows: exact sha256 first, then phash.

    A phash match within the radius is confirmed, when ``similarity`` is given and
    ``config.confirm`` is on, by the thumbnail correlation of the two images (the
    dedup stage's second signal): up to :data:`MAX_CONFIRM` nearest reference images
    are tried per row. A pair that cannot be read counts as confirmed (a leak is
    worse than a moved image).

    Returns:
        ``(matches, unconfirmed, notes)``: the match per row index, the phash
        matches the second signal rejected (reported, not acted on), and notes.

    Raises:
        SplitError: phashes would be compared across different hash recipes.
    """
    exact: dict[int, dict[str, Any]] = {}
    near: dict[int, list[tuple[int, str, Row]]] = defaultdict(list)
    notes: list[str] = []
    own_recipe = recipe_key(header)
    radius = near_radius(config, header)
    for name, ref in references.items():
        ref_rows, whole = _reference_test_rows(ref)
        if whole:
            notes.append(f"reference {name} has no split column; all its kept images count as test")
        by_sha: dict[str, Row] = {}
        for r in ref_rows:
            if r.sha256:
                by_sha.setdefault(r.sha256, r)
        for i in candidates:
            hit = by_sha.get(rows[i].sha256) if rows[i].sha256 else None
            if hit is not None and i not in exact:
                exact[i] = _match(name, hit, "exact", 0)
        queries = [i for i in candidates if i not in exact and rows[i].phash]
        refs = [r for r in ref_rows if r.phash]
        if radius < 0 or not queries or not refs:
            continue
        if recipe_key(ref.header) != own_recipe:
            raise SplitError(
                f"reference {name} made its perceptual hashes with recipe "
                f"{recipe_key(ref.header)!r} but the manifest being split used {own_recipe!r}; "
                "hashes from different recipes cannot be compared. Re-run kaedama dedup on both "
                "with the same settings, or pass --max-distance -1 to match exact copies only"
            )
        q = parse_hashes([rows[i].phash for i in queries], "manifest")
        rr = parse_hashes([r.phash for r in refs], f"reference {name}")
        if q.shape[1:] != rr.shape[1:]:
            raise SplitError(
                f"reference {name}: its perceptual hashes differ in length from the manifest's"
            )
        for qi, ri, dist in cross_matches(q, rr, radius):
            near[queries[qi]].append((dist, name, refs[ri]))

    matches = dict(exact)
    unconfirmed: list[dict[str, Any]] = []
    pending = {
        i: sorted(c, key=lambda t: (t[0], t[1], t[2].uri))[:MAX_CONFIRM]
        for i, c in near.items()
        if i not in exact
    }
    sims: dict[tuple[str, str], float | None] = {}
    if similarity is not None and config.confirm and pending:
        pairs = sorted({(rows[i].uri, ref.uri) for i, c in pending.items() for _, _, ref in c})
        sims = dict(zip(pairs, similarity(pairs), strict=True))
    threshold = confirm_threshold(config, header)
    for i in sorted(pending):
        tried = []
        for dist, name, ref in pending[i]:
            sim = sims.get((rows[i].uri, ref.uri)) if sims else None
            tried.append(_match(name, ref, "near", dist, sim))
            if sim is None or sim >= threshold:
                matches[i] = tried[-1]
                break
        else:
            unconfirmed.append({"uri": rows[i].uri, "label": rows[i].label, **tried[0]})
    return matches, unconfirmed, notes


def _match(
    name: str, ref: Row, kind: str, distance: int, similarity: float | None = None
) -> dict[str, Any]:
    out = {
        "reference": name,
        "reference_uri": ref.uri,
        "reference_label": ref.label,
        "match": kind,
        "distance": distance,
    }
    if kind == "near":
        out["similarity"] = None if similarity is None else round(float(similarity), 4)
    return out


def confirm_threshold(config: SplitConfig, header: Mapping[str, Any] | None) -> float:
    """The thumbnail correlation that confirms a near match: the config's, else dedup's."""
    if config.confirm_threshold is not None:
        return config.confirm_threshold
    value = ((header or {}).get("dedup") or {}).get("confirm_threshold")
    return float(value) if isinstance(value, int | float) else DEFAULT_CONFIRM_THRESHOLD


def read_similarity(
    header: Mapping[str, Any] | None = None, *, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> Similarity:
    """A :data:`Similarity` that reads both images (local or ``gs://``) and correlates thumbnails.

    Images are decoded as the manifest's hash recipe decoded them (reduced JPEG
    decode or full) and each URI is read once. An unreadable image gives ``None``.
    """
    fields = (header or {}).get("hash")
    try:
        recipe = HashRecipe(
            **{k: v for k, v in (fields or {}).items() if k in HashRecipe.__dataclass_fields__}
        )
    except (HashingError, TypeError) as exc:
        raise SplitError(
            f"the manifest header's hash recipe {fields!r} is not valid: {exc}"
        ) from exc
    cache: dict[str, bytes | None] = {}

    def thumbnail(uri: str) -> bytes | None:
        if uri not in cache:
            try:
                data = storage.read_bytes(uri)
                cache[uri] = descriptor(
                    images.decode(data, max_pixels=max_pixels, draft=recipe.draft, uri=uri)
                )
            except (StorageError, images.ImageError) as exc:
                log.warning("cannot read %s to confirm a near match: %s", uri, exc)
                cache[uri] = None
        return cache[uri]

    def similarity(pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        out: list[float | None] = []
        for a, b in pairs:
            da, db = thumbnail(a), thumbnail(b)
            out.append(None if da is None or db is None else descriptor_similarity(da, db))
        return out

    return similarity


# ---------------------------------------------------------------------------
# The split


def _as_manifest(rows: Manifest | Sequence[Row]) -> Manifest:
    return rows if isinstance(rows, Manifest) else Manifest(header={}, rows=list(rows))


def _copy(row: Row) -> Row:
    out = copy.copy(row)  # much faster than dataclasses.replace on large manifests
    out.extra = dict(row.extra)
    return out


@dataclass
class _Leakage:
    """What the reference check found and did."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    unconfirmed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    same_images: int = 0
    radius: int | None = None


def _fix_rows(
    rows: Sequence[Row], config: SplitConfig, previous: Sequence[Row]
) -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """Rows whose split is fixed up front, ``{index: (split, why)}``, and previous splits."""
    prev_by_uri, prev_by_sha = previous_lookup(previous)
    fixed: dict[int, tuple[str, str]] = {}
    prior: dict[int, str] = {}
    for i, row in enumerate(rows):
        before = prev_by_uri.get(row.uri) or prev_by_sha.get(row.sha256, "")
        if before:
            prior[i] = before
        override = override_of(row, i + 1) if config.overrides else ""
        if override:
            fixed[i] = (override, "override")
        elif before:
            fixed[i] = (before, "previous")
    return fixed, prior


def _check_references(
    rows: list[Row],
    units: Sequence[Sequence[int]],
    fixed: dict[int, tuple[str, str]],
    prior: Mapping[int, str],
    refs: Mapping[str, Manifest],
    config: SplitConfig,
    header: Mapping[str, Any],
    similarity: Similarity | None,
) -> _Leakage:
    """Force (or drop) the units of new images that duplicate a reference test image.

    Updates ``fixed`` and, for ``reference_action="drop"``, the rows' status. An
    image that *is* a reference test image (same URI) simply stays in test; it is
    no leak. Rows fixed by an override or the previous version keep their split
    and are reported.
    """
    report = _Leakage(radius=near_radius(config, header))
    candidates = [i for i, r in enumerate(rows) if r.status != "rejected" and i not in prior]
    matches, report.unconfirmed, report.notes = find_reference_matches(
        rows, candidates, refs, config, header, similarity
    )
    for i, hit in matches.items():
        if rows[i].uri == hit["reference_uri"] and i not in fixed:
            fixed[i] = ("test", "reference")
            report.same_images += 1
    leaks = {i: hit for i, hit in matches.items() if rows[i].uri != hit["reference_uri"]}
    unit_of = {i: u for u, members in enumerate(units) for i in members}
    for u in sorted({unit_of[i] for i in leaks}):
        trigger = next(leaks[i] for i in units[u] if i in leaks)
        for i in units[u]:
            row, hit = rows[i], leaks.get(i)
            if row.status == "rejected" or (i in fixed and hit is None):
                continue
            if i in fixed:
                action = f"none ({fixed[i][1]} keeps {fixed[i][0]})"
            elif row.status != "kept":
                action = config.reference_action
            elif config.reference_action == "drop":
                row.status, row.reason = "dropped", REFERENCE_REASON
                row.duplicate_of = row.duplicate_of or trigger["reference_uri"]
                action = "drop"
            else:
                fixed[i] = ("test", "reference")
                action = "test"
            entry = {"uri": row.uri, "label": row.label, **(hit or trigger)}
            if hit is None:
                entry.update(match="cluster", distance=None)
            entry["action"] = action
            report.entries.append(entry)
    return report


def _assign(
    rows: list[Row],
    units: Sequence[Sequence[int]],
    fixed: Mapping[int, tuple[str, str]],
    config: SplitConfig,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], list[dict[str, Any]]]:
    """Fill ``split`` on every row; returns per-label targets, counts and straddling units."""
    kept_by_label = Counter(r.label for r in rows if r.status == "kept")
    targets = {label: targets_for(n, config, label) for label, n in kept_by_label.items()}
    current = {label: dict.fromkeys(SPLITS, 0) for label in kept_by_label}
    straddling: list[dict[str, Any]] = []

    def place(u: int, split: str) -> None:
        for i in units[u]:
            row = rows[i]
            row.split = fixed[i][0] if i in fixed and row.status == "kept" else split
            if row.status == "kept":
                current[row.label][row.split] += 1

    # Fixed units first: rows keep their fixed split, the rest follow the majority.
    free: list[int] = []
    for u, members in enumerate(units):
        kept = [i for i in members if rows[i].status == "kept"]
        if not kept:
            for i in members:
                rows[i].split = ""
            continue
        votes = Counter(fixed[i][0] for i in kept if i in fixed)
        # A unit whose fixed members were all dropped since (e.g. a new copy replaced
        # an old test image) still follows them.
        votes = votes or Counter(fixed[i][0] for i in members if i in fixed)
        if not votes:
            free.append(u)
            continue
        place(u, min(votes, key=lambda s: (-votes[s], _TIE_ORDER[s])))
        if len(votes) > 1:
            straddling.append(
                {
                    "unit": _unit_name(rows, members),
                    "splits": dict(sorted(votes.items())),
                    "why": sorted({fixed[i][1] for i in members if i in fixed}),
                }
            )

    # Free units: largest first (they are the hard ones to fit), then by seeded hash;
    # each fills the largest relative deficit of its majority label.
    active = config.active
    labels_of = {
        u: Counter(rows[i].label for i in units[u] if rows[i].status == "kept") for u in free
    }
    order = sorted(free, key=lambda u: (-labels_of[u].total(), unit_order(rows, units[u], config)))
    for u in order:
        labels = labels_of[u]
        major = min(labels, key=lambda lab: (-labels[lab], lab))
        place(u, _choose(targets[major], current[major], labels[major], active))
    return targets, current, straddling


def split_rows(
    rows: Manifest | Sequence[Row],
    config: SplitConfig | None = None,
    previous: Manifest | Sequence[Row] | None = None,
    references: Mapping[str, Manifest] | Sequence[Manifest] = (),
    similarity: Similarity | None = None,
) -> SplitResult:
    """Assign train/val/test to every row of a cleaned manifest.

    Args:
        rows: the dedup job's manifest (or its rows). Not modified.
        config: ratios, seed, minimums and reference handling.
        previous: the last dataset version's split manifest; its rows keep their split.
        references: earlier manifests (a name -> manifest mapping, or a sequence) whose
            test images no new image may duplicate.
        similarity: confirms phash matches against reference images (see
            :func:`read_similarity`); without it a phash match within the radius counts.

    Returns:
        A :class:`SplitResult` with copies of all rows (``split`` filled for kept rows
        and for the other members of their clusters, "" elsewhere), the summary
        (counts per label per split, targets, leakage report, warnings) and a header.

    Raises:
        SplitError: a bad override value, or incomparable perceptual hashes.
    """
    config = config or SplitConfig()
    source = _as_manifest(rows)
    out = [_copy(r) for r in source.rows]
    if isinstance(references, Mapping):
        refs = dict(references)
    else:
        refs = {f"reference[{i}]": _as_manifest(m) for i, m in enumerate(references)}
    prev_rows = _as_manifest(previous).rows if previous is not None else []

    fixed, prior = _fix_rows(out, config, prev_rows)
    units = group_units(out)
    leakage = _Leakage()
    if refs:
        leakage = _check_references(
            out, units, fixed, prior, refs, config, source.header, similarity
        )
    targets, current, straddling = _assign(out, units, fixed, config)

    summary = _summary(out, config, targets, current, straddling, leakage)
    summary["previous"] = (
        {
            "given": True,
            "existing_rows": len(prior),
            "moved": sum(1 for i, s in prior.items() if out[i].split and out[i].split != s),
            "new_kept_rows": sum(
                1 for i, r in enumerate(out) if r.status == "kept" and i not in prior
            ),
        }
        if previous is not None
        else {"given": False}
    )
    sources = Counter(why for _, why in fixed.values())
    summary["fixed"] = {k: sources.get(k, 0) for k in ("override", "previous", "reference")}
    summary["references"] = sorted(refs)
    header = {k: v for k, v in source.header.items() if k != "version"}
    header["split"] = {
        "config": {**dataclasses.asdict(config), "ratios": list(config.ratios)},
        "previous": previous is not None,
        "references": sorted(refs),
    }
    return SplitResult(rows=out, summary=summary, header=header)


def _unit_name(rows: Sequence[Row], members: Sequence[int]) -> str:
    clusters = sorted({rows[i].cluster for i in members if rows[i].cluster})
    return clusters[0] if clusters else min(rows[i].uri for i in members)


def _summary(
    rows: Sequence[Row],
    config: SplitConfig,
    targets: Mapping[str, Mapping[str, int]],
    current: Mapping[str, Mapping[str, int]],
    straddling: list[dict[str, Any]],
    leakage: _Leakage,
) -> dict[str, Any]:
    """Counts per label per split, targets, the leakage report and warnings."""
    labels: dict[str, Any] = {}
    warnings: list[str] = list(leakage.notes)
    singles: list[str] = []
    for label in sorted(current):
        counts = dict(current[label])
        total = sum(counts.values())
        labels[label] = {**counts, "total": total, "target": dict(targets[label])}
        if total == 1:
            singles.append(label)
            warnings.append(
                f"label {label!r} has a single image; it goes to train and cannot be evaluated"
            )
            continue
        short = [s for s in config.active if counts[s] < config.min_per_split]
        if short:
            warnings.append(
                f"label {label!r} has {total} images and fewer than min_per_split="
                f"{config.min_per_split} in {', '.join(short)} "
                f"(counts {', '.join(f'{s}={counts[s]}' for s in SPLITS)}); add images, "
                "merge the label, or lower --min-per-split"
            )
    for entry in straddling:
        warnings.append(
            f"cluster {entry['unit']!r} straddles splits {entry['splits']} because of "
            f"{' and '.join(entry['why'])} splits that disagree; near-duplicates leak across "
            "these splits"
        )
    caught = sum(1 for e in leakage.entries if e["match"] in ("exact", "near"))
    if caught:
        warnings.append(
            f"{caught} image(s) duplicate a reference test image "
            f"(action: {config.reference_action}); see the leakage report"
        )
    totals = {s: sum(v[s] for v in current.values()) for s in SPLITS}
    return {
        "ratios": {s: config.weights[s] for s in SPLITS},
        "seed": config.seed,
        "labels": labels,
        "totals": {**totals, "total": sum(totals.values())},
        "status": dict(sorted(Counter(r.status for r in rows).items())),
        "max_distance": leakage.radius,
        "reference_test_images_kept_in_test": leakage.same_images,
        "leakage": leakage.entries,
        "unconfirmed_near_matches": leakage.unconfirmed,
        "straddling": straddling,
        "single_image_labels": singles,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------
# Printing


def display_width(text: str) -> int:
    """Terminal columns of ``text``: wide (CJK) characters take two, combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _pad(text: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-label table printed by ``kaedama split``: counts per split, totals, shares."""
    splits = [s for s in SPLITS if summary["ratios"].get(s, 0) > 0 or summary["totals"][s] > 0]
    header = ["label", *splits, "total"]
    body = [
        [label, *(str(c[s]) for s in splits), str(c["total"])]
        for label, c in summary["labels"].items()
    ]
    totals = summary["totals"]
    grand = totals["total"] or 1
    foot = [
        ["total", *(str(totals[s]) for s in splits), str(totals["total"])],
        ["share", *(f"{100 * totals[s] / grand:.1f}%" for s in splits), ""],
        ["target", *(f"{100 * summary['ratios'][s]:.1f}%" for s in splits), ""],
    ]
    table = [header, *body, *foot]
    widths = [max(display_width(r[c]) for r in table) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [_pad(cells[0], widths[0])]
        parts += [_pad(cell, w, right=True) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), rule, *map(line, body), rule, *map(line, foot)])
