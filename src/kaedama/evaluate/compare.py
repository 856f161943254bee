"""Champion/challenger: this model against another on the same test images, with McNemar's test.

A bare accuracy difference says nothing about whether it is noise. McNemar's
test looks only at the images where the two models disagree on correctness
(``b``: only this one right, ``c``: only the other right); under "equally good"
``b ~ Binomial(b + c, 1/2)``. The exact two-sided binomial p-value comes from
scipy. The images are paired by URI; images only one side evaluated are counted
and left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from scipy.stats import binomtest

from kaedama import storage
from kaedama.errors import KaedamaError


class CompareError(KaedamaError):
    """The other model's results cannot be compared with these."""


def read_other(metrics_uri: str) -> tuple[dict[str, Any], dict[str, bool]]:
    """The other run's metrics.json and ``uri -> correct`` from predictions.jsonl beside it."""
    try:
        other = json.loads(storage.read_text(metrics_uri))
    except storage.NotFoundError as exc:
        raise CompareError(f"--compare: {metrics_uri} not found") from exc
    except json.JSONDecodeError as exc:
        raise CompareError(f"--compare: {metrics_uri} is not JSON ({exc})") from exc
    preds_uri = storage.join(storage.parent(metrics_uri), "predictions.jsonl")
    try:
        text = storage.read_text(preds_uri)
    except storage.NotFoundError as exc:
        raise CompareError(
            f"--compare needs the other run's per-image predictions at {preds_uri} "
            "(kaedama evaluate writes them beside metrics.json)"
        ) from exc
    correct = {}
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            correct[rec["uri"]] = bool(rec["correct"])
    return other, correct


def mcnemar(ours: Sequence[bool], theirs: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test on paired correctness."""
    b = sum(1 for a, o in zip(ours, theirs, strict=True) if a and not o)
    c = sum(1 for a, o in zip(ours, theirs, strict=True) if o and not a)
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"only_this_right": b, "only_other_right": c, "p_value": float(p)}


def compare(
    metrics: dict[str, Any],
    recs: Sequence[dict[str, Any]],
    other: dict[str, Any],
    other_correct: dict[str, bool],
    *,
    alpha: float = 0.05,
    other_name: str = "other",
) -> dict[str, Any]:
    """Per-class deltas (this - other), accuracy on the shared images, McNemar and a verdict."""
    shared = [r for r in recs if r["uri"] in other_correct]
    if not shared:
        raise CompareError(
            "the two runs share no test image URI; compare models on the same test set"
        )
    ours = [r["correct"] for r in shared]
    theirs = [other_correct[r["uri"]] for r in shared]
    test = mcnemar(ours, theirs)
    acc_this, acc_other = sum(ours) / len(ours), sum(theirs) / len(theirs)
    better = "tie" if acc_this == acc_other else "this" if acc_this > acc_other else "other"
    significant = better != "tie" and test["p_value"] < alpha
    theirs_pc = {row["class"]: row for row in other.get("per_class", [])}
    deltas = []
    for row in metrics["per_class"]:
        o = theirs_pc.get(row["class"])
        if o is None:
            continue
        d = {"class": row["class"], "support": row["support"]}
        for key in ("precision", "recall", "f1"):
            if row[key] is not None and o.get(key) is not None:
                d[key] = row[key] - o[key]
        deltas.append(d)
    return {
        "other": other_name,
        "other_model": other.get("model", {}).get("name"),
        "shared_images": len(shared),
        "only_this": len(recs) - len(shared),
        "only_other": len(set(other_correct) - {r["uri"] for r in recs}),
        "accuracy_this": acc_this,
        "accuracy_other": acc_other,
        "accuracy_delta": acc_this - acc_other,
        "mcnemar": test,
        "alpha": alpha,
        "better": better,
        "significant": bool(significant),
        "verdict": _verdict(better, significant, test["p_value"], alpha),
        "per_class_delta": deltas,
    }


def _verdict(better: str, significant: bool, p: float, alpha: float) -> str:
    if better == "tie":
        return "the two models are equally accurate on the shared images"
    who = "this model" if better == "this" else "the other model"
    if significant:
        return f"{who} is better (McNemar p = {p:.3g} < {alpha})"
    return f"{who} is ahead, but not significantly (McNemar p = {p:.3g} >= {alpha})"
