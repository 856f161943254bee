"""Embeddings kept between runs, keyed by sha256 and model, so each image is embedded once.

Like the dedup hash cache (:mod:`kaedama.dedup.hashcache`): the same bytes under
another name or label hit the cache, an embedding made by another model (or other
weights, or other preprocessing: all part of the model key) never does. The file is
one uncompressed ``.npz`` (NumPy arrays, no pickle) written through
:mod:`kaedama.storage`, local or ``gs://``. One file holds one model's vectors: its
name says which (:func:`cache_name`).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable

import numpy as np

from kaedama import storage
from kaedama.errors import KaedamaError

FORMAT_VERSION = 1


class EmbeddingCacheError(KaedamaError):
    """The cache file cannot be read; delete it to rebuild it on the next run."""


def cache_name(model_key: str) -> str:
    """A file name for one model's cache: readable, and distinct for distinct keys."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_key)[:60].strip("-")
    digest = hashlib.sha256(model_key.encode()).hexdigest()[:10]
    return f"embeddings-{slug}-{digest}.npz"


class EmbeddingCache:
    """In-memory map ``sha256 -> float32 vector`` for one model key, with load/save.

    ``hits`` and ``misses`` count :meth:`get` calls, for the run summary.
    """

    def __init__(self, model_key: str, dim: int = 0) -> None:
        self.model_key = model_key
        self.dim = dim
        self._vectors: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self.added = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._vectors

    def get(self, sha256: str) -> np.ndarray | None:
        """The cached embedding of these bytes, or None."""
        hit = self._vectors.get(sha256)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, sha256: str, vector: np.ndarray) -> None:
        """Store one embedding (a 1-D vector of this cache's dimension)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if self.dim and vector.shape[0] != self.dim:
            raise EmbeddingCacheError(
                f"embedding of {sha256[:12]} has {vector.shape[0]} values, the cache holds "
                f"{self.dim}-value vectors of {self.model_key}"
            )
        self.dim = vector.shape[0]
        if sha256 not in self._vectors:
            self.added += 1
        self._vectors[sha256] = vector

    def matrix(self, shas: Iterable[str]) -> np.ndarray:
        """The ``(N, dim)`` matrix of these shas' vectors (all must be present)."""
        shas = list(shas)
        if not shas:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._vectors[s] for s in shas])

    def to_bytes(self) -> bytes:
        """The ``.npz`` encoding (format :data:`FORMAT_VERSION`)."""
        keys = sorted(self._vectors)
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array([FORMAT_VERSION], dtype=np.int64),
            model_key=np.array([self.model_key], dtype=np.str_),
            sha256=np.array([k.encode("ascii") for k in keys], dtype=np.bytes_),
            vectors=self.matrix(keys),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, model_key: str, *, uri: str = "embedding cache"):
        """Decode what :meth:`to_bytes` wrote; refuses a file made by another model."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                version = int(z["version"][0])
                if version != FORMAT_VERSION:
                    raise EmbeddingCacheError(
                        f"{uri}: embedding cache format {version} is not supported; delete "
                        "it and it will be rebuilt"
                    )
                stored = str(z["model_key"][0])
                if stored != model_key:
                    raise EmbeddingCacheError(
                        f"{uri} holds embeddings of {stored!r}, not {model_key!r}; point "
                        "--embedding-cache at another file"
                    )
                vectors = np.asarray(z["vectors"], dtype=np.float32)
                shas = [b.decode("ascii") for b in z["sha256"].tolist()]
        except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
            raise EmbeddingCacheError(
                f"{uri}: cannot read the embedding cache ({exc}); delete it and it will be rebuilt"
            ) from exc
        cache = cls(model_key, vectors.shape[1] if vectors.ndim == 2 else 0)
        cache._vectors = {sha: vectors[n] for n, sha in enumerate(shas)}
        return cache

    @classmethod
    def load(cls, uri: str, model_key: str) -> EmbeddingCache:
        """Read a cache (local or gs://); a missing file is an empty cache."""
        if not storage.exists(uri):
            return cls(model_key)
        return cls.from_bytes(storage.read_bytes(uri), model_key, uri=uri)

    def save(self, uri: str) -> None:
        """Write the cache atomically (local or gs://)."""
        storage.write_bytes(uri, self.to_bytes())
