"""Tests for timm_tagger (the timm backbone family) and what training needs from it: configs, the
builder of both families, timm's own layer grouping and weight-decay rule, the body freeze,
gradient checkpointing and progressive resolution."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay

from Configuration_System import load_config
from layer_decay import layer_assignment, param_groups
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from timm_tagger import TimmTagger, TimmTaggerConfig, build_tagger, input_size_error, tagger_config_from_dict
from training_setup import body_frozen_at, timm_model_config
from training_utils import ModelEma

# Small members of each family the WD v3 releases use, plus SigLIP (attention pooling).
FAMILIES = {
    "vit": (
        "vit_base_patch16_224",
        {
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "class_token": False,
            "global_pool": "avg",
            "fc_norm": False,
            "act_layer": "gelu_tanh",
        },
        32,
    ),
    "eva02": (
        "eva02_large_patch14_448",
        {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "ref_feat_shape": [4, 4]},
        32,
    ),
    "swinv2": (
        "swinv2_base_window8_256",
        {"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "act_layer": "gelu_tanh"},
        64,
    ),
    "convnext": ("convnext_base", {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "act_layer": "gelu_tanh"}, 64),
    "siglip": ("vit_base_patch16_siglip_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, 32),
}


def _cfg(family: str, **changes: object) -> TimmTaggerConfig:
    arch, args, size = FAMILIES[family]
    return TimmTaggerConfig(**{"architecture": arch, "model_args": copy.deepcopy(args), "num_tags": 7, "image_size": size, **changes})


def _images(family: str, n: int = 3) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))  # (N, 3, S, S)


def test_config_round_trip_and_family_dispatch() -> None:
    cfg = _cfg("eva02", tag_bias_init=[0.1] * 7, input_channels="bgr", drop_path_rate=0.1, grad_checkpoint_every=1)
    data = cfg.to_dict()
    assert data["family"] == "timm" and data["model_args"]["ref_feat_shape"] == [4, 4]
    assert tagger_config_from_dict(data) == cfg
    assert TimmTaggerConfig.from_dict(data) == cfg
    vit = VisionTransformerConfig(image_size=32, patch_size=8, num_tags=3, embed_dim=16, depth=1, num_heads=2)
    assert tagger_config_from_dict(vit.to_dict()) == vit  # checkpoints before the timm family have no "family" key
    assert tagger_config_from_dict({**vit.to_dict(), "family": "vit"}) == vit
    assert isinstance(build_tagger(vit.to_dict()), SimplifiedTagger)
    assert isinstance(build_tagger(data), TimmTagger) and isinstance(build_tagger(cfg), TimmTagger)
    with pytest.raises(ValueError, match="unknown model family 'jax'"):
        tagger_config_from_dict({"family": "jax"})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": ""}, "architecture must be a timm model name"),
        ({"model_args": {"num_classes": 5}}, "may not set 'num_classes'"),
        ({"model_args": {"pretrained": True}}, "may not set 'pretrained'"),
        ({"model_args": {"drop_path_rate": 0.1}}, "may not set 'drop_path_rate'"),
        ({"model_args": {"img_size": float("nan")}}, "finite number"),
        ({"model_args": {"act_layer": object()}}, "must be a number, string"),
        ({"input_channels": "rgba"}, "input_channels must be one of"),
        ({"num_tags": 0}, "num_tags must be a positive int"),
        ({"drop_path_rate": 1.0}, "drop_path_rate must be in"),
        ({"tag_bias_init": [0.5]}, "tag_bias_init has 1 values"),
    ],
)
def test_config_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg("vit", **changes)


def test_unknown_architecture_and_argument_are_named() -> None:
    with pytest.raises(ValueError, match="no model named 'vit_nonexistent'"):
        TimmTagger(_cfg("vit", architecture="vit_nonexistent"))
    with pytest.raises(ValueError, match="rejects model_args"):
        TimmTagger(_cfg("convnext", model_args={"no_such_argument": 1}))
    with pytest.raises(ValueError, match="takes 32x32 images but image_size is 48"):
        TimmTagger(_cfg("vit", image_size=48))
    with pytest.raises(ValueError, match="unknown TimmTaggerConfig key"):
        TimmTaggerConfig.from_dict({**_cfg("vit").to_dict(), "depth": 3})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_are_timm_features_through_our_heads(family: str) -> None:
    """forward = our heads on timm's pooled features (num_classes=0); bgr flips the channels first."""
    torch.manual_seed(0)
    model = TimmTagger(_cfg(family, input_channels="bgr")).eval()
    x = _images(family)
    with torch.no_grad():
        out = model(x)
        features = model.body.forward_head(model.body.forward_features(x.flip(1)), pre_logits=True)  # (N, C)
    assert out["tag_logits"].shape == (3, 7) and out["rating_logits"].shape == (3, 4)
    torch.testing.assert_close(out["tag_logits"], model.tag_head(features), rtol=0, atol=1e-6)
    assert set(model.backbone_state_dict()) == set(timm.create_model(model.cfg.architecture, num_classes=0, **model.cfg.model_args).state_dict())


def test_tag_bias_starts_at_the_frequency_prior() -> None:
    freqs = [0.01, 0.5, 0.9, 0.2, 0.3, 0.0, 1.0]
    model = TimmTagger(_cfg("vit", tag_bias_init=freqs))
    probs = torch.sigmoid(model.tag_head.bias.detach().double())
    torch.testing.assert_close(probs[:5], torch.tensor(freqs[:5], dtype=torch.float64), rtol=1e-6, atol=1e-7)


def _timm_reference_groups(family: str, decay: float) -> tuple[dict[str, float], dict[str, bool]]:
    """timm.optim.param_groups_layer_decay on the same timm model with a classifier: name -> (lr scale, decays)."""
    arch, args, _ = FAMILIES[family]
    model = timm.create_model(arch, num_classes=11, **args)
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decays = {}, {}
    for group in timm_param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=no_wd, layer_decay=decay):
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
            decays[names[id(p)]] = group["weight_decay"] > 0
    return scale, decays


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_decay_and_weight_decay_are_timms_own(family: str) -> None:
    """Every body parameter gets the lr scale and weight decay timm gives it; the heads get timm's classifier's."""
    model = TimmTagger(_cfg(family))
    scale, decays = _timm_reference_groups(family, 0.7)
    classifier = {n.rsplit(".", 1)[1]: n for n in scale if n not in {k for k, _ in model.body.named_parameters()}}
    assert sorted(classifier) == ["bias", "weight"]
    for name, (_, ours_decays, ours_scale) in layer_assignment(model, 0.7).items():
        theirs = name[len("body.") :] if name.startswith("body.") else classifier[name.rsplit(".", 1)[1]]
        assert ours_scale == pytest.approx(scale[theirs], rel=1e-12), name
        assert ours_decays == decays[theirs], name


def test_body_lr_scale_multiplies_everything_but_the_heads() -> None:
    model = TimmTagger(_cfg("eva02"))
    plain = layer_assignment(model, 0.8)
    scaled = layer_assignment(model, 0.8, body_lr_scale=0.1)
    for name, (_, _, scale) in scaled.items():
        head = name.startswith(("tag_head.", "rating_head."))
        assert scale == pytest.approx(plain[name][2] * (1.0 if head else 0.1), rel=1e-12), name
    groups = param_groups(model, 0.05, 1.0, base_lr=1e-3, body_lr_scale=0.1)
    assert groups[0]["lr"] == 1e-3 and {id(p) for p in groups[0]["params"]} <= {id(p) for p in model.tag_head.parameters()} | {
        id(p) for p in model.rating_head.parameters()
    }
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    two = param_groups(model, 0.05, 1.0, base_lr=1e-3)
    assert len(two) == 2 and [g["weight_decay"] for g in two] == [0.05, 0.0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: TimmTagger(_cfg("eva02", drop_path_rate=0.2)),
        lambda: SimplifiedTagger(
            VisionTransformerConfig(image_size=32, patch_size=8, num_tags=7, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.2)
        ),
    ],
)
def test_frozen_body_gets_no_gradient_no_update_no_state_and_keeps_its_ema(make) -> None:
    """Head-only steps: the body's tensors, its EMA and the optimizer state stay untouched (weight decay
    included); its modules run in eval mode (no stochastic depth); unfreezing trains it again."""
    torch.manual_seed(0)
    model = make().train()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("tag_head.", "rating_head."))}
    optimizer = torch.optim.AdamW(param_groups(model, 0.5, 1.0, base_lr=1e-2), lr=1e-2, fused=True)
    ema = ModelEma(model, 0.5)
    model.set_body_frozen(True)
    assert not any(m.training for name, m in model.named_modules() if name and not name.startswith(("tag_head", "rating_head")))
    x = torch.randn(4, 3, 32, 32)
    for step in range(3):
        out = model(x)
        (out["tag_logits"].square().mean() + out["rating_logits"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in body.items())
    assert all(torch.equal(ema.shadow[k], v.float()) for k, v in body.items() if v.is_floating_point())
    trained = {id(p) for p in optimizer.state}
    assert trained == {id(p) for p in (*model.tag_head.parameters(), *model.rating_head.parameters())}
    model.set_body_frozen(False)
    assert all(m.training for m in model.modules())
    out = model(x)
    (out["tag_logits"].square().mean()).backward()
    optimizer.step()
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in body.items())


def test_freeze_schedule_is_a_function_of_the_step() -> None:
    cfg = load_config(None, ["training.freeze_body_steps=3"])
    assert [body_frozen_at(cfg, s) for s in range(5)] == [True, True, True, False, False]
    cfg.training.freeze_body_steps = -1
    assert all(body_frozen_at(cfg, s) for s in (0, 10, 10**6))
    cfg.training.freeze_body_steps = 0
    assert not body_frozen_at(cfg, 0)


@pytest.mark.parametrize("family", ["vit", "eva02", "swinv2", "convnext"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(family: str) -> None:
    torch.manual_seed(0)
    model = TimmTagger(_cfg(family)).train()
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(1)
    assert twin.cfg.grad_checkpoint_every == 1 and model.cfg.grad_checkpoint_every == 0
    x = _images(family, 2)
    results = []
    for m in (model, twin):
        out = m(x)
        loss = out["tag_logits"].square().sum() + out["rating_logits"].sum()
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dynamic_img_size_gives_the_same_outputs_at_the_native_size() -> None:
    """What progressive resolution switches on for a fixed-size timm model changes nothing at full size."""
    torch.manual_seed(0)
    fixed = TimmTagger(_cfg("eva02")).eval()
    dynamic = TimmTagger(_cfg("eva02", dynamic_img_size=True)).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = _images("eva02")
    with torch.no_grad():
        assert torch.equal(fixed(x)["tag_logits"], dynamic(x)["tag_logits"])
        assert dynamic(torch.randn(1, 3, 24, 24))["tag_logits"].shape == (1, 7)
    assert input_size_error(_cfg("eva02"), 24) is not None and input_size_error(_cfg("eva02", dynamic_img_size=True), 24) is None


def _timm_run(*sets: str):
    return load_config(None, ["model.family=timm", "model.drop_path_rate=0", *sets])


def test_run_config_from_timm_keys_and_progressive_resolution() -> None:
    """model.timm_architecture: img_size follows data.image_size; progressive resolution turns on
    dynamic_img_size for a fixed-size model, keeps a convolutional one as it is, refuses one that cannot."""
    vit_args = "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}"
    cfg = timm_model_config(
        _timm_run("data.image_size=32", "model.timm_architecture=vit_base_patch16_224", f"model.timm_model_args={vit_args}"), 5, None
    )
    assert cfg.model_args["img_size"] == 32 and not cfg.dynamic_img_size and cfg.input_channels == "rgb"
    progressive = _timm_run(
        "data.image_size=32", "data.progressive_image_size=16", "model.timm_architecture=vit_base_patch16_224", f"model.timm_model_args={vit_args}"
    )
    assert timm_model_config(progressive, 5, None).dynamic_img_size
    conv = _timm_run("data.image_size=64", "data.progressive_image_size=32", "model.timm_architecture=convnext_atto")
    assert not timm_model_config(conv, 5, None).dynamic_img_size
    mixer = _timm_run("data.image_size=224", "data.progressive_image_size=160", "model.timm_architecture=mixer_s16_224")
    with pytest.raises(ValueError, match="cannot train at another resolution"):
        timm_model_config(mixer, 5, None)
    with pytest.raises(ValueError, match="must be a multiple of vit_base_patch16_224's patch size 8"):
        timm_model_config(
            _timm_run(
                "data.image_size=32",
                "data.progressive_image_size=20",
                "model.timm_architecture=vit_base_patch16_224",
                f"model.timm_model_args={vit_args}",
            ),
            5,
            None,
        )
    with pytest.raises(ValueError, match="data.image_size=40: timm model mixer_s16_224"):
        timm_model_config(_timm_run("data.image_size=40", "model.timm_architecture=mixer_s16_224", "model.timm_model_args={img_size: 224}"), 5, None)
