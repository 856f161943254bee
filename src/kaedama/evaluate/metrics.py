"""Classification metrics from true labels and class probabilities, computed by scikit-learn.

Everything here is pure NumPy in, JSON-friendly values out, so the figures can be
checked against hand-computed cases and scikit-learn itself. The one table
scikit-learn has no function for is Vertex AI's precision/recall at confidence
thresholds (a prediction counts only when its top-1 probability reaches the
threshold); it is two counts per threshold, done here with NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

# Vertex AI's confidence thresholds: 0.0, 0.05, ..., 0.95 and 0.99.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.0, 0.951, 0.05)) + (0.99,)
# Points kept per PR curve (the curve is thinned evenly in recall for the report).
PR_POINTS = 101


def _f(value: Any) -> float | None:
    """A float for JSON (NaN -> None)."""
    value = float(value)
    return None if not np.isfinite(value) else value


def summary(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: int = 5) -> dict:
    """Top-1/top-k accuracy, log loss and macro/weighted precision, recall and F1."""
    n_classes = len(classes)
    labels = np.arange(n_classes)
    y_pred = probs.argmax(1)
    out: dict[str, Any] = {
        "images": int(len(y_true)),
        "classes": n_classes,
        "accuracy": _f(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _f(skm.balanced_accuracy_score(y_true, y_pred)),
        "log_loss": _f(skm.log_loss(y_true, probs, labels=labels)),
    }
    k = min(top_k, n_classes)
    out["top_k"] = k
    if k >= n_classes:  # every class is in the top k: always right (scikit-learn warns)
        out[f"top{k}_accuracy"] = 1.0
    elif n_classes > 2:
        out[f"top{k}_accuracy"] = _f(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    else:
        out[f"top{k}_accuracy"] = out["accuracy"]
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        out[average] = {"precision": _f(p), "recall": _f(r), "f1": _f(f)}
    return out


def per_class(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Precision, recall, F1, support, average precision and ROC AUC of every class."""
    labels = np.arange(len(classes))
    y_pred = probs.argmax(1)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    rows = []
    for c, name in enumerate(classes):
        positive = y_true == c
        ap = auc = None
        if positive.any():
            ap = _f(skm.average_precision_score(positive, probs[:, c]))
            if not positive.all():
                auc = _f(skm.roc_auc_score(positive, probs[:, c]))
        rows.append(
            {
                "class": name,
                "precision": _f(p[c]),
                "recall": _f(r[c]),
                "f1": _f(f[c]),
                "support": int(s[c]),
                "predicted": int((y_pred == c).sum()),
                "average_precision": ap,
                "roc_auc": auc,
            }
        )
    return rows


def pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One-vs-rest precision-recall curve of every class (thinned to :data:`PR_POINTS`)."""
    out = []
    for c, name in enumerate(classes):
        positive = y_true == c
        if not positive.any():
            out.append({"class": name, "precision": [], "recall": [], "average_precision": None})
            continue
        precision, recall, _ = skm.precision_recall_curve(positive, probs[:, c])
        if len(recall) > PR_POINTS:
            keep = np.unique(np.linspace(0, len(recall) - 1, PR_POINTS).round().astype(int))
            precision, recall = precision[keep], recall[keep]
        out.append(
            {
                "class": name,
                "precision": [round(float(v), 5) for v in precision],
                "recall": [round(float(v), 5) for v in recall],
                "average_precision": _f(skm.average_precision_score(positive, probs[:, c])),
            }
        )
    return out


def threshold_table(
    y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> list[dict]:
    """Vertex-style precision and recall of the top-1 prediction at confidence thresholds.

    At threshold ``t`` the model answers only when its top-1 probability is ``>= t``:
    precision = right answers / answers, recall = right answers / images.
    """
    conf = probs.max(1)
    right = probs.argmax(1) == y_true
    n = len(y_true)
    rows = []
    for t in thresholds:
        answered = conf >= t
        count = int(answered.sum())
        hits = int((answered & right).sum())
        rows.append(
            {
                "threshold": float(t),
                "answered": count,
                "coverage": count / n if n else None,
                "precision": hits / count if count else None,
                "recall": hits / n if n else None,
            }
        )
    return rows


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """The full confusion matrix (rows: true, columns: predicted), no label cap."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def confusion_order(matrix: np.ndarray) -> list[int]:
    """Class order that puts classes confused with each other next to each other.

    Average-linkage clustering of the symmetrised, row-normalised off-diagonal
    confusion (scipy), leaves in optimal order: blocks of mutually confused
    classes line up along the diagonal, which is what makes a 100+ class matrix
    readable.
    """
    n = len(matrix)
    if n < 3:
        return list(range(n))
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    m = matrix.astype(float)
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    np.fill_diagonal(rates, 0)
    sym = (rates + rates.T) / 2
    dist = 1.0 - sym / max(sym.max(), 1e-12)
    np.fill_diagonal(dist, 0)
    condensed = squareform(dist, checks=False)
    tree = optimal_leaf_ordering(linkage(condensed, "average"), condensed)
    return [int(i) for i in leaves_list(tree)]


def confused_pairs(matrix: np.ndarray, classes: Sequence[str], top: int = 20) -> list[dict]:
    """The most frequent (true, predicted) mistakes, most first."""
    m = matrix.copy()
    np.fill_diagonal(m, 0)
    flat = np.argsort(-m, axis=None, kind="stable")
    out = []
    support = matrix.sum(1)
    for idx in flat[:top]:
        t, p = divmod(int(idx), len(classes))
        if m[t, p] == 0:
            break
        out.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": int(m[t, p]),
                "rate": float(m[t, p] / support[t]) if support[t] else None,
            }
        )
    return out


def kfp_confusion(matrix: np.ndarray, classes: Sequence[str]) -> dict:
    """Arguments of KFP's ``ClassificationMetrics.log_confusion_matrix(categories, matrix)``."""
    return {"categories": list(classes), "matrix": matrix.astype(int).tolist()}


def kfp_scalars(metrics: dict) -> dict[str, float]:
    """Flat ``name -> float`` pairs for KFP's ``Metrics.log_metric`` (None values left out)."""
    out: dict[str, float] = {}
    s = metrics["summary"]
    for key in ("accuracy", "balanced_accuracy", "log_loss", f"top{s['top_k']}_accuracy"):
        if s.get(key) is not None:
            out[key] = float(s[key])
    for avg in ("macro", "weighted"):
        for key, value in s[avg].items():
            if value is not None:
                out[f"{avg}_{key}"] = float(value)
    cal = metrics.get("calibration") or {}
    for key in ("ece", "mce"):
        if cal.get(key) is not None:
            out[key] = float(cal[key])
    lat = metrics.get("latency") or {}
    for key in ("batch1_ms_median", "images_per_s"):
        if lat.get(key) is not None:
            out[key] = float(lat[key])
    return out


def log_kfp(kfp: dict, classification_metrics: Any, scalar_metrics: Any) -> None:
    """Log ``metrics.json["kfp"]`` into KFP output artifacts (duck-typed: the core imports no kfp).

    ``classification_metrics`` is a ``dsl.ClassificationMetrics``, ``scalar_metrics`` a
    ``dsl.Metrics``; a pipeline component is this one call.
    """
    cm = kfp["confusion_matrix"]
    classification_metrics.log_confusion_matrix(cm["categories"], cm["matrix"])
    for name, value in kfp["metrics"].items():
        scalar_metrics.log_metric(name, value)
