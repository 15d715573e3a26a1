"""Tests for Monitor_log.py: TensorBoard event files and server, metrics.jsonl, resume, console, threads."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from Monitor_log import (
    ThreadSafeMetricsTracker,
    TrainingMonitor,
    flatten_dict,
    format_duration,
    pr_curve_from_histograms,
    render_image_grid,
    truncate_metrics_jsonl,
)

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        """Start at t = 1000."""
        self.t = 1000.0

    def __call__(self) -> float:
        """Current fake time."""
        return self.t


def load_events(run_dir: Path) -> EventAccumulator:
    """Load every event file under run_dir/tensorboard with no down-sampling."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_jsonl(path: Path) -> list[dict]:
    """All records of a metrics.jsonl."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scalar_series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar tag."""
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def make_monitor(run_dir: Path, **kwargs: object) -> TrainingMonitor:
    """A monitor with a private stream and no system thread unless asked for."""
    kwargs.setdefault("total_steps", 100)
    kwargs.setdefault("system_stats_interval_s", 0.0)
    kwargs.setdefault("stream", io.StringIO())
    return TrainingMonitor(run_dir, **kwargs)


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def test_format_duration() -> None:
    """Durations format as in the console line."""
    assert format_duration(0) == "0s"
    assert format_duration(42.4) == "42s"
    assert format_duration(252) == "4m12s"
    assert format_duration(3 * 3600 + 5 * 60 + 59) == "3h05m"
    assert format_duration(2 * 86400 + 7 * 3600 + 1) == "2d07h"
    assert format_duration(float("nan")) == "--"


def test_flatten_dict() -> None:
    """Nested dicts flatten with the separator; leaves are kept as they are."""
    assert flatten_dict({"a": {"b": 1, "c": {"d": "x"}}, "e": [1]}) == {"a.b": 1, "a.c.d": "x", "e": [1]}
    assert flatten_dict({"a": {"b": 2}}, sep="/") == {"a/b": 2}


def test_pr_curve_matches_thresholding_the_raw_scores() -> None:
    """Counts from histograms equal counts from thresholding the scores themselves at j/B."""
    rng = np.random.default_rng(0)
    bins = 20
    pos_scores = rng.beta(5, 2, size=700)
    neg_scores = rng.beta(2, 5, size=1300)
    pos_hist = np.bincount(np.minimum((pos_scores * bins).astype(int), bins - 1), minlength=bins)
    neg_hist = np.bincount(np.minimum((neg_scores * bins).astype(int), bins - 1), minlength=bins)
    curve = pr_curve_from_histograms(torch.from_numpy(pos_hist), neg_hist.tolist())
    assert curve["tp"].shape == (bins + 1,)
    for j in range(bins + 1):
        thr = j / bins
        tp = float((pos_scores >= thr).sum())
        fp = float((neg_scores >= thr).sum())
        assert curve["tp"][j] == tp
        assert curve["fp"][j] == fp
        assert curve["fn"][j] == len(pos_scores) - tp
        assert curve["tn"][j] == len(neg_scores) - fp
        want_p = tp / (tp + fp) if tp + fp > 0 else 0.0
        assert curve["precision"][j] == pytest.approx(want_p)
        assert curve["recall"][j] == pytest.approx(tp / len(pos_scores))


def test_pr_curve_with_logit_bin_edges_and_resampled_thresholds() -> None:
    """With the metrics module's logit-spaced bins, counts at t_k are those of scores >= the first edge >= t_k."""
    rng = np.random.default_rng(1)
    bins, logit_range = 512, 16.0
    width = 2 * logit_range / bins
    edges = 1 / (1 + np.exp(-(-logit_range + np.arange(bins) * width)))  # lower edges as probabilities
    edges[0] = 0.0
    pos_scores = 1 / (1 + np.exp(-rng.normal(2.0, 2.0, 400)))
    neg_scores = 1 / (1 + np.exp(-rng.normal(-4.0, 2.5, 3000)))

    def to_bins(p: np.ndarray) -> np.ndarray:
        """Histogram of scores over the logit bins (outer bins take everything beyond)."""
        idx = np.clip(np.floor((np.log(p / (1 - p)) + logit_range) / width).astype(int), 0, bins - 1)
        return np.bincount(idx, minlength=bins)

    curve = pr_curve_from_histograms(to_bins(pos_scores), to_bins(neg_scores), torch.from_numpy(edges))
    assert curve["tp"].shape == (127,)
    for k in range(127):
        t = k / 126
        above = [e for e in edges if e >= t]
        cut = min(above) if above else math.inf
        assert curve["tp"][k] == (pos_scores >= cut).sum(), k
        assert curve["fp"][k] == (neg_scores >= cut).sum(), k
    # Recall falls from 1 to 0 as the threshold rises; counts always add up.
    assert curve["recall"][0] == 1.0 and curve["recall"][-1] == 0.0
    assert np.all(np.diff(curve["recall"]) <= 0)
    np.testing.assert_array_equal(curve["tp"] + curve["fn"], len(pos_scores))
    assert pr_curve_from_histograms(to_bins(pos_scores), to_bins(neg_scores), edges, num_thresholds=11)["tp"].shape == (11,)
    with pytest.raises(ValueError, match="one lower edge per bin"):
        pr_curve_from_histograms(to_bins(pos_scores), to_bins(neg_scores), edges[:-1])
    with pytest.raises(ValueError, match="ascending"):
        pr_curve_from_histograms(to_bins(pos_scores), to_bins(neg_scores), edges[::-1].copy())


@pytest.mark.parametrize(
    "pos,neg,needle", [([1, 2], [1, 2, 3], "differ"), ([], [], "non-empty"), ([1, -1], [0, 0], "non-negative"), ([[1]], [[1]], "1-D")]
)
def test_pr_curve_rejects_bad_histograms(pos: list, neg: list, needle: str) -> None:
    """Mismatched, empty, negative or 2-D histograms are ValueErrors."""
    with pytest.raises(ValueError, match=needle):
        pr_curve_from_histograms(pos, neg)


def test_render_image_grid_places_images_and_draws_captions() -> None:
    """Each image appears unchanged at its tile; captions put text pixels below it; empty ones don't."""
    n, h, w = 5, 20, 30
    images = np.zeros((n, 3, h, w), dtype=np.uint8)
    for k in range(n):
        images[k, 0] = 40 * k + 10
        images[k, 1] = 255 - 40 * k
        images[k, 2, :, : w // 2] = 77  # left/right halves differ: catches a transposed paste
    captions = ["true: smile, long_hair\npred: smile (0.93)", "", "x", "y", "z"]
    grid = render_image_grid(images, captions, min_tile_width=64)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    cols, gap, tile_w = 3, 2, 64  # ceil(sqrt(5)) = 3 columns, 2 rows
    tile_h = (grid.shape[0] - gap) // 2
    assert grid.shape[1] == cols * tile_w + (cols - 1) * gap
    for k in range(n):
        x0 = (k % cols) * (tile_w + gap) + (tile_w - w) // 2
        y0 = (k // cols) * (tile_h + gap)
        np.testing.assert_array_equal(grid[y0 : y0 + h, x0 : x0 + w], images[k].transpose(1, 2, 0))
    caption0 = grid[h:tile_h, 0:tile_w]
    caption1 = grid[h:tile_h, tile_w + gap : 2 * tile_w + gap]
    assert (caption0.max(axis=2) > 150).sum() > 20  # light text on the dark background
    assert (caption1.max(axis=2) > 150).sum() == 0
    # A longer caption wraps onto more lines and makes the tiles taller.
    taller = render_image_grid(images, [" ".join(["long_tag_name"] * 12)] + captions[1:], min_tile_width=64)
    assert taller.shape[0] > grid.shape[0]


def test_render_image_grid_shrinks_large_images() -> None:
    """Images above max_image_side are scaled down with their aspect kept."""
    images = np.full((2, 3, 100, 50), 200, dtype=np.uint8)
    grid = render_image_grid(images, ["a", "b"], max_image_side=40, min_tile_width=10, columns=2)
    # Two 20-px-wide tiles (50 * 40/100) side by side with a 2-px gap.
    assert grid.shape[1] == 2 * 20 + 2
    np.testing.assert_array_equal(grid[:40, :20], 200)
    assert (grid[40:, :20].max(axis=2) > 150).any()  # caption text below the shrunk image


@pytest.mark.parametrize(
    "images,captions,needle",
    [
        (np.zeros((2, 3, 4, 4), dtype=np.float32), ["a", "b"], "uint8"),
        (np.zeros((2, 4, 4), dtype=np.uint8), ["a", "b"], "shape"),
        (np.zeros((2, 3, 4, 4), dtype=np.uint8), ["a"], "captions"),
    ],
)
def test_render_image_grid_rejects_bad_input(images: np.ndarray, captions: list[str], needle: str) -> None:
    """Wrong dtype, shape or caption count are ValueErrors."""
    with pytest.raises(ValueError, match=needle):
        render_image_grid(images, captions)


# ------------------------------------------------------------------------------------------
# ThreadSafeMetricsTracker
# ------------------------------------------------------------------------------------------


def test_tracker_means_counts_last_and_reset() -> None:
    """update() weights by n, increment() sums, snapshot(reset=True) empties."""
    tr = ThreadSafeMetricsTracker()
    tr.update("ckpt_s", 2.0)
    tr.update("ckpt_s", 4.0, n=3)  # mean of 3 observations
    tr.increment("bad_images")
    tr.increment("bad_images", 4)
    snap = tr.snapshot()
    assert snap["ckpt_s"] == pytest.approx((2.0 + 4.0 * 3) / 4)
    assert snap["ckpt_s/count"] == 4
    assert snap["ckpt_s/last"] == 4.0
    assert snap["bad_images"] == 5
    assert tr.snapshot(reset=True) == snap
    assert tr.snapshot() == {}
    tr.update("x", torch.tensor(3.0))
    tr.reset()
    assert tr.snapshot() == {}


def test_tracker_rejects_bad_values() -> None:
    """Non-numbers, bad n and a name used both ways are ValueErrors."""
    tr = ThreadSafeMetricsTracker()
    with pytest.raises(ValueError, match="'a'"):
        tr.update("a", "fast")
    with pytest.raises(ValueError, match="0"):
        tr.update("a", 1.0, n=0)
    tr.update("a", 1.0)
    with pytest.raises(ValueError, match="already"):
        tr.increment("a")


def test_tracker_under_many_threads() -> None:
    """Concurrent writers lose no update; concurrent snapshots see consistent mean/count pairs."""
    tr = ThreadSafeMetricsTracker()
    threads_n, per_thread = 8, 3000
    start = threading.Barrier(threads_n + 1)
    inconsistent: list[dict] = []

    def writer(k: int) -> None:
        """Write per_thread values and counter increments."""
        start.wait()
        for _ in range(per_thread):
            tr.update("v", float(k), n=1)
            tr.increment("c", 2)

    def reader() -> None:
        """Take snapshots while writers run; every mean must lie in the range of written values."""
        start.wait()
        for _ in range(300):
            s = tr.snapshot()
            if s and not (0.0 <= s["v"] <= threads_n - 1):
                inconsistent.append(s)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads_n)]
    workers.append(threading.Thread(target=reader))
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    snap = tr.snapshot()
    assert snap["v/count"] == threads_n * per_thread
    assert snap["v"] == pytest.approx(sum(range(threads_n)) / threads_n)
    assert snap["c"] == 2 * threads_n * per_thread
    assert inconsistent == []


# ------------------------------------------------------------------------------------------
# TrainingMonitor: files
# ------------------------------------------------------------------------------------------


def test_event_files_hold_every_category(tmp_path: Path) -> None:
    """train/perf/val/system scalars, PR curve, example grid and hparams read back from the event files."""
    run = tmp_path / "run"
    pos, neg = np.array([0, 1, 3, 6.0]), np.array([6, 2, 1, 1.0])
    images = torch.randint(0, 256, (4, 3, 16, 24), dtype=torch.uint8)
    captions = ["true: a b\npred: a (0.9)"] * 4
    with make_monitor(run, total_steps=5, system_stats_interval_s=30.0) as mon:
        for step in range(1, 6):
            mon.log_train(
                step,
                1,
                {"loss": 10.0 / step, "loss/tags": 8.0 / step, "grad_norm": 0.5 * step},
                images_per_s=100.0 + step,
                data_wait_share=0.01 * step,
                lr=1e-4 * step,
            )
        mon.log_validation(
            5,
            {
                "mAP": 0.42,
                "f1_micro": 0.5,
                "f1_macro": 0.25,
                "per_tag_ap": [0.1, 0.2],
                "by_category": {"general": {"f1": 0.3}},
                "confusion": [[1, 2], [3, 4]],
            },
        )
        mon.log_pr_curve(5, "smile", pos, neg)
        mon.log_image_grid(5, images, captions)
        mon.log_hparams({"model": {"preset": "tiny", "dim": 64}, "lr": 1e-3, "data_root": None}, {"mAP": 0.42})
    acc = load_events(run)
    tags = acc.Tags()
    assert scalar_series(acc, "train/loss") == [(s, pytest.approx(10.0 / s)) for s in range(1, 6)]
    assert scalar_series(acc, "train/loss/tags")[-1] == (5, pytest.approx(1.6))
    assert scalar_series(acc, "train/grad_norm")[2] == (3, pytest.approx(1.5))
    assert scalar_series(acc, "train/lr")[1] == (2, pytest.approx(2e-4))
    assert scalar_series(acc, "perf/images_per_s")[0] == (1, pytest.approx(101.0))
    assert scalar_series(acc, "perf/data_wait_share")[4] == (5, pytest.approx(0.05))
    assert scalar_series(acc, "val/mAP") == [(5, pytest.approx(0.42))]
    assert scalar_series(acc, "val/by_category/general/f1") == [(5, pytest.approx(0.3))]
    assert not any("per_tag_ap" in t or "confusion" in t for t in tags["scalars"])
    for name in ("cpu_percent", "ram_percent", "process_rss_gb", "disk_free_gb"):
        assert f"system/{name}" in tags["scalars"], name
    assert acc.Scalars("system/process_rss_gb")[0].value > 0

    assert "val/pr/smile" in tags["tensors"]
    assert acc.SummaryMetadata("val/pr/smile").plugin_data.plugin_name == "pr_curves"
    from tensorboard.util import tensor_util

    stored = tensor_util.make_ndarray(acc.Tensors("val/pr/smile")[0].tensor_proto)  # (6, B+1)
    ref = pr_curve_from_histograms(pos, neg)
    for row, key in enumerate(("tp", "fp", "tn", "fn", "precision", "recall")):
        np.testing.assert_allclose(stored[row], ref[key], rtol=1e-6)

    assert tags["images"] == ["val/examples"]
    img = acc.Images("val/examples")[0]
    grid = render_image_grid(images, captions)
    assert (img.step, img.height, img.width) == (5, grid.shape[0], grid.shape[1])

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["model.preset"].string_value == "tiny"
    assert hp["model.dim"].number_value == 64
    assert hp["lr"].number_value == pytest.approx(1e-3)
    assert hp["data_root"].string_value == "None"
    assert scalar_series(acc, "hparams/mAP") == [(5, pytest.approx(0.42))]


def test_metrics_jsonl_contents_and_flush_per_line(tmp_path: Path) -> None:
    """Each call is one JSON line, readable before close; NaN becomes null; events carry their fields."""
    run, stream = tmp_path / "run", io.StringIO()
    mon = make_monitor(run, total_steps=10, stream=stream)
    path = run / "metrics.jsonl"
    before = time.time()
    mon.log_train(3, 1, {"loss": 2.5, "loss/rating": float("nan")}, images_per_s=50.0, data_wait_share=0.2, lr=1e-3)
    recs = read_jsonl(path)  # not closed yet: must already be on disk
    assert len(recs) == 1
    r = recs[0]
    assert r["type"] == "train" and r["step"] == 3 and r["epoch"] == 1
    assert r["loss"] == 2.5 and r["loss/rating"] is None
    assert r["lr"] == 1e-3 and r["images_per_s"] == 50.0 and r["data_wait_share"] == 0.2
    assert before - 1 <= r["time"] <= time.time() + 1
    mon.log_validation(4, {"mAP": 0.3, "f1_micro": 0.4, "names": ["a"]})
    mon.log_event(4, "checkpoint_saved", path=Path("ckpt") / "step_4", seconds=1.25)
    mon.close()
    recs = read_jsonl(path)
    assert [x["type"] for x in recs] == ["train", "val", "event"]
    assert recs[1] == {"type": "val", "step": 4, "time": recs[1]["time"], "mAP": 0.3, "f1_micro": 0.4}
    assert recs[2]["kind"] == "checkpoint_saved" and recs[2]["seconds"] == 1.25
    assert recs[2]["path"] == str(Path("ckpt") / "step_4")
    assert "[checkpoint_saved] step 4" in stream.getvalue()


def test_event_with_a_sentence_prints_it_once(tmp_path: Path) -> None:
    """log_event(say=...) prints the sentence instead of the key=value line, once; the record keeps the fields."""
    stream = io.StringIO()
    mon = TrainingMonitor(tmp_path, total_steps=10, stream=stream, tensorboard=False, system_stats_interval_s=0)
    mon.log_event(0, "micro_batches", batch_size=8, micro_batch=8, say="micro-batches: batches of 8 in one pass")
    mon.close()
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "micro" in line] == ["micro-batches: batches of 8 in one pass"]
    rec = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["type"] == "event"]
    assert rec[0]["kind"] == "micro_batches" and rec[0]["batch_size"] == 8 and "say" not in rec[0]


def test_system_thread_writes_records_and_stops_on_close(tmp_path: Path) -> None:
    """The sampler writes system records at the current step and is joined by close()."""
    run = tmp_path / "run"
    mon = make_monitor(run, system_stats_interval_s=0.05)
    mon.log_train(7, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(r["type"] == "system" and r["step"] == 7 for r in read_jsonl(run / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.05)
    assert mon._system is not None
    thread = mon._system.thread
    assert thread.daemon and thread.is_alive()
    mon.close()
    assert not thread.is_alive()
    system = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "system"]
    assert sum(r["step"] == 7 for r in system) >= 2
    for key in ("cpu_percent", "ram_percent", "ram_used_gb", "process_rss_gb", "workers_rss_gb", "disk_free_gb"):
        assert key in system[-1], key
    assert 0 < system[-1]["process_rss_gb"] < 1024
    count = len(system)
    time.sleep(0.2)
    assert len([r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "system"]) == count
    assert mon.error_counts == {}


def test_resume_truncates_jsonl_and_tensorboard(tmp_path: Path) -> None:
    """A run resumed at step 6 reads as one run: later records of the first run are gone everywhere."""
    run = tmp_path / "run"
    with make_monitor(run, total_steps=10) as mon:
        for step in range(1, 11):
            mon.log_train(step, 1, {"loss": float(step)}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        mon.log_validation(5, {"mAP": 0.1})
        mon.log_validation(10, {"mAP": 0.2})
        mon.log_event(10, "checkpoint_saved", path="x")
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 11, "lo')  # a line cut by a kill

    stream = io.StringIO()
    with make_monitor(run, total_steps=10, resume_step=6, stream=stream) as mon:
        assert (mon.resume_removed_lines, mon.resume_malformed_lines) == (6, 1)
        for step in range(7, 10):
            mon.log_train(step, 2, {"loss": 100.0 + step}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    recs = read_jsonl(run / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]
    assert train == [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 10)]
    assert [(r["step"], r["mAP"]) for r in recs if r["type"] == "val"] == [(5, 0.1)]
    trunc = [r for r in recs if r.get("kind") == "metrics_truncated"]
    assert len(trunc) == 1 and trunc[0]["removed_lines"] == 6 and trunc[0]["malformed_lines"] == 1
    assert not (run / "metrics.jsonl.tmp").exists()
    acc = load_events(run)
    assert scalar_series(acc, "train/loss") == [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 10)]
    assert scalar_series(acc, "val/mAP") == [(5, pytest.approx(0.1))]


def test_truncate_metrics_jsonl_missing_file_and_keeps_stepless_lines(tmp_path: Path) -> None:
    """A missing file stays missing; records without an int step are kept."""
    path = tmp_path / "metrics.jsonl"
    assert truncate_metrics_jsonl(path, 3) == (0, 0)
    assert not path.exists()
    path.write_text('{"type": "event", "kind": "x"}\n{"step": 2}\n{"step": 4}\n[1]\n\n', encoding="utf-8")
    assert truncate_metrics_jsonl(path, 3) == (1, 1)
    assert read_jsonl(path) == [{"type": "event", "kind": "x"}, {"step": 2}]


def test_disabled_monitor_writes_nothing(tmp_path: Path) -> None:
    """A disabled (non-rank-0) monitor creates no folder, no thread and prints nothing."""
    run = tmp_path / "run"
    stream = io.StringIO()
    with TrainingMonitor(run, enabled=False, total_steps=10, stream=stream, resume_step=3, system_stats_interval_s=0.01) as mon:
        mon.log_train(1, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        mon.log_validation(1, {"mAP": 0.5})
        mon.log_pr_curve(1, "a", [1, 2], [2, 1])
        mon.log_image_grid(1, np.zeros((1, 3, 4, 4), dtype=np.uint8), ["x"])
        mon.log_hparams({"a": 1}, {"mAP": 0.5})
        mon.log_event(1, "resumed")
        mon.log_scalars(1, {"a": 1.0}, prefix="io")
        mon.flush()
        assert mon._system is None
    assert not run.exists()
    assert stream.getvalue() == ""


def test_close_is_idempotent_and_later_calls_are_ignored(tmp_path: Path) -> None:
    """close() twice is fine; logging after close writes nothing."""
    run = tmp_path / "run"
    mon = make_monitor(run)
    mon.log_event(1, "start")
    mon.close()
    mon.close()
    mon.log_event(2, "late")
    mon.log_train(2, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    assert [r["kind"] for r in read_jsonl(run / "metrics.jsonl")] == ["start"]


def test_log_scalars_for_tracker_snapshots(tmp_path: Path) -> None:
    """A tracker snapshot logs under its prefix in both TensorBoard and metrics.jsonl."""
    run = tmp_path / "run"
    tr = ThreadSafeMetricsTracker()
    tr.update("write_s", 0.5)
    tr.update("write_s", 1.5)
    with make_monitor(run) as mon:
        mon.log_scalars(9, tr.snapshot(reset=True), prefix="checkpoint")
    assert scalar_series(load_events(run), "checkpoint/write_s") == [(9, pytest.approx(1.0))]
    rec = read_jsonl(run / "metrics.jsonl")[0]
    assert rec["checkpoint/write_s/count"] == 2.0 and rec["step"] == 9


def test_log_train_rejects_non_numeric_values(tmp_path: Path) -> None:
    """A non-number among the values names itself in a ValueError."""
    with make_monitor(tmp_path / "run") as mon:
        with pytest.raises(ValueError, match="'loss'"):
            mon.log_train(1, 1, {"loss": "high"}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)


def test_constructor_validates_arguments(tmp_path: Path) -> None:
    """Negative total_steps or resume_step are ValueErrors naming the value."""
    with pytest.raises(ValueError, match="-1"):
        TrainingMonitor(tmp_path, total_steps=-1)
    with pytest.raises(ValueError, match="-2"):
        TrainingMonitor(tmp_path, total_steps=3, resume_step=-2)


# ------------------------------------------------------------------------------------------
# Console
# ------------------------------------------------------------------------------------------


def test_console_line_format_and_eta(tmp_path: Path) -> None:
    """The progress line has the documented shape; the ETA comes from the measured step rate."""
    clock, stream = FakeClock(), io.StringIO()
    with make_monitor(tmp_path / "run", total_steps=2000, console_interval_s=0.0, clock=clock, stream=stream) as mon:
        mon.log_train(100, 1, {"loss": 13.0}, images_per_s=400.0, data_wait_share=0.05, lr=3e-4)
        clock.t += 20 * 0.134  # 20 steps at 0.134 s/step -> 1880 steps left = 251.92 s
        mon.log_train(120, 1, {"loss": 12.345}, images_per_s=412.4, data_wait_share=0.031, lr=3.0e-4)
        assert mon.eta_seconds() == pytest.approx(1880 * 0.134)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ep 1 step 100/2000 loss 13 lr 3.0e-04 400 img/s wait 5% ETA --"
    assert lines[1] == "ep 1 step 120/2000 loss 12.345 lr 3.0e-04 412 img/s wait 3% ETA 4m12s"


def test_a_new_total_after_a_schedule_change_is_counted_to(tmp_path: Path) -> None:
    clock, stream = FakeClock(), io.StringIO()
    with make_monitor(tmp_path / "run", total_steps=2000, console_interval_s=0.0, clock=clock, stream=stream) as mon:
        mon.log_train(100, 1, {"loss": 13.0}, images_per_s=400.0, data_wait_share=0.05, lr=3e-4)
        mon.set_total_steps(1100)
        clock.t += 20 * 0.134
        mon.log_train(120, 1, {"loss": 12.0}, images_per_s=400.0, data_wait_share=0.05, lr=3e-4)
        assert mon.eta_seconds() == pytest.approx(980 * 0.134)
        with pytest.raises(ValueError, match="total_steps"):
            mon.set_total_steps(-1)
    assert stream.getvalue().splitlines()[1].startswith("ep 1 step 120/1100 ")


def test_eta_smooths_a_changing_rate(tmp_path: Path) -> None:
    """After a slowdown the ETA moves toward the new rate, not jumping and not ignoring it."""
    clock = FakeClock()
    with make_monitor(tmp_path / "run", total_steps=100_000, clock=clock) as mon:
        step = 0
        for _ in range(200):  # 1 s per step for long enough that the estimate settles
            step += 1
            clock.t += 1.0
            mon.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        assert mon.eta_seconds() == pytest.approx((100_000 - step) * 1.0)
        step += 1
        clock.t += 2.0  # one slow step: 2 s
        mon.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        alpha = 1 - math.exp(-2.0 / 30.0)
        assert mon.eta_seconds() == pytest.approx((100_000 - step) * (1.0 + alpha * 1.0))


def test_console_rate_limited_but_first_and_last_always_printed(tmp_path: Path) -> None:
    """Lines appear at most every console_interval_s, plus the first and the last step."""
    clock, stream = FakeClock(), io.StringIO()
    with make_monitor(tmp_path / "run", total_steps=30, console_interval_s=10.0, clock=clock, stream=stream) as mon:
        printed_at = []
        for step in range(1, 31):
            before = len(stream.getvalue().splitlines())
            mon.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
            if len(stream.getvalue().splitlines()) > before:
                printed_at.append(step)
            clock.t += 0.75 if step < 25 else 0.01
    # t(step) = 0.75 * (step - 1) for step <= 25: prints at t = 0 (first), 10.5 (step 15), then the last.
    assert printed_at == [1, 15, 30]
    # Every train record still reaches metrics.jsonl: only the console is rate-limited.
    assert len([r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]) == 30


def test_validation_line_shows_the_best_the_caller_reports(tmp_path: Path) -> None:
    """One line per validation with mAP and F1; the best shown is the caller's, under its readable name."""
    run, stream = tmp_path / "run", io.StringIO()
    with make_monitor(run, stream=stream) as mon:
        mon.log_validation(
            100, {"mAP": 0.3, "f1_micro": 0.41, "f1_macro": 0.2, "rating_accuracy": 0.9}, best_name="mAP", best_value=0.3, best_step=100
        )
        # A resumed run's best comes from its checkpoint, not from what this monitor has seen.
        mon.log_validation(200, {"mAP": 0.25, "f1_micro": 0.4, "f1_macro": 0.19}, best_name="mAP", best_value=0.8705, best_step=60)
        mon.log_validation(300, {"mAP": 0.5, "f1_macro": 0.25}, best_name="f1_macro", best_value=0.25, best_step=300)
        mon.log_validation(400, {"mAP": 0.5, "f1_micro": 0.6}, best_name="f1_micro", best_value=np.float32(0.5), best_step=400)
        mon.log_validation(500, {"mAP": 0.1})  # no best given: none shown
    assert stream.getvalue().splitlines() == [
        "val step 100 mAP 0.3000 F1 micro 0.4100 macro 0.2000 rating acc 0.9000 best mAP 0.3000 @ 100",
        "val step 200 mAP 0.2500 F1 micro 0.4000 macro 0.1900 best mAP 0.8705 @ 60",
        "val step 300 mAP 0.5000 F1 macro 0.2500 best F1 macro 0.2500 @ 300",
        "val step 400 mAP 0.5000 F1 micro 0.6000 best F1 micro 0.5000 @ 400",
        "val step 500 mAP 0.1000",
    ]
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "val"]
    assert (val[1]["best/mAP"], val[1]["best/step"]) == (0.8705, 60)
    assert (val[2]["best/f1_macro"], val[2]["best/step"]) == (0.25, 300)
    assert not any(k.startswith("best/") for k in val[4])
    acc = load_events(run)
    assert scalar_series(acc, "val/best/mAP") == [(100, pytest.approx(0.3)), (200, pytest.approx(0.8705))]
    assert scalar_series(acc, "val/best/step") == [(100, 100.0), (200, 60.0), (300, 300.0), (400, 400.0)]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"best_value": 0.5, "best_step": 3}, "need best_name"),
        ({"best_name": "mAP", "best_step": 3}, "best_value"),
        ({"best_name": "mAP", "best_value": "high", "best_step": 3}, "best_value"),
        ({"best_name": "mAP", "best_value": 0.5}, "best_step"),
        ({"best_name": "mAP", "best_value": 0.5, "best_step": -1}, "best_step"),
        ({"best_name": "", "best_value": 0.5, "best_step": 1}, "best_name"),
    ],
)
def test_log_validation_rejects_a_partial_best(tmp_path: Path, kwargs: dict, needle: str) -> None:
    """The best is all three of name, value and step, or nothing; a bad one is a ValueError naming it."""
    with make_monitor(tmp_path / "run") as mon:
        with pytest.raises(ValueError, match=needle):
            mon.log_validation(1, {"mAP": 0.5}, **kwargs)


def test_state_dict_round_trip_continues_eta_errors_and_starvation(tmp_path: Path) -> None:
    """A monitor loaded from another's state_dict has its error counts, ETA rate and starvation state."""
    clock = FakeClock()
    first = make_monitor(tmp_path / "a", total_steps=1000, clock=clock, console_interval_s=1e9)
    for step in range(1, 31):
        clock.t += 0.5
        first.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.9, lr=1.0)
    first._count_error("console")
    state = first.state_dict()
    first.close()
    assert state["error_counts"] == {"console": 1}
    assert state["step_rate"]["sec_per_step"] == pytest.approx(0.5)
    assert state["starvation"]["reported"] is True and state["starvation"]["calls"] == 30
    # Plain types only: the checkpoint stores it with torch.save and reads it back with weights_only=True.
    path = tmp_path / "state.pt"
    torch.save({"monitor": state}, path)
    loaded = torch.load(path, weights_only=True)["monitor"]
    assert json.loads(json.dumps(loaded)) == state

    run = tmp_path / "b"
    second = make_monitor(run, total_steps=1000, clock=clock, console_interval_s=1e9, resume_step=30)
    second.load_state_dict(loaded)
    assert second.state_dict() == state
    clock.t += 100.0  # the restart: not a step interval, so it must not enter the rate
    second.log_train(31, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.9, lr=1.0)
    assert second.eta_seconds() == pytest.approx((1000 - 31) * 0.5)
    for step in range(32, 60):
        clock.t += 0.5
        second.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.9, lr=1.0)
    second.close()
    assert not any(r.get("kind") == "data_starved" for r in read_jsonl(run / "metrics.jsonl"))  # said once per run
    fresh = make_monitor(tmp_path / "c", total_steps=1000)
    assert fresh.state_dict() == {
        "error_counts": {},
        "step_rate": {"sec_per_step": None},
        "starvation": {"wait_ema": None, "calls": 0, "reported": False},
    }
    fresh.close()


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.pop("starvation"), "mappings under"),
        (lambda s: s.update(error_counts={"console": -1}), "error_counts"),
        (lambda s: s.update(step_rate={"sec_per_step": "fast"}), "sec_per_step"),
        (lambda s: s.update(step_rate={}), "sec_per_step"),
        (lambda s: s["starvation"].update(calls=1.5), "calls"),
        (lambda s: s["starvation"].update(reported="yes"), "reported"),
        (lambda s: s["starvation"].update(wait_ema=float("nan")), "wait_ema"),
    ],
)
def test_load_state_dict_rejects_malformed_state(tmp_path: Path, change: Callable[[dict], object], needle: str) -> None:
    """A checkpoint's monitor state is untrusted: a wrong entry is a ValueError naming it."""
    with make_monitor(tmp_path / "run") as mon:
        state = mon.state_dict()
        change(state)
        with pytest.raises(ValueError, match=needle):
            mon.load_state_dict(state)


class _AsciiStream(io.StringIO):
    """A console that cannot encode non-ASCII text, like a legacy Windows code page."""

    def write(self, text: str) -> int:
        """Refuse non-ASCII characters."""
        text.encode("ascii")
        return super().write(text)


class _BrokenStream(io.StringIO):
    """A console whose writes fail, like a closed pipe."""

    def write(self, text: str) -> int:
        """Always fail."""
        raise OSError("broken pipe")


def test_console_failures_never_stop_training(tmp_path: Path) -> None:
    """Text the console cannot encode is escaped; a failing console is counted and the files still get everything."""
    ascii_stream = _AsciiStream()
    with make_monitor(tmp_path / "a", stream=ascii_stream) as mon:
        mon.log_event(1, "note", text="caf\u00e9 \u2713")
    assert ascii_stream.getvalue() == "[note] step 1 text=caf\\xe9 \\u2713\n"
    with make_monitor(tmp_path / "b", stream=_BrokenStream(), console_interval_s=0.0) as mon:
        mon.log_train(1, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        mon.log_event(1, "note")
        assert mon.error_counts == {"console": 2}
    assert [r["type"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == ["train", "event"]


def test_data_starvation_reported_once(tmp_path: Path) -> None:
    """A persistently high data-wait share produces exactly one data_starved event."""
    stream = io.StringIO()
    with make_monitor(tmp_path / "run", stream=stream, console_interval_s=1e9) as mon:
        for step in range(1, 60):
            mon.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.6, lr=1.0)
    events = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "data_starved"]
    assert len(events) == 1 and events[0]["wait_share"] > 0.3
    assert stream.getvalue().count("[data_starved]") == 1


def test_no_starvation_report_when_data_keeps_up(tmp_path: Path) -> None:
    """A low wait share never triggers the hint."""
    with make_monitor(tmp_path / "run") as mon:
        for step in range(1, 60):
            mon.log_train(step, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.02, lr=1.0)
    assert not any(r.get("kind") == "data_starved" for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------
# Weights & Biases (optional writer)
# ------------------------------------------------------------------------------------------


class _FakeWandbRun:
    """Records what the monitor sends to a W&B run."""

    def __init__(self) -> None:
        """Empty logs."""
        self.logged: list[tuple[dict, int]] = []
        self.finished = False
        self.config = types.SimpleNamespace(update=self._update)
        self.config_updates: list[dict] = []

    def _update(self, values: dict, allow_val_change: bool = False) -> None:
        """Record a config update."""
        self.config_updates.append(values)

    def log(self, values: dict, step: int) -> None:
        """Record a log call."""
        self.logged.append((values, step))

    def finish(self) -> None:
        """Record the finish call."""
        self.finished = True


def _fake_wandb_module() -> types.ModuleType:
    """A stand-in `wandb` module recording init calls."""
    mod = types.ModuleType("wandb")
    mod.init_calls = []  # type: ignore[attr-defined]
    mod.run = _FakeWandbRun()  # type: ignore[attr-defined]

    def init(**kwargs: object) -> _FakeWandbRun:
        """Record kwargs and hand back the fake run."""
        mod.init_calls.append(kwargs)  # type: ignore[attr-defined]
        return mod.run  # type: ignore[attr-defined]

    mod.init = init  # type: ignore[attr-defined]
    return mod


def test_wandb_used_only_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With wandb importable, it is started only when the dict enables it, and gets the same scalars."""
    fake = _fake_wandb_module()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with make_monitor(tmp_path / "a") as mon:
        mon.log_train(1, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    with make_monitor(tmp_path / "b", wandb={"enabled": False, "project": "p"}):
        pass
    assert fake.init_calls == []

    with make_monitor(tmp_path / "c", wandb={"project": "p", "mode": "offline"}, resume_step=0) as mon:
        mon.log_train(1, 1, {"loss": 2.0}, images_per_s=5.0, data_wait_share=0.0, lr=0.1)
        mon.log_hparams({"lr": 0.1}, {"mAP": 0.0})
    assert fake.init_calls == [{"project": "p", "mode": "offline", "dir": str(tmp_path / "c"), "resume": "allow"}]
    values, step = fake.run.logged[0]
    assert step == 1 and values["train/loss"] == 2.0 and values["perf/images_per_s"] == 5.0
    assert fake.run.config_updates == [{"lr": 0.1}]
    assert fake.run.finished


def test_wandb_missing_is_reported_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If wandb is asked for but cannot be imported, the run continues and says so once."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    stream = io.StringIO()
    with make_monitor(tmp_path / "run", wandb={"project": "p"}, stream=stream) as mon:
        mon.log_train(1, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    assert "wandb requested but not installed" in stream.getvalue()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 1.0


# ------------------------------------------------------------------------------------------
# A real TensorBoard server
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port free at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> object:
    """GET a URL and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode("utf-8"))


@pytest.mark.e2e
def test_tensorboard_server_serves_the_run(tmp_path: Path) -> None:
    """`tensorboard --logdir` started on the run folder serves train/loss and val/mAP over HTTP."""
    run = tmp_path / "run"
    with make_monitor(run, total_steps=4, system_stats_interval_s=30.0) as mon:
        for step in range(1, 5):
            mon.log_train(step, 1, {"loss": 5.0 - step}, images_per_s=10.0, data_wait_share=0.1, lr=1e-3)
        mon.log_validation(4, {"mAP": 0.375})

    exe = Path(sys.executable).with_name("tensorboard.exe" if sys.platform == "win32" else "tensorboard")
    if not exe.exists():
        pytest.skip(f"tensorboard executable not found next to {sys.executable}")
    port = _free_port()
    log = (tmp_path / "tb.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [str(exe), "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        tags: object = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.flush()
                pytest.skip(f"tensorboard exited with {proc.returncode}: {(tmp_path / 'tb.log').read_text(encoding='utf-8')[-500:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                tags = None
            if isinstance(tags, dict) and "train/loss" in tags.get("tensorboard", {}) and "val/mAP" in tags.get("tensorboard", {}):
                break
            time.sleep(0.3)
        assert isinstance(tags, dict), "tensorboard did not answer within 45 s"
        assert "train/loss" in tags["tensorboard"], tags
        assert any(t.startswith("system/") for t in tags["tensorboard"]), tags

        def series(tag: str) -> list[tuple[int, float]]:
            """(step, value) pairs served for one tag of the 'tensorboard' run."""
            q = urllib.parse.urlencode({"run": "tensorboard", "tag": tag})
            return [(int(s), float(v)) for _, s, v in _get_json(f"{base}/data/plugin/scalars/scalars?{q}")]

        assert series("train/loss") == [(s, 5.0 - s) for s in range(1, 5)]
        assert series("val/mAP") == [(4, 0.375)]
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


# ------------------------------------------------------------------------------------------
# GPU paths, with stand-ins (the real ones are exercised on a GPU machine)
# ------------------------------------------------------------------------------------------


def _fake_pynvml() -> types.ModuleType:
    """A stand-in `pynvml` module: one GPU at 87% utilisation whose power reading is unsupported."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        """Stand-in for pynvml.NVMLError."""

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    mod.calls = []  # type: ignore[attr-defined]
    mod.nvmlInit = lambda: mod.calls.append("init")  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: mod.calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)  # type: ignore[attr-defined]
    memory = types.SimpleNamespace(used=3 << 30, total=16 << 30)
    mod.nvmlDeviceGetMemoryInfo = lambda h: memory  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTemperature = lambda h, kind: 61  # type: ignore[attr-defined]

    def power(h: object) -> int:
        """Power reading unsupported on this board."""
        raise NVMLError("not supported")

    mod.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    return mod


def test_nvml_values_reach_system_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pynvml importable, GPU utilisation/memory/temperature are logged; failed reads are counted."""
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = tmp_path / "run"
    with make_monitor(run, system_stats_interval_s=30.0) as mon:
        pass
    assert fake.calls == ["init", "shutdown"]
    rec = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "system"][0]
    assert rec["gpu_util_percent"] == 87.0 and rec["gpu_mem_util_percent"] == 40.0
    assert rec["gpu_mem_used_gb"] == 3.0 and rec["gpu_mem_total_gb"] == 16.0
    assert rec["gpu_temperature_c"] == 61.0 and "gpu_power_w" not in rec
    assert mon.error_counts == {"nvml": 1}
    assert scalar_series(load_events(run), "system/gpu_util_percent") == [(0, 87.0)]


def test_cuda_memory_logged_only_when_cuda_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """perf/gpu_mem_* and the console 'mem' field appear only once CUDA is initialised."""
    run, stream = tmp_path / "run", io.StringIO()
    with make_monitor(run, stream=stream, console_interval_s=0.0) as mon:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        mon.log_train(1, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 5 << 29)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 3 << 30)
        mon.log_train(2, 1, {"loss": 1.0}, images_per_s=1.0, data_wait_share=0.0, lr=1.0)
    recs = read_jsonl(run / "metrics.jsonl")
    assert "gpu_mem_max_allocated_gb" not in recs[0]
    assert recs[1]["gpu_mem_max_allocated_gb"] == 2.5 and recs[1]["gpu_mem_reserved_gb"] == 3.0
    assert scalar_series(load_events(run), "perf/gpu_mem_reserved_gb") == [(2, 3.0)]
    lines = stream.getvalue().splitlines()
    assert "mem" not in lines[0] and lines[1].endswith(" mem 2.5/3.0GB")
