"""A person's decisions on the review page's findings, applied by the next run.

The review page (:mod:`kaedama.dedup.review`) lets a person act on each image of a
finding and download the decisions as a JSON file; ``kaedama dedup ... --decisions
FILE`` applies them (:func:`kaedama.dedup.decide.decide`). Decisions are keyed by the
image's sha256, not its URI, so they survive re-listing, renames and a dataset that grew.

File format::

    {"kaedama_decisions": 1,
     "decisions": {"<sha256>": {"action": "not_duplicate"},
                   "<sha256>": {"action": "keep"},
                   "<sha256>": {"action": "unwanted"},
                   "<sha256>": {"action": "label", "label": "三田本店"}}}

``not_duplicate``
    the image is not a near-duplicate of anything: its candidate pairs never cluster
    (files with the same bytes are still the same image);
``keep``
    keep this image whatever its cluster decided (it is also preferred as the one kept);
``unwanted``
    drop it (reason ``unwanted``), e.g. an image that belongs in no class;
``label``
    its label is ``label`` (label conflicts and per-label counts follow the new label).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kaedama import storage
from kaedama.errors import KaedamaError
from kaedama.manifest import normalize_label

FORMAT_VERSION = 1
ACTIONS = ("not_duplicate", "keep", "unwanted", "label")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DecisionsError(KaedamaError):
    """The decisions file cannot be used (not JSON, unknown action, bad sha256...)."""


@dataclass(frozen=True)
class Decision:
    """What a person decided about one image (by content): an action from :data:`ACTIONS`."""

    action: str
    label: str = ""


def parse(text: str, *, source: str = "decisions") -> dict[str, Decision]:
    """``sha256 -> Decision`` from a decisions file's text.

    Raises:
        DecisionsError: the text is not a decisions file, or an entry is invalid (each
            message says which entry and what to fix).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecisionsError(f"{source} is not JSON ({exc}); download it from report.html") from exc
    if not isinstance(data, dict) or data.get("kaedama_decisions") != FORMAT_VERSION:
        raise DecisionsError(
            f'{source} is not a kaedama decisions file (expected {{"kaedama_decisions": '
            f'{FORMAT_VERSION}, "decisions": {{...}}}}); download it from report.html'
        )
    entries = data.get("decisions")
    if not isinstance(entries, dict):
        raise DecisionsError(f'{source}: "decisions" must be an object keyed by sha256')
    out: dict[str, Decision] = {}
    for sha, entry in entries.items():
        where = f"{source}: decision for {sha!r}"
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise DecisionsError(f"{where}: keys are the images' sha256 (64 hex digits)")
        if not isinstance(entry, dict) or entry.get("action") not in ACTIONS:
            raise DecisionsError(f"{where}: action must be one of {', '.join(ACTIONS)}")
        label = entry.get("label", "")
        if entry["action"] == "label":
            if not isinstance(label, str) or not normalize_label(label).strip():
                raise DecisionsError(f"{where}: a label decision needs a non-empty label")
            label = normalize_label(label.strip())
        out[sha] = Decision(entry["action"], label if entry["action"] == "label" else "")
    return out


def load(uri: str) -> dict[str, Decision]:
    """:func:`parse` of a decisions file (local or gs://)."""
    try:
        text = storage.read_text(uri)
    except storage.StorageError as exc:
        raise DecisionsError(f"cannot read the decisions file {uri}: {exc}") from exc
    return parse(text, source=uri)


def to_json(decisions: Mapping[str, Decision]) -> str:
    """The decisions file for ``decisions`` (what the review page downloads)."""
    entries: dict[str, Any] = {}
    for sha, d in sorted(decisions.items()):
        entries[sha] = {"action": d.action, **({"label": d.label} if d.action == "label" else {})}
    body = {"kaedama_decisions": FORMAT_VERSION, "decisions": entries}
    return json.dumps(body, ensure_ascii=False, indent=2) + "\n"
