"""A hash cache so that re-running dedup on a grown dataset decodes only new files.

Entries are keyed by ``(sha256 of the bytes, HashRecipe.key())``: the same bytes under
another name or label hit the cache, and a hash made by another recipe (algorithm,
size, decode path, imagehash or Pillow version) never does. The file is one ``.npz``
(NumPy arrays, no pickle) written through :mod:`kaedama.storage`, so it can live
next to the manifest on local disk or in a bucket. It is stored uncompressed: the
descriptors (most of its bytes) are thumbnails that barely compress, and writing it
must not cost the job a second.

It also keeps the same-shot keypoint test of candidate pairs
(:mod:`kaedama.dedup.sameshot`), keyed by ``(sha256 of the first file, sha256 of the
second, sameshot.cache_key())`` in the job's URI order (the key names the test's
settings, the decode and the OpenCV and Pillow versions): the test is deterministic,
so a re-run decodes and matches only pairs it has not seen (format 3).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from kaedama import storage
from kaedama.dedup.hashing import HashRecipe, hash_to_hex, hex_to_hash
from kaedama.errors import KaedamaError

FORMAT_VERSION = 3
# Version 1 (unicode arrays, one recipe string per entry, compressed) and version 2
# (no pair table) are still read.
READABLE_VERSIONS = (1, 2, 3)
# One pair's keypoint test as plain values: (keypoints, matches, inliers, exact, coverage).
PairGeometry = tuple[int, int, int, int, float]


class HashCacheError(KaedamaError):
    """The cache file cannot be read; delete it to rebuild the cache on the next run."""


class CachedHash(NamedTuple):
    """What a cache hit gives back: everything hashing needs besides the bytes."""

    width: int
    height: int
    hash: int
    descriptor: bytes


def _recipe_key(recipe: HashRecipe | str) -> str:
    return recipe if isinstance(recipe, str) else recipe.key()


class HashCache:
    """In-memory map ``(sha256, recipe key) -> CachedHash``, and the pair tests, with load/save.

    ``hits`` and ``misses`` count :meth:`get` calls, for the run summary.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], CachedHash] = {}
        self._pairs: dict[tuple[str, str, str], PairGeometry] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Fingerprints held (pairs apart: :attr:`pair_count`)."""
        return len(self._entries)

    @property
    def pair_count(self) -> int:
        """Keypoint tests of pairs held."""
        return len(self._pairs)

    def get_pair(self, sha_a: str, sha_b: str, version: str) -> PairGeometry | None:
        """The keypoint test of the files ``sha_a`` then ``sha_b`` under ``version``, or None."""
        return self._pairs.get((sha_a, sha_b, version))

    def put_pair(self, sha_a: str, sha_b: str, version: str, geometry: PairGeometry) -> None:
        """Store one pair's keypoint test (``sha_a`` is the file that came first)."""
        k, m, i, e, c = geometry
        self._pairs[(sha_a, sha_b, version)] = (int(k), int(m), int(i), int(e), float(c))

    def __contains__(self, key: tuple[str, str]) -> bool:
        sha, recipe = key
        return (sha, _recipe_key(recipe)) in self._entries

    def get(self, sha256: str, recipe: HashRecipe | str) -> CachedHash | None:
        """The cached fingerprint of these bytes under this recipe, or None."""
        hit = self._entries.get((sha256, _recipe_key(recipe)))
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(
        self,
        sha256: str,
        recipe: HashRecipe | str,
        width: int,
        height: int,
        hash: int,
        descriptor: bytes,
    ) -> None:
        """Store one fingerprint (replacing any entry under the same key)."""
        self._entries[(sha256, _recipe_key(recipe))] = CachedHash(
            int(width), int(height), int(hash), bytes(descriptor)
        )

    def items(self) -> Iterator[tuple[tuple[str, str], CachedHash]]:
        """All ``((sha256, recipe_key), CachedHash)`` entries, sorted by key."""
        for key in sorted(self._entries):
            yield key, self._entries[key]

    def update(self, other: HashCache) -> int:
        """Merge another cache into this one (e.g. per-worker caches after a run).

        An entry without a descriptor never replaces one that has it (descriptors are
        computed only for candidate images, so a later run may not have made one).

        Returns:
            How many entries were added or changed.
        """
        changed = 0
        for key, entry in other._entries.items():
            mine = self._entries.get(key)
            if mine is not None and not entry.descriptor and mine.descriptor:
                entry = entry._replace(descriptor=mine.descriptor)
            if mine != entry:
                self._entries[key] = entry
                changed += 1
        for pair, geometry in other._pairs.items():
            if self._pairs.get(pair) != geometry:
                self._pairs[pair] = geometry
                changed += 1
        return changed

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """The ``.npz`` encoding of the cache (format :data:`FORMAT_VERSION`)."""
        keys = sorted(self._entries)
        values = [self._entries[k] for k in keys]
        descriptors = [v.descriptor for v in values]
        offsets = np.cumsum([0] + [len(d) for d in descriptors], dtype=np.int64)
        recipes = sorted({k[1] for k in keys})
        index = {r: n for n, r in enumerate(recipes)}
        pairs = sorted(self._pairs)
        versions = sorted({p[2] for p in pairs})
        at = {v: n for n, v in enumerate(versions)}
        geometry = [self._pairs[p] for p in pairs]
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array([FORMAT_VERSION], dtype=np.int64),
            # ASCII bytes, not numpy unicode (4 bytes per character).
            sha256=np.array([k[0].encode("ascii") for k in keys], dtype=np.bytes_),
            recipes=np.array(recipes, dtype=np.str_),
            recipe_index=np.array([index[k[1]] for k in keys], dtype=np.int32),
            width=np.array([v.width for v in values], dtype=np.int64),
            height=np.array([v.height for v in values], dtype=np.int64),
            hash=np.array([hash_to_hex(v.hash, 4).encode("ascii") for v in values], np.bytes_),
            descriptor=np.frombuffer(b"".join(descriptors), dtype=np.uint8),
            offsets=offsets,
            pair_a=np.array([p[0].encode("ascii") for p in pairs], dtype="S64"),
            pair_b=np.array([p[1].encode("ascii") for p in pairs], dtype="S64"),
            pair_versions=np.array(versions, dtype=np.str_),
            pair_version_index=np.array([at[p[2]] for p in pairs], dtype=np.int32),
            pair_counts=np.array([g[:4] for g in geometry], dtype=np.int64).reshape(-1, 4),
            pair_coverage=np.array([g[4] for g in geometry], dtype=np.float64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, uri: str = "hash cache") -> HashCache:
        """Decode what :meth:`to_bytes` wrote (this format or an earlier one: 1, 2)."""
        cache = cls()
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                version = int(z["version"][0])
                if version not in READABLE_VERSIONS:
                    raise HashCacheError(
                        f"{uri}: hash cache format {version} is not supported; delete it "
                        "and it will be rebuilt"
                    )
                if version == 1:
                    recipes = z["recipe"].tolist()
                    shas = z["sha256"].tolist()
                    hexes = z["hash"].tolist()
                else:
                    table = z["recipes"].tolist()
                    recipes = [table[i] for i in z["recipe_index"].tolist()]
                    shas = [b.decode("ascii") for b in z["sha256"].tolist()]
                    hexes = z["hash"].tolist()
                blob = z["descriptor"].tobytes()
                offsets = z["offsets"].tolist()
                for n, (sha, recipe, w, h, hx) in enumerate(
                    zip(
                        shas,
                        recipes,
                        z["width"].tolist(),
                        z["height"].tolist(),
                        hexes,
                        strict=True,
                    )
                ):
                    desc = blob[offsets[n] : offsets[n + 1]]
                    cache._entries[(sha, recipe)] = CachedHash(w, h, hex_to_hash(hx), desc)
                if version >= 3:
                    cache._pairs = _read_pairs(z)
        except (
            OSError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
            UnicodeDecodeError,
            zipfile.BadZipFile,
        ) as exc:
            raise HashCacheError(
                f"{uri}: cannot read the hash cache ({exc}); delete it and it will be rebuilt"
            ) from exc
        return cache

    @classmethod
    def load(cls, uri: str) -> HashCache:
        """Read a cache from a local path or gs:// URI; a missing file is an empty cache."""
        if not storage.exists(uri):
            return cls()
        return cls.from_bytes(storage.read_bytes(uri), uri=uri)

    def save(self, uri: str) -> None:
        """Write the cache atomically to a local path or gs:// URI."""
        storage.write_bytes(uri, self.to_bytes())


def _read_pairs(z: Any) -> dict[tuple[str, str, str], PairGeometry]:
    """The pair table of a format-3 file (see :meth:`HashCache.to_bytes`), checked.

    Raises:
        ValueError: the table's arrays disagree in shape, type or length.
    """
    a, b, index = z["pair_a"], z["pair_b"], z["pair_version_index"]
    counts, coverage, versions = z["pair_counts"], z["pair_coverage"], z["pair_versions"]
    n = len(a)
    if (
        a.dtype.kind != "S"
        or b.dtype.kind != "S"
        or versions.dtype.kind != "U"
        or counts.ndim != 2
        or counts.shape[1] != 4
        or not n == len(b) == len(index) == len(counts) == len(coverage)
        or (n and (index.min() < 0 or index.max() >= len(versions)))
    ):
        raise ValueError("the pair table is malformed")
    table = versions.tolist()
    return {
        (sha_a.decode("ascii"), sha_b.decode("ascii"), table[v]): (*count, float(cov))
        for sha_a, sha_b, v, count, cov in zip(
            a.tolist(), b.tolist(), index.tolist(), counts.tolist(), coverage.tolist(), strict=True
        )
    }
