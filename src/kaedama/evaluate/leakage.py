"""Leakage-aware accuracy: test images with a near-duplicate in train, counted apart.

The split stage keeps clusters together, but a manifest can still pair a test
image with a training one: a fixed split (override, previous version) placed a
cluster on both sides, two files are byte-identical, a ``duplicate_of`` link
crosses the split, or the split recorded a reference match (``reference_uri``).
Accuracy on those images measures memory, not generalisation, so it is reported
apart from accuracy on the rest, with counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kaedama.manifest import Row

# Extra manifest columns that name another image this one matches.
LINK_COLUMNS = ("reference_uri", "near_duplicate_of", "matches")


def _links(row: Row) -> list[str]:
    out = [row.duplicate_of] if row.duplicate_of else []
    for key in LINK_COLUMNS:
        value = row.extra.get(key)
        if isinstance(value, str) and value:
            out.append(value)
        elif isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str) and v)
    return out


def train_neighbours(test_rows: Sequence[Row], all_rows: Sequence[Row]) -> list[list[str]]:
    """For each test row, why it has a near-duplicate among the training rows (empty: none)."""
    train = [r for r in all_rows if r.split == "train" and r.status == "kept"]
    train_uris = {r.uri for r in train}
    by_cluster: dict[str, int] = defaultdict(int)
    by_sha: dict[str, int] = defaultdict(int)
    linked_to: set[str] = set()
    for r in train:
        if r.cluster:
            by_cluster[r.cluster] += 1
        if r.sha256:
            by_sha[r.sha256] += 1
        linked_to.update(_links(r))
    out = []
    for row in test_rows:
        why = []
        if row.cluster and by_cluster.get(row.cluster):
            why.append("cluster")
        if row.sha256 and by_sha.get(row.sha256):
            why.append("identical_file")
        if any(uri in train_uris for uri in _links(row)) or row.uri in linked_to:
            why.append("match")
        out.append(why)
    return out


def leakage(
    test_rows: Sequence[Row], all_rows: Sequence[Row], correct: np.ndarray
) -> dict[str, Any]:
    """Accuracy with counts on test images with a training near-duplicate and on the rest."""
    reasons = train_neighbours(test_rows, all_rows)
    leaked = np.array([bool(w) for w in reasons], dtype=bool)
    correct = np.asarray(correct, dtype=bool)

    def part(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {"images": n, "accuracy": float(correct[mask].mean()) if n else None}

    by_reason: dict[str, int] = defaultdict(int)
    for why in reasons:
        for w in why:
            by_reason[w] += 1
    return {
        "with_train_duplicate": part(leaked),
        "without": part(~leaked),
        "by_reason": dict(by_reason),
        "uris": [r.uri for r, w in zip(test_rows, reasons, strict=True) if w][:1000],
        "what": "test images sharing a cluster, a file (sha256) or a duplicate/reference "
        "link with a kept training image",
    }
