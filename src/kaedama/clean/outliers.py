"""Outliers: images far from the rest of their label in embedding space.

Each image's score is its mean cosine distance to its ``k`` nearest neighbours of
the same label (scikit-learn's exact ``NearestNeighbors``). Labels differ in how
spread out they are, so the distance is compared with the label's own: the robust
z-score ``(d - median) / (1.4826 * MAD)`` (Iglewicz and Hoaglin's modified z-score;
3.5 is their usual cut-off). Ranked by z, highest first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kaedama.clean.labels import normalize

# Labels with fewer images than this have no meaningful "rest" to compare with.
MIN_PER_LABEL = 4


@dataclass(frozen=True)
class Outlier:
    """One image's outlier score; ``rank`` 1 is the most isolated."""

    index: int
    distance: float
    zscore: float
    rank: int


def knn_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row to its ``k`` nearest other rows."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    dist, _ = nn.kneighbors(x)
    # Column 0 is the point itself (or an identical twin at distance 0 either way).
    return dist[:, 1:].mean(axis=1)


def robust_z(d: np.ndarray) -> np.ndarray:
    """Modified z-scores; a label whose distances barely vary falls back to their mean spread."""
    median = np.median(d)
    mad = np.median(np.abs(d - median)) * 1.4826
    if mad <= 1e-9:
        mad = max(float(np.mean(np.abs(d - median))), 1e-9)
    return (d - median) / mad


def score_outliers(embeddings: np.ndarray, labels: Sequence[str], *, k: int = 5) -> list[Outlier]:
    """Every image of a label with :data:`MIN_PER_LABEL`+ images, scored and ranked.

    Returns:
        :class:`Outlier` for each scored image, sorted by rank (highest z first).
    """
    x = normalize(embeddings)
    by_label: dict[str, list[int]] = defaultdict(list)
    for n, label in enumerate(labels):
        by_label[label].append(n)
    scored: list[tuple[int, float, float]] = []
    for label in sorted(by_label):
        members = np.array(by_label[label])
        if len(members) < MIN_PER_LABEL:
            continue
        d = knn_distances(x[members], k)
        z = robust_z(d)
        scored.extend(zip(members.tolist(), d.tolist(), z.tolist(), strict=True))
    scored.sort(key=lambda s: (-s[2], s[0]))
    return [
        Outlier(index=i, distance=float(d), zscore=float(z), rank=r)
        for r, (i, d, z) in enumerate(scored, start=1)
    ]
