"""Numeric kernels of the tagging metrics: pure functions on per-tag counts and score histograms.

Owns the arithmetic that `evaluation_metrics.MetricComputer` accumulates inputs for: the logit
binning of scores, average precision and F1-optimal bins from histograms, F1/precision/recall from
counts, the pooled precision = recall threshold and the per-tag threshold midpoints. Every function
is stateless tensor code with no I/O and no project imports, so each one can be checked on its own
against a brute-force reference (tests/test_evaluation_metrics.py).

Shapes: T tags, K bins, B samples. A histogram holds integer counts per (tag, bin) with bins in
ascending score order; "predicted positive at bin k" means the score is in bin k or above, i.e.
the threshold is bin k's lower edge. Rates that are 0/0 are NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "AP_METHODS",
    "CurveStats",
    "counts_at_or_above",
    "counts_from_bin",
    "highest_occupied_bin_below",
    "histogram_curve_stats",
    "logit_bin_edges",
    "logit_bin_positions",
    "midpoint_thresholds",
    "nan_div",
    "precision_equals_recall",
    "rarest_tags",
    "summarize_tags",
    "threshold_scores",
    "to_float",
]

# "step": sklearn's tie rule per bin; "interpolated": positives and negatives evenly interleaved.
AP_METHODS: tuple[str, ...] = ("step", "interpolated")

# Scores are clamped this far from 0 and 1 before the logit so that every logit is finite.
_LOGIT_EPS = 1e-7


def nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Elementwise num / den in float64, NaN where den == 0 (any matching shapes)."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    return torch.where(den > 0, num / den.clamp(min=1.0), torch.full_like(num, math.nan))


def to_float(value: torch.Tensor | float) -> float:
    """Plain Python float from a 0-d tensor or a number."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# ------------------------------------------------------------------ binning


def logit_bin_edges(num_bins: int, logit_range: float) -> torch.Tensor:
    """Lower edge of each of `num_bins` logit-uniform bins over [-range, range] as a probability, (K,) float64.

    Edge k is sigmoid(-range + k * width) with width = 2 * range / K, except edge 0, which is 0.0:
    the lowest bin also takes every score below -range (and NaN scores).
    """
    width = 2.0 * logit_range / num_bins
    k = torch.arange(num_bins, dtype=torch.float64)
    edges = torch.sigmoid(-logit_range + k * width)  # (K,)
    edges[0] = 0.0
    return edges


def logit_bin_positions(probs: torch.Tensor, num_bins: int, logit_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional bin position of every score in [0, K - 1] and the number of NaN scores.

    `probs` (B, T) float32 probabilities; returns (positions (B, T) float32, count 0-d int64).
    floor(position) is the bin of `logit_bin_edges`; logits beyond +-range land in the end bins and
    NaN scores in bin 0 (ranked as a score of 0). `probs` itself is not modified.
    """
    width = 2.0 * logit_range / num_bins
    scaled = torch.logit(probs, eps=_LOGIT_EPS)  # (B, T), a new tensor: safe to modify in place
    num_nan = torch.count_nonzero(torch.isnan(scaled))
    scaled.mul_(1.0 / width).add_(logit_range / width)
    scaled.clamp_(0.0, num_bins - 1).nan_to_num_(nan=0.0)
    return scaled, num_nan


def counts_at_or_above(counts: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over the last (bin) dimension: entry k counts bins k..K-1, shape kept."""
    return counts.flip(-1).cumsum(-1).flip(-1)


# ------------------------------------------------------------------ curves from histograms


class CurveStats(NamedTuple):
    """Per-tag results of `histogram_curve_stats`; every field has shape (T,)."""

    ap: torch.Tensor  # float64 average precision, NaN for tags with no positive
    support: torch.Tensor  # int64 number of positives
    best_f1: torch.Tensor  # float64 F1 at the best bin edge, NaN for tags with no positive
    best_bin: torch.Tensor  # int64 bin whose lower edge gives best_f1 (lowest on ties), -1 if none


def histogram_curve_stats(pos: torch.Tensor, neg: torch.Tensor, ap_method: str = "step") -> CurveStats:
    """AP, support and the F1-optimal bin per tag from integer histograms pos, neg (T, K).

    AP is the mean over positives of the precision at their rank. "step" treats each bin as one
    group of tied scores (scikit-learn's average_precision_score rule, so the result is the exact
    AP of the binned scores); "interpolated" assumes a bin's positives and negatives are evenly
    interleaved and integrates the precision in closed form. F1 = 2TP / (PP + P) is evaluated at
    every bin's lower edge.

    Only bins holding positives matter: AP sums precision over positives, and F1 peaks at the
    lower edge of a bin with positives (moving the threshold past a bin with no positive never
    lowers F1). So the dense work is two cumulative sums; the rest runs on the few (tag, bin)
    cells that hold positives. Prefix sums stay in the histograms' integer dtype, which is exact.
    """
    if ap_method not in AP_METHODS:
        raise ValueError(f"ap_method must be 'step' or 'interpolated', got {ap_method!r}")
    if pos.dim() != 2 or pos.shape != neg.shape:
        raise ValueError(f"pos and neg must be (tags, bins) histograms of one shape, got {tuple(pos.shape)} and {tuple(neg.shape)}")
    rows, bins = pos.shape
    both = neg + pos  # (T, K) all samples per bin
    cum_pos = pos.cumsum(1, dtype=pos.dtype)  # (T, K) inclusive prefix sums over ascending bins
    cum_all = both.cumsum(1, dtype=pos.dtype)  # (T, K)
    support = cum_pos[:, -1].to(torch.int64)  # (T,)
    total = cum_all[:, -1]  # (T,)

    cells = pos.reshape(-1).nonzero().squeeze(1)  # (n,) flat index of cells with positives
    row = cells // bins  # (n,)
    k = cells % bins  # (n,)
    p = torch.take(pos, cells).to(torch.float64)  # (n,) positives in the bin
    a = torch.take(both, cells).to(torch.float64)  # (n,) all samples in the bin
    n_pos = support.to(torch.float64)[row]  # (n,)
    # Counts at or above the bin = total - (inclusive prefix) + bin.
    tp = n_pos - torch.take(cum_pos, cells).to(torch.float64) + p  # (n,)
    pp = total.to(torch.float64)[row] - torch.take(cum_all, cells).to(torch.float64) + a  # (n,)

    if ap_method == "step":
        contrib = _step_ap_terms(p, tp, pp)
    else:
        contrib = _interpolated_ap_terms(p, a, tp, pp)
    dev = pos.device
    ap = torch.zeros(rows, dtype=torch.float64, device=dev).index_add_(0, row, contrib)  # (T,)
    has_pos = support > 0
    ap = torch.where(has_pos, ap / support.to(torch.float64).clamp(min=1), math.nan)

    f1 = 2.0 * tp / (pp + n_pos)  # (n,)
    best_f1 = torch.full((rows,), -1.0, dtype=torch.float64, device=dev)
    best_f1.scatter_reduce_(0, row, f1, reduce="amax")
    # Equal F1 at several bins: keep the lowest bin (the most recall for the same F1).
    at_best = f1 == best_f1[row]
    best_bin = torch.full((rows,), bins, dtype=torch.int64, device=dev)
    best_bin.scatter_reduce_(0, row[at_best], k[at_best], reduce="amin")
    best_f1 = torch.where(has_pos, best_f1, math.nan)
    best_bin = torch.where(has_pos, best_bin, -1)
    return CurveStats(ap, support, best_f1, best_bin)


def _step_ap_terms(p: torch.Tensor, tp: torch.Tensor, pp: torch.Tensor) -> torch.Tensor:
    """Each bin is one tied group: its p positives all get the precision tp / pp at the bin's end; (n,)."""
    return p * tp / pp


def _interpolated_ap_terms(p: torch.Tensor, a: torch.Tensor, tp: torch.Tensor, pp: torch.Tensor) -> torch.Tensor:
    """Sum of precisions of a bin's positives if its p positives and a - p negatives interleave evenly; (n,).

    The j-th positive then has (tp - p) + j true and (pp - a - tp + p) + n (j - 1/2) / p false
    positives ahead of it; the sum over j is replaced by its midpoint-rule integral, whose closed
    form is below.
    """
    above_pos = tp - p
    above = pp - a
    rate = a / p  # samples per positive inside the bin
    d = above - (a - p) / (2.0 * p)
    return p / rate + (above_pos - d / rate) / rate * torch.log((above + a + 0.5) / (above + 0.5))


# ------------------------------------------------------------------ counts at one threshold


def threshold_scores(tp: torch.Tensor, predicted: torch.Tensor, support: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-tag precision TP/PP, recall TP/P and F1 2TP/(PP + P) from counts (T,); float64, NaN for 0/0."""
    return {"precision": nan_div(tp, predicted), "recall": nan_div(tp, support), "f1": nan_div(2 * tp, predicted + support)}


def summarize_tags(ap: torch.Tensor, support: torch.Tensor, tp: torch.Tensor, predicted: torch.Tensor, best_f1: torch.Tensor) -> dict[str, float]:
    """mAP, macro/micro F1, micro precision/recall and mean best F1 over a group of tags (all (T,), CPU).

    mAP and the mean best F1 average over tags with a positive; macro F1 over tags where F1 is
    defined (a positive or a predicted positive); micro values pool TP/PP/P over all tags.
    """
    has_pos = support > 0
    f1 = nan_div(2 * tp, predicted + support)  # (T,)
    defined = (predicted + support) > 0
    total_tp = tp.sum()
    total_pred = predicted.sum()
    total_pos = support.sum()
    nan = math.nan
    return {
        "mAP": to_float(ap[has_pos].mean()) if bool(has_pos.any()) else nan,
        "f1_macro": to_float(f1[defined].mean()) if bool(defined.any()) else nan,
        "f1_micro": to_float(nan_div(2 * total_tp, total_pred + total_pos)),
        "precision_micro": to_float(nan_div(total_tp, total_pred)),
        "recall_micro": to_float(nan_div(total_tp, total_pos)),
        "f1_macro_best_thresholds": (to_float(best_f1[has_pos].mean()) if bool(has_pos.any()) else nan),
        "num_tags": int(support.numel()),
        "num_tags_with_positives": int(has_pos.sum()),
        "num_tags_f1_defined": int(defined.sum()),
    }


# ------------------------------------------------------------------ thresholds


def precision_equals_recall(pos: torch.Tensor, neg: torch.Tensor) -> tuple[int, float, float] | None:
    """(bin, precision, recall) where pooled precision equals recall, from counts pos, neg (K,); None if no positive.

    Precision TP/PP and recall TP/P are equal exactly when PP = P, so the bin whose lower edge
    predicts a number of positives closest to P wins; ties go to the lowest bin. Counts are
    float64 (exact for integers below 2**53).
    """
    total_pos = pos.sum()
    if float(total_pos) <= 0:
        return None
    predicted_at = counts_at_or_above(neg + pos)  # (K,) predicted positives at edge k
    tp_at = counts_at_or_above(pos)  # (K,)
    k = int((predicted_at - total_pos).abs().argmin())
    return k, to_float(nan_div(tp_at[k], predicted_at[k])), to_float(tp_at[k] / total_pos)


def counts_from_bin(pos: torch.Tensor, neg: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tag (TP, predicted positives), both (T,) int64, when bins k.. of histograms pos, neg (T, K) are predicted."""
    if pos.dim() != 2 or pos.shape != neg.shape:
        raise ValueError(f"pos and neg must be (tags, bins) of one shape, got {tuple(pos.shape)} and {tuple(neg.shape)}")
    if not 0 <= k < pos.shape[1]:
        raise ValueError(f"bin {k} outside [0, {pos.shape[1]})")
    tp = pos[:, k:].sum(1, dtype=torch.int64)  # (T,)
    return tp, tp + neg[:, k:].sum(1, dtype=torch.int64)


def rarest_tags(rank_by: torch.Tensor, eligible: torch.Tensor, parts: int) -> torch.Tensor:
    """Mask (T,) of the ceil(n / parts) eligible tags with the smallest `rank_by` (T,); ties go to the lower index.

    n is the number of eligible tags (`eligible` (T,) bool); no eligible tag gives an all-False mask.
    Integer ceil (no float fraction) so n = 300, parts = 3 keeps exactly 100; the stable sort makes
    the cut deterministic when many rare tags share one count.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an int >= 1, got {parts!r}")
    if rank_by.shape != eligible.shape or rank_by.dim() != 1:
        raise ValueError(f"rank_by {tuple(rank_by.shape)} and eligible {tuple(eligible.shape)} must be one (T,) shape")
    candidates = eligible.nonzero().squeeze(1)  # (n,) ascending tag index
    keep = -(-candidates.numel() // parts)
    order = torch.sort(rank_by[candidates], stable=True).indices[:keep]  # stable: ties keep index order
    mask = torch.zeros_like(eligible, dtype=torch.bool)
    mask[candidates[order]] = True
    return mask


def highest_occupied_bin_below(occupied: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Per row, the highest bin k < limit[row] with occupied[row, k], else -1.

    occupied (T, K) bool, limit (T,) int64 -> (T,) int64.
    """
    ks = torch.arange(occupied.shape[1], device=occupied.device)  # (K,)
    below = occupied & (ks[None, :] < limit[:, None])  # (T, K)
    return torch.where(below, ks[None, :], -1).amax(dim=1)


def midpoint_thresholds(best_bin: torch.Tensor, highest_below: torch.Tensor, logit_range: float, num_bins: int) -> torch.Tensor:
    """Probability threshold per tag in the middle (in logit space) of the gap below its best bin; (T,) float64.

    Every threshold between the top of the highest non-empty bin below `best_bin` (index
    `highest_below`, -1 when none) and the lower edge of `best_bin` makes the same predictions; the
    midpoint is the choice that generalises best to unseen scores. Best bin 0 reaches down to score
    0, so its threshold is 0 (predict everything); best_bin -1 (no positive) gives NaN.
    """
    width = 2.0 * logit_range / num_bins
    below = highest_below.to(torch.float64)
    best = best_bin.to(torch.float64)
    # Logit of a bin's lower edge is -range + k * width; the gap is [edge(j + 1), edge(k)].
    low = -logit_range + (below + 1.0) * width
    high = -logit_range + best * width
    threshold = torch.sigmoid((low + high) / 2.0)
    threshold = torch.where(best == 0, 0.0, threshold)
    return torch.where(best_bin >= 0, threshold, math.nan)
