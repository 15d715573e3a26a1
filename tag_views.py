"""The page's HTML: tag results as probability bars, side-by-side models, the per-tag table, a precision-recall curve.

Pure functions from plain values to HTML text (no gradio, no model): tag_app.py computes what to
show and hands it here. Every name, tag and path is escaped (they come from files and uploads).
Elements carry `data-*` attributes with the exact values shown (tag, model, probability), so a
test can read the page as precisely as the code wrote it. It imports nothing from the project.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PAGE_CSS",
    "ImageView",
    "ModelView",
    "TagLine",
    "WorstImage",
    "pr_curve_svg",
    "precision_recall_points",
    "tag_results_html",
    "tag_table_html",
]

PAGE_CSS = """
.oo-image { border: 1px solid #d0d0d8; border-radius: 8px; padding: 8px; margin-bottom: 10px; }
.oo-head { display: flex; gap: 10px; align-items: center; font-weight: 600; }
.oo-head img { width: 72px; height: 72px; object-fit: contain; background: #eee; border-radius: 4px; }
.oo-models { display: flex; gap: 12px; flex-wrap: wrap; }
.oo-model { flex: 1 1 260px; min-width: 240px; }
.oo-model h4 { margin: 6px 0 2px 0; }
.oo-section { font-size: 0.8em; color: #666; margin-top: 4px; text-transform: uppercase; }
.oo-tag { display: grid; grid-template-columns: 1fr 52px 56px; gap: 4px; align-items: center; font-size: 0.9em; }
.oo-bar { position: relative; background: #eef; border-radius: 3px; overflow: hidden; white-space: nowrap; padding: 1px 4px; }
.oo-bar span.fill { position: absolute; left: 0; top: 0; bottom: 0; background: #9ab6ff; z-index: 0; }
.oo-bar span.name { position: relative; z-index: 1; }
.oo-only .oo-bar { outline: 2px solid #f0a020; }
.oo-delta { font-size: 0.8em; color: #555; text-align: right; }
.oo-caption { width: 100%; font-family: monospace; font-size: 0.85em; }
.oo-error { color: #b00020; font-weight: 600; }
.oo-table { border-collapse: collapse; font-size: 0.85em; }
.oo-table th, .oo-table td { border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: right; }
.oo-table td:first-child, .oo-table th:first-child { text-align: left; }
"""


@dataclass
class TagLine:
    """One chosen tag of one model: its probability, whether no other model chose it, and p minus the others' highest."""

    name: str
    probability: float
    only: bool = False
    delta: float | None = None  # None: no other model, or no other model has this tag
    missing_in: tuple[str, ...] = ()  # models whose labels lack the tag


@dataclass
class ModelView:
    """What one model says about one image."""

    model: str
    rating: list[tuple[str, float]]  # the four ratings, high to low
    character: list[TagLine]
    general: list[TagLine]
    caption: str
    command: str = ""  # the tag_images.py options that write this caption


@dataclass
class ImageView:
    """One uploaded file: its models' answers, or why it could not be read."""

    name: str
    thumbnail: str = ""  # a data: URI, "" for none
    error: str = ""
    models: list[ModelView] = field(default_factory=list)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _tag_line(line: TagLine, model: str, section: str) -> str:
    delta = "" if line.delta is None else f"{line.delta:+.3f}"
    title = f"only {model} gives this tag" if line.only else ""
    if line.missing_in:
        title = (title + "; " if title else "") + "not a tag of " + ", ".join(line.missing_in)
    width = max(0.0, min(1.0, line.probability)) * 100
    return (
        f'<div class="oo-tag{" oo-only" if line.only else ""}" data-model="{_e(model)}" data-section="{section}" data-tag="{_e(line.name)}" '
        f'data-prob="{line.probability:.9g}" data-only="{int(line.only)}" data-delta="{"" if line.delta is None else f"{line.delta:.9g}"}" title="{_e(title)}">'
        f'<div class="oo-bar"><span class="fill" style="width:{width:.1f}%"></span><span class="name">{_e(line.name)}</span></div>'
        f'<span>{line.probability:.3f}</span><span class="oo-delta">{_e(delta)}</span></div>'
    )


def _model_html(view: ModelView) -> str:
    parts = [f'<div class="oo-model" data-model="{_e(view.model)}"><h4>{_e(view.model)}</h4>', '<div class="oo-section">rating</div>']
    parts += [
        f'<div class="oo-tag" data-model="{_e(view.model)}" data-section="rating" data-tag="{_e(name)}" data-prob="{p:.9g}">'
        f'<div class="oo-bar"><span class="fill" style="width:{max(0.0, min(1.0, p)) * 100:.1f}%"></span><span class="name">{_e(name)}</span></div>'
        f"<span>{p:.3f}</span><span></span></div>"
        for name, p in view.rating
    ]
    for section, lines in (("character", view.character), ("general", view.general)):
        parts.append(f'<div class="oo-section">{section} ({len(lines)})</div>')
        parts += [_tag_line(line, view.model, section) for line in lines]
    parts.append(
        f'<div class="oo-section">caption</div><textarea class="oo-caption" data-model="{_e(view.model)}" readonly rows="3" '
        f'onfocus="this.select()">{_e(view.caption)}</textarea>'
    )
    if view.command:
        parts.append(
            f'<div class="oo-section">same caption from</div><code class="oo-command" data-model="{_e(view.model)}">{_e(view.command)}</code>'
        )
    parts.append("</div>")
    return "".join(parts)


def tag_results_html(images: Sequence[ImageView]) -> str:
    """Every uploaded file: a header with its thumbnail, then one column per model (or the reason it was not tagged)."""
    if not images:
        return '<div class="oo-empty">Upload images to see their tags.</div>'
    blocks = []
    for image in images:
        thumb = f'<img src="{_e(image.thumbnail)}" alt="">' if image.thumbnail else ""
        head = f'<div class="oo-head">{thumb}<span class="oo-name">{_e(image.name)}</span></div>'
        if image.error:
            body = f'<div class="oo-error" data-error="1">{_e(image.name)}: not tagged: {_e(image.error)}</div>'
        else:
            body = '<div class="oo-models">' + "".join(_model_html(m) for m in image.models) + "</div>"
        blocks.append(f'<div class="oo-image" data-image="{_e(image.name)}" data-failed="{int(bool(image.error))}">{head}{body}</div>')
    return "".join(blocks)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("tag", "tag"),
    ("category", "category"),
    ("ap", "AP"),
    ("f1", "F1"),
    ("precision", "P"),
    ("recall", "R"),
    ("support", "support"),
    ("train_frequency", "frequency"),
)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return _e(value)


def tag_table_html(rows: Sequence[Mapping[str, object]], threshold: float) -> str:
    """The per-tag table (rows as eval_reports.per_tag_rows gives them); F1, P and R at `threshold`."""
    head = "".join(f"<th>{label}</th>" for _, label in TABLE_COLUMNS)
    body = []
    for row in rows:
        attrs = " ".join(f'data-{key.replace("_", "-")}="{_e(row[key])}"' for key, _ in TABLE_COLUMNS)
        body.append(f'<tr class="oo-row" {attrs}>' + "".join(f"<td>{_cell(row[key])}</td>" for key, _ in TABLE_COLUMNS) + "</tr>")
    caption = f"<caption>{len(rows)} tags; F1, P and R at threshold {threshold:.3f}</caption>"
    return f'<table class="oo-table">{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def precision_recall_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) at every distinct score, high to low: predicted positive when score >= threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order].astype(np.float64), positive[order].astype(bool)
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores
    total = max(int(y.sum()), 1)
    return tp[last] / total, tp[last] / (tp[last] + fp[last]), s[last]


@dataclass
class WorstImage:
    """One image the model gets wrong for a tag: its score, labels and predicted tags."""

    path: str
    kind: str  # "fp" (labelled without the tag, predicted with it) or "fn"
    probability: float
    true_tags: list[str]
    predicted_tags: list[str]


def pr_curve_svg(recall: np.ndarray, precision: np.ndarray, tag: str, threshold: float, at: tuple[float, float] | None) -> str:
    """A precision-recall curve as inline SVG, with the point at the evaluation's threshold marked."""
    w, h, pad = 320, 240, 32

    def xy(r: float, p: float) -> tuple[float, float]:
        return pad + r * (w - 2 * pad), h - pad - p * (h - 2 * pad)

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(float(r), float(p)) for r, p in zip(recall, precision)))
    marker = ""
    if at is not None:
        x, y = xy(*at)
        marker = (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#e0462a"><title>threshold {threshold:.3f}: R {at[0]:.3f} P {at[1]:.3f}</title></circle>'
        )
    x0, y0 = xy(0, 0)
    x1, y1 = xy(1, 1)
    return (
        f'<svg class="oo-pr" data-tag="{_e(tag)}" data-points="{len(recall)}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'xmlns="http://www.w3.org/2000/svg" font-size="11">'
        f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#999"/>'
        f'<polyline points="{points}" fill="none" stroke="#3366cc" stroke-width="2"/>{marker}'
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">recall</text>'
        f'<text x="10" y="{h / 2}" text-anchor="middle" transform="rotate(-90 10 {h / 2})">precision</text>'
        f'<text x="{w / 2}" y="14" text-anchor="middle">{_e(tag)}</text></svg>'
    )


def worst_images_html(items: Sequence[WorstImage], tag: str, threshold: float) -> str:
    """The worst images as a list: kind, score, true and predicted tags (the gallery's captions, readable by a test)."""
    if not items:
        return f'<div class="oo-empty">No image gets "{_e(tag)}" wrong at threshold {threshold:.3f}.</div>'
    rows = []
    for item in items:
        what = "false positive: labelled without it, predicted" if item.kind == "fp" else "false negative: labelled with it, missed"
        rows.append(
            f'<li class="oo-worst" data-kind="{item.kind}" data-path="{_e(item.path)}" data-prob="{item.probability:.9g}" '
            f'data-true="{_e(",".join(item.true_tags))}" data-predicted="{_e(",".join(item.predicted_tags))}">'
            f"<b>{_e(what)}</b> p={item.probability:.3f} · {_e(item.path)}<br>true: {_e(', '.join(item.true_tags) or '(none)')}"
            f"<br>predicted: {_e(', '.join(item.predicted_tags) or '(none)')}</li>"
        )
    return f'<ol class="oo-worst-list" data-tag="{_e(tag)}">{"".join(rows)}</ol>'
