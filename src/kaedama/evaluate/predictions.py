"""Per-image predictions (JSONL and CSV), the worst confident mistakes, confused-pair examples."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from kaedama import storage
from kaedama.manifest import Row


def records(
    rows: Sequence[Row],
    probs: np.ndarray,
    classes: Sequence[str],
    y_true: np.ndarray,
    *,
    top_k: int = 0,
) -> list[dict[str, Any]]:
    """One record per image: URI, true and predicted label, probabilities, correctness.

    ``top_k > 0`` keeps only the k most probable classes (``top_k`` list); otherwise
    ``probs`` maps every class to its probability.
    """
    out = []
    pred = probs.argmax(1)
    for i, row in enumerate(rows):
        p = probs[i]
        rec: dict[str, Any] = {
            "uri": row.uri,
            "label": row.label,
            "predicted": classes[pred[i]],
            "confidence": round(float(p[pred[i]]), 6),
            "correct": bool(pred[i] == y_true[i]),
            "true_probability": round(float(p[y_true[i]]), 6),
        }
        if top_k > 0:
            top = np.argsort(-p, kind="stable")[:top_k]
            rec["top_k"] = [[classes[c], round(float(p[c]), 6)] for c in top]
        else:
            rec["probs"] = {c: round(float(v), 6) for c, v in zip(classes, p, strict=True)}
        out.append(rec)
    return out


def ordered(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistakes first, the most confident first; then the right answers in input order."""
    wrong = sorted((r for r in recs if not r["correct"]), key=lambda r: -r["confidence"])
    return wrong + [r for r in recs if r["correct"]]


def write(out_uri: str, recs: Sequence[dict[str, Any]], classes: Sequence[str]) -> list[str]:
    """``predictions.jsonl`` and ``predictions.csv`` (one probability column per class).

    Rows are :func:`ordered`: the worst confident mistakes open the files.
    """
    recs = ordered(recs)
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    storage.write_text(storage.join(out_uri, "predictions.jsonl"), jsonl)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    full = bool(recs) and "probs" in recs[0]
    head = ["uri", "label", "predicted", "confidence", "correct"]
    w.writerow(head + ([f"p:{c}" for c in classes] if full else ["top_k"]))
    for r in recs:
        base = [r[k] for k in head]
        extra = (
            [r["probs"][c] for c in classes]
            if full
            else [json.dumps(r["top_k"], ensure_ascii=False)]
        )
        w.writerow(base + extra)
    storage.write_text(storage.join(out_uri, "predictions.csv"), buf.getvalue())
    return ["predictions.jsonl", "predictions.csv"]


def worst_mistakes(recs: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Wrong predictions, most confident first."""
    wrong = [r for r in recs if not r["correct"]]
    return sorted(wrong, key=lambda r: (-r["confidence"], r["uri"]))[:n]


def pair_examples(
    recs: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]], per_pair: int
) -> list[dict[str, Any]]:
    """The confused pairs with up to ``per_pair`` example images each (most confident first)."""
    out = []
    for pair in pairs:
        hits = [
            r for r in recs if r["label"] == pair["true"] and r["predicted"] == pair["predicted"]
        ]
        hits.sort(key=lambda r: (-r["confidence"], r["uri"]))
        out.append({**pair, "examples": [h["uri"] for h in hits[:per_pair]]})
    return out
