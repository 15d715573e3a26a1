"""Tests for export_memory: the export's memory estimate and the batch sizes it allows (budgets injected, no real OOM)."""

from __future__ import annotations

import re

import pytest

from export_memory import (
    METRIC_BINS,
    ORT_CHUNK_TARGET,
    WEIGHT_COPIES,
    ExportEstimate,
    ExportMemoryError,
    ExportShape,
    estimate_export_memory,
    plan_export,
)

GB = 10**9
DEMO_448 = ExportShape(image_size=448, patch_size=8, embed_dim=128, num_heads=4, mlp_ratio=4.0, num_params=830_000, vocab_tags=28, exported_tags=28)
VIT_B_448 = ExportShape(
    image_size=448, patch_size=16, embed_dim=768, num_heads=12, mlp_ratio=4.0, num_params=94_000_000, vocab_tags=10_000, exported_tags=10_000
)


def test_estimate_counts_the_attention_matrices_onnxruntime_materialises() -> None:
    demo = estimate_export_memory(DEMO_448, resident=0)
    assert DEMO_448.tokens == 1 + 56 * 56
    attention = 2 * 4 * DEMO_448.tokens**2 * 4  # scores and softmax, float32, 4 heads
    assert attention < demo.per_image_verify < attention * 1.25
    # The measured figures of the module docstring: 19 MB an image in the backbone pass, 316 MB in onnxruntime.
    assert 19e6 <= demo.per_image_pass <= 30e6 and 316e6 <= demo.per_image_verify <= 400e6
    vit = estimate_export_memory(VIT_B_448, resident=0)
    assert vit.weights == WEIGHT_COPIES * 4 * 94_000_000
    assert vit.metrics >= 2 * METRIC_BINS * 4 * 10_000
    # Memory grows with the image size (tokens, and tokens squared in onnxruntime).
    small = estimate_export_memory(ExportShape(**{**VIT_B_448.__dict__, "image_size": 224}), resident=0)
    assert small.per_image_pass < vit.per_image_pass / 3 and small.per_image_verify < vit.per_image_verify / 4


def test_on_a_gpu_the_backbone_pass_costs_the_host_only_the_loader() -> None:
    host = estimate_export_memory(VIT_B_448, resident=0)
    gpu = estimate_export_memory(ExportShape(**{**VIT_B_448.__dict__, "host_passes": False}), resident=0)
    assert gpu.per_image_pass == VIT_B_448.loader_batches * 3 * 448**2 < host.per_image_pass
    assert gpu.metrics == 0


def _estimate() -> ExportEstimate:
    return ExportEstimate(resident=500_000_000, weights=100_000_000, metrics=400_000_000, per_image_pass=20_000_000, per_image_verify=300_000_000)


def test_plan_keeps_the_runs_batch_when_it_fits_and_shrinks_it_when_not() -> None:
    est = _estimate()
    plan = plan_export(est, image_size=448, requested_batch=0, default_batch=64, budget=20 * GB)
    assert (plan.batch_size, plan.how) == (64, "the run's validation batch")
    assert plan.verify_chunk == ORT_CHUNK_TARGET // est.per_image_verify == 3
    assert plan.needed == est.needed(64, 3) <= plan.budget
    tight = plan_export(est, image_size=448, requested_batch=0, default_batch=64, budget=2 * GB)
    assert tight.batch_size == (2 * GB - est.fixed) // est.per_image_pass == 50
    assert tight.needed <= 2 * GB and est.needed(tight.batch_size + 1, 1) > 2 * GB
    assert "does not fit" in tight.how
    # The chunk never exceeds the batch: --batch-size bounds every phase.
    assert plan_export(est, image_size=448, requested_batch=2, default_batch=64, budget=20 * GB).verify_chunk == 2


def test_a_batch_that_does_not_fit_is_refused_naming_one_that_does() -> None:
    est = _estimate()
    with pytest.raises(ExportMemoryError) as info:
        plan_export(est, image_size=448, requested_batch=64, default_batch=64, budget=1_500_000_000)
    message = str(info.value)
    suggested = int(re.search(r"use --batch-size (\d+)", message).group(1))
    assert suggested == 25 and "--batch-size 64 needs about 2.3 GB" in message and "1.5 GB can be used" in message
    assert plan_export(est, image_size=448, requested_batch=suggested, default_batch=64, budget=1_500_000_000).needed <= 1_500_000_000


def test_nothing_fits_names_the_image_size_or_the_limit_flag() -> None:
    est = _estimate()
    # One image through onnxruntime does not fit, the fixed part does: a smaller input would.
    with pytest.raises(ExportMemoryError, match=r"smaller --image-size, or raise --memory-limit$"):
        plan_export(est, image_size=448, requested_batch=0, default_batch=64, budget=est.fixed + 10, limit_flag="--memory-limit")
    with pytest.raises(ExportMemoryError, match=r"smaller --image-size$"):
        plan_export(est, image_size=448, requested_batch=0, default_batch=64, budget=est.fixed + est.per_image_pass)
    # The weights and metric state alone are too much: no input size helps.
    with pytest.raises(ExportMemoryError, match=r"needs a machine with more free memory, or raise --memory-limit$"):
        plan_export(est, image_size=448, requested_batch=0, default_batch=64, budget=est.fixed - 1, limit_flag="--memory-limit")
    with pytest.raises(ValueError, match="batch sizes"):
        plan_export(est, image_size=448, requested_batch=0, default_batch=0, budget=20 * GB)


def test_a_timm_body_is_estimated_from_its_blocks_and_a_staged_one_refused() -> None:
    from export_memory import timm_shape
    from timm_tagger import TimmTaggerConfig, timm_body

    eva = TimmTaggerConfig(
        "eva02_large_patch14_448",
        {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "ref_feat_shape": [4, 4]},
        image_size=32,
    )
    shape = timm_shape(timm_body(eva, device="meta"), eva.architecture)
    assert shape["patch_size"] == 8 and shape["embed_dim"] == 64 and shape["num_heads"] == 2
    assert shape["mlp_ratio"] == pytest.approx(4 * 2 / 3, rel=0.05)  # EVA02's SwiGLU hidden width
    convnext = TimmTaggerConfig("convnext_base", {"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64]}, image_size=64)
    with pytest.raises(ExportMemoryError, match="convnext_base"):
        timm_shape(timm_body(convnext, device="meta"), convnext.architecture)
