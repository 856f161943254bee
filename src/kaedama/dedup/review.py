"""The dedup review page: one self-contained HTML file, every cluster side by side.

:func:`render_report` is a pure function of the dedup results (clusters, summary, rows)
and a ``thumbnail(uri)`` callable, so the Beam job can make thumbnails in parallel and
hand in a dict lookup, and tests can hand in anything. Thumbnails are embedded as
base64 ``data:`` URIs (made by :func:`thumbnail_data_uri` through the shared decoder,
with a reduced-size JPEG decode), so the page needs no access to the images themselves:
it works for ``gs://`` datasets and can be mailed around.

Layout: a summary (counts by status and reason, per label before/after), then one
``<section class="cluster" data-cluster="ID">`` per cluster, label conflicts first,
then larger clusters first; each shows its images as thumbnails with label, URI, size
and decision, and the candidate pairs with distance, similarity, keypoint score and whether they were
confirmed. Every string from the data (labels and URIs are untrusted and often
unicode) is HTML-escaped. The page loads nothing from elsewhere; its one static script
is the review loop: each image has actions (not a duplicate, keep this, unwanted, set
label), and "Download decisions" saves them as the file that ``kaedama dedup
--decisions`` applies on the next run (:mod:`kaedama.dedup.decisions`).
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kaedama import images
from kaedama.manifest import Row

DEFAULT_THUMBNAIL = 128
_JPEG_QUALITY = 75
# Clusters with at most this many candidate pairs show their pair table unfolded.
_OPEN_PAIRS = 6

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin:.2rem 0}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.15rem .5rem;text-align:left;font-size:.85rem}
th{background:#f3f3f3}
.num{text-align:right}
.cluster{border:1px solid #bbb;border-radius:6px;padding:.6rem;margin:1rem 0}
.cluster.conflict{border:2px solid #c0392b;background:#fff6f5}
.badge{display:inline-block;padding:0 .4rem;border-radius:4px;font-size:.8rem;margin-left:.4rem}
.badge.conflict{background:#c0392b;color:#fff}
.badge.decision{background:#eee}
.members{display:flex;flex-wrap:wrap;gap:.6rem;align-items:flex-start}
figure{margin:0;width:190px;font-size:.75rem}
figure img,.noimg{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.noimg{display:flex;align-items:center;justify-content:center;color:#888}
figure.kept{outline:3px solid #27ae60}
figure.dropped{outline:3px solid #aaa;opacity:.85}
.uri{word-break:break-all;color:#555}
.label{font-weight:bold}
details{margin-top:.4rem}
.act{display:flex;flex-wrap:wrap;gap:.2rem;margin-top:.3rem}
.act button{font-size:.7rem;padding:.05rem .3rem}
.act input{font-size:.7rem;width:6rem}
figure[data-decided]:not([data-decided=""]){box-shadow:0 0 0 3px #2980b9}
#decisions{position:sticky;top:0;background:#fff;padding:.3rem 0;z-index:1}
"""

# The review loop's only script: it records a person's actions by sha256 and downloads
# them as the decisions file that ``kaedama dedup --decisions`` applies. Static text:
# every value it handles comes from data-* attributes, never from the page's data
# spliced into code.
_SCRIPT = """
const decisions = {};
function show(figure, sha) {
  const d = decisions[sha];
  figure.dataset.decided = d ? d.action : "";
  figure.querySelector(".chosen").textContent =
    d ? (d.action === "label" ? "label: " + d.label : d.action.replace("_", " ")) : "";
  document.getElementById("decision-count").textContent = Object.keys(decisions).length;
}
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const figure = button.closest("figure[data-sha256]");
  const sha = figure.dataset.sha256;
  const action = button.dataset.action;
  if (action === "label") {
    const label = figure.querySelector("input.relabel").value.trim();
    if (!label) return;
    decisions[sha] = {action: "label", label: label};
  } else if (decisions[sha] && decisions[sha].action === action) {
    delete decisions[sha];
  } else {
    decisions[sha] = {action: action};
  }
  document.querySelectorAll("figure[data-sha256]").forEach((f) => {
    if (f.dataset.sha256 === sha) show(f, sha);
  });
});
document.getElementById("download-decisions").addEventListener("click", () => {
  const body = JSON.stringify({kaedama_decisions: 1, decisions: decisions}, null, 2);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body + "\\n"], {type: "application/json"}));
  link.download = "decisions.json";
  document.body.appendChild(link);
  link.click();
  link.remove();
});
"""

_ACTIONS_HTML = (
    "<div class='act'>"
    "<button type='button' data-action='not_duplicate'>not a duplicate</button>"
    "<button type='button' data-action='keep'>keep this</button>"
    "<button type='button' data-action='unwanted'>unwanted</button>"
    "<input class='relabel' placeholder='label' aria-label='new label'>"
    "<button type='button' data-action='label'>set label</button>"
    "<span class='chosen'></span></div>"
)

_DECISIONS_BAR = (
    "<div id='decisions'><button type='button' id='download-decisions'>Download decisions "
    "(<span id='decision-count'>0</span>)</button> then run <code>kaedama dedup SRC --out "
    "DST --decisions decisions.json</code></div>"
)


def thumbnail_data_uri(
    data: bytes, *, size: int = DEFAULT_THUMBNAIL, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> str:
    """A small JPEG of the image, as a ``data:image/jpeg;base64,...`` URI.

    Args:
        data: the image file's bytes.
        size: longest side of the thumbnail, in pixels.
        max_pixels: decompression-bomb guard handed to the decoder.

    Raises:
        kaedama.images.ImageError: the bytes are not a readable image.
    """
    image = images.decode(data, max_pixels=max_pixels, draft=(size, size))
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def cluster_order(clusters: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Label conflicts first, then larger clusters, then by id (stable across runs)."""
    return sorted(clusters, key=lambda c: (not c.get("conflict"), -len(c["members"]), c["id"]))


def _summary_html(summary: Mapping[str, Any]) -> str:
    parts = ["<section id='summary'><h2>Summary</h2><table>"]
    for key in ("input", "kept", "dropped", "rejected", "clusters", "conflict_clusters"):
        if key in summary:
            parts.append(f"<tr><th>{_e(key)}</th><td class='num'>{_e(summary[key])}</td></tr>")
    parts.append("</table>")
    by_reason = summary.get("by_reason") or {}
    if by_reason:
        parts.append("<table><tr><th>reason</th><th>files</th></tr>")
        for reason, count in by_reason.items():
            parts.append(f"<tr><td>{_e(reason)}</td><td class='num'>{_e(count)}</td></tr>")
        parts.append("</table>")
    per_label = summary.get("per_label") or {}
    if per_label:
        parts.append(
            "<details><summary>Per label: before / after</summary><table>"
            "<tr><th>label</th><th>before</th><th>after</th><th>dropped</th>"
            "<th>rejected</th></tr>"
        )
        for label, c in per_label.items():
            cells = "".join(
                f"<td class='num'>{_e(c.get(k, 0))}</td>"
                for k in ("before", "after", "dropped", "rejected")
            )
            parts.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
        parts.append("</table></details>")
    if "hash_recipe" in summary:
        parts.append(f"<p>Hash recipe: <code>{_e(summary['hash_recipe'])}</code></p>")
    parts.append("</section>")
    return "".join(parts)


# A figure for identical files lists this many of their URIs; the manifest has them all.
_LISTED_COPIES = 10


def representatives(cluster: Mapping[str, Any]) -> dict[str, str]:
    """``sha256 -> first URI`` of each content in a cluster: the one whose thumbnail is shown."""
    reps: dict[str, str] = {}
    for member in cluster["members"]:
        sha, uri = member.get("sha256", "") or member["uri"], member["uri"]
        if sha not in reps or uri < reps[sha]:
            reps[sha] = uri
    return reps


def _member_groups(cluster: Mapping[str, Any]) -> list[list[Mapping[str, Any]]]:
    """Members grouped by (content, label, decision): one figure per group, in page order.

    Thousands of identical files with the same fate become one figure with a count, so
    the page grows with the number of distinct images, not of copies.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for m in cluster["members"]:
        key = (m.get("sha256", "") or m["uri"], m.get("label", ""), m.get("decision", ""))
        groups[key + (m.get("reason", ""),)].append(m)
    ordered = [sorted(g, key=lambda m: m["uri"]) for g in groups.values()]
    return sorted(
        ordered,
        key=lambda g: (g[0].get("decision") != "kept", g[0].get("label", ""), g[0]["uri"]),
    )


def _copies_html(group: Sequence[Mapping[str, Any]]) -> str:
    if len(group) < 2:
        return ""
    listed = "".join(f"<li class='uri'>{_e(m['uri'])}</li>" for m in group[1:_LISTED_COPIES])
    more = len(group) - max(1, min(len(group), _LISTED_COPIES))
    tail = f"<li>… and {more} more (see manifest.jsonl)</li>" if more else ""
    return (
        f"<details class='copies'><summary>{len(group)} identical files</summary>"
        f"<ul>{listed}{tail}</ul></details>"
    )


def _member_html(
    group: Sequence[Mapping[str, Any]],
    thumbnail: Callable[[str], str | None],
    shown: str,
    distance: int | None,
    nearest: int | None,
) -> str:
    member = group[0]
    uri = member["uri"]
    status = member.get("decision", "")
    src = thumbnail(shown)
    no_preview = "<div class='noimg'>no preview</div>"
    img = f"<img src='{_e(src)}' alt='{_e(uri)}'>" if src else no_preview
    decision = _e(status)
    if member.get("reason"):
        decision += f" ({_e(member['reason'])})"
    lines = [
        f"<div class='label'>{_e(member.get('label', ''))}</div>",
        f"<div class='uri'>{_e(uri)}</div>",
        f"<div>{_e(member.get('width', 0))}×{_e(member.get('height', 0))}, "
        f"{_e(member.get('bytes', 0))} bytes</div>",
        f"<div class='decision'>{decision}</div>",
    ]
    if nearest is not None:
        lines.append(f"<div class='nearest'>nearest member: distance {_e(nearest)}</div>")
    if member.get("duplicate_of"):
        dist = "" if distance is None else f" at distance {_e(distance)}"
        lines.append(
            f"<div>duplicate of <span class='uri'>{_e(member['duplicate_of'])}</span>{dist}</div>"
        )
    if member.get("decided"):
        lines.append(f"<div class='decided'>decided: {_e(member['decided'])}</div>")
    count = f" data-count='{len(group)}'" if len(group) > 1 else ""
    sha = member.get("sha256", "")
    actions = f" data-sha256='{_e(sha)}' data-decided=''" if sha else ""
    return (
        f"<figure class='member {_e(status)}' data-uri='{_e(uri)}'{count}{actions}>{img}"
        f"<figcaption>{''.join(lines)}{_copies_html(group)}"
        f"{_ACTIONS_HTML if sha else ''}</figcaption></figure>"
    )


def _pairs_html(cluster: Mapping[str, Any]) -> str:
    # Identical files are shown as one figure with a count; only pairs of different
    # contents are listed (n copies would otherwise add n rows).
    sha = {m["uri"]: m.get("sha256") or m["uri"] for m in cluster["members"]}
    pairs = [p for p in cluster.get("pairs") or [] if sha.get(p["a"]) != sha.get(p["b"])]
    groups = cluster.get("exact_groups") or []
    parts = []
    if groups:
        parts.append(f"<div>{len(groups)} group(s) of identical files</div>")
    if pairs:
        opened = " open" if len(pairs) <= _OPEN_PAIRS else ""
        parts.append(
            f"<details{opened}><summary>{len(pairs)} candidate pair(s)</summary><table>"
            "<tr><th>a</th><th>b</th><th>distance</th><th>similarity</th><th>keypoints</th>"
            "<th>confirmed</th></tr>"
        )
        for p in pairs:
            parts.append(
                f"<tr><td class='uri'>{_e(p['a'])}</td><td class='uri'>{_e(p['b'])}</td>"
                f"<td class='num'>{_e(p['distance'])}</td>"
                f"<td class='num'>{_e(p.get('similarity', ''))}</td>"
                f"<td class='num'>{_e(_or_blank(p.get('keypoints')))}</td>"
                f"<td>{'yes' if p.get('confirmed') else 'no'}</td></tr>"
            )
        parts.append("</table></details>")
    return "".join(parts)


def _or_blank(value: Any) -> Any:
    """A missing score (the test did not judge the pair) shows as an empty cell."""
    return "" if value is None else value


def _cluster_html(cluster: Mapping[str, Any], thumbnail: Callable[[str], str | None]) -> str:
    distance: dict[frozenset[str], int] = {
        frozenset((p["a"], p["b"])): p["distance"] for p in cluster.get("pairs") or []
    }
    # Identical files are at distance 0; looked up by group, not pair by pair, so a
    # group of thousands of identical files stays linear.
    group_of = {
        uri: n for n, group in enumerate(cluster.get("exact_groups") or []) for uri in group
    }

    def between(a: str, b: str) -> int | None:
        if a in group_of and group_of[a] == group_of.get(b):
            return 0
        return distance.get(frozenset((a, b)))

    nearest: dict[str, int] = {uri: 0 for uri in group_of}
    for pair, dist in distance.items():
        for uri in pair:
            nearest[uri] = min(dist, nearest.get(uri, dist))
    conflict = bool(cluster.get("conflict"))
    labels = ", ".join(_e(label) for label in cluster.get("labels", []))
    badges = f"<span class='badge decision'>{_e(cluster.get('decision', ''))}</span>"
    if conflict:
        badges = "<span class='badge conflict'>label conflict</span>" + badges
    members = cluster["members"]
    reps = representatives(cluster)
    figures = "".join(
        _member_html(
            g,
            thumbnail,
            reps[g[0].get("sha256", "") or g[0]["uri"]],
            between(g[0]["uri"], g[0].get("duplicate_of", "")),
            nearest.get(g[0]["uri"]),
        )
        for g in _member_groups(cluster)
    )
    cls = "cluster conflict" if conflict else "cluster"
    return (
        f"<section class='{cls}' id='{_e(cluster['id'])}' data-cluster='{_e(cluster['id'])}' "
        f"data-conflict='{str(conflict).lower()}' data-size='{len(members)}'>"
        f"<h2>{_e(cluster['id'])} · {len(members)} images · {labels}{badges}</h2>"
        f"<div class='members'>{figures}</div>{_pairs_html(cluster)}</section>"
    )


def _rejected_html(rows: Sequence[Row]) -> str:
    rejected = [r for r in rows if r.status == "rejected"]
    if not rejected:
        return ""
    parts = [
        f"<section id='rejected'><h2>{len(rejected)} rejected file(s)</h2><table>"
        "<tr><th>label</th><th>uri</th><th>reason</th><th>message</th></tr>"
    ]
    for r in rejected:
        parts.append(
            f"<tr data-rejected='{_e(r.uri)}'><td>{_e(r.label)}</td><td class='uri'>{_e(r.uri)}</td>"
            f"<td>{_e(r.reason)}</td><td>{_e(r.extra.get('message', ''))}</td></tr>"
        )
    parts.append("</table></section>")
    return "".join(parts)


def render_report(
    clusters: Iterable[Mapping[str, Any]],
    summary: Mapping[str, Any],
    thumbnail: Callable[[str], str | None],
    *,
    rows: Sequence[Row] = (),
    title: str = "kaedama dedup review",
) -> str:
    """The review page as one HTML string.

    Args:
        clusters: ``DedupResult.clusters`` (dicts with id, labels, conflict, decision,
            members, exact_groups, pairs).
        summary: ``summary.json`` content.
        thumbnail: ``uri -> data URI`` (or None for a placeholder), e.g. a dict's ``get``.
        rows: the manifest rows; rejected files are listed at the end.
        title: page title.

    Returns:
        A complete, self-contained HTML document.
    """
    ordered = cluster_order(clusters)
    conflicts = sum(1 for c in ordered if c.get("conflict"))
    body = "".join(_cluster_html(c, thumbnail) for c in ordered)
    if not ordered:
        body = "<p id='no-clusters'>No duplicates found.</p>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>{_summary_html(summary)}"
        f"<h2 id='clusters'>{len(ordered)} cluster(s), {conflicts} with label conflicts</h2>"
        f"{_DECISIONS_BAR if ordered else ''}{body}{_rejected_html(rows)}"
        f"{f'<script>{_SCRIPT}</script>' if ordered else ''}</body></html>\n"
    )


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text table for the terminal: totals, reasons, labels."""
    lines = [
        f"input {summary.get('input', 0)} = kept {summary.get('kept', 0)} + dropped "
        f"{summary.get('dropped', 0)} + rejected {summary.get('rejected', 0)}; "
        f"{summary.get('clusters', 0)} clusters ({summary.get('conflict_clusters', 0)} "
        "with label conflicts)",
    ]
    by_reason = summary.get("by_reason") or {}
    if by_reason:
        width = max(len(r) for r in by_reason)
        lines.append("")
        lines.append(f"{'reason':<{width}}  files")
        lines.extend(f"{reason:<{width}}  {count:>5}" for reason, count in by_reason.items())
    per_label = summary.get("per_label") or {}
    if per_label:
        width = max(5, *(len(label) for label in per_label))
        lines.append("")
        lines.append(f"{'label':<{width}}  before  after  dropped  rejected")
        for label, c in per_label.items():
            lines.append(
                f"{label:<{width}}  {c.get('before', 0):>6}  {c.get('after', 0):>5}  "
                f"{c.get('dropped', 0):>7}  {c.get('rejected', 0):>8}"
            )
    return "\n".join(lines)
