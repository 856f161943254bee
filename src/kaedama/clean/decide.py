"""From findings to manifest rows: flag or drop, count, and list the findings by rank.

Every step reports :class:`Finding` objects about rows of the manifest (by index);
:func:`apply_findings` turns them into updated rows. Only rows that were ``kept``
are ever changed: dedup's decisions stand. A flagged row keeps its status and gets
the step's columns plus ``clean_flags``; a dropped row gets status ``dropped`` and
the reason of the first dropping step in :data:`KINDS` order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kaedama.errors import KaedamaError
from kaedama.manifest import Row

# Steps, in the order that picks a dropped row's reason (the most certain first).
KINDS = ("low_information", "unwanted", "outlier", "label_error")


class CleanError(KaedamaError):
    """The clean stage's inputs or results are inconsistent."""


@dataclass(frozen=True)
class Finding:
    """One step's verdict on one row.

    Attributes:
        kind: one of :data:`KINDS` (also the drop reason).
        index: the row's position in the manifest.
        rank: 1 = the step's most certain finding.
        score: the step's number (lower self-confidence, higher z or probability).
        columns: what the row gets in the manifest (``label_self_confidence``, ...).
    """

    kind: str
    index: int
    rank: int
    score: float
    columns: dict[str, Any] = field(default_factory=dict)


def apply_findings(
    rows: Sequence[Row], findings: Sequence[Finding], actions: Mapping[str, str]
) -> list[Row]:
    """New rows with the findings applied; ``actions[kind]`` is ``flag`` or ``drop``."""
    by_row: dict[int, list[Finding]] = {}
    for f in findings:
        if rows[f.index].status != "kept":
            raise CleanError(f"internal error: a {f.kind} finding on a {rows[f.index].status} row")
        by_row.setdefault(f.index, []).append(f)
    out = list(rows)
    for index, found in by_row.items():
        found.sort(key=lambda f: KINDS.index(f.kind))
        row = out[index]
        extra = dict(row.extra)
        for f in found:
            extra.update(f.columns)
        extra["clean_flags"] = [f.kind for f in found]
        drops = [f.kind for f in found if actions.get(f.kind) == "drop"]
        if drops:
            out[index] = replace(row, status="dropped", reason=drops[0], extra=extra)
        else:
            out[index] = replace(row, extra=extra)
    return out


def finding_records(rows_after: Sequence[Row], findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """The findings as JSON objects, by step (:data:`KINDS` order) then rank."""
    records = []
    for f in sorted(findings, key=lambda f: (KINDS.index(f.kind), f.rank)):
        row = rows_after[f.index]
        dropped = row.status == "dropped" and row.reason == f.kind
        records.append(
            {
                "kind": f.kind,
                "rank": f.rank,
                "score": round(f.score, 6),
                "uri": row.uri,
                "label": row.label,
                "sha256": row.sha256,
                "action": "dropped" if dropped else "flagged",
                **f.columns,
            }
        )
    return records


def counts(rows: Sequence[Row]) -> dict[str, int]:
    """``{"input", "kept", "dropped", "rejected"}`` of a list of rows."""
    by_status = Counter(r.status for r in rows)
    return {
        "input": len(rows),
        "kept": by_status.get("kept", 0),
        "dropped": by_status.get("dropped", 0),
        "rejected": by_status.get("rejected", 0),
    }


def summarise(
    before: Sequence[Row], after: Sequence[Row], findings: Sequence[Finding]
) -> dict[str, Any]:
    """Counts before and after, by step and by label; checks that nothing was lost.

    Raises:
        CleanError: kept + dropped + rejected differs from the input, before or after,
            or the number of rows changed.
    """
    c_before, c_after = counts(before), counts(after)
    for name, c in (("before", c_before), ("after", c_after)):
        if c["kept"] + c["dropped"] + c["rejected"] != c["input"]:
            raise CleanError(f"internal error: counts {name} cleaning do not add up: {c}")
    if c_before["input"] != c_after["input"]:
        raise CleanError(
            f"internal error: {c_before['input']} rows in, {c_after['input']} rows out"
        )
    found = Counter(f.kind for f in findings)
    dropped = Counter(
        r.reason
        for b, r in zip(before, after, strict=True)
        if b.status == "kept" and r.status != "kept"
    )
    per_label: dict[str, dict[str, int]] = {}
    for b, a in zip(before, after, strict=True):
        entry = per_label.setdefault(a.label, {"kept_before": 0, "kept_after": 0, "flagged": 0})
        entry["kept_before"] += b.status == "kept"
        entry["kept_after"] += a.status == "kept"
        entry["flagged"] += a.status == "kept" and bool(a.extra.get("clean_flags"))
    return {
        "before": c_before,
        "after": c_after,
        "found": {k: found.get(k, 0) for k in KINDS},
        "removed_by_reason": dict(sorted(dropped.items())),
        "flagged_kept": sum(1 for a in after if a.status == "kept" and a.extra.get("clean_flags")),
        "per_label": dict(sorted(per_label.items())),
    }
