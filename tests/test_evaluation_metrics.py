"""Tests for evaluation_metrics.MetricComputer: every metric against a direct exact computation."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation_metrics import MetricComputer, json_safe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------- references


def exact_ap(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Sort-based AP, scikit-learn's tie rule (one step per distinct score); NaN if no positive."""
    scores = scores.double().cpu()
    labels = labels.double().cpu()
    n_pos = float(labels.sum())
    if n_pos == 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order]
    tp = y.cumsum(0)
    fp = (1 - y).cumsum(0)
    last_of_group = torch.ones_like(s, dtype=torch.bool)
    last_of_group[:-1] = s[:-1] != s[1:]
    tp, fp = tp[last_of_group], fp[last_of_group]
    gained = torch.diff(tp, prepend=torch.zeros(1, dtype=tp.dtype))
    return float((gained * tp / (tp + fp)).sum() / n_pos)


def direct_counts(probs: torch.Tensor, targets: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tag (TP, predicted positives, positives) counted directly, int64."""
    pred = probs >= threshold
    pos = targets.bool()
    return (pred & pos).sum(0), pred.sum(0), pos.sum(0)


def realistic_batch(n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid-of-normal scores, sparse positives shifted up by a per-tag margin."""
    g = torch.Generator().manual_seed(seed)
    density = torch.exp(torch.empty(t).uniform_(-6.0, -1.5, generator=g))  # 0.25% .. 22%
    targets = torch.rand(n, t, generator=g) < density
    margin = torch.empty(t).uniform_(0.5, 6.0, generator=g)
    logits = torch.randn(n, t, generator=g) * 1.5 - 4.0 + torch.randn(t, generator=g)
    logits += targets * margin
    return torch.sigmoid(logits), targets


def bin_centred_batch(mc: MetricComputer, n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores at bin centres (far from every edge, many exact ties) with informative labels."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * mc.logit_range / mc.num_bins
    k = torch.randint(1, mc.num_bins - 1, (n, t), generator=g)
    logits = -mc.logit_range + (k.double() + 0.5) * width
    chance = torch.sigmoid(logits / 2)  # higher bins are more often positive
    targets = torch.rand(n, t, generator=g, dtype=torch.float64) < chance
    return torch.sigmoid(logits).float(), targets


def stream(mc: MetricComputer, probs: torch.Tensor, targets: torch.Tensor, batch: int) -> None:
    """Feed data in batches of `batch`."""
    for start in range(0, probs.shape[0], batch):
        mc.update(probs[start : start + batch], targets[start : start + batch])


# ---------------------------------------------------------------------- mAP


@pytest.mark.parametrize("ap_method", ["step", "interpolated"])
def test_map_close_to_exact_on_realistic_scores(ap_method: str) -> None:
    """mAP within 1e-3 of sort-based AP, with no-positive, all-positive and tied tags."""
    probs, targets = realistic_batch(6000, 60, seed=1)
    targets[:, 0] = False  # no positives: excluded from mAP, AP NaN
    targets[:, 1] = True  # only positives: AP 1
    probs[:, 2] = 0.25  # every score tied
    probs[:3000, 3] = torch.round(probs[:3000, 3] * 100) / 100  # partial ties
    mc = MetricComputer(60, ap_method=ap_method)
    stream(mc, probs, targets, 512)
    ref = torch.tensor([exact_ap(probs[:, j], targets[:, j]) for j in range(60)], dtype=torch.float64)
    has_pos = ~ref.isnan()
    out = mc.compute()
    ap = mc.per_tag()["ap"]
    assert math.isnan(float(ap[0]))
    assert float(ap[1]) == pytest.approx(1.0, abs=1e-12)
    assert out["num_tags_with_positives"] == int(has_pos.sum()) == 59
    assert out["mAP"] == pytest.approx(float(ap[has_pos].mean()), abs=1e-12)
    assert abs(out["mAP"] - float(ref[has_pos].mean())) < 1e-3
    if ap_method == "step":
        # Fully tied tag: one bin, so the step rule is sklearn's rule exactly.
        assert float(ap[2]) == pytest.approx(float(ref[2]), abs=1e-12)


def test_step_ap_is_exact_for_scores_tied_within_bins() -> None:
    """Step AP equals the exact tied AP when each distinct score has its own bin."""
    mc = MetricComputer(12, num_bins=64)
    probs, targets = bin_centred_batch(mc, 3000, 12, seed=2)
    stream(mc, probs, targets, 700)
    ref = torch.tensor([exact_ap(probs[:, j], targets[:, j]) for j in range(12)], dtype=torch.float64)
    torch.testing.assert_close(mc.per_tag()["ap"], ref, rtol=0, atol=1e-12)


def test_interpolated_ap_beats_step_on_continuous_scores() -> None:
    """On continuous scores and coarse bins the interpolated rule is closer to exact."""
    probs, targets = realistic_batch(5000, 40, seed=3)
    ref = torch.tensor([exact_ap(probs[:, j], targets[:, j]) for j in range(40)], dtype=torch.float64)
    errors = {}
    for method in ("step", "interpolated"):
        mc = MetricComputer(40, num_bins=512, ap_method=method)
        stream(mc, probs, targets, 1000)
        errors[method] = abs(mc.compute()["mAP"] - float(ref[~ref.isnan()].mean()))
    assert errors["interpolated"] < errors["step"]


# ---------------------------------------------------------------------- threshold metrics


def test_f1_precision_recall_at_threshold_are_exact() -> None:
    """Threshold metrics equal direct counts, including scores exactly at the threshold."""
    threshold = 0.37
    probs, targets = realistic_batch(3000, 30, seed=4)
    probs[::7, 5] = threshold  # exactly at the threshold: predicted positive (>=)
    probs[:, 6] = 0.01  # no predictions ...
    targets[:, 6] = False  # ... and no positives: F1 undefined, excluded from f1_macro
    probs[:, 7] = 0.9  # predictions but no positives: F1 = 0, included
    targets[:, 7] = False
    mc = MetricComputer(30, threshold=threshold, num_bins=256)
    stream(mc, probs, targets, 333)
    out = mc.compute()
    tp, pred, pos = direct_counts(probs, targets, threshold)
    fp, fn = pred - tp, pos - tp
    f1 = 2 * tp.double() / (2 * tp + fp + fn).clamp(min=1).double()
    defined = (2 * tp + fp + fn) > 0
    assert not bool(defined[6]) and bool(defined[7])
    assert out["f1_macro"] == pytest.approx(float(f1[defined].double().mean()), abs=1e-12)
    assert out["num_tags_f1_defined"] == int(defined.sum())
    tps, fps, fns = int(tp.sum()), int(fp.sum()), int(fn.sum())
    assert out["f1_micro"] == pytest.approx(2 * tps / (2 * tps + fps + fns), abs=1e-12)
    assert out["precision_micro"] == pytest.approx(tps / (tps + fps), abs=1e-12)
    assert out["recall_micro"] == pytest.approx(tps / (tps + fns), abs=1e-12)
    per_tag = mc.per_tag()
    assert torch.equal(per_tag["true_positives"], tp)
    assert torch.equal(per_tag["predicted"], pred)
    assert torch.equal(per_tag["support"], pos)
    torch.testing.assert_close(per_tag["f1"][defined], f1[defined].double(), rtol=0, atol=1e-12)
    assert math.isnan(float(per_tag["f1"][6])) and float(per_tag["f1"][7]) == 0.0
    assert math.isnan(float(per_tag["precision"][6]))
    assert math.isnan(float(per_tag["recall"][7]))


def test_best_thresholds_match_brute_force() -> None:
    """Per-tag best F1 equals a brute-force search, and its threshold achieves it."""
    mc = MetricComputer(10, num_bins=48)
    probs, targets = bin_centred_batch(mc, 2000, 10, seed=5)
    targets[:, 9] = False  # no positives: NaN threshold
    stream(mc, probs, targets, 128)
    edges = mc.bin_edges()
    per_tag = mc.per_tag()
    for j in range(9):
        p, y = probs[:, j].double(), targets[:, j]
        brute = []
        for edge in edges.tolist():
            pred = p >= edge
            tp = int((pred & y).sum())
            brute.append(2 * tp / (int(pred.sum()) + int(y.sum())))
        assert float(per_tag["best_f1"][j]) == pytest.approx(max(brute), abs=1e-12)
        # The reported threshold itself, counted directly, achieves the best F1.
        pred = p >= float(per_tag["best_threshold"][j])
        tp = int((pred & y).sum())
        direct = 2 * tp / (int(pred.sum()) + int(y.sum()))
        assert direct == pytest.approx(max(brute), abs=1e-12)
    assert math.isnan(float(per_tag["best_threshold"][9]))
    assert math.isnan(float(per_tag["best_f1"][9]))
    out = mc.compute()
    assert out["f1_macro_best_thresholds"] == pytest.approx(float(per_tag["best_f1"][:9].mean()), abs=1e-12)


def test_global_p_eq_r_threshold_matches_brute_force() -> None:
    """The pooled precision = recall edge equals a brute-force search over edges."""
    mc = MetricComputer(15, num_bins=40)
    probs, targets = bin_centred_batch(mc, 1500, 15, seed=6)
    stream(mc, probs, targets, 100)
    out = mc.compute()
    n_pos = int(targets.sum())
    best = None
    for edge in mc.bin_edges().tolist():  # ascending: first minimum is the lowest edge
        pred = probs.double() >= edge
        gap = abs(int(pred.sum()) - n_pos)
        if best is None or gap < best[0]:
            tp = int((pred & targets).sum())
            best = (gap, edge, tp / int(pred.sum()), tp / n_pos)
    assert best is not None
    assert out["global_threshold_p_eq_r"] == pytest.approx(best[1], abs=1e-15)
    assert out["p_eq_r_precision"] == pytest.approx(best[2], abs=1e-12)
    assert out["p_eq_r_recall"] == pytest.approx(best[3], abs=1e-12)


# ---------------------------------------------------------------------- rating


def test_rating_accuracy_and_confusion() -> None:
    """Rating accuracy and confusion match direct counts; -1 and invalid are excluded."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(500, 4, generator=g)
    target = torch.randint(-1, 4, (500,), generator=g)
    target[:5] = 9  # invalid labels: excluded, counted
    mc = MetricComputer(3)
    for start in range(0, 500, 64):
        mc.update_rating(logits[start : start + 64], target[start : start + 64])
    out = mc.compute()
    known = (target >= 0) & (target < 4)
    pred = logits.argmax(1)
    conf = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(target[known].tolist(), pred[known].tolist()):
        conf[t, p] += 1
    assert out["rating_confusion"] == conf.tolist()
    assert out["rating_accuracy"] == pytest.approx(float((pred[known] == target[known]).double().mean()), abs=1e-12)
    assert out["rating_num_known"] == int(known.sum())
    assert out["rating_num_unknown"] == int((target == -1).sum())
    assert out["rating_num_invalid"] == 5


def test_rating_all_unknown_is_nan() -> None:
    """No known rating gives NaN accuracy and an all-zero confusion matrix."""
    mc = MetricComputer(3)
    mc.update_rating(torch.randn(4, 4), torch.full((4,), -1))
    out = mc.compute()
    assert math.isnan(out["rating_accuracy"])
    assert out["rating_confusion"] == [[0] * 4 for _ in range(4)]


# ---------------------------------------------------------------------- streaming and merging


def _assert_same_results(a: MetricComputer, b: MetricComputer) -> None:
    """Identical state and identical computed metrics (NaN == NaN)."""
    for x, y in zip(a.state_tensors(), b.state_tensors()):
        assert torch.equal(x.cpu().to(torch.int64), y.cpu().to(torch.int64))
    ca, cb = a.compute(), b.compute()
    assert json.dumps(json_safe(ca), sort_keys=True) == json.dumps(json_safe(cb), sort_keys=True)


def test_streaming_small_batches_equals_one_batch() -> None:
    """Uneven small batches (including empty ones) give the one-batch state."""
    probs, targets = realistic_batch(700, 25, seed=8)
    ratings = torch.randint(-1, 4, (700,))
    rating_logits = torch.randn(700, 4)
    whole = MetricComputer(25, num_bins=128)
    whole.update(probs, targets)
    whole.update_rating(rating_logits, ratings)
    pieces = MetricComputer(25, num_bins=128)
    sizes = [1, 0, 7, 64, 3, 300, 325]
    start = 0
    for size in sizes:
        pieces.update(probs[start : start + size], targets[start : start + size].float())
        pieces.update_rating(rating_logits[start : start + size], ratings[start : start + size])
        start += size
    assert start == 700
    _assert_same_results(whole, pieces)


def test_merge_of_halves_equals_whole() -> None:
    """merge_ of two halves equals the whole; incompatible merges raise."""
    probs, targets = realistic_batch(600, 20, seed=9)
    whole = MetricComputer(20, num_bins=100)
    whole.update(probs, targets)
    first, second = MetricComputer(20, num_bins=100), MetricComputer(20, num_bins=100)
    first.update(probs[:250], targets[:250])
    second.update(probs[250:], targets[250:])
    first.merge_(second)
    _assert_same_results(whole, first)
    with pytest.raises(ValueError, match="num_bins"):
        first.merge_(MetricComputer(20, num_bins=50))


def test_sample_mask_drops_padded_samples() -> None:
    """Masked samples count nowhere, as if they had not been passed."""
    probs, targets = realistic_batch(200, 10, seed=10)
    keep = torch.arange(200) % 3 != 0
    masked = MetricComputer(10, num_bins=64)
    masked.update(probs, targets, sample_mask=keep)
    direct = MetricComputer(10, num_bins=64)
    direct.update(probs[keep], targets[keep])
    assert masked.compute()["num_samples"] == int(keep.sum())
    ta, tb = masked.state_tensors(), direct.state_tensors()
    # The histogram's trailing discard cell holds the dropped samples; all else matches.
    assert torch.equal(ta[0][:-1], tb[0][:-1])
    for x, y in zip(ta[1:], tb[1:]):
        assert torch.equal(x, y)


def _all_reduce_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """One gloo rank: update on its shard, all-reduce, save the reduced state."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        probs, targets = realistic_batch(300, 12, seed=11)
        mc = MetricComputer(12, num_bins=64)
        mc.update(probs[rank::world], targets[rank::world])
        mc.update_rating(torch.randn(5, 4), torch.full((5,), rank))
        mc.all_reduce_()
        torch.save([t.to(torch.int64) for t in mc.state_tensors()], os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    """A currently free TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_all_reduce_sums_ranks_without_double_counting(tmp_path: Path) -> None:
    """Two gloo ranks all-reduce to exactly the single-process state."""
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    probs, targets = realistic_batch(300, 12, seed=11)
    whole = MetricComputer(12, num_bins=64)
    whole.update(probs, targets)
    expected = [t.to(torch.int64) for t in whole.state_tensors()]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert int(got[3]) == 300  # num_samples
        for name_index in (0, 1, 2, 3):  # histogram, TP, predicted, samples
            assert torch.equal(got[name_index], expected[name_index])
        assert int(got[5].sum()) == 10  # five rating samples per rank, both ranks


# ---------------------------------------------------------------------- groups


def test_by_bucket_and_by_category_match_per_tag_subsets() -> None:
    """Bucket and category summaries equal per-tag subsets computed directly."""
    probs, targets = realistic_batch(1500, 16, seed=12)
    freqs = [3, 9, 10, 50, 99, 100, 500, 999, 1000, 5000, 0, 42, 7, 123, 2000, 11]
    cats = ["general", "character", None, "general"] * 4
    mc = MetricComputer(16, num_bins=256, tag_frequencies=freqs, tag_categories=cats, threshold=0.3)
    stream(mc, probs, targets, 500)
    per_tag = mc.per_tag()
    tp, pred, pos = direct_counts(probs, targets, 0.3)
    buckets = mc.by_bucket()
    assert list(buckets) == ["<10", "10-99", "100-999", "1000+"]
    members = {
        "<10": [f < 10 for f in freqs],
        "10-99": [10 <= f < 100 for f in freqs],
        "100-999": [100 <= f < 1000 for f in freqs],
        "1000+": [f >= 1000 for f in freqs],
    }
    for name, mask_list in members.items():
        mask = torch.tensor(mask_list)
        got = buckets[name]
        assert got["num_tags"] == int(mask.sum())
        ap = per_tag["ap"][mask]
        assert got["mAP"] == pytest.approx(float(ap[~ap.isnan()].mean()), abs=1e-12)
        t, p, s = int(tp[mask].sum()), int(pred[mask].sum()), int(pos[mask].sum())
        assert got["f1_micro"] == pytest.approx(2 * t / (p + s), abs=1e-12)
    by_cat = mc.by_category()
    assert sorted(by_cat) == ["character", "general", "unknown"]
    assert by_cat["general"]["num_tags"] == 8 and by_cat["unknown"]["num_tags"] == 4
    mask = torch.tensor([c == "character" for c in cats])
    assert by_cat["character"]["mAP"] == pytest.approx(float(per_tag["ap"][mask].mean()), abs=1e-12)
    with pytest.raises(ValueError, match="tag_frequencies"):
        MetricComputer(3).by_bucket()
    with pytest.raises(ValueError, match="tag_categories"):
        MetricComputer(3).by_category()


# ---------------------------------------------------------------------- edge cases


def test_no_samples_gives_nan_rates_and_zero_counts() -> None:
    """An empty computer reports NaN rates, zero counts, and strict JSON via json_safe."""
    out = MetricComputer(5, num_bins=32).compute()
    for key in ("mAP", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "rating_accuracy", "global_threshold_p_eq_r"):
        assert math.isnan(out[key]), key
    assert out["num_samples"] == 0 and out["num_tags"] == 5
    assert out["num_tags_with_positives"] == 0
    strict = json.dumps(json_safe(out), allow_nan=False)
    assert json.loads(strict)["mAP"] is None


def test_compute_returns_plain_python_values() -> None:
    """compute() holds only plain Python values; reset() empties the state."""
    probs, targets = realistic_batch(100, 6, seed=13)
    mc = MetricComputer(6, num_bins=32)
    mc.update(probs, targets)
    mc.update_rating(torch.randn(100, 4), torch.randint(0, 4, (100,)))
    out = mc.compute()
    for key, value in out.items():
        assert type(value) in (float, int, list, str), key
    json.dumps(out, allow_nan=False)
    mc.reset()
    assert mc.compute()["num_samples"] == 0


def test_nan_scores_are_counted_and_never_predicted() -> None:
    """NaN scores are counted, never predicted, and rank as score 0."""
    probs = torch.tensor([[0.9, float("nan")], [float("nan"), 0.2]])
    targets = torch.tensor([[1, 1], [0, 0]])
    mc = MetricComputer(2, num_bins=16)
    mc.update(probs, targets)
    out = mc.compute()
    assert out["num_nan_scores"] == 2
    per_tag = mc.per_tag()
    assert per_tag["predicted"].tolist() == [1, 0]
    # NaN ranks as score 0: tag 1's positive sits in the lowest bin below its negative.
    assert float(per_tag["ap"][1]) == pytest.approx(0.5, abs=1e-12)


def test_histogram_widens_to_int64_before_overflow() -> None:
    """Nearing 2**31 samples, the histogram widens to int64 with counts kept."""
    probs, targets = realistic_batch(64, 4, seed=14)
    mc = MetricComputer(4, num_bins=16)
    mc.update(probs, targets)
    assert mc.state_tensors()[0].dtype == torch.int32
    mc._samples_upper_bound = 2**31 - 10  # pretend two billion samples went by
    mc.update(probs, targets)
    assert mc.state_tensors()[0].dtype == torch.int64
    ref = MetricComputer(4, num_bins=16)
    ref.update(torch.cat([probs, probs]), torch.cat([targets, targets]))
    assert torch.equal(mc.state_tensors()[0], ref.state_tensors()[0].to(torch.int64))


def test_bad_inputs_raise_specific_errors() -> None:
    """Wrong shapes and settings raise ValueError naming the problem."""
    mc = MetricComputer(4)
    with pytest.raises(ValueError, match="probs must have shape"):
        mc.update(torch.rand(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="does not match"):
        mc.update(torch.rand(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="sample_mask"):
        mc.update(torch.rand(2, 4), torch.zeros(2, 4), sample_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rating_logits"):
        mc.update_rating(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold"):
        MetricComputer(4, threshold=1.5)
    with pytest.raises(ValueError, match="tag_frequencies"):
        MetricComputer(4, tag_frequencies=[1, 2])
    with pytest.raises(ValueError, match="ap_method"):
        MetricComputer(4, ap_method="trapezoid")


@pytest.mark.parametrize("device", DEVICES)
def test_device_results_match_cpu(device: str) -> None:
    """Results on each available device equal the CPU results."""
    probs, targets = realistic_batch(800, 30, seed=15)
    ref = MetricComputer(30, num_bins=256)
    stream(ref, probs, targets, 200)
    mc = MetricComputer(30, num_bins=256)  # device=None follows the first batch
    stream(mc, probs.to(device), targets.to(device), 200)
    assert mc.state_tensors()[0].device.type == device
    _assert_same_results(ref, mc)
    torch.testing.assert_close(mc.per_tag()["best_threshold"], ref.per_tag()["best_threshold"], equal_nan=True)


def test_chunked_compute_matches_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute()/per_tag() over many tag chunks equal the one-chunk results."""
    import evaluation_metrics

    probs, targets = realistic_batch(400, 37, seed=16)
    single = MetricComputer(37, num_bins=32)
    single.update(probs, targets)
    expected_out, expected_tags = single.compute(), single.per_tag()
    monkeypatch.setattr(evaluation_metrics, "_COMPUTE_CELLS_PER_CHUNK", 5 * 2 * 32)
    chunked = MetricComputer(37, num_bins=32)
    chunked.update(probs, targets)
    assert len(chunked._tag_chunks()) == 8  # 37 tags in chunks of 5
    assert json.dumps(json_safe(chunked.compute())) == json.dumps(json_safe(expected_out))
    got_tags = chunked.per_tag()
    for key in ("ap", "best_f1", "best_threshold", "support"):
        torch.testing.assert_close(got_tags[key], expected_tags[key], equal_nan=True)


# ---------------------------------------------------------------------- long-tail headline metrics


def _sweep_p_eq_r_edge(probs: np.ndarray, targets: np.ndarray, edges: list[float]) -> float:
    """Lowest edge whose predicted-positive count is closest to the positive count (numpy sweep)."""
    n_pos = int(targets.sum())
    gaps = [abs(int((probs >= e).sum()) - n_pos) for e in edges]
    return edges[int(np.argmin(gaps))]  # argmin returns the first (lowest) minimum


def _macro_f1_numpy(probs: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Mean per-tag F1 = 2TP / (PP + P) over tags with PP + P > 0 at one threshold."""
    pred = probs >= threshold
    tp = (pred & targets).sum(0)
    denominator = pred.sum(0) + targets.sum(0)
    defined = denominator > 0
    return float((2 * tp[defined] / denominator[defined]).mean())


def _numpy_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """average_precision_score's definition: sum over distinct scores of (R_n - R_n-1) * P_n."""
    ap, prev_recall, n_pos = 0.0, 0.0, labels.sum()
    for s in np.unique(scores)[::-1]:
        pred = scores >= s
        recall = (pred & labels).sum() / n_pos
        ap += (recall - prev_recall) * (pred & labels).sum() / pred.sum()
        prev_recall = recall
    return float(ap)


def test_f1_macro_at_pr_matches_a_threshold_sweep() -> None:
    """Macro F1 at the global P = R threshold equals a numpy sweep over edges plus direct F1."""
    mc = MetricComputer(20, num_bins=48)
    probs, targets = bin_centred_batch(mc, 1200, 20, seed=21)
    targets[:, 3] = False  # a tag with no positive: still counted where it predicts positives
    stream(mc, probs, targets, 250)
    out = mc.compute()
    p, y = probs.double().numpy(), targets.numpy()
    edge = _sweep_p_eq_r_edge(p, y, mc.bin_edges().tolist())
    assert out["global_threshold_p_eq_r"] == pytest.approx(edge, abs=1e-15)
    assert out["f1_macro_at_pr"] == pytest.approx(_macro_f1_numpy(p, y, edge), abs=1e-12)
    # Not the same number as F1 at the configured 0.5 (the test would be vacuous otherwise).
    assert abs(out["f1_macro_at_pr"] - out["f1_macro"]) > 1e-3


@pytest.mark.parametrize("with_frequencies", [True, False])
def test_ap_rare_third_matches_sorted_reference(with_frequencies: bool) -> None:
    """Mean sklearn-style AP of the rarest third (by training frequency, else val support) of tags with a positive."""
    t = 14
    mc0 = MetricComputer(t, num_bins=64)
    probs, targets = bin_centred_batch(mc0, 900, t, seed=22)
    targets[:, 5] = False  # excluded: no validation positive
    # Uneven validation supports so ranking by support is meaningful.
    keep = torch.rand(900, t, generator=torch.Generator().manual_seed(3)) < torch.linspace(0.05, 1.0, t)
    targets &= keep
    freqs = [40, 3, 3, 500, 7, 1, 3, 90, 2, 2000, 3, 60, 8, 5]  # ties at 3 cut by tag index
    mc = MetricComputer(t, num_bins=64, tag_frequencies=freqs if with_frequencies else None)
    stream(mc, probs, targets, 300)
    out = mc.compute()
    p, y = probs.double().numpy(), targets.numpy()
    support = y.sum(0)
    eligible = np.flatnonzero(support > 0)
    rank = np.asarray(freqs)[eligible] if with_frequencies else support[eligible]
    rare = eligible[np.argsort(rank, kind="stable")[: math.ceil(len(eligible) / 3)]]
    expected = float(np.mean([_numpy_ap(p[:, j], y[:, j]) for j in rare]))
    assert out["ap_rare_third_num_tags"] == len(rare) == 5
    assert out["ap_rare_third"] == pytest.approx(expected, abs=1e-12)
    assert out["ap_rare_third_ranked_by"] == ("train_frequency" if with_frequencies else "val_support")
    if with_frequencies:
        assert sorted(rare.tolist()) == [1, 2, 6, 8, 10]  # tag 5 (freq 1) has no validation positive


def test_long_tail_keys_are_nan_without_samples_and_json_safe() -> None:
    """With no data the new rates are NaN (None in strict JSON) and the count is 0."""
    out = MetricComputer(4, num_bins=16, tag_frequencies=[1, 2, 3, 4]).compute()
    assert math.isnan(out["f1_macro_at_pr"]) and math.isnan(out["ap_rare_third"])
    assert out["ap_rare_third_num_tags"] == 0
    assert json.loads(json.dumps(json_safe(out), allow_nan=False))["f1_macro_at_pr"] is None
