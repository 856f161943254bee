"""Label errors: confident learning on out-of-fold probabilities of linear probes.

A logistic regression (scikit-learn) on frozen embeddings is fitted k times, each
time predicting the fold it did not see, so every image gets probabilities from a
model that never saw its label. cleanlab's ``find_label_issues`` (confident
learning, Northcutt et al. 2021, JAIR 70; cleanlab >= 2.8 is Apache-2.0) then
estimates the joint of given and true labels and picks the issues, ranked by
self-confidence (the probability of the given label; lowest first).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kaedama.errors import KaedamaError

log = logging.getLogger(__name__)

# Labels with fewer images than this cannot be held out and fitted at once.
MIN_PER_LABEL = 2


class LabelErrorsError(KaedamaError):
    """Label errors cannot be searched for (e.g. a single label)."""


@dataclass(frozen=True)
class LabelIssue:
    """One image whose given label the probes doubt.

    Attributes:
        index: its position in the inputs.
        self_confidence: out-of-fold probability of its given label.
        suggested: the label the probes find most likely.
        suggested_probability: that label's probability.
        rank: 1 = most likely wrong.
    """

    index: int
    self_confidence: float
    suggested: str
    suggested_probability: float
    rank: int


@dataclass(frozen=True)
class LabelErrorResult:
    """Issues, everyone's self-confidence, and the labels left out (too few images)."""

    issues: list[LabelIssue]
    self_confidence: np.ndarray  # NaN for rows of skipped labels
    skipped_labels: list[str]
    folds: int


def _require_sklearn():
    try:
        import cleanlab  # noqa: F401
        import sklearn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise LabelErrorsError(
            f"label errors need scikit-learn and cleanlab>=2.8 ({exc}); install kaedama "
            "with the 'clean' extra: pip install 'kaedama[clean]'"
        ) from exc


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry for probes and neighbours)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0, c: float = 0.1
) -> np.ndarray:
    """``(N, K)`` probabilities, each row from a probe fitted without that row.

    Args:
        x: ``(N, D)`` embeddings.
        y: ``(N,)`` integer labels ``0..K-1``, each with at least ``folds`` rows.
        folds: k of the stratified k-fold.
        c: inverse regularisation strength of the logistic regression. Strong (0.1 on
            standardised features): a probe that can memorise the flipped labels of its
            training folds finds fewer of them in the held-out fold.
    """
    _require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(probe, normalize(x), y, cv=cv, method="predict_proba")


def find_label_errors(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    c: float = 0.1,
) -> LabelErrorResult:
    """Images whose label looks wrong, ranked by self-confidence (lowest first).

    Labels with fewer than :data:`MIN_PER_LABEL` images are left out (their rows are
    never flagged and get NaN self-confidence); ``folds`` shrinks to the smallest
    remaining label's count.

    Raises:
        LabelErrorsError: fewer than two labels with enough images.
    """
    _require_sklearn()
    from cleanlab.filter import find_label_issues

    labels = list(labels)
    counts = Counter(labels)
    usable = sorted(lab for lab, n in counts.items() if n >= MIN_PER_LABEL)
    skipped = sorted(lab for lab, n in counts.items() if n < MIN_PER_LABEL)
    if len(usable) < 2:
        raise LabelErrorsError(
            f"label errors need at least two labels with {MIN_PER_LABEL}+ images each; "
            f"found {len(usable)}"
        )
    index = {lab: n for n, lab in enumerate(usable)}
    rows = np.array([n for n, lab in enumerate(labels) if lab in index], dtype=np.int64)
    y = np.array([index[labels[n]] for n in rows], dtype=np.int64)
    k = max(2, min(folds, min(counts[lab] for lab in usable)))
    probs = out_of_fold_probabilities(embeddings[rows], y, folds=k, seed=seed, c=c)
    with warnings.catch_warnings():
        # cleanlab warns about classes with few examples; the counts are in the summary.
        warnings.simplefilter("ignore")
        ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    confidence = np.full(len(labels), np.nan, dtype=np.float64)
    confidence[rows] = probs[np.arange(len(rows)), y]
    issues = []
    for rank, local in enumerate(ranked.tolist(), start=1):
        best = int(np.argmax(probs[local]))
        issues.append(
            LabelIssue(
                index=int(rows[local]),
                self_confidence=float(probs[local, y[local]]),
                suggested=usable[best],
                suggested_probability=float(probs[local, best]),
                rank=rank,
            )
        )
    return LabelErrorResult(issues, confidence, skipped, k)
