"""Tests for eval_reports' predictions file: a round trip, damaged files refused by name, and the metric state rebuilt
from it equal to one fed the same outputs batch by batch (as evaluate feeds it)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_reports import Predictions, load_predictions, per_tag_rows, result_from_predictions, save_predictions
from evaluation_metrics import MetricComputer


def _predictions(n: int = 37, t: int = 11, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    targets = rng.random((n, t)) < 0.3
    probs = np.clip(targets * 0.4 + rng.random((n, t)) * 0.6, 0, 1).astype(np.float32)
    tags = [f"tag_{i}" for i in range(t)]
    return Predictions(
        tags=tags,
        categories=["character" if i % 4 == 0 else "general" for i in range(t)],
        frequencies=[int(v) for v in rng.integers(1, 100, t)],
        paths=[f"/data/img_{i}.png" for i in range(n)],
        probs=probs,
        targets=targets,
        rating_logits=rng.normal(size=(n, 4)).astype(np.float32),
        ratings=rng.integers(-1, 4, n),
        threshold=0.45,
        checkpoint="/runs/x/checkpoints/step_3",
        step=3,
        data="/elsewhere",
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    original = _predictions()
    save_predictions(tmp_path / "p.npz", original)
    back = load_predictions(tmp_path / "p.npz")
    for name in ("tags", "categories", "frequencies", "paths", "threshold", "checkpoint", "step", "ema", "data"):
        assert getattr(back, name) == getattr(original, name), name
    for name in ("probs", "targets", "rating_logits", "ratings"):
        assert np.array_equal(getattr(back, name), getattr(original, name)), name
    assert back.probs.dtype == np.float32 and back.targets.dtype == bool


def test_damaged_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_predictions(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip", encoding="utf-8")
    with pytest.raises(ValueError, match="text.npz"):
        load_predictions(tmp_path / "text.npz")
    save_predictions(tmp_path / "good.npz", _predictions())
    with np.load(tmp_path / "good.npz") as data:
        arrays = {k: data[k] for k in data.files}
    for change, message in ((lambda a: a.pop("probs"), "missing probs"), (lambda a: a.update(paths=a["paths"][:3]), "inconsistent shapes")):
        broken = dict(arrays)
        change(broken)
        buffer = io.BytesIO()
        np.savez(buffer, **broken)
        (tmp_path / "bad.npz").write_bytes(buffer.getvalue())
        with pytest.raises(ValueError, match=message):
            load_predictions(tmp_path / "bad.npz")


def test_rebuilt_metrics_equal_a_computer_fed_batch_by_batch() -> None:
    p = _predictions()
    fed = MetricComputer(
        len(p.tags), threshold=p.threshold, device=torch.device("cpu"), tag_names=p.tags, tag_categories=p.categories, tag_frequencies=p.frequencies
    )
    for i in range(0, len(p.paths), 8):  # evaluate's batches, not the rebuild's
        fed.update(torch.from_numpy(p.probs[i : i + 8]), torch.from_numpy(p.targets[i : i + 8]).float())
        fed.update_rating(torch.from_numpy(p.rating_logits[i : i + 8]), torch.from_numpy(p.ratings[i : i + 8]))
    rebuilt = result_from_predictions(p, batch_size=5)
    expected = fed.compute()
    assert json.dumps(rebuilt.metrics, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)
    rows = per_tag_rows(rebuilt, p.vocabulary())
    assert [r["tag"] for r in rows] == p.tags and [r["support"] for r in rows] == p.targets.sum(axis=0).tolist()
    assert [r["category"] for r in rows] == p.categories and [r["train_frequency"] for r in rows] == p.frequencies
    assert all(0 <= r["ap"] <= 1 for r in rows if not math.isnan(r["ap"]))
