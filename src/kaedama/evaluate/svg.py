"""Inline SVG figures for the report: charts, heatmaps and images as vector markup.

Why not ``<img src="data:image/png;base64,...">``: Kubeflow Pipelines shows an
HTML artifact in an ``<iframe sandbox="allow-scripts">`` through ``srcdoc``, and a
``srcdoc`` document inherits the Content-Security-Policy of the page that embeds
it; an ``img-src`` without ``data:`` there blocks every base64 image while the
rest of the page renders (kubeflow/pipelines#10527). Inline ``<svg>`` elements
are part of the document, not fetched resources, so no ``img-src`` rule applies
to them. Colours are SVG presentation attributes, not CSS, so a ``style-src``
rule cannot strip them either. Pictures (CAM overlays, mistakes) become a grid
of ``<rect>`` runs at thumbnail size.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def esc(text: object) -> str:
    """HTML/SVG-escaped text."""
    return html.escape(str(text), quote=True)


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 420,
    height: int = 260,
    ylim: tuple[float, float] | None = None,
    xlim: tuple[float, float] | None = None,
    diagonal: bool = False,
    legend: bool = True,
    figure_id: str = "",
) -> str:
    """A line chart: ``series`` of ``(name, xs, ys)``; ``None`` values break the line."""
    left, right, top, bottom = 48, 12, 26, 40
    pw, ph = width - left - right, height - top - bottom
    xs_all = [x for _, xs, ys in series for x, y in zip(xs, ys, strict=True) if y is not None]
    ys_all = [y for _, _, ys in series for y in ys if y is not None]
    x0, x1 = xlim or ((min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0))
    y0, y1 = ylim or ((min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='figure' role='img' "
        f"data-figure='{esc(figure_id)}' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='11'>",
        f"<title>{esc(title)}</title>",
        f"<text x='{width / 2}' y='15' text-anchor='middle' font-size='13'>{esc(title)}</text>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>",
    ]
    for i in range(5):
        gy = y0 + (y1 - y0) * i / 4
        gx = x0 + (x1 - x0) * i / 4
        parts.append(
            f"<line x1='{left}' x2='{left + pw}' y1='{_fmt(py(gy))}' y2='{_fmt(py(gy))}' "
            f"stroke='#eee'/><text x='{left - 4}' y='{_fmt(py(gy) + 4)}' text-anchor='end'>"
            f"{gy:.3g}</text><text x='{_fmt(px(gx))}' y='{top + ph + 14}' "
            f"text-anchor='middle'>{gx:.3g}</text>"
        )
    parts.append(
        f"<text x='{left + pw / 2}' y='{height - 6}' text-anchor='middle'>{esc(xlabel)}</text>"
        f"<text transform='translate(12 {top + ph / 2}) rotate(-90)' text-anchor='middle'>"
        f"{esc(ylabel)}</text>"
    )
    if diagonal:
        parts.append(
            f"<line x1='{_fmt(px(x0))}' y1='{_fmt(py(y0))}' x2='{_fmt(px(x1))}' "
            f"y2='{_fmt(py(y1))}' stroke='#aaa' stroke-dasharray='4 3'/>"
        )
    for k, (name, xs, ys) in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for x, y in zip(xs, ys, strict=True):
            if y is None:
                runs.append([])
                continue
            runs[-1].append(f"{_fmt(px(x))},{_fmt(py(y))}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f"<circle cx='{cx}' cy='{cy}' r='2.5' fill='{colour}'/>")
            elif run:
                parts.append(
                    f"<polyline fill='none' stroke='{colour}' stroke-width='1.6' "
                    f"points='{' '.join(run)}'><title>{esc(name)}</title></polyline>"
                )
        if legend and len(series) <= 12:
            ly = top + 12 + 13 * k
            parts.append(
                f"<rect x='{left + pw - 120}' y='{ly - 8}' width='10' height='3' "
                f"fill='{colour}'/><text x='{left + pw - 106}' y='{ly - 3}'>{esc(name)[:22]}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def reliability(bins: Sequence[dict], *, title: str, width: int = 420, height: int = 280) -> str:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with counts."""
    left, right, top, bottom = 48, 12, 26, 40
    pw, ph = width - left - right, height - top - bottom
    total = max(1, sum(b["count"] for b in bins))
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='figure' role='img' "
        f"data-figure='reliability' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='11'>",
        f"<title>{esc(title)}</title>",
        f"<text x='{width / 2}' y='15' text-anchor='middle' font-size='13'>{esc(title)}</text>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>",
    ]
    for b in bins:
        x = left + b["lo"] * pw
        w = (b["hi"] - b["lo"]) * pw
        share = b["count"] / total
        parts.append(
            f"<rect x='{_fmt(x)}' y='{_fmt(top + ph - share * ph)}' width='{_fmt(w)}' "
            f"height='{_fmt(share * ph)}' fill='#ddd'><title>{b['count']} images</title></rect>"
        )
        if b["accuracy"] is not None:
            h = b["accuracy"] * ph
            parts.append(
                f"<rect x='{_fmt(x + 1)}' y='{_fmt(top + ph - h)}' width='{_fmt(w - 2)}' "
                f"height='{_fmt(h)}' fill='#1f77b4' fill-opacity='0.75'><title>"
                f"confidence {b['lo']:.2f}-{b['hi']:.2f}: accuracy {b['accuracy']:.3f}, "
                f"mean confidence {b['confidence']:.3f}, {b['count']} images</title></rect>"
            )
    parts.append(
        f"<line x1='{left}' y1='{top + ph}' x2='{left + pw}' y2='{top}' stroke='#d62728' "
        f"stroke-dasharray='4 3'/>"
    )
    for i in range(5):
        v = i / 4
        parts.append(
            f"<text x='{left - 4}' y='{_fmt(top + ph - v * ph + 4)}' text-anchor='end'>{v:g}</text>"
            f"<text x='{_fmt(left + v * pw)}' y='{top + ph + 14}' text-anchor='middle'>{v:g}</text>"
        )
    parts.append(
        f"<text x='{left + pw / 2}' y='{height - 6}' text-anchor='middle'>confidence "
        f"(grey: share of images)</text><text transform='translate(12 {top + ph / 2}) "
        f"rotate(-90)' text-anchor='middle'>accuracy</text></svg>"
    )
    return "".join(parts)


def heatmap(matrix: np.ndarray, labels: Sequence[str], *, title: str, max_side: int = 760) -> str:
    """A confusion matrix as cells: row-normalised colour, count in each cell's tooltip."""
    n = len(labels)
    cell = max(2.0, min(28.0, (max_side - 140) / max(n, 1)))
    # Labels stay even for 100+ classes: tiny, but vector text that zooms sharp.
    font = min(11.0, max(3.5, cell * 0.8))
    show_labels = cell >= 4
    longest = max((len(str(label)[:20]) for label in labels), default=1)
    margin = min(130.0, 14 + 0.65 * font * longest) if show_labels else 20
    side = margin + cell * n
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='figure' role='img' "
        f"data-figure='confusion' width='{_fmt(side + 10)}' height='{_fmt(side + 10)}' "
        f"viewBox='0 0 {_fmt(side + 10)} {_fmt(side + 10)}' font-family='sans-serif' "
        f"font-size='{font:.1f}' shape-rendering='crispEdges'>"
        f"<title>{esc(title)}</title>"
    ]
    for i in range(n):
        for j in range(n):
            count = int(matrix[i, j])
            if count == 0:
                continue
            r = float(rates[i, j])
            colour = _blue(r) if i == j else _red(r)
            parts.append(
                f"<rect x='{_fmt(margin + j * cell)}' y='{_fmt(margin + i * cell)}' "
                f"width='{_fmt(cell)}' height='{_fmt(cell)}' fill='{colour}'><title>true "
                f"{esc(labels[i])}, predicted {esc(labels[j])}: {count} ({r:.1%})</title></rect>"
            )
            if cell >= 22:
                parts.append(
                    f"<text x='{_fmt(margin + (j + 0.5) * cell)}' "
                    f"y='{_fmt(margin + (i + 0.5) * cell + 4)}' text-anchor='middle'>{count}</text>"
                )
    parts.append(
        f"<rect x='{margin}' y='{margin}' width='{_fmt(cell * n)}' height='{_fmt(cell * n)}' "
        f"fill='none' stroke='#999'/>"
    )
    if show_labels:
        for i, name in enumerate(labels):
            c = _fmt(margin + (i + 0.5) * cell + font * 0.35)
            parts.append(
                f"<text x='{margin - 4}' y='{c}' text-anchor='end'>{esc(name)[:20]}</text>"
                f"<text transform='translate({c} {margin - 4}) rotate(-90)'>{esc(name)[:20]}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _blue(r: float) -> str:
    v = int(235 - 200 * r)
    return f"#{v:02x}{v + 10 if v < 245 else 255:02x}ff"


def _red(r: float) -> str:
    v = int(235 - 220 * min(1.0, 2 * r))
    return f"#ff{v:02x}{v:02x}"


def picture(rgb: np.ndarray, *, title: str, scale: float = 3.0, figure_id: str = "") -> str:
    """An ``(H, W, 3)`` uint8 picture as runs of equal-colour ``<rect>`` (4 bits per channel)."""
    h, w, _ = rgb.shape
    q = (rgb.astype(np.uint16) * 15 + 127) // 255  # 0..15 per channel
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='thumb' role='img' "
        f"data-figure='{esc(figure_id)}' width='{_fmt(w * scale)}' height='{_fmt(h * scale)}' "
        f"viewBox='0 0 {w} {h}' shape-rendering='crispEdges'><title>{esc(title)}</title>"
    ]
    for y in range(h):
        row = q[y]
        x = 0
        while x < w:
            end = x + 1
            while end < w and (row[end] == row[x]).all():
                end += 1
            r, g, b = (int(v) for v in row[x])
            parts.append(
                f"<rect x='{x}' y='{y}' width='{end - x}' height='1' fill='#{r:x}{g:x}{b:x}'/>"
            )
            x = end
    parts.append("</svg>")
    return "".join(parts)
