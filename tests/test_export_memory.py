"""Tests for export_memory: the export's memory estimate and the batch sizes it allows (budgets injected, no real OOM)."""

from __future__ import annotations

import re

import pytest
import torch

from export_memory import (
    METRIC_BINS,
    ORT_CHUNK_TARGET,
    WEIGHT_COPIES,
    ExportEstimate,
    ExportMemoryError,
    ExportShape,
    StageShape,
    estimate_export_memory,
    plan_export,
    timm_stages,
    vit_stages,
)
from wd_release_helpers import SHRINK, release_config

GB = 10**9
DEMO_448 = ExportShape(image_size=448, stages=vit_stages(448, 8, 128, 4, 4.0), num_params=830_000, vocab_tags=28, exported_tags=28)


def _vit_b(size: int, **changes: object) -> ExportShape:
    values = dict(image_size=size, stages=vit_stages(size, 16, 768, 12, 4.0), num_params=94_000_000, vocab_tags=10_000, exported_tags=10_000)
    return ExportShape(**{**values, **changes})


VIT_B_448 = _vit_b(448)


def test_estimate_counts_the_attention_matrices_onnxruntime_materialises() -> None:
    demo = estimate_export_memory(DEMO_448, resident=0)
    tokens = DEMO_448.stages[0].tokens
    assert tokens == 1 + 56 * 56
    attention = 2 * 4 * tokens**2 * 4  # scores and softmax, float32, 4 heads
    assert attention < demo.per_image_verify < attention * 1.25
    # The measured figures of the module docstring: 19 MB an image in the backbone pass, 316 MB in onnxruntime.
    assert 19e6 <= demo.per_image_pass <= 30e6 and 316e6 <= demo.per_image_verify <= 400e6
    vit = estimate_export_memory(VIT_B_448, resident=0)
    assert vit.weights == WEIGHT_COPIES * 4 * 94_000_000
    assert vit.metrics >= 2 * METRIC_BINS * 4 * 10_000
    # Memory grows with the image size (tokens, and tokens squared in onnxruntime).
    small = estimate_export_memory(_vit_b(224), resident=0)
    assert small.per_image_pass < vit.per_image_pass / 3 and small.per_image_verify < vit.per_image_verify / 4


def test_on_a_gpu_the_backbone_pass_costs_the_host_only_the_loader() -> None:
    host = estimate_export_memory(VIT_B_448, resident=0)
    gpu = estimate_export_memory(_vit_b(448, host_passes=False), resident=0)
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


def _widest_output_per_stage(body: torch.nn.Module, names: list[str], size: int) -> dict[str, int]:
    """Bytes per image of the largest single module output inside each named stage (a real forward of 2 images;
    outputs without the batch in their first dimension, like SwinV2's position-bias MLP, are the model's, not an image's)."""
    widest = dict.fromkeys(names, 0)
    hooks = []
    for name in names:
        for module in body.get_submodule(name).modules():
            if not list(module.children()):

                def record(_m: torch.nn.Module, _i: object, out: object, stage: str = name) -> None:
                    if isinstance(out, torch.Tensor) and out.shape[0] % 2 == 0:
                        widest[stage] = max(widest[stage], out.numel() * out.element_size() // 2)

                hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        body(torch.zeros(2, 3, size, size))
    for hook in hooks:
        hook.remove()
    return widest


@pytest.mark.parametrize("name", list(SHRINK))
def test_every_released_family_is_estimated_stage_by_stage_against_its_real_tensors(name: str) -> None:
    from timm_tagger import TimmTaggerConfig, timm_body

    config = release_config(name, 7, shrink=True)
    size = config["pretrained_cfg"]["input_size"][1]
    body = timm_body(TimmTaggerConfig(config["architecture"], config["model_args"], image_size=size)).eval()
    stages = timm_stages(body, config["architecture"], size)
    infos = body.feature_info
    assert len(stages) == len(infos)
    widest = _widest_output_per_stage(body, [info["module"] for info in infos], size)
    for stage, info in zip(stages, infos):
        assert stage.tokens - getattr(body, "num_prefix_tokens", 0) == (size // info["reduction"]) ** 2 and stage.width == info["num_chs"]
        # the estimate covers the stage's widest real tensor and is not wildly above it
        real = widest[info["module"]]
        assert real <= stage.block_activations() <= 12 * real, (info["module"], real, stage)
    if "swinv2" in name:  # window attention: tokens x window, not tokens squared
        assert all(s.heads and s.window == min(s.tokens, 16 if i < 3 else 4) for i, s in enumerate(stages))
        assert stages[0].attention_matrices() == 2 * stages[0].heads * stages[0].tokens * 16 * 4
    elif "convnext" in name:  # convolutions: no attention matrices
        assert all(s.heads == 0 and s.attention_matrices() == 0 for s in stages)
    else:  # global attention, the prefix (class) token included where the model has one
        assert all(s.window == s.tokens for s in stages)


def test_a_body_that_does_not_list_its_stages_is_refused_by_name() -> None:
    with pytest.raises(ExportMemoryError, match="some_net does not describe them"):
        timm_stages(torch.nn.Linear(2, 2), "some_net", 64)
    with pytest.raises(ValueError, match="at least one stage"):
        ExportShape(image_size=64, stages=(), num_params=1, vocab_tags=1, exported_tags=1)
    conv = StageShape(tokens=16, width=8, hidden=32)
    assert conv.block_activations() == 4 * 16 * (8 + 8 + 64) and conv.attention_matrices() == 0
