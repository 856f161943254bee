"""The evaluation report: one self-contained HTML page, readable without network or scripts.

Figures are inline SVG (see :mod:`kaedama.evaluate.svg` for why not base64
images); nothing is fetched. The one script sorts the per-class table when a
header is clicked; without it (a strict Content-Security-Policy, a viewer that
blocks scripts) the table still reads, sorted by F1, worst first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kaedama.evaluate import svg
from kaedama.evaluate.svg import esc

SECTIONS = (
    ("summary", "Summary"),
    ("training", "Training curves"),
    ("classes", "Per-class metrics"),
    ("confusion", "Confusion matrix"),
    ("calibration", "Calibration"),
    ("thresholds", "Precision and recall at confidence thresholds"),
    ("pr", "Precision-recall curves"),
    ("leakage", "Near-duplicates of training images"),
    ("cam", "Where the model looks (CAM gallery)"),
    ("mistakes", "Worst confident mistakes"),
    ("speed", "Latency and test-time augmentation"),
    ("compare", "Comparison"),
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:0 16px 40px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4;cursor:pointer}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:20px}.muted{color:#666;font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.item{font-size:11px;width:120px;word-break:break-all}
.ok{color:#1a7f37}.bad{color:#c62828}.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
nav a{margin-right:10px;font-size:13px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
      return dir * String(x).localeCompare(String(y));
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _card(title: str, value: str, note: str = "") -> str:
    extra = f"<span class='muted'>{esc(note)}</span>" if note else ""
    return f"<div class='card'>{esc(title)}<b>{esc(value)}</b>{extra}</div>"


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f"<section id='{key}' data-section='{key}'><h2>{esc(title)}</h2>{body}</section>"


def _summary(m: dict) -> str:
    s = m["summary"]
    k = s["top_k"]
    cal = m.get("calibration") or {}
    cards = [
        _card("accuracy", _pct(s["accuracy"]), f"{s['images']} images, {s['classes']} classes"),
        _card(f"top-{k} accuracy", _pct(s[f"top{k}_accuracy"])),
        _card("macro F1", _num(s["macro"]["f1"])),
        _card("weighted F1", _num(s["weighted"]["f1"])),
        _card("log loss", _num(s["log_loss"])),
    ]
    if cal:
        cards.append(
            _card(
                "ECE",
                _num(cal["ece"]),
                f"noise floor {_num((cal.get('noise_floor') or {}).get('ece_p95'))}",
            )
        )
    lat = m.get("latency") or {}
    if lat:
        cards.append(_card("batch-1 latency", f"{lat['batch1_ms_median']:.1f} ms", lat["device"]))
    model = m.get("model", {})
    skipped = m.get("skipped", [])
    note = (
        f"<p class='bad'>{len(skipped)} image(s) could not be read and are not counted "
        f"(listed in metrics.json).</p>"
        if skipped
        else ""
    )
    return (
        f"<p>Model <b>{esc(model.get('name', '?'))}</b> from <code>{esc(model.get('checkpoint', ''))}</code>, "
        f"input {esc(model.get('input_size'))}, split <b>{esc(m.get('split'))}</b> of "
        f"<code>{esc(m.get('manifest', ''))}</code>, TTA {esc(m.get('tta', 'none'))}.</p>"
        f"<div class='cards'>{''.join(cards)}</div>{note}"
    )


def _training(history: Sequence[dict]) -> str:
    if not history:
        return "<p class='muted'>No history.json beside the checkpoint.</p>"
    epochs = [h["epoch"] for h in history]
    figs = []
    for kind, label in (("loss", "loss"), ("acc", "accuracy")):
        series = [
            (split, epochs, [h.get(f"{split}_{kind}") for h in history])
            for split in ("train", "val")
            if any(h.get(f"{split}_{kind}") is not None for h in history)
        ]
        figs.append(
            svg.line_chart(
                series,
                title=f"{label} per epoch",
                xlabel="epoch",
                ylabel=label,
                figure_id=f"training-{kind}",
            )
        )
    return f"<div class='figs'>{''.join(figs)}</div>"


def _classes(rows: Sequence[dict]) -> str:
    cols = ("precision", "recall", "f1", "average_precision", "roc_auc")
    head = "<th class='l'>class</th>" + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    head += "<th>support</th><th>predicted</th>"
    body = []
    for r in sorted(rows, key=lambda r: (r["f1"] if r["f1"] is not None else -1, r["class"])):
        cells = [f"<td class='l' data-v='{esc(r['class'])}'>{esc(r['class'])}</td>"]
        for c in cols:
            v = r[c]
            cells.append(f"<td data-v='{'' if v is None else v}'>{_num(v)}</td>")
        cells.append(f"<td data-v='{r['support']}'>{r['support']}</td>")
        cells.append(f"<td data-v='{r['predicted']}'>{r['predicted']}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<p class='muted'>Worst F1 first; click a column header to sort.</p>"
        f"<table class='sortable' id='per-class'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _confusion(m: dict, pairs: Sequence[dict], thumbs: dict[str, str]) -> str:
    cm = m["confusion"]
    order = cm["order"]
    labels = [cm["categories"][i] for i in order]
    matrix = np.asarray(cm["matrix"])[np.ix_(order, order)]
    fig = svg.heatmap(matrix, labels, title="confusion matrix, ordered by confusion")
    items = []
    for p in pairs:
        ex = "".join(thumbs.get(u, "") for u in p.get("examples", []))
        rate = "" if p["rate"] is None else f" ({p['rate']:.1%} of {esc(p['true'])})"
        items.append(
            f"<li><b>{esc(p['true'])}</b> → <b>{esc(p['predicted'])}</b>: {p['count']}{rate}"
            f"<div class='gallery'>{ex}</div></li>"
        )
    listing = f"<ol>{''.join(items)}</ol>" if items else "<p>No mistakes.</p>"
    return (
        "<p class='muted'>Rows: true class, columns: predicted; classes confused with each other "
        "sit together (hierarchical ordering). Blue: correct share, red: confusion share; hover a "
        "cell for its count. The full matrix is in metrics.json (KFP shape).</p>"
        f"{fig}<h3>Most confused pairs</h3>{listing}"
    )


def _calibration(m: dict) -> str:
    cal = m.get("calibration")
    if not cal:
        return "<p class='muted'>Not computed.</p>"
    floor = cal.get("noise_floor") or {}
    ci = cal.get("ece_ci95")
    lines = [
        f"<p>ECE <b>{_num(cal['ece'], 4)}</b>"
        + (f" (95% CI {_num(ci[0], 4)}–{_num(ci[1], 4)})" if ci else "")
        + f", MCE {_num(cal['mce'], 4)}, {cal['bins']} bins, {cal['images']} images.</p>"
    ]
    if floor:
        verdict = (
            "above the noise floor: the miscalibration is real"
            if cal.get("distinguishable_from_calibrated")
            else "within the noise floor: indistinguishable from a calibrated model at this n"
        )
        lines.append(
            f"<p>A perfectly calibrated model with the same confidences would show ECE "
            f"{_num(floor['ece_mean'], 4)} on average (95th percentile "
            f"{_num(floor['ece_p95'], 4)}) at this n and bin count: this ECE is {verdict}.</p>"
        )
    temp = m.get("temperature")
    if temp:
        lines.append(
            f"<p>Temperature fitted on val: T = {temp['temperature']:.3f} (val NLL "
            f"{temp['nll_before']:.4f} → {temp['nll_after']:.4f}); test ECE after scaling "
            f"{_num(temp.get('test_ece_after'), 4)}. Saved as <code>{esc(temp.get('saved_to', ''))}</code>.</p>"
        )
    fig = svg.reliability(cal["reliability"], title="reliability diagram")
    return "".join(lines) + fig


def _thresholds(rows: Sequence[dict]) -> str:
    body = "".join(
        f"<tr><td>{r['threshold']:.2f}</td><td>{r['answered']}</td><td>{_pct(r['coverage'])}</td>"
        f"<td>{_pct(r['precision'])}</td><td>{_pct(r['recall'])}</td></tr>"
        for r in rows
    )
    return (
        "<p class='muted'>The model answers only when its top-1 confidence reaches the "
        "threshold (as Vertex AI reports it).</p><table><thead><tr><th>threshold</th>"
        "<th>answered</th><th>coverage</th><th>precision</th><th>recall</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _pr(curves: Sequence[dict]) -> str:
    usable = [c for c in curves if c["recall"]]
    note = ""
    if len(usable) > 10:
        usable = sorted(usable, key=lambda c: (c["average_precision"], c["class"]))[:10]
        note = "<p class='muted'>The 10 classes with the lowest average precision; all curves are in metrics.json.</p>"
    series = [
        (f"{c['class']} AP {c['average_precision']:.2f}", c["recall"], c["precision"])
        for c in usable
    ]
    fig = svg.line_chart(
        series,
        title="precision-recall (one vs rest)",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        figure_id="pr",
    )
    return note + fig


def _leakage(leak: dict | None) -> str:
    if not leak:
        return "<p class='muted'>Not computed.</p>"
    a, b = leak["with_train_duplicate"], leak["without"]
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(leak["by_reason"].items())) or "none"
    return (
        f"<p>{esc(leak['what'])}.</p><table><thead><tr><th class='l'>test images</th>"
        "<th>images</th><th>accuracy</th></tr></thead><tbody>"
        f"<tr><td class='l'>with a near-duplicate in train</td><td>{a['images']}</td><td>{_pct(a['accuracy'])}</td></tr>"
        f"<tr><td class='l'>without</td><td>{b['images']}</td><td>{_pct(b['accuracy'])}</td></tr>"
        f"</tbody></table><p class='muted'>By reason: {esc(reasons)}.</p>"
    )


def _gallery(items: Sequence[dict], cam_info: dict | None) -> str:
    if not items:
        why = (cam_info or {}).get("error") or "explanations were switched off"
        return f"<p class='muted'>No CAM gallery ({esc(why)}).</p>"
    if cam_info.get("method") == "cam":
        how = (
            "CAM: the classifier's weights over the pre-pool feature map (the head is global "
            "average pooling + one linear layer, checked on the model)"
        )
    else:
        how = (
            f"Grad-CAM on layer <code>{esc(cam_info.get('target_layer'))}</code> "
            f"({esc(cam_info.get('layout'))}), the last stage that reaches the prediction"
        )
    head = f"<p>{how}; heat for the predicted class; ✓ right, ✗ wrong.</p>"
    by_class: dict[str, list[dict]] = {}
    for it in items:
        by_class.setdefault(it["label"], []).append(it)
    blocks = []
    for label, its in by_class.items():
        cells = "".join(
            f"<div class='item' data-cam='{'correct' if it['correct'] else 'wrong'}'>{it['svg']}"
            f"<span class='{'ok' if it['correct'] else 'bad'}'>"
            f"{'✓' if it['correct'] else '✗'} → {esc(it['predicted'])} "
            f"{it['confidence']:.2f}</span></div>"
            for it in its
        )
        blocks.append(f"<h3>{esc(label)}</h3><div class='gallery'>{cells}</div>")
    return head + "".join(blocks)


def _mistakes(recs: Sequence[dict], thumbs: dict[str, str]) -> str:
    if not recs:
        return "<p>No mistakes.</p>"
    cells = "".join(
        f"<div class='item'>{thumbs.get(r['uri'], '')}<span class='bad'>{esc(r['label'])} → "
        f"{esc(r['predicted'])} {r['confidence']:.2f}</span><br><span class='muted'>{esc(r['uri'])}</span></div>"
        for r in recs
    )
    return f"<div class='gallery'>{cells}</div>"


def _speed(m: dict) -> str:
    out = []
    lat = m.get("latency")
    if lat:
        prep = lat.get("preprocess_ms_per_image")
        out.append(
            f"<p>{esc(lat['model'])} at {esc(lat['input_size'])} on {esc(lat['device'])} "
            f"({esc(lat['device_name'])}), {lat['threads']} torch threads, torch {esc(lat['torch'])}: "
            f"batch 1 <b>{lat['batch1_ms_median']:.2f} ms</b> median (p90 {lat['batch1_ms_p90']:.2f} ms); "
            f"batch {lat['batch']}: <b>{lat['images_per_s']:.1f} images/s</b>"
            + (f"; preprocessing {prep:.2f} ms per image" if prep is not None else "")
            + ".</p>"
        )
    tta = m.get("tta_measurement")
    if tta:
        rows = "".join(
            f"<tr><td class='l'>{esc(r['tta'])}</td><td>{r['views']}</td><td>{_pct(r['accuracy'])}</td>"
            f"<td>{_num(r['log_loss'])}</td><td>{r['seconds']:.2f}</td></tr>"
            for r in tta["runs"]
        )
        out.append(
            "<table><thead><tr><th class='l'>TTA</th><th>views</th><th>accuracy</th><th>log loss</th>"
            f"<th>seconds</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<p>Gain {100 * tta['accuracy_gain']:+.2f} points for {tta['cost_ratio']:.2f}x the time.</p>"
        )
    return "".join(out) or "<p class='muted'>Not measured.</p>"


def _compare(c: dict | None) -> str:
    if not c:
        return "<p class='muted'>No comparison (pass --compare OTHER/metrics.json).</p>"
    t = c["mcnemar"]
    rows = "".join(
        f"<tr><td class='l' data-v='{esc(d['class'])}'>{esc(d['class'])}</td>"
        + "".join(
            f"<td data-v='{d.get(k, '')}'>{'–' if d.get(k) is None else f'{d[k]:+.3f}'}</td>"
            for k in ("precision", "recall", "f1")
        )
        + f"<td data-v='{d['support']}'>{d['support']}</td></tr>"
        for d in c["per_class_delta"]
    )
    return (
        f"<p><b>{esc(c['verdict'])}</b>. Accuracy {_pct(c['accuracy_this'])} vs "
        f"{_pct(c['accuracy_other'])} on {c['shared_images']} shared images; only this model right "
        f"on {t['only_this_right']}, only the other on {t['only_other_right']}.</p>"
        "<table class='sortable' id='compare-table'><thead><tr><th class='l'>class</th>"
        "<th>Δ precision</th><th>Δ recall</th><th>Δ F1</th><th>support</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def render(
    metrics: dict,
    *,
    history: Sequence[dict] = (),
    thumbs: dict[str, str] | None = None,
    gallery: Sequence[dict] = (),
    mistakes: Sequence[dict] = (),
    pairs: Sequence[dict] = (),
    curves: Sequence[dict] = (),
) -> str:
    """The report page (a string of HTML)."""
    thumbs = thumbs or {}
    bodies = {
        "summary": _summary(metrics),
        "training": _training(history),
        "classes": _classes(metrics["per_class"]),
        "confusion": _confusion(metrics, pairs, thumbs),
        "calibration": _calibration(metrics),
        "thresholds": _thresholds(metrics["thresholds"]),
        "pr": _pr(curves),
        "leakage": _leakage(metrics.get("leakage")),
        "cam": _gallery(gallery, metrics.get("cam")),
        "mistakes": _mistakes(mistakes, thumbs),
        "speed": _speed(metrics),
        "compare": _compare(metrics.get("compare")),
    }
    nav = "".join(f"<a href='#{k}'>{esc(t)}</a>" for k, t in SECTIONS)
    title = f"kaedama evaluation: {metrics.get('model', {}).get('name', '')}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><nav>{nav}</nav>"
        + "".join(_section(k, bodies[k]) for k, _ in SECTIONS)
        + f"<script>{_SORT_JS}</script></body></html>"
    )
