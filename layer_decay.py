"""Layer-wise learning-rate decay (BEiT / timm) for `SimplifiedTagger`, combined with its weight-decay split.

Fine-tuning a pretrained ViT moves the early layers less than the late ones: for L blocks, layer
id 0 is the embeddings (patch_embed, cls_token, pos_embed), block i is layer i + 1, the final
norm is layer L (with the last block) and the tag and rating heads are layer L + 1. A parameter
of layer l trains at lr * decay ** (L + 1 - l), so the heads keep the full rate and the patch
embedding gets decay ** (L + 1). This is exactly the grouping timm's `param_groups_layer_decay`
gives a timm VisionTransformer (tests compare the two): its `group_matcher` puts `norm` in
MATCH_PREV_GROUP, i.e. with the last block. BEiT's original `get_num_layer_for_vit` differs
only there (its final norm is layer L + 1, full rate); we follow timm so that recipes tuned
with timm's `--layer-decay` carry over.

Which parameters get weight decay is not decided here: the rule is
`model_architecture.param_groups_for_weight_decay` (biases, norms, LayerScale, pos_embed and
cls_token get none), read back by parameter identity so the two can never disagree. It imports
only `model_architecture`.
"""

from __future__ import annotations

import math
from typing import Any

from model_architecture import SimplifiedTagger, param_groups_for_weight_decay

__all__ = ["EMBEDDING_NAMES", "FINAL_NORM_NAME", "HEAD_NAMES", "layer_id", "layer_assignment", "param_groups_layer_decay"]

# Top-level names of SimplifiedTagger's parameters before the blocks (layer 0), of the final norm
# (layer L, timm's MATCH_PREV_GROUP) and of the heads (layer L + 1).
EMBEDDING_NAMES: tuple[str, ...] = ("patch_embed", "cls_token", "pos_embed")
FINAL_NORM_NAME = "norm"
HEAD_NAMES: tuple[str, ...] = ("tag_head", "rating_head")


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter name: 0 embeddings, i + 1 for blocks.i, depth for the final norm, depth + 1 heads.

    ValueError for any other top-level name, so a new module cannot silently train at full rate.
    """
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


def layer_assignment(model: SimplifiedTagger, layer_decay: float) -> dict[str, tuple[int, bool, float]]:
    """Per trainable parameter name: (layer id, gets weight decay, lr scale), in named_parameters order."""
    if not (0.0 < layer_decay <= 1.0 and math.isfinite(layer_decay)):
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    depth = len(model.blocks)
    # The weight-decay rule's own split (decay group first); 1.0 is only a marker value here.
    decay_group, _ = param_groups_for_weight_decay(model, 1.0)
    decayed = {id(p) for p in decay_group["params"]}
    out: dict[str, tuple[int, bool, float]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            layer = layer_id(name, depth)
            out[name] = (layer, id(param) in decayed, layer_decay ** (depth + 1 - layer))
    return out


def param_groups_layer_decay(model: SimplifiedTagger, weight_decay: float, layer_decay: float, base_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups per (layer, decay or not): params, weight_decay, lr_scale, layer and, with base_lr, lr.

    Groups run from the heads (layer L + 1, scale 1) down to the embeddings, decay group first, so
    group 0 trains at the base rate and train_direct's logged `get_last_lr()[0]` keeps meaning the
    schedule's lr. With `base_lr` each group's "lr" is
    base_lr * lr_scale, so a scheduler that scales every group's initial lr (torch LRScheduler's
    base_lrs, as schedulers.py does) keeps the ratios for the whole run.
    """
    params = dict(model.named_parameters())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, (layer, decays, scale) in layer_assignment(model, layer_decay).items():
        group = groups.setdefault(
            (layer, decays), {"params": [], "weight_decay": float(weight_decay) if decays else 0.0, "lr_scale": scale, "layer": layer}
        )
        group["params"].append(params[name])
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]
    if base_lr is not None:
        for group in ordered:
            group["lr"] = float(base_lr) * group["lr_scale"]
    return ordered
