"""Release-shaped folders built with timm itself, and the reference recipe that reads them.

`write_release` writes what SmilingWolf's wd-*-tagger-v3 releases publish: the verbatim config.json
of the release (num_classes and, for a shrunk copy, model_args / input_size / num_features changed),
model.safetensors from `timm.create_model` with random weights, and a selected_tags.csv of rating
(9), general (0) and character (4) rows. `reference_probabilities` is the reference code's recipe
(wdv3-timm, ComfyUI-WD-Timm-Tagger): `timm.create_model("local-dir:FOLDER", pretrained=True)`,
RGBA composited on white, padded to a square with white, timm's eval transform from the
pretrained_cfg (bicubic resize), channels RGB -> BGR, sigmoid.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

PRETRAINED_CFG: dict[str, Any] = {
    "custom_load": False,
    "input_size": [3, 448, 448],
    "fixed_input_size": False,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "num_classes": 10861,
    "pool_size": None,
    "first_conv": None,
    "classifier": None,
}

# config.json of the four WD v3 releases, key order as published (wd-vit-tagger-v3 verbatim; the
# others differ in architecture, num_features, model_args and, for ConvNeXt, no top-level global_pool).
RELEASE_CONFIGS: dict[str, dict[str, Any]] = {
    "wd-vit-tagger-v3": {
        "architecture": "vit_base_patch16_224",
        "num_classes": 10861,
        "num_features": 768,
        "global_pool": "avg",
        "model_args": {"img_size": 448, "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"},
        "pretrained_cfg": PRETRAINED_CFG,
    },
    "wd-eva02-large-tagger-v3": {
        "architecture": "eva02_large_patch14_448",
        "num_classes": 10861,
        "num_features": 1024,
        "global_pool": "avg",
        "model_args": {"img_size": 448, "ref_feat_shape": [32, 32]},
        "pretrained_cfg": PRETRAINED_CFG,
    },
    "wd-swinv2-tagger-v3": {
        "architecture": "swinv2_base_window8_256",
        "num_classes": 10861,
        "num_features": 1024,
        "global_pool": "avg",
        "model_args": {"act_layer": "gelu_tanh", "img_size": 448, "window_size": 14},
        "pretrained_cfg": PRETRAINED_CFG,
    },
    "wd-convnext-tagger-v3": {
        "architecture": "convnext_base",
        "num_classes": 10861,
        "num_features": 1024,
        "model_args": {"act_layer": "gelu_tanh"},
        "pretrained_cfg": PRETRAINED_CFG,
    },
}

# Shrunk copies for training tests: fewer blocks, narrower, 32 px input (the release's own arguments kept).
SHRINK: dict[str, tuple[dict[str, Any], int, int]] = {  # model_args overrides, input size, num_features
    "wd-vit-tagger-v3": ({"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}, 32, 64),
    "wd-eva02-large-tagger-v3": ({"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "ref_feat_shape": [4, 4]}, 32, 64),
    "wd-swinv2-tagger-v3": ({"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}, 64, 128),
    "wd-convnext-tagger-v3": ({"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64]}, 64, 64),
}

RATINGS = ("general", "sensitive", "questionable", "explicit")


def release_config(name: str, num_classes: int, shrink: bool) -> dict[str, Any]:
    """The release's config.json for a head of num_classes rows (shrunk: SHRINK's arguments and size)."""
    config = copy.deepcopy(RELEASE_CONFIGS[name])
    config["num_classes"] = num_classes
    config["pretrained_cfg"]["num_classes"] = num_classes
    if shrink:
        overrides, size, features = SHRINK[name]
        config["model_args"].update(overrides)
        config["pretrained_cfg"]["input_size"] = [3, size, size]
        config["num_features"] = features
    return config


def write_release(
    folder: Path, name: str, general: list[str], character: list[str], *, shrink: bool = True, seed: int = 0, bias_std: float = 1.0
) -> Path:
    """A release-shaped folder (config.json, model.safetensors, selected_tags.csv) with random timm weights."""
    import timm

    folder.mkdir(parents=True, exist_ok=True)
    num_classes = len(RATINGS) + len(general) + len(character)
    config = release_config(name, num_classes, shrink)
    torch.manual_seed(seed)
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=num_classes, **config["model_args"])
    with torch.no_grad():  # spread logits: timm zero-inits classifier biases (and ConvNeXt scales its head)
        classifier = model.get_classifier()
        classifier.weight.normal_(0.0, 0.05)
        classifier.bias.normal_(0.0, bias_std)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        rows = [(r, 9) for r in RATINGS] + [(g, 0) for g in general] + [(c, 4) for c in character]
        for i, (tag, category) in enumerate(rows):
            writer.writerow([i, tag, category, 1000 - i])
    return folder


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Test images of several shapes and modes: non-square RGBA with soft alpha, palette, RGB, grey."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(61, 40, "RGBA"), (30, 75, "RGB"), (128, 128, "RGB"), (90, 33, "P"), (47, 47, "L"), (300, 190, "RGBA")]
    paths = []
    for i in range(count):
        w, h, mode = sizes[i % len(sizes)]
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 4), dtype=np.uint8)  # smooth-ish content, not pure noise
        image = Image.fromarray(base, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
        if mode != "RGBA":
            image = image.convert("RGB").quantize(32) if mode == "P" else image.convert(mode)
        path = folder / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def _ensure_rgb(image: Image.Image) -> Image.Image:
    """wdv3-timm's pil_ensure_rgb: RGB, RGBA composited on white."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    return image


def _pad_square(image: Image.Image) -> Image.Image:
    """wdv3-timm's pil_pad_square: white canvas, the image centred."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def reference_probabilities(folder: Path, images: list[Path]) -> torch.Tensor:
    """The reference recipe's sigmoid outputs (N, num_classes), in selected_tags.csv order."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model.pretrained_cfg, model=model))
    batch = torch.stack([transform(_pad_square(_ensure_rgb(Image.open(p)))) for p in images])  # (N, 3, S, S) RGB
    with torch.no_grad():
        return torch.sigmoid(model(batch[:, [2, 1, 0]]))  # the reference feeds BGR
