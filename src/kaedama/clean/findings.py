"""The clean stage's findings: each step's ranked list of images, as :class:`Finding` values.

Each function turns one step's scores (statistics, out-of-fold probabilities, kNN
distances, the junk model's probabilities) into findings with a rank and the fields
the manifest and ``findings.jsonl`` carry; :func:`kaedama.clean.decide.apply_findings`
then flags or drops by the step's action.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kaedama.clean.config import CleanConfig
from kaedama.clean.decide import Finding
from kaedama.clean.lowinfo import ImageStats, low_info_reasons
from kaedama.manifest import Row


def low_info_findings(
    rows: Sequence[Row], stats: dict[int, ImageStats], config: CleanConfig
) -> list[Finding]:
    """One finding per low-information image; ranked by how many rules it breaks, then uri."""
    t = config.thresholds()
    found = [(i, low_info_reasons(s, t)) for i, s in stats.items()]
    found = [(i, r) for i, r in found if r]
    found.sort(key=lambda f: (-len(f[1]), rows[f[0]].uri))
    return [
        Finding(
            "low_information",
            i,
            rank,
            float(len(reasons)),
            {"low_info": reasons, "low_info_stats": stats[i].to_json()},
        )
        for rank, (i, reasons) in enumerate(found, start=1)
    ]


def label_error_findings(
    indices: Sequence[int], x: np.ndarray, labels: Sequence[str], config: CleanConfig
) -> tuple[list[Finding], dict[str, Any]]:
    """Label-error findings for the embedded rows ``indices`` (rows of ``x``), and notes."""
    from kaedama.clean.labels import LabelErrorsError, find_label_errors

    try:
        result = find_label_errors(
            x, labels, folds=config.folds, seed=config.seed, c=config.probe_c
        )
    except LabelErrorsError as exc:
        return [], {"skipped": str(exc)}
    findings = [
        Finding(
            "label_error",
            indices[issue.index],
            issue.rank,
            issue.self_confidence,
            {
                "label_self_confidence": round(issue.self_confidence, 6),
                "suggested_label": issue.suggested,
                "suggested_probability": round(issue.suggested_probability, 6),
                "label_error_rank": issue.rank,
            },
        )
        for issue in result.issues
    ]
    return findings, {"folds": result.folds, "skipped_labels": result.skipped_labels}


def outlier_findings(
    indices: Sequence[int], x: np.ndarray, labels: Sequence[str], config: CleanConfig
) -> tuple[list[Finding], int]:
    """Outliers above ``config.outlier_z`` (ranked), and how many images were scored."""
    from kaedama.clean.outliers import score_outliers

    scored = score_outliers(x, labels, k=config.outlier_k)
    over = [o for o in scored if o.zscore > config.outlier_z]
    findings = [
        Finding(
            "outlier",
            indices[o.index],
            o.rank,
            o.zscore,
            {
                "outlier_z": round(o.zscore, 4),
                "outlier_distance": round(o.distance, 6),
                "outlier_rank": o.rank,
            },
        )
        for o in over
    ]
    return findings, len(scored)


def junk_findings(indices: Sequence[int], scores: np.ndarray, threshold: float) -> list[Finding]:
    """Images whose unwanted-probability reaches ``threshold``, most likely first."""
    order = sorted(
        (n for n in range(len(indices)) if scores[n] >= threshold),
        key=lambda n: (-scores[n], indices[n]),
    )
    return [
        Finding(
            "unwanted",
            indices[n],
            rank,
            float(scores[n]),
            {"unwanted_score": round(float(scores[n]), 6), "unwanted_rank": rank},
        )
        for rank, n in enumerate(order, start=1)
    ]
