"""The optimizer's parameter groups for both backbone families: weight decay, layer-wise LR decay, the body's LR scale.

Fine-tuning a pretrained model moves the early layers less than the late ones (BEiT / timm
layer-wise decay): a parameter of layer l of a model whose heads are layer H trains at
lr * decay ** (H - l), so the heads keep the full rate. For `SimplifiedTagger` with L blocks,
layer 0 is the embeddings (patch_embed, cls_token, pos_embed), block i is layer i + 1, the final
norm is layer L (with the last block) and the heads are layer L + 1: exactly the grouping timm's
`param_groups_layer_decay` gives a timm VisionTransformer (tests compare the two; its
`group_matcher` puts `norm` in MATCH_PREV_GROUP). BEiT's original `get_num_layer_for_vit` differs
only there (its final norm is layer L + 1, full rate); we follow timm so that recipes tuned with
timm's `--layer-decay` carry over. For `TimmTagger` the layers are timm's own grouping of the
architecture (`TimmTagger.layer_ids`: `group_matcher(coarse=False)`, the heads with timm's
classifier), so every timm family (ViT, EVA02, SwinV2, ConvNeXt) is split as timm splits it.

`body_lr_scale` multiplies the rate of everything but the two heads (fine-tuning a release: the
body at a lower learning rate than its new head).

Which parameters get weight decay is each family's rule, read back by parameter identity so the
two can never disagree: `model_architecture.param_groups_for_weight_decay` (biases, norms,
LayerScale, pos_embed and cls_token get none) and `TimmTagger.weight_decay_flags` (timm's: 1-D
tensors and the model's `no_weight_decay()` names). `param_groups` is the one entry point
(training_setup.build_step): two groups (decay, no decay) when neither scaling is on, the
checkpoint layout of every earlier run. It imports model_architecture and timm_tagger.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from model_architecture import HEAD_PREFIXES, SimplifiedTagger, param_groups_for_weight_decay
from timm_tagger import TimmTagger

__all__ = [
    "EMBEDDING_NAMES",
    "FINAL_NORM_NAME",
    "HEAD_NAMES",
    "layer_id",
    "layer_assignment",
    "param_groups",
    "param_groups_layer_decay",
    "weight_decay_flags",
]

# Top-level names of SimplifiedTagger's parameters before the blocks (layer 0), of the final norm
# (layer L, timm's MATCH_PREV_GROUP) and of the heads (layer L + 1).
EMBEDDING_NAMES: tuple[str, ...] = ("patch_embed", "cls_token", "pos_embed")
FINAL_NORM_NAME = "norm"
HEAD_NAMES: tuple[str, ...] = ("tag_head", "rating_head")


def layer_id(name: str, depth: int) -> int:
    """Layer of a SimplifiedTagger parameter name: 0 embeddings, i + 1 for blocks.i, depth for the final
    norm, depth + 1 heads. ValueError for any other top-level name, so a new module cannot silently train at full rate."""
    top = name.split(".", 1)[0]
    if top in EMBEDDING_NAMES:
        return 0
    if top == "blocks":
        index = int(name.split(".")[1])
        if not 0 <= index < depth:
            raise ValueError(f"parameter {name!r} names block {index}, outside [0, {depth})")
        return index + 1
    if top == FINAL_NORM_NAME:
        return depth
    if top in HEAD_NAMES:
        return depth + 1
    raise ValueError(f"parameter {name!r} has no layer-decay layer; expected one of {EMBEDDING_NAMES + ('blocks', FINAL_NORM_NAME) + HEAD_NAMES}")


def weight_decay_flags(model: nn.Module) -> dict[str, bool]:
    """Per trainable parameter name: whether AdamW decays it, by the model family's own rule."""
    if isinstance(model, TimmTagger):
        flags = model.weight_decay_flags()
        return {name: flags[name] for name, param in model.named_parameters() if param.requires_grad}
    decay_group, _ = param_groups_for_weight_decay(model, 1.0)  # 1.0 is only a marker value here
    decayed = {id(p) for p in decay_group["params"]}
    return {name: id(param) in decayed for name, param in model.named_parameters() if param.requires_grad}


def _layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter name and the heads' (top) layer, by family."""
    if isinstance(model, TimmTagger):
        return model.layer_ids()
    if not isinstance(model, SimplifiedTagger):
        raise ValueError(f"no layer grouping for {type(model).__name__}")
    depth = len(model.blocks)
    return {name: layer_id(name, depth) for name, _ in model.named_parameters()}, depth + 1


def layer_assignment(model: nn.Module, layer_decay: float, body_lr_scale: float = 1.0) -> dict[str, tuple[int, bool, float]]:
    """Per trainable parameter name: (layer id, gets weight decay, lr scale), in named_parameters order.
    lr scale = layer_decay ** (top - layer), times body_lr_scale for everything but the heads."""
    for name, value in (("layer_decay", layer_decay), ("body_lr_scale", body_lr_scale)):
        if not (0.0 < value <= 1.0 and math.isfinite(value)):
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    layers, top = _layers(model)
    flags = weight_decay_flags(model)
    out: dict[str, tuple[int, bool, float]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = layer_decay ** (top - layers[name]) * (1.0 if name.startswith(HEAD_PREFIXES) else body_lr_scale)
            out[name] = (layers[name], flags[name], scale)
    return out


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float, base_lr: float | None = None, body_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups per (layer, heads or body, decay or not): params, weight_decay, lr_scale, layer and, with base_lr, lr.

    Groups run from the heads (top layer, scale 1) down to the embeddings, decay group first, so
    group 0 trains at the base rate and train_direct's logged `get_last_lr()[0]` keeps meaning the
    schedule's lr. With `base_lr` each group's "lr" is base_lr * lr_scale, so a scheduler that
    scales every group's initial lr (torch LRScheduler's base_lrs, as schedulers.py does) keeps
    the ratios for the whole run.
    """
    params = dict(model.named_parameters())
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, (layer, decays, scale) in layer_assignment(model, layer_decay, body_lr_scale).items():
        key = (layer, name.startswith(HEAD_PREFIXES), decays)
        group = groups.setdefault(key, {"params": [], "weight_decay": float(weight_decay) if decays else 0.0, "lr_scale": scale, "layer": layer})
        group["params"].append(params[name])
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1], not k[2]))]
    if base_lr is not None:
        for group in ordered:
            group["lr"] = float(base_lr) * group["lr_scale"]
    return ordered


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float, base_lr: float, body_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's groups: layered (param_groups_layer_decay) when layer_decay or body_lr_scale is
    below 1, else two groups, decay then no decay (the layout of every run without them)."""
    if layer_decay < 1.0 or body_lr_scale < 1.0:
        return param_groups_layer_decay(model, weight_decay, layer_decay, base_lr=base_lr, body_lr_scale=body_lr_scale)
    flags = weight_decay_flags(model)
    decay = [p for name, p in model.named_parameters() if p.requires_grad and flags[name]]
    no_decay = [p for name, p in model.named_parameters() if p.requires_grad and not flags[name]]
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
