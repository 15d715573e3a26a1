"""Tests for metric_kernels.py: each kernel against a brute-force loop over thresholds or samples."""

from __future__ import annotations

import math

import pytest
import torch

from metric_kernels import (
    counts_at_or_above,
    counts_from_bin,
    highest_occupied_bin_below,
    histogram_curve_stats,
    logit_bin_edges,
    logit_bin_positions,
    midpoint_thresholds,
    nan_div,
    precision_equals_recall,
    rarest_tags,
    summarize_tags,
    threshold_scores,
)


def random_histograms(tags: int, bins: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse integer histograms pos, neg (T, K) with an empty tag, an all-positive tag and empty bins."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4, (tags, bins), generator=g) * (torch.rand(tags, bins, generator=g) < 0.4)
    neg = torch.randint(0, 9, (tags, bins), generator=g) * (torch.rand(tags, bins, generator=g) < 0.7)
    pos[0] = 0  # no positive: AP and best F1 undefined
    neg[1] = 0  # only positives: AP 1
    pos[1, 0] = 2
    pos[2, bins // 2] = 5  # at least one tag with a heavy bin
    return pos.to(torch.int32), neg.to(torch.int32)


def sklearn_ap(scores: list[float], labels: list[int]) -> float:
    """average_precision_score's definition: sum over distinct thresholds of (R_n - R_n-1) * P_n."""
    n_pos = sum(labels)
    if n_pos == 0:
        return math.nan
    ap, prev_recall = 0.0, 0.0
    for s in sorted(set(scores), reverse=True):
        tp = sum(1 for x, y in zip(scores, labels) if x >= s and y)
        predicted = sum(1 for x in scores if x >= s)
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / predicted
        prev_recall = recall
    return ap


def f1_at_edge(pos: torch.Tensor, neg: torch.Tensor, k: int) -> float:
    """F1 of one tag's histogram (K,) when bins k.. are predicted positive."""
    tp = int(pos[k:].sum())
    predicted = tp + int(neg[k:].sum())
    return 2 * tp / (predicted + int(pos.sum()))


# ---------------------------------------------------------------------- binning


def test_logit_bins_match_a_search_over_the_edges() -> None:
    """floor(position) is the bin whose edges bracket the score; outer logits and NaN go to the end bins."""
    bins, logit_range = 64, 8.0
    edges = logit_bin_edges(bins, logit_range)
    width = 2 * logit_range / bins
    ref_edges = [0.0] + [1 / (1 + math.exp(-(-logit_range + k * width))) for k in range(1, bins)]
    torch.testing.assert_close(edges, torch.tensor(ref_edges, dtype=torch.float64), rtol=0, atol=1e-15)
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(400, dtype=torch.float64).uniform_(-11.0, 11.0, generator=g)
    # Keep scores clearly inside a bin: float32 rounding right at an edge may fall either way.
    offset = (logits + logit_range) / width
    logits = logits[(offset - offset.round()).abs() > 1e-2]
    probs = torch.sigmoid(logits).float()[None, :]  # (1, N)
    probs[0, :3] = torch.tensor([float("nan"), 0.0, 1.0])
    before = probs.clone()
    positions, num_nan = logit_bin_positions(probs, bins, logit_range)
    assert int(num_nan) == 1
    assert positions.dtype == torch.float32 and float(positions.min()) >= 0 and float(positions.max()) <= bins - 1
    got = positions.floor().long()[0].tolist()
    for i, p in enumerate(probs[0].double().tolist()):
        want = 0 if math.isnan(p) else max(k for k in range(bins) if ref_edges[k] <= p)
        assert got[i] == want, (i, p)
    torch.testing.assert_close(probs, before, equal_nan=True, rtol=0, atol=0)  # the input is left as it was


def test_counts_at_or_above_is_a_suffix_sum() -> None:
    """Entry k of the last dimension sums bins k..K-1."""
    x = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    want = torch.tensor([[int(x[r, k:].sum()) for k in range(7)] for r in range(3)])
    assert torch.equal(counts_at_or_above(x), want)


# ---------------------------------------------------------------------- curves


@pytest.mark.parametrize("bins", [1, 2, 9])
def test_step_ap_and_best_f1_match_brute_force(bins: int) -> None:
    """Step AP equals scikit-learn's AP of the binned scores; best F1 is the maximum over all bin edges."""
    pos, neg = random_histograms(6, bins, seed=bins)
    stats = histogram_curve_stats(pos, neg, "step")
    assert stats.support.tolist() == pos.sum(1).tolist()
    for t in range(6):
        scores = [float(k) for k in range(bins) for _ in range(int(pos[t, k]) + int(neg[t, k]))]
        labels = [1 if i < int(pos[t, k]) else 0 for k in range(bins) for i in range(int(pos[t, k]) + int(neg[t, k]))]
        ref = sklearn_ap(scores, labels)
        if math.isnan(ref):
            assert math.isnan(float(stats.ap[t])) and math.isnan(float(stats.best_f1[t]))
            assert int(stats.best_bin[t]) == -1
            continue
        assert float(stats.ap[t]) == pytest.approx(ref, abs=1e-12), t
        f1 = [f1_at_edge(pos[t], neg[t], k) for k in range(bins)]
        best = max(f1)
        assert float(stats.best_f1[t]) == pytest.approx(best, abs=1e-12), t
        k = int(stats.best_bin[t])
        # The lowest bin holding positives that reaches the maximum (lower empty bins tie it).
        assert int(pos[t, k]) > 0 and f1[k] == pytest.approx(best, abs=1e-12)
        assert all(f1[j] < best - 1e-12 for j in range(k) if int(pos[t, j]) > 0), t
    assert float(stats.ap[1]) == pytest.approx(1.0, abs=1e-12)


def test_interpolated_ap_is_the_midpoint_integral_of_interleaved_precision() -> None:
    """Interpolated AP equals a fine numerical integral of precision with each bin's samples evenly interleaved.

    A bin with p positives among a samples, below `above` samples of which `above_pos` are
    positive, puts its x-th positive at rank above + x * a / p - (a / p - 1) / 2; the kernel's closed
    form is the integral of precision over x in [1/2, p + 1/2].
    """
    pos, neg = random_histograms(5, 8, seed=3)
    stats = histogram_curve_stats(pos.to(torch.int64), neg.to(torch.int64), "interpolated")
    x = 0.5 + (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000  # midpoints of [1/2, 3/2] ...
    for t in range(5):
        n_pos = int(pos[t].sum())
        if n_pos == 0:
            assert math.isnan(float(stats.ap[t]))
            continue
        total = 0.0
        for k in range(8):
            p, a = int(pos[t, k]), int(pos[t, k]) + int(neg[t, k])
            if p == 0:
                continue
            above_pos, above = int(pos[t, k + 1 :].sum()), int((pos[t] + neg[t])[k + 1 :].sum())
            rate = a / p
            xs = 0.5 + (x - 0.5) * p  # ... stretched to [1/2, p + 1/2]
            total += float(((above_pos + xs) / (above + rate * xs - (rate - 1) / 2)).mean()) * p
        assert float(stats.ap[t]) == pytest.approx(total / n_pos, rel=1e-7), t


def test_curve_stats_reject_bad_input() -> None:
    """Unknown AP rules and mismatched histograms are ValueErrors naming the problem."""
    pos, neg = random_histograms(3, 4, seed=0)
    with pytest.raises(ValueError, match="ap_method"):
        histogram_curve_stats(pos, neg, "trapezoid")
    with pytest.raises(ValueError, match="one shape"):
        histogram_curve_stats(pos, neg[:, :3])


# ---------------------------------------------------------------------- counts at a threshold


def test_threshold_scores_and_summary_match_direct_formulas() -> None:
    """Per-tag P/R/F1 with NaN for 0/0, and the group summary's macro/micro values."""
    tp = torch.tensor([3, 0, 0, 5])
    predicted = torch.tensor([4, 0, 2, 5])
    support = torch.tensor([6, 0, 0, 10])
    scores = threshold_scores(tp, predicted, support)
    nan = math.nan
    torch.testing.assert_close(scores["precision"], torch.tensor([0.75, nan, 0.0, 1.0], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(scores["recall"], torch.tensor([0.5, nan, nan, 0.5], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(scores["f1"], torch.tensor([0.6, nan, 0.0, 10 / 15], dtype=torch.float64), equal_nan=True)
    ap = torch.tensor([0.5, nan, nan, 0.9], dtype=torch.float64)
    best_f1 = torch.tensor([0.7, nan, nan, 0.8], dtype=torch.float64)
    out = summarize_tags(ap, support, tp, predicted, best_f1)
    assert out["mAP"] == pytest.approx(0.7)
    assert out["f1_macro"] == pytest.approx((0.6 + 0.0 + 10 / 15) / 3)  # tag 1: F1 undefined, left out
    assert out["f1_micro"] == pytest.approx(2 * 8 / (11 + 16))
    assert out["precision_micro"] == pytest.approx(8 / 11) and out["recall_micro"] == pytest.approx(8 / 16)
    assert out["f1_macro_best_thresholds"] == pytest.approx(0.75)
    assert (out["num_tags"], out["num_tags_with_positives"], out["num_tags_f1_defined"]) == (4, 2, 3)
    assert math.isnan(float(nan_div(torch.tensor(0), torch.tensor(0))))


# ---------------------------------------------------------------------- thresholds


def test_precision_equals_recall_matches_brute_force() -> None:
    """The lowest bin where predicted positives are closest to actual positives, with its P and R."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        p = (torch.randint(0, 6, (12,), generator=g) * (torch.rand(12, generator=g) < 0.5)).double()
        n = (torch.randint(0, 20, (12,), generator=g) * (torch.rand(12, generator=g) < 0.6)).double()
        if seed == 0:
            p.zero_()
        got = precision_equals_recall(p, n)
        n_pos = float(p.sum())
        if n_pos == 0:
            assert got is None
            continue
        best = None
        for k in range(12):
            predicted, tp = float((p + n)[k:].sum()), float(p[k:].sum())
            gap = abs(predicted - n_pos)
            if best is None or gap < best[0]:
                best = (gap, k, tp / predicted if predicted else math.nan, tp / n_pos)
        assert got is not None and got[0] == best[1]
        assert got[1] == pytest.approx(best[2], abs=1e-12, nan_ok=True) and got[2] == pytest.approx(best[3], abs=1e-12)


def test_highest_occupied_bin_below_matches_a_loop() -> None:
    """For each row, the highest occupied bin strictly below the limit, or -1."""
    g = torch.Generator().manual_seed(4)
    occupied = torch.rand(8, 10, generator=g) < 0.3
    limit = torch.randint(0, 11, (8,), generator=g)
    got = highest_occupied_bin_below(occupied, limit).tolist()
    for r in range(8):
        below = [k for k in range(10) if k < int(limit[r]) and bool(occupied[r, k])]
        assert got[r] == (max(below) if below else -1), r


def test_midpoint_thresholds_sit_in_the_middle_of_the_empty_gap() -> None:
    """sigmoid of the mean logit of edge(highest_below + 1) and edge(best); 0 for bin 0, NaN for -1."""
    logit_range, bins = 4.0, 16
    width = 2 * logit_range / bins
    best_bin = torch.tensor([5, 5, 0, -1, 15])
    below = torch.tensor([2, -1, -1, -1, 14])
    got = midpoint_thresholds(best_bin, below, logit_range, bins)

    def edge_logit(k: int) -> float:
        """Logit of bin k's lower edge."""
        return -logit_range + k * width

    def sigmoid(z: float) -> float:
        """Logistic function."""
        return 1 / (1 + math.exp(-z))

    assert float(got[0]) == pytest.approx(sigmoid((edge_logit(3) + edge_logit(5)) / 2), abs=1e-15)
    assert float(got[1]) == pytest.approx(sigmoid((edge_logit(0) + edge_logit(5)) / 2), abs=1e-15)
    assert float(got[2]) == 0.0 and math.isnan(float(got[3]))
    assert float(got[4]) == pytest.approx(sigmoid(edge_logit(14) + width), abs=1e-15)  # adjacent: the edge itself
    edges = logit_bin_edges(bins, logit_range)
    assert float(edges[3]) < float(got[0]) < float(edges[5])  # above the occupied bin 2, below bin 5


def test_counts_from_bin_matches_a_loop() -> None:
    """TP and predicted positives from bin k on equal direct sums over bins k.. for every k."""
    pos, neg = random_histograms(7, 10, seed=4)
    for k in range(10):
        tp, predicted = counts_from_bin(pos, neg, k)
        for t in range(7):
            assert int(tp[t]) == sum(int(pos[t, j]) for j in range(k, 10))
            assert int(predicted[t]) == sum(int(pos[t, j]) + int(neg[t, j]) for j in range(k, 10))
        assert tp.dtype == predicted.dtype == torch.int64
    with pytest.raises(ValueError, match="bin 10"):
        counts_from_bin(pos, neg, 10)


def test_rarest_tags_keeps_the_smallest_eligible_third_with_index_ties() -> None:
    """ceil(n / parts) eligible tags of smallest rank, lower index first on ties; a loop reference."""
    g = torch.Generator().manual_seed(9)
    for trial in range(20):
        t = int(torch.randint(1, 30, (1,), generator=g))
        rank = torch.randint(0, 5, (t,), generator=g)  # many ties
        eligible = torch.rand(t, generator=g) < 0.7
        parts = 1 + trial % 4
        got = rarest_tags(rank, eligible, parts)
        candidates = sorted((int(rank[i]), i) for i in range(t) if bool(eligible[i]))
        expected = {i for _, i in candidates[: math.ceil(len(candidates) / parts)]}
        assert set(got.nonzero().squeeze(1).tolist()) == expected
    assert rarest_tags(torch.arange(300), torch.ones(300, dtype=torch.bool), 3).sum() == 100
    assert not rarest_tags(torch.arange(4), torch.zeros(4, dtype=torch.bool), 3).any()
    with pytest.raises(ValueError, match="parts"):
        rarest_tags(torch.arange(4), torch.ones(4, dtype=torch.bool), 0)
