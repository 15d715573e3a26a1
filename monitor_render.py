"""Pictures for TensorBoard: PR-curve counts from score histograms and captioned image grids.

Owns the pure rendering helpers of the monitor: `pr_curve_from_histograms` (TensorBoard's raw PR
curve counts from binned scores, e.g. `MetricComputer.histograms`) and `render_image_grid` (example
images with their tags below, drawn with PIL's default font). No file I/O; the TensorBoard sink in
monitor_sinks writes what these return.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["pr_curve_from_histograms", "render_image_grid"]


def _as_hist(name: str, hist: object) -> np.ndarray:
    """Return a histogram as a 1-D float64 array of non-negative counts, or raise ValueError."""
    if isinstance(hist, torch.Tensor):
        hist = hist.detach().cpu().numpy()
    arr = np.asarray(hist, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D histogram, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must hold finite non-negative counts, got {arr.tolist()[:8]}...")
    return arr


def pr_curve_from_histograms(
    pos_hist: object, neg_hist: object, bin_edges: object | None = None, num_thresholds: int | None = None
) -> dict[str, np.ndarray]:
    """Cumulative PR-curve counts at evenly spaced thresholds from score histograms of positives/negatives.

    `bin_edges` is the lower score edge (a probability) of each bin, ascending, as
    `MetricComputer.bin_edges()` returns it; None means B equal bins over [0, 1] (edge i = i/B).
    Thresholds are t_k = k/(K-1), k = 0..K-1 (TensorBoard's PR-curve convention); at t_k a bin
    counts as predicted positive when its lower edge is >= t_k, so a bin straddling t_k counts as
    below it. K defaults to min(B + 1, 127): with equal bins and B <= 126 the thresholds are the
    bin edges themselves and the counts are exact. Returns tp, fp, tn, fn, precision, recall (K,).
    """
    pos = _as_hist("pos_hist", pos_hist)
    neg = _as_hist("neg_hist", neg_hist)
    if pos.shape != neg.shape:
        raise ValueError(f"pos_hist and neg_hist differ in length: {pos.size} vs {neg.size}")
    bins = pos.size
    if bin_edges is None:
        edges = np.arange(bins, dtype=np.float64) / bins
    else:
        if isinstance(bin_edges, torch.Tensor):
            bin_edges = bin_edges.detach().cpu().numpy()
        edges = np.asarray(bin_edges, dtype=np.float64)
        if edges.shape != (bins,):
            raise ValueError(f"bin_edges must hold one lower edge per bin ({bins}), got shape {edges.shape}")
        if not (np.all(np.diff(edges) >= 0) and edges[0] >= 0.0 and edges[-1] <= 1.0):
            raise ValueError("bin_edges must be ascending probabilities in [0, 1]")
    k = min(bins + 1, 127) if num_thresholds is None else int(num_thresholds)
    if k < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds!r}")
    thresholds = np.arange(k, dtype=np.float64) / (k - 1)  # (K,), same arithmetic as edges i/B
    first_bin = np.searchsorted(edges, thresholds, side="left")  # (K,) first bin with edge >= t
    # Counts at or above each bin, plus a trailing 0 for "no bin qualifies".
    pos_at_or_above = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])  # (B+1,)
    neg_at_or_above = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])  # (B+1,)
    tp = pos_at_or_above[first_bin]  # (K,)
    fp = neg_at_or_above[first_bin]  # (K,)
    fn = pos.sum() - tp
    tn = neg.sum() - fp
    # Same guard TensorBoard's own pr_curve summary uses: 0/0 reads as 0, not NaN.
    min_count = 1e-7
    precision = tp / np.maximum(min_count, tp + fp)
    recall = tp / np.maximum(min_count, tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall}


def _load_font(size: int) -> Any:
    """PIL's default font at `size` where Pillow supports sizing it (>= 10.1), else the bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        # Older Pillow or no FreeType: the fixed bitmap font still renders ASCII.
        return ImageFont.load_default()


def _wrap_text(text: str, width_px: int, measure: Callable[[str], float], max_lines: int) -> list[str]:
    """Greedy word wrap of `text` to `width_px`, honouring explicit newlines, at most `max_lines`."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if measure(candidate) <= width_px:
                current = candidate
                continue
            if current:
                lines.append(current)
            # A single word wider than the tile is cut by characters.
            while word and measure(word) > width_px:
                cut = len(word) - 1
                while cut > 1 and measure(word[:cut]) > width_px:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def render_image_grid(
    images: torch.Tensor | np.ndarray,
    captions: Sequence[str],
    *,
    columns: int | None = None,
    min_tile_width: int = 224,
    max_caption_lines: int = 10,
    font_size: int = 12,
    max_image_side: int = 256,
) -> np.ndarray:
    """Lay uint8 images (N, 3, H, W) out in a grid, each with its caption below; returns (H', W', 3) uint8.

    Tile k sits at row k // columns, column k % columns; inside a tile the image is centred
    horizontally at the top and the caption (wrapped, PIL's default font) fills the space below.
    Images larger than `max_image_side` are shrunk (aspect kept) so that a validation grid stays
    a few MB in the event file however large the training resolution is.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(f"images must have shape (N, 3, H, W) with N >= 1, got {arr.shape}")
    if len(captions) != arr.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {arr.shape[0]} images")
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)  # grey -> RGB
    n, _, h, w = arr.shape
    tiles = [Image.fromarray(np.ascontiguousarray(arr[k].transpose(1, 2, 0))) for k in range(n)]  # (H, W, 3)
    if max(h, w) > max_image_side:
        scale = max_image_side / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        tiles = [t.resize((w, h), Image.Resampling.BILINEAR) for t in tiles]
    cols = columns if columns is not None else math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"columns must be >= 1, got {cols}")
    rows = math.ceil(n / cols)

    font = _load_font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> float:
        """Pixel width of `text` in the caption font."""
        return probe.textlength(text, font=font)

    pad, gap = 4, 2
    tile_w = max(w, min_tile_width)
    _, top, _, bottom = probe.textbbox((0, 0), "Ag|", font=font)
    line_h = (bottom - top) + 3
    safe = [_ascii_fallback(c, font) for c in captions]
    wrapped = [_wrap_text(c, tile_w - 2 * pad, measure, max_caption_lines) for c in safe]
    caption_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    tile_h = h + caption_h

    canvas = Image.new("RGB", (cols * tile_w + (cols - 1) * gap, rows * tile_h + (rows - 1) * gap), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        x0 = (k % cols) * (tile_w + gap)
        y0 = (k // cols) * (tile_h + gap)
        canvas.paste(tiles[k], (x0 + (tile_w - w) // 2, y0))
        for i, line in enumerate(wrapped[k]):
            draw.text((x0 + pad, y0 + h + pad + i * line_h - top), line, fill=(235, 235, 235), font=font)
    return np.asarray(canvas, dtype=np.uint8)  # (H', W', 3)


def _ascii_fallback(text: str, font: Any) -> str:
    """Return `text`, or its ASCII-escaped form if the font cannot encode it (bitmap fallback font)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("ascii", "backslashreplace").decode("ascii")
    return text
