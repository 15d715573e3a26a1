"""Tests for model_architecture: config, shapes, pos-embed resampling, checkpointing, compile, timm weight import."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F

from model_architecture import (
    SimplifiedTagger,
    TransformerBlock,
    VisionTransformerConfig,
    load_pretrained_backbone,
    param_groups_for_weight_decay,
    resample_pos_embed,
)


def micro_cfg(**overrides: Any) -> VisionTransformerConfig:
    """A CPU-sized config: 32 px, patch 8 (4x4 grid), 64 dim, 2 blocks, 4 heads, 10 tags."""
    values: Dict[str, Any] = dict(image_size=32, patch_size=8, num_tags=10, embed_dim=64, depth=2, num_heads=4)
    values.update(overrides)
    return VisionTransformerConfig.from_preset("tiny", **values)


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random non-trivial values (biases, norms and cls token included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


# ----------------------------------------------------------------------------------------------- config


def test_presets_and_overrides() -> None:
    expected = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    for name, (dim, depth, heads) in expected.items():
        cfg = VisionTransformerConfig.from_preset(name, num_tags=5)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (dim, depth, heads)
    micro = VisionTransformerConfig.from_preset("base", embed_dim=128, depth=4, num_heads=4, num_tags=7)
    assert (micro.embed_dim, micro.depth, micro.num_heads, micro.num_tags) == (128, 4, 4, 7)
    # None overrides mean "use the preset", so optional CLI values can be passed straight through.
    assert VisionTransformerConfig.from_preset("small", depth=None).depth == 12
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        VisionTransformerConfig.from_preset("huge")
    with pytest.raises(ValueError, match="not_a_field"):
        VisionTransformerConfig.from_preset("tiny", not_a_field=1)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"image_size": 30}, "image_size=30 is not divisible by patch_size=8"),
        ({"embed_dim": 66}, "embed_dim=66 is not divisible by num_heads=4"),
        ({"depth": 0}, "depth must be a positive int, got 0"),
        ({"num_tags": -3}, "num_tags must be a positive int, got -3"),
        ({"patch_size": 0}, "patch_size must be a positive int, got 0"),
        ({"pooling": "max"}, "pooling must be 'cls' or 'avg', got 'max'"),
        ({"grad_checkpoint_every": -1}, "grad_checkpoint_every"),
        ({"tag_bias_init": [0.5] * 3}, "tag_bias_init has 3 values, expected num_tags=10"),
        ({"tag_bias_init": [2.0] * 10}, "frequencies in \\[0, 1\\]"),
        ({"layer_scale_init": -1.0}, "layer_scale_init"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
    ],
)
def test_config_validation_names_field_and_value(overrides: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        micro_cfg(**overrides)


def test_config_dict_round_trip() -> None:
    cfg = micro_cfg(layer_scale_init=0.1, pooling="avg", tag_bias_init=[0.1] * 10, grad_checkpoint_every=2)
    data = cfg.to_dict()
    assert isinstance(data["tag_bias_init"], list)
    import json

    restored = VisionTransformerConfig.from_dict(json.loads(json.dumps(data)))
    assert restored == cfg
    with pytest.raises(ValueError, match="bogus"):
        VisionTransformerConfig.from_dict({**data, "bogus": 1})


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_shapes_small_presets(preset: str) -> None:
    cfg = VisionTransformerConfig.from_preset(preset, image_size=32, patch_size=16, num_tags=13, depth=2)
    model = SimplifiedTagger(cfg).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == {"tag_logits", "rating_logits"}
    assert out["tag_logits"].shape == (2, 13)
    assert out["rating_logits"].shape == (2, 4)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 4, cfg.embed_dim)


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large"])
def test_forward_shapes_full_presets_on_meta_device(preset: str) -> None:
    cfg = VisionTransformerConfig.from_preset(preset, image_size=224, patch_size=16, num_tags=10000)
    with torch.device("meta"):
        model = SimplifiedTagger(cfg)
        images = torch.empty(2, 3, 224, 224)
    assert len(model.blocks) == cfg.depth
    assert model.pos_embed.shape == (1, 1 + 196, cfg.embed_dim)
    out = model(images)
    assert out["tag_logits"].shape == (2, 10000)
    assert out["rating_logits"].shape == (2, 4)
    assert model.forward_features(images).shape == (2, 197, cfg.embed_dim)


def test_forward_rejects_bad_image_shapes() -> None:
    model = SimplifiedTagger(micro_cfg())
    with pytest.raises(ValueError, match="not a multiple of patch_size=8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must be \\(B, 3, H, W\\)"):
        model(torch.randn(1, 1, 32, 32))


def test_attention_matches_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(32, num_heads=4)
    randomise_(block)
    x = torch.randn(2, 7, 32)
    attn = block.attn
    qkv = attn.qkv(x).reshape(2, 7, 3, 4, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, N, D)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    # And the block is pre-norm residual: x + attn(norm1(x)), then + mlp(norm2(.)).
    h = x + attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)), rtol=1e-5, atol=1e-5)


def reference_logits(model: SimplifiedTagger, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The forward as first written, in plain ops: every block on every token, explicit softmax attention,
    final norm on all tokens, then pooling and the heads (no drop path: eval mode or rate 0)."""
    cfg = model.cfg
    batch, dim, heads = images.shape[0], cfg.embed_dim, cfg.num_heads
    head_dim = dim // heads
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=cfg.patch_size).flatten(2).transpose(1, 2)  # (B, N, C)
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1) + model.pos_embed  # (B, 1+N, C)
    tokens = x.shape[1]
    for block in model.blocks:
        h = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(batch, tokens, 3, heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, 1+N, D)
        weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        attn = F.linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), block.attn.proj.weight, block.attn.proj.bias)
        x = x + (attn * block.ls1.gamma if cfg.layer_scale_init else attn)
        h = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        mlp = F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
        x = x + (mlp * block.ls2.gamma if cfg.layer_scale_init else mlp)
    x = F.layer_norm(x, (dim,), model.norm.weight, model.norm.bias, eps=1e-6)  # (B, 1+N, C)
    pooled = x[:, 1:].mean(1) if cfg.pooling == "avg" else x[:, 0]  # (B, C)
    return {
        "tag_logits": F.linear(pooled, model.tag_head.weight, model.tag_head.bias),
        "rating_logits": F.linear(pooled, model.rating_head.weight, model.rating_head.bias),
    }


@pytest.mark.parametrize("pooling", ["cls", "avg"])
@pytest.mark.parametrize("layer_scale_init", [None, 0.1])
@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_forward_and_gradients_match_full_token_reference(pooling: str, layer_scale_init: Any, checkpoint_every: int) -> None:
    """forward skips the last block's unread patch tokens under cls pooling; outputs and every
    parameter's gradient still equal the all-tokens forward."""
    torch.manual_seed(0)
    model = SimplifiedTagger(micro_cfg(depth=3, pooling=pooling, layer_scale_init=layer_scale_init, grad_checkpoint_every=checkpoint_every)).train()
    randomise_(model)
    images = torch.randn(3, 3, 32, 32)
    params = dict(model.named_parameters())
    results = []
    for forward in (model, lambda x: reference_logits(model, x)):
        out = forward(images)
        loss = out["tag_logits"].square().sum() + (out["rating_logits"] * torch.arange(4.0)).sum()
        results.append((out, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))))
    (ours, our_grads), (ref, ref_grads) = results
    for key in ("tag_logits", "rating_logits"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        # float32 sums over a different token set: ~3e-7 of the gradients' scale (up to ~20 here),
        # so an element near zero may differ by a few 1e-6 (torch 2.14's CPU kernels sum in another order)
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=2e-5, msg=name)


def test_last_block_computes_only_the_tokens_pooling_reads() -> None:
    model = SimplifiedTagger(micro_cfg(depth=2)).eval()
    shapes = []
    model.blocks[-1].register_forward_hook(lambda _module, _args, out: shapes.append(tuple(out.shape)))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        model.forward_features(images)
        model.cfg.pooling = "avg"
        model(images)
    assert shapes == [(2, 1, 64), (2, 17, 64), (2, 17, 64)]


def test_forward_draws_the_same_drop_path_masks_as_forward_features() -> None:
    """Drop path draws one mask per sample and block either way, so a seeded step is unchanged."""
    model = SimplifiedTagger(micro_cfg(depth=3, drop_path_rate=0.5)).train()
    randomise_(model)
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(3)
    fast = model.forward_pooled(images)
    torch.manual_seed(3)
    full = model.pool(model.forward_features(images))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(model.forward_pooled(images), fast)  # the masks do depend on the seed


def test_avg_pooling_uses_mean_of_patch_tokens() -> None:
    torch.manual_seed(0)
    model = SimplifiedTagger(micro_cfg(pooling="avg")).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(images)
    torch.testing.assert_close(model(images)["tag_logits"], model.tag_head(tokens[:, 1:].mean(1)))
    model.cfg.pooling = "cls"
    torch.testing.assert_close(model(images)["tag_logits"], model.tag_head(tokens[:, 0]))


def test_layer_scale_and_drop_path() -> None:
    model = SimplifiedTagger(micro_cfg(layer_scale_init=0.1, drop_path_rate=0.5))
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((64,), 0.1))
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # linear rule: first block rate 0
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    images = torch.randn(8, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images)["tag_logits"], model(images)["tag_logits"])
    model.train()
    torch.manual_seed(1)
    first = model(images)["tag_logits"]
    torch.manual_seed(2)
    assert not torch.allclose(first, model(images)["tag_logits"])


# ----------------------------------------------------------------------------------------------- pos embed


def test_pos_embed_interpolation_matches_direct_bicubic() -> None:
    torch.manual_seed(0)
    model = SimplifiedTagger(micro_cfg()).eval()  # configured 32 px -> 4x4 grid
    randomise_(model)
    pos = model.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([pos[:, :1], up.permute(0, 2, 3, 1).reshape(1, 48, 64)], dim=1)
    resampled = resample_pos_embed(pos, (6, 8), (4, 4))
    torch.testing.assert_close(resampled, expected)
    torch.testing.assert_close(resampled[:, 0], pos[:, 0])  # class-token slot kept as is
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos

    # forward at 48x64 px uses exactly that resampled table: compare with a model built for 48x64.
    images = torch.randn(2, 3, 48, 64)
    tokens = model.forward_features(images)
    assert tokens.shape == (2, 1 + 48, 64)
    other = SimplifiedTagger(micro_cfg(image_size=48)).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, strict=False)
    with torch.no_grad():
        other.pos_embed.copy_(resample_pos_embed(pos, (6, 6), (4, 4)))
    square = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model.forward_features(square), other.forward_features(square), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_gives_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    base = SimplifiedTagger(micro_cfg(depth=4))
    randomise_(base)
    state = base.state_dict()
    calls = {"n": 0}
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args: Any, **kwargs: Any) -> Any:
        """Count calls and insist on the non-reentrant variant."""
        calls["n"] += 1
        assert kwargs.get("use_reentrant") is False
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    grads = {}
    for every, expected_calls in ((0, 0), (1, 4), (2, 2), (3, 2)):
        model = SimplifiedTagger(micro_cfg(depth=4, grad_checkpoint_every=every)).train()
        model.load_state_dict(state)
        calls["n"] = 0
        out = model(images)
        (out["tag_logits"].square().sum() + out["rating_logits"].sum()).backward()
        assert calls["n"] == expected_calls
        grads[every] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for every in (1, 2, 3):
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[every][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # No checkpointing in eval mode or without grad.
    model.eval()
    calls["n"] = 0
    with torch.no_grad():
        model(images)
    assert calls["n"] == 0


def test_tag_bias_init_gives_sigmoid_bias_equal_frequency() -> None:
    freqs = [0.5, 0.1, 0.01, 0.001, 1e-4, 0.9, 0.3, 0.05, 0.2, 0.7]
    model = SimplifiedTagger(micro_cfg(tag_bias_init=freqs))
    torch.testing.assert_close(torch.sigmoid(model.tag_head.bias.detach()), torch.tensor(freqs), rtol=1e-5, atol=1e-7)
    # With the head weights at zero, every image's initial probabilities are exactly the priors.
    with torch.no_grad():
        model.tag_head.weight.zero_()
    probs = torch.sigmoid(model(torch.randn(2, 3, 32, 32))["tag_logits"])
    torch.testing.assert_close(probs, torch.tensor(freqs).expand(2, -1), rtol=1e-5, atol=1e-7)
    extreme = SimplifiedTagger(micro_cfg(tag_bias_init=[0.0] * 5 + [1.0] * 5)).tag_head.bias.detach()
    assert torch.isfinite(extreme).all()
    assert (extreme[:5] < -10).all() and (extreme[5:] > 10).all()


def test_param_groups_for_weight_decay() -> None:
    model = SimplifiedTagger(micro_cfg(layer_scale_init=0.1))
    groups = param_groups_for_weight_decay(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == set(names.values())
    assert {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "norm.bias",
        "tag_head.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.attn.qkv.bias",
        "blocks.1.norm2.weight",
    } <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "tag_head.weight", "rating_head.weight"} <= decay
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as-is


def test_forward_compiles_fullgraph() -> None:
    # Inductor needs ~25 s per graph on this 2-core CPU, so the graph-break check uses aot_eager:
    # fullgraph=True still fails on any graph break, and aot_eager also traces the backward.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SimplifiedTagger(micro_cfg(depth=2)).eval()
    randomise_(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(images)["tag_logits"], model(images)["tag_logits"])
    # Training mode with checkpointing also compiles without graph breaks and gives eager's gradients.
    model.train()
    model.set_grad_checkpointing(1)
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = fn(images)
        (out["tag_logits"].square().sum() + out["rating_logits"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Drop path (random per-sample masks) traces without graph breaks too.
    drop_model = SimplifiedTagger(micro_cfg(depth=2, drop_path_rate=0.2)).train()
    out = torch.compile(drop_model, fullgraph=True, backend="aot_eager")(images)
    assert out["tag_logits"].shape == (2, 10)


# ----------------------------------------------------------------------------------------------- weight import


def timm_model(img_size: int = 32, **kwargs: Any) -> torch.nn.Module:
    """timm ViT matching micro_cfg's shape, random weights, eval mode (skips the test without timm)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    args: Dict[str, Any] = dict(img_size=img_size, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0, global_pool="token")
    args.update(kwargs)
    model = timm_vit.VisionTransformer(**args)
    randomise_(model, seed=7)
    return model.eval()


def save_safetensors(state: Dict[str, torch.Tensor], path: Path) -> Path:
    """Write a state dict with safetensors (contiguous copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def test_import_matches_timm_forward_features(tmp_path: Path) -> None:
    theirs = timm_model(num_classes=5)  # with a classifier head that we must not use
    path = save_safetensors(theirs.state_dict(), tmp_path / "vit.safetensors")
    ours = SimplifiedTagger(micro_cfg()).eval()
    head_before = ours.tag_head.weight.detach().clone()
    report = load_pretrained_backbone(ours, path)
    assert report.missing == []
    assert report.mismatched == []
    assert report.unused == ["head.bias", "head.weight"]
    assert set(report.loaded) == set(ours.backbone_state_dict())
    assert torch.equal(ours.tag_head.weight, head_before)  # heads stay fresh
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), rtol=1e-5, atol=1e-5)
        # The logits (class token only through the last block) equal our heads on timm's class token.
        pooled = theirs.forward_features(images)[:, 0]  # (B, C)
        out = ours(images)
        torch.testing.assert_close(out["tag_logits"], ours.tag_head(pooled), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["rating_logits"], ours.rating_head(pooled), rtol=1e-5, atol=1e-5)


def test_import_into_other_image_size_matches_timm_resampled(tmp_path: Path) -> None:
    theirs = timm_model(img_size=32)
    from timm.layers import resample_abs_pos_embed

    path = save_safetensors(theirs.state_dict(), tmp_path / "vit.safetensors")
    # Our model configured at 56 px (7x7 grid) loads weights made for a 4x4 grid.
    ours = SimplifiedTagger(micro_cfg(image_size=56)).eval()
    report = load_pretrained_backbone(ours, path)
    assert any("resampled from grid 4x4 to 7x7" in note for note in report.notes)
    reference = timm_model(img_size=56)
    state = dict(theirs.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[7, 7], num_prefix_tokens=1)
    reference.load_state_dict(state)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images), rtol=1e-5, atol=1e-5)


def test_forward_at_other_size_matches_timm_dynamic_img_size(tmp_path: Path) -> None:
    theirs = timm_model(img_size=32, dynamic_img_size=True)
    path = save_safetensors(theirs.state_dict(), tmp_path / "vit.safetensors")
    ours = SimplifiedTagger(micro_cfg()).eval()
    load_pretrained_backbone(ours, path)
    images = torch.randn(2, 3, 48, 64)  # non-square, different grid at run time
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), rtol=1e-5, atol=1e-5)


def test_import_layer_scale_no_embed_class_and_no_qkv_bias(tmp_path: Path) -> None:
    theirs = timm_model(init_values=0.1, no_embed_class=True, qkv_bias=False)
    path = save_safetensors(theirs.state_dict(), tmp_path / "vit.safetensors")
    ours = SimplifiedTagger(micro_cfg(layer_scale_init=1e-5)).eval()
    report = load_pretrained_backbone(ours, path)
    assert "blocks.0.ls1.gamma" in report.loaded
    assert "blocks.0.attn.qkv.bias" in report.missing
    assert any("no class-token slot" in note for note in report.notes)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), rtol=1e-5, atol=1e-5)
    # Without LayerScale on our side the gammas are reported unused, with a note.
    plain = SimplifiedTagger(micro_cfg())
    report = load_pretrained_backbone(plain, path)
    assert "blocks.0.ls1.gamma" in report.unused
    assert any("LayerScale" in note for note in report.notes)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module_prefix", "compiled_prefix"])
def test_import_pth_wrappers(tmp_path: Path, wrapper: str) -> None:
    theirs = timm_model()
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    if wrapper == "module_prefix":
        payload: Any = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrapper == "compiled_prefix":
        payload = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}}
    else:
        payload = {wrapper: state, "optimizer_name": "adamw"}
    path = tmp_path / "vit.pth"
    torch.save(payload, path)
    ours = SimplifiedTagger(micro_cfg()).eval()
    report = load_pretrained_backbone(ours, path)
    assert report.missing == [] and report.mismatched == []
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images), rtol=1e-5, atol=1e-5)


def test_import_reports_shape_mismatches(tmp_path: Path) -> None:
    theirs = timm_model(patch_size=16)  # 2x2 grid, 16 px kernels
    path = save_safetensors(theirs.state_dict(), tmp_path / "vit.safetensors")
    ours = SimplifiedTagger(micro_cfg())
    before = ours.patch_embed.proj.weight.detach().clone()
    report = load_pretrained_backbone(ours, path)
    assert ("patch_embed.proj.weight", (64, 3, 8, 8), (64, 3, 16, 16)) in report.mismatched
    assert torch.equal(ours.patch_embed.proj.weight, before)
    assert "blocks.1.mlp.fc2.weight" in report.loaded
    assert "pos_embed" in report.loaded  # 2x2 grid resampled to our 4x4
    assert "mismatch: patch_embed.proj.weight" in report.summary()


def test_import_errors_name_the_path(tmp_path: Path) -> None:
    model = SimplifiedTagger(micro_cfg())
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_pretrained_backbone(model, missing)
    unrelated = save_safetensors({"encoder.layer.0.weight": torch.zeros(3, 3)}, tmp_path / "bert.safetensors")
    with pytest.raises(ValueError, match="bert.safetensors"):
        load_pretrained_backbone(model, unrelated)
    wrong_width = save_safetensors(timm_model(embed_dim=32).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="narrow.safetensors"):
        load_pretrained_backbone(model, wrong_width)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"not really")
    with pytest.raises(ValueError, match="weights.npz"):
        load_pretrained_backbone(model, odd)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match="list.pt"):
        load_pretrained_backbone(model, not_dict)
