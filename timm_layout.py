"""timm's model-folder layout for a WD tagger: config.json + model.safetensors, written and read back.

Our `SimplifiedTagger` is timm's `VisionTransformer` with these arguments (same parameter names,
LayerNorm eps 1e-6, exact GELU, fused qkv, pre-norm blocks, learned position embedding with a
class-token slot): `class_token=True, no_embed_class=False, fc_norm=False` and
`global_pool="token"` (our cls pooling) or `"avg"` (our avg pooling: the final norm before the
mean, hence `fc_norm=False`), `init_values` = our LayerScale. Our two heads become timm's one
`head` of 4 + T rows in selected_tags.csv order, and the first convolution's input channels are
reversed so the model takes BGR input like SmilingWolf's WD v3 timm models (whose app flips
RGB -> BGR after timm's transform). So timm builds the exported model exactly:

    timm.create_model("local-dir:exports/X", pretrained=True)

or, naming the architecture and arguments from config.json yourself,
`timm.create_model(arch, pretrained=True, num_classes=N, **model_args,
pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=N))` (without num_classes in
the overlay timm drops the head as "another number of classes"). Outputs are logits (sigmoid for tags, softmax over the first four
for the rating). timm itself is not needed to write or read the folder.

A timm-family run (`TimmTagger`) is written as the WD v3 releases are (`timm_family_config`,
`timm_family_state_dict`): its architecture and model_args, the release's pretrained_cfg keys
(input size, interpolation, mean/std, crop_pct 1.0), the body's own state dict and the fused head
as timm's classifier (its key from the body's `get_classifier()`, e.g. `head`), rows in
selected_tags.csv order. It takes BGR input like the releases: a run that already takes BGR (one
initialised from a release) keeps its weights as they are, an RGB one has its first convolution's
input channels reversed. `timm.create_model("local-dir:FOLDER", pretrained=True)` builds it unchanged
and `wd_release.read_release` reads it back.

It imports model_architecture, timm_tagger and file_io (atomic writes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from file_io import atomic_write_text, replace_with_retry
from image_preprocess import PreprocessParams
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from timm_tagger import TimmTagger

__all__ = [
    "TIMM_CONFIG_FILE",
    "TIMM_WEIGHTS_FILE",
    "TimmFolder",
    "read_timm_folder",
    "is_vit_export",
    "ratings_are_softmax",
    "timm_config",
    "timm_family_config",
    "timm_family_state_dict",
    "timm_model_args",
    "timm_state_dict",
    "write_timm_folder",
]

TIMM_CONFIG_FILE = "config.json"
TIMM_WEIGHTS_FILE = "model.safetensors"
_FIRST_CONV = "patch_embed.proj.weight"

# Registered timm names for the standard ViT sizes at patch 16; other shapes use vit_base_patch16_224
# with every shape argument in model_args (the arguments override the name's defaults).
_ARCHITECTURES: dict[tuple[int, int, int], str] = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
}
_DEFAULT_ARCHITECTURE = "vit_base_patch16_224"
_OUR_TAG = "oppaioracle"  # pretrained_cfg tag of our ViT's exports (timm_config)
_FAMILY_TAG = "oppaioracle_timm"  # pretrained_cfg tag of our timm-family exports (timm_family_config)

# model_args our architecture can express, with the only values it supports (None = any value).
_SUPPORTED_ARGS: dict[str, Any] = {
    "img_size": None,
    "patch_size": None,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "mlp_ratio": None,
    "qkv_bias": None,
    "init_values": None,
    "global_pool": None,
    "num_classes": None,
    "class_token": True,
    "no_embed_class": False,
    "fc_norm": False,
    "reg_tokens": 0,
    "pre_norm": False,
    "final_norm": True,
    "qk_norm": False,
    "proj_bias": True,
    "pos_embed": "learn",
    "in_chans": 3,
    "dynamic_img_size": None,
    "dynamic_img_pad": False,
    "act_layer": "gelu",
    "pool_include_prefix": False,
    "drop_rate": None,
    "pos_drop_rate": None,
    "proj_drop_rate": None,
    "attn_drop_rate": None,
    "drop_path_rate": None,
    "patch_drop_rate": None,
    "weight_init": None,
}


def timm_model_args(cfg: VisionTransformerConfig) -> dict[str, Any]:
    """timm VisionTransformer keyword arguments that build our architecture exactly."""
    return {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": float(cfg.mlp_ratio),
        "qkv_bias": bool(cfg.qkv_bias),
        "init_values": cfg.layer_scale_init,
        "class_token": True,
        "no_embed_class": False,
        "global_pool": "token" if cfg.pooling == "cls" else "avg",
        "fc_norm": False,
    }


def timm_config(
    cfg: VisionTransformerConfig, label_names: Sequence[str], mean: Sequence[float], std: Sequence[float], *, description: str = ""
) -> dict[str, Any]:
    """config.json for timm (hub layout): architecture, num_classes, model_args, pretrained_cfg, label_names."""
    args = timm_model_args(cfg)
    size = cfg.image_size
    return {
        "architecture": _ARCHITECTURES.get((cfg.embed_dim, cfg.depth, cfg.num_heads), _DEFAULT_ARCHITECTURE),
        "num_classes": len(label_names),
        "num_features": cfg.embed_dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "tag": _OUR_TAG,
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "num_classes": len(label_names),
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "description": description or "OppaiOracle multi-label tagger (WD-tagger layout)",
            "notes": [
                (
                    "Input: the image padded to a square with white, resized, normalised with mean/std, "
                    "channels in BGR order (x[:, [2, 1, 0]] after timm's transform), as WD v3 taggers."
                ),
                "Output: logits; sigmoid for the tags, softmax over the first four (the rating).",
            ],
        },
        "label_names": list(label_names),
    }


def timm_state_dict(backbone: SimplifiedTagger, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """timm state dict: our backbone (same key names), first conv taking BGR, the fused head as `head`."""
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.backbone_state_dict().items()}
    # (C, 3, p, p): reversing the input channels makes the model read BGR exactly (a permutation).
    state[_FIRST_CONV] = state[_FIRST_CONV].flip(1).contiguous()
    state["head.weight"] = head.weight.detach().cpu().contiguous()
    state["head.bias"] = head.bias.detach().cpu().contiguous()
    return state


def _classifier_name(model: TimmTagger) -> str:
    """The module name of timm's classifier in the body (e.g. "head", "head.fc"): where the fused head's rows go."""
    classifier = model.body.get_classifier()
    for name, module in model.body.named_modules():
        if module is classifier:
            return name
    raise ValueError(f"timm model {model.cfg.architecture}: its classifier is not a submodule of the body")


def timm_family_config(model: TimmTagger, label_names: Sequence[str], preprocess: PreprocessParams, *, description: str = "") -> dict[str, Any]:
    """config.json of a timm-family tagger in the WD v3 releases' layout (architecture, model_args, pretrained_cfg)."""
    cfg = model.cfg
    size = cfg.image_size
    config: dict[str, Any] = {"architecture": cfg.architecture, "num_classes": len(label_names), "num_features": int(model.num_features)}
    pool = getattr(model.body, "global_pool", None)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    config["model_args"] = dict(cfg.model_args)
    config["pretrained_cfg"] = {
        "tag": _FAMILY_TAG,
        "custom_load": False,
        "input_size": [3, size, size],
        "fixed_input_size": False,
        "interpolation": preprocess.resample,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [float(v) for v in preprocess.mean],
        "std": [float(v) for v in preprocess.std],
        "num_classes": len(label_names),
        "pool_size": None,
        "first_conv": None,
        "classifier": None,
        "description": description or "OppaiOracle multi-label tagger (WD v3 layout)",
        "notes": [
            "Input: the image padded to a square with white, resized, normalised with mean/std, channels in BGR order "
            "(x[:, [2, 1, 0]] after timm's transform), as the WD v3 taggers.",
            "Output: logits; sigmoid for the tags, softmax over the first four (the rating).",
        ],
    }
    config["label_names"] = list(label_names)
    return config


def timm_family_state_dict(model: TimmTagger, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """timm's state dict of the body taking BGR input, with the fused head (4 + T rows) as its classifier."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone_state_dict().items()}
    if model.cfg.input_channels == "rgb":
        first = model.body.pretrained_cfg.get("first_conv") if isinstance(getattr(model.body, "pretrained_cfg", None), dict) else None
        key = f"{first}.weight" if first else ""
        if key not in state or state[key].ndim != 4 or state[key].shape[1] != 3:
            raise ValueError(f"timm model {model.cfg.architecture}: no 3-channel first convolution ({key or 'unnamed'}) to take BGR input")
        state[key] = state[key].flip(1).contiguous()  # (C, 3, k, k): reversed input channels read BGR exactly
    classifier = _classifier_name(model)
    state[f"{classifier}.weight"] = head.weight.detach().cpu().contiguous()
    state[f"{classifier}.bias"] = head.bias.detach().cpu().contiguous()
    return state


def write_timm_folder(folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Write config.json and model.safetensors into `folder` (each through a temp file and os.replace)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{TIMM_WEIGHTS_FILE}.tmp"
    save_file(dict(state), str(tmp), metadata={"format": "pt"})
    replace_with_retry(tmp, folder / TIMM_WEIGHTS_FILE)
    atomic_write_text(folder / TIMM_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))


def _pretrained_tag(folder: str | Path) -> object:
    """config.json's pretrained_cfg.tag (None when absent); ValueError naming config.json when it is not a JSON object."""
    path = Path(folder) / TIMM_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the top level must be an object")
    pretrained = config.get("pretrained_cfg")
    return pretrained.get("tag") if isinstance(pretrained, dict) else None


def is_vit_export(folder: str | Path) -> bool:
    """Whether a timm-layout folder is one of our ViT's exports (timm_config's pretrained_cfg tag), which
    read_timm_folder reads into our ViT; any other (a WD release, a timm-family export) is timm's to build.
    ValueError naming config.json when it is not a JSON object."""
    return _pretrained_tag(folder) == _OUR_TAG


def ratings_are_softmax(folder: str | Path) -> bool:
    """Whether a timm-layout folder's four rating outputs are read with a softmax: our exports (either family) train
    the rating as one choice; a released WD tagger's are sigmoid outputs like its tags (ValueError as is_vit_export)."""
    return _pretrained_tag(folder) in (_OUR_TAG, _FAMILY_TAG)


@dataclass
class TimmFolder:
    """A timm-layout tagger read back into our layout."""

    cfg: VisionTransformerConfig  # our architecture (num_tags = outputs after the ratings)
    backbone: dict[str, torch.Tensor]  # our key names, first conv taking RGB again
    head_weight: torch.Tensor  # (4 + T, C), rows in the folder's output order
    head_bias: torch.Tensor  # (4 + T,)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _check_model_args(args: Mapping[str, Any], source: str) -> None:
    """Refuse model_args our architecture cannot reproduce; ValueError names each one."""
    problems = []
    for key, value in args.items():
        if key not in _SUPPORTED_ARGS:
            problems.append(f"{key}={value!r} (not an argument our ViT has)")
            continue
        allowed = _SUPPORTED_ARGS[key]
        if allowed is not None and value != allowed:
            problems.append(f"{key}={value!r} (ours: {allowed!r})")
    pool = args.get("global_pool", "token")
    if pool not in ("token", "avg"):
        problems.append(f"global_pool={pool!r} (ours: 'token' or 'avg')")
    if pool == "avg" and args.get("fc_norm", None) is not False:
        problems.append("global_pool='avg' with timm's default fc_norm (a norm after pooling; ours norms before)")
    if problems:
        raise ValueError(f"{source}: this timm model cannot be loaded into our ViT exactly: " + "; ".join(problems))


def _our_config(
    config: Mapping[str, Any], args: Mapping[str, Any], state: Mapping[str, torch.Tensor], pretrained: Mapping[str, Any], source: str
) -> VisionTransformerConfig:
    """Our VisionTransformerConfig from the weights' shapes, model_args and the architecture's defaults."""
    embed_dim, _, patch, _ = state[_FIRST_CONV].shape  # (C, 3, p, p)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * embed_dim
    defaults = {name: shape for shape, name in _ARCHITECTURES.items()}.get(str(config.get("architecture", "")))
    num_heads = args.get("num_heads", defaults[2] if defaults and defaults[0] == embed_dim else None)
    if num_heads is None:
        raise ValueError(
            f"{source}: model_args has no num_heads and the architecture {config.get('architecture')!r} does not fix it for width {embed_dim}"
        )
    for key, found in (("embed_dim", embed_dim), ("patch_size", patch), ("depth", depth)):
        if key in args and int(args[key]) != found:
            raise ValueError(f"{source}: model_args {key}={args[key]} but the weights have {found}")
    num_outputs = state["head.weight"].shape[0]
    if num_outputs <= 4:
        raise ValueError(f"{source}: the head has {num_outputs} outputs; a WD tagger has 4 ratings plus tags")
    image_size = args.get("img_size", (pretrained.get("input_size") or [3, 224, 224])[-1])
    try:
        return VisionTransformerConfig(
            image_size=int(image_size[-1] if isinstance(image_size, (list, tuple)) else image_size),
            patch_size=int(patch),
            num_tags=num_outputs - 4,
            embed_dim=int(embed_dim),
            depth=depth,
            num_heads=int(num_heads),
            mlp_ratio=hidden / embed_dim,
            qkv_bias="blocks.0.attn.qkv.bias" in state,
            layer_scale_init=1.0 if "blocks.0.ls1.gamma" in state else None,  # gamma itself is loaded
            pooling="avg" if args.get("global_pool", "token") == "avg" else "cls",
        )
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def read_timm_folder(folder: str | Path) -> TimmFolder:
    """Read config.json + model.safetensors of a timm-layout ViT tagger; ValueError when it is not our architecture."""
    folder = Path(folder)
    config_path = folder / TIMM_CONFIG_FILE
    weights_path = folder / TIMM_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a timm-layout model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_args", {}), dict):
        raise ValueError(f"{config_path}: expected an object with an object 'model_args'")
    args = dict(config.get("model_args", {}))
    _check_model_args(args, str(config_path))
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    for key in (_FIRST_CONV, "pos_embed", "head.weight", "head.bias"):
        if key not in state:
            raise ValueError(f"{weights_path}: no {key!r} tensor; not a timm ViT with a classifier head")
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    cfg = _our_config(config, args, state, pretrained, str(config_path))
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    backbone[_FIRST_CONV] = backbone[_FIRST_CONV].flip(1).contiguous()  # back to RGB input
    mean = tuple(float(v) for v in pretrained.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(v) for v in pretrained.get("std", (0.5, 0.5, 0.5)))
    return TimmFolder(cfg, backbone, state["head.weight"], state["head.bias"], mean, std)  # type: ignore[arg-type]
