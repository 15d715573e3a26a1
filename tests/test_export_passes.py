"""Tests for export_passes: the one backbone pass with its spill, the chunked exported metrics, the chunked onnxruntime check.

References: the unbounded computation the export did before (every image through the WDTagger
graph at once, ExportMetrics over all of it), the model's own forward, and onnxruntime on the
traced model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from checkpoint_eval import evaluate
from export_calibration import ExportMetrics, fit_calibration
from export_model import export_onnx
from export_passes import FeatureSpill, PooledTagger, exported_metrics, verify_onnx
from image_preprocess import PreprocessParams
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from vocabulary import TagVocabulary
from wd_model import WDTagger, fused_head, plan_outputs, resized_tagger

SIZE = 32
TAGS = ["hero", "sky", "tree", "brand", "villain", "mystery", "cloud", "rain", "sun"]  # 9 tags: targets are not a whole byte
CATEGORIES = {"hero": "character", "villain": "character", "brand": "copyright", "mystery": ""}


def _vocab() -> TagVocabulary:
    return TagVocabulary(TAGS, {t: 20 - i for i, t in enumerate(TAGS)}, {t: CATEGORIES.get(t, "general") for t in TAGS})


def _model(size: int = SIZE, pooling: str = "cls") -> SimplifiedTagger:
    torch.manual_seed(0)
    cfg = VisionTransformerConfig(image_size=size, patch_size=8, num_tags=len(TAGS), embed_dim=32, depth=2, num_heads=2, pooling=pooling)
    model = SimplifiedTagger(cfg).eval()
    with torch.no_grad():  # spread the scores so thresholds and ranks mean something
        model.tag_head.weight.mul_(40.0)
        model.tag_head.bias.normal_()
    return model


def _batches(n: int, batch: int, seed: int = 0, size: int = SIZE) -> list[dict[str, Any]]:
    """Collated validation batches (as batching.collate_samples makes them): uint8 images, padded tag indices, ratings."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        tags = torch.full((k, 4), -1, dtype=torch.long)
        for row in range(k):
            chosen = rng.choice(len(TAGS), size=int(rng.integers(0, 5)), replace=False)
            tags[row, : len(chosen)] = torch.from_numpy(chosen)
        out.append(
            {
                "images": torch.from_numpy(rng.integers(0, 256, (k, 3, size, size), dtype=np.uint8)),
                "tag_indices": tags,
                "ratings": torch.from_numpy(rng.integers(-1, 4, k)),
            }
        )
    return out


def test_pooled_tagger_outputs_are_the_models() -> None:
    model = _model()
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        ours, theirs = PooledTagger(model)(x), model(x)
    assert torch.equal(ours["tag_logits"], theirs["tag_logits"]) and torch.equal(ours["rating_logits"], theirs["rating_logits"])
    assert ours["pooled"].shape == (5, 32)


def test_spill_gives_back_what_was_appended_in_chunks_of_at_most_the_asked_size() -> None:
    rng = np.random.default_rng(1)
    pooled = torch.from_numpy(rng.normal(size=(23, 6)).astype(np.float32))
    targets = torch.from_numpy((rng.random((23, 9)) < 0.3).astype(np.float32))
    ratings = torch.from_numpy(rng.integers(-1, 4, 23))
    with FeatureSpill(6, 9) as spill:
        for start, stop in ((0, 5), (5, 6), (6, 23)):
            spill.append(pooled[start:stop], targets[start:stop], ratings[start:stop])
        assert spill.rows == 23
        for rows in (1, 4, 100):
            chunks = list(spill.chunks(rows))
            assert [len(c.ratings) for c in chunks] == [min(rows, 23 - s) for s in range(0, 23, rows)]
            assert torch.equal(torch.cat([c.pooled for c in chunks]), pooled)
            assert torch.equal(torch.cat([c.targets for c in chunks]), targets)
            assert torch.equal(torch.cat([c.ratings for c in chunks]), ratings)
        with pytest.raises(ValueError, match="spill expects"):
            spill.append(pooled[:2], targets[:2, :8], ratings[:2])
        folder = Path(spill._dir.name)
    assert not folder.exists()  # the context removes its files


def _export_pass(model: SimplifiedTagger, batches: list[dict[str, Any]], chunk: int) -> tuple[torch.Tensor, dict[str, Any], WDTagger]:
    """What export_model does: one evaluate pass with the spill, calibration, then the exported metrics from the spill."""
    vocab = _vocab()
    plan = plan_outputs(vocab)
    targets = {"general": 0.35, "character": 0.85}
    preprocess = PreprocessParams(image_size=SIZE)
    with FeatureSpill(32, len(vocab)) as spill:
        raw = evaluate(PooledTagger(model), batches, torch.device("cpu"), vocab, preprocess, threshold=0.5, observe=spill.observe)
        calibration = fit_calibration(raw.computer, plan, prior=2.0)
        wd = WDTagger(model, fused_head(model, plan, calibration.shifts), preprocess.mean, preprocess.std).eval()
        with torch.no_grad():
            probs = torch.cat([WDTagger.probabilities(wd.head(part.pooled)) for part in spill.chunks(chunk)])
        metrics = exported_metrics(spill, wd.head, plan, targets, chunk=chunk)
    return probs, metrics, wd


def test_chunked_exported_metrics_equal_the_unbounded_computation() -> None:
    model = _model()
    batches = _batches(90, 16)
    probs, metrics, wd = _export_pass(model, batches, chunk=7)
    # The unbounded reference: every image through the exported graph at once, as the old second pass did.
    images = torch.cat([b["images"] for b in batches])  # (N, 3, S, S) uint8
    vocab_targets = torch.zeros(len(images), len(TAGS))
    rows = torch.cat([b["tag_indices"] for b in batches])
    for row, tags in enumerate(rows.tolist()):
        vocab_targets[row, [t for t in tags if t >= 0]] = 1.0
    with torch.no_grad():
        reference = WDTagger.probabilities(wd.logits_from_rgb(images))  # (N, 4 + T)
    np.testing.assert_allclose(probs.numpy(), reference.numpy(), rtol=0, atol=1e-5)
    whole = ExportMetrics(plan_outputs(_vocab()), {"general": 0.35, "character": 0.85})
    whole.update(reference, vocab_targets, torch.cat([b["ratings"] for b in batches]))
    expected = whole.compute()
    assert metrics["num_samples"] == expected["num_samples"] == 90
    assert metrics["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert metrics["at_consumer_thresholds"] == expected["at_consumer_thresholds"]
    assert metrics["rating_accuracy"] == pytest.approx(expected["rating_accuracy"], abs=1e-12)


def test_chunk_size_changes_nothing_and_the_largest_chunk_does_not_grow_with_the_images() -> None:
    model = _model()
    seen: list[int] = []

    class CountingHead(torch.nn.Module):
        """The fused head, recording how many embeddings each call gets."""

        def __init__(self, head: torch.nn.Linear) -> None:
            super().__init__()
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return self.head(x)

    plan = plan_outputs(_vocab())
    results = {}
    for n in (40, 400):
        batches = _batches(n, 64, seed=n)
        with FeatureSpill(32, len(TAGS)) as spill:
            evaluate(
                PooledTagger(model), batches, torch.device("cpu"), _vocab(), PreprocessParams(image_size=SIZE), threshold=0.5, observe=spill.observe
            )
            head = CountingHead(fused_head(model, plan))
            for chunk in (5, 64):
                seen.clear()
                results[n, chunk] = exported_metrics(spill, head, plan, {"general": 0.35, "character": 0.85}, chunk=chunk)
                assert max(seen) == min(chunk, n) and sum(seen) == n  # every image once, never more than a chunk at a time
    for n in (40, 400):
        assert results[n, 5]["at_consumer_thresholds"] == results[n, 64]["at_consumer_thresholds"]
        assert results[n, 5]["mAP"] == pytest.approx(results[n, 64]["mAP"], abs=1e-12)


class _RecordingSession:
    """Stands in for an onnxruntime session: records the batch sizes it is given, answers with the PyTorch graph."""

    def __init__(self, wd: WDTagger) -> None:
        self.wd = wd
        self.calls: list[int] = []

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        self.calls.append(x.shape[0])
        with torch.no_grad():
            return [self.wd(torch.from_numpy(x)).numpy()]


def test_verify_runs_onnxruntime_in_chunks_and_stops_at_the_limit(tmp_path: Path) -> None:
    model = resized_tagger(_model(), 48)
    wd = WDTagger(model, fused_head(model, plan_outputs(_vocab())), (0.5,) * 3, (0.5,) * 3).eval()
    batches = _batches(50, 16, size=48)
    for limit, chunk, images in ((0, 3, 50), (20, 3, 20), (7, 64, 7), (100, 5, 50)):
        fake = _RecordingSession(wd)
        result = verify_onnx(fake, wd, batches, limit=limit, chunk=chunk)
        assert result.images == images and sum(fake.calls) == images
        assert max(fake.calls) <= chunk and result.max_abs_diff <= 1e-6
    # The real runtime on the traced graph, chunk by chunk, agrees with PyTorch.
    export_onnx(wd, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    result = verify_onnx(session, wd, batches, limit=0, chunk=4)
    assert result.images == 50 and result.max_abs_diff <= 1e-5
    with pytest.raises(ValueError, match="chunk"):
        verify_onnx(session, wd, batches, limit=0, chunk=0)
