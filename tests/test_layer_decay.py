"""Tests for layer_decay.py: the BEiT/timm layer ids and scales, the weight-decay split, and timm's own grouping."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay
from torch import nn

from layer_decay import layer_assignment, layer_id, param_groups_layer_decay
from model_architecture import SimplifiedTagger, VisionTransformerConfig, param_groups_for_weight_decay
from schedulers import LinearWarmupCosineLR

DEPTH, DECAY, WD = 3, 0.65, 0.05


def _tagger() -> SimplifiedTagger:
    """A tiny tagger with LayerScale so every kind of parameter is present."""
    cfg = VisionTransformerConfig(image_size=32, patch_size=8, num_tags=7, embed_dim=32, depth=DEPTH, num_heads=2, layer_scale_init=1e-5)
    return SimplifiedTagger(cfg)


def _timm_name(name: str) -> str:
    """Our parameter name in timm's ViT: both heads map onto timm's single classifier `head`."""
    for ours in ("tag_head.", "rating_head."):
        if name.startswith(ours):
            return "head." + name[len(ours) :]
    return name


def test_every_parameter_in_exactly_one_group_with_formula_scales() -> None:
    """Groups partition the trainable parameters; scale = decay ** (L + 1 - layer) with the stated layer ids."""
    model = _tagger()
    groups = param_groups_layer_decay(model, WD, DECAY, base_lr=1e-3)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == sum(1 for _ in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    expected_layer = {
        "cls_token": 0,
        "pos_embed": 0,
        "patch_embed.proj.weight": 0,
        "blocks.0.attn.qkv.weight": 1,
        "blocks.2.ls2.gamma": 3,
        "norm.weight": 3,
        "tag_head.weight": 4,
        "rating_head.bias": 4,
    }
    for group in groups:
        assert group["lr_scale"] == pytest.approx(DECAY ** (DEPTH + 1 - group["layer"]), rel=1e-15)
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"], rel=1e-15)
        for p in group["params"]:
            name = names[id(p)]
            if name in expected_layer:
                assert group["layer"] == expected_layer[name], name
            if name.startswith("blocks."):
                assert group["layer"] == int(name.split(".")[1]) + 1
    assert {g["layer"] for g in groups} == set(range(DEPTH + 2))
    assert groups[0]["layer"] == DEPTH + 1 and groups[0]["lr_scale"] == 1.0  # logged lr = get_last_lr()[0]
    assert [g["layer"] for g in groups] == sorted((g["layer"] for g in groups), reverse=True)
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer spec


def test_weight_decay_split_is_the_models_own_rule() -> None:
    """The decay / no-decay membership equals param_groups_for_weight_decay's, parameter by parameter."""
    model = _tagger()
    decay_group, no_decay_group = param_groups_for_weight_decay(model, WD)
    decayed = {id(p) for p in decay_group["params"]}
    assert {id(p) for p in no_decay_group["params"]}  # biases, norms, gammas, pos_embed, cls_token
    for group in param_groups_layer_decay(model, WD, DECAY):
        for p in group["params"]:
            assert (id(p) in decayed) == (group["weight_decay"] == WD)
            assert group["weight_decay"] in (0.0, WD)


def test_assignment_matches_timm_param_groups_layer_decay() -> None:
    """Same depth timm ViT: every parameter gets timm's lr_scale and weight decay (heads mapped to `head`)."""
    timm_model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=7, init_values=1e-5, global_pool="token"
    )
    timm_groups = timm_param_groups_layer_decay(timm_model, weight_decay=WD, layer_decay=DECAY, no_weight_decay_list=timm_model.no_weight_decay())
    timm_names = {id(p): n for n, p in timm_model.named_parameters()}
    timm_of = {timm_names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in timm_groups for p in g["params"]}
    ours = layer_assignment(_tagger(), DECAY)
    assert {_timm_name(n) for n in ours} == set(timm_of)  # same parameters, name for name
    for name, (_, decays, scale) in ours.items():
        timm_scale, timm_wd = timm_of[_timm_name(name)]
        assert scale == pytest.approx(timm_scale, rel=1e-12), name
        assert (WD if decays else 0.0) == timm_wd, name
    assert len({s for s, _ in timm_of.values()}) == DEPTH + 2  # distinct scales: the layer ids agree too
    assert timm_of["norm.weight"][0] == pytest.approx(DECAY)  # final norm with the last block (MATCH_PREV_GROUP)


def test_frozen_parameters_are_left_out_and_bad_input_raises() -> None:
    """requires_grad=False parameters get no group; decay outside (0, 1] and unknown modules raise."""
    model = _tagger()
    model.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups_layer_decay(model, WD, DECAY)
    assert all(p is not model.patch_embed.proj.weight for g in groups for p in g["params"])
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, WD, 0.0)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        layer_assignment(model, DECAY)
    with pytest.raises(ValueError, match="block 5"):
        layer_id("blocks.5.norm1.weight", DEPTH)


def test_project_scheduler_keeps_the_layer_ratios() -> None:
    """schedulers.LinearWarmupCosineLR scales each group's own initial lr, so lr / lr_head == lr_scale at every step."""
    model = _tagger()
    groups = param_groups_layer_decay(model, WD, DECAY, base_lr=2e-3)
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    scheduler = LinearWarmupCosineLR(optimizer, warmup_steps=3, total_steps=10)
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lrs = scheduler.get_last_lr()
        assert lrs[0] > 0.0
        for group, lr in zip(optimizer.param_groups, lrs):
            assert lr / lrs[0] == pytest.approx(group["lr_scale"], rel=1e-12)
