"""A released WD v3 tagger folder, read as untrusted data: config.json + model.safetensors + selected_tags.csv.

SmilingWolf's wd-*-tagger-v3 releases (ViT, EVA02, SwinV2, ConvNeXt) are timm folders: config.json
names the timm `architecture` with its `model_args`, `num_classes` outputs and the `pretrained_cfg`
(input_size, mean, std, interpolation); model.safetensors is timm's state dict, whose classifier
has one row per selected_tags.csv row (the four ratings first, category 9; then general 0; then
character 4); model.onnx may sit next to them. The reference code (wdv3-timm,
ComfyUI-WD-Timm-Tagger) feeds RGBA composited on white, padded to a square with white, resized
bicubic to input_size, normalised with mean/std, then the channels reordered RGB -> BGR, and reads
logits (sigmoid per tag).

This module reads such a folder: `read_release_config` validates config.json (ValueError naming
the file and the key), `read_release` adds the labels and the weights, split into the body (timm's
keys, loaded strictly) and the classifier's rows by tag name. The input convention becomes our
terms: `ReleaseConfig.preprocess()` (pad_then_resize, white, the release's size, mean, std and
filter: our pipeline then produces the reference's pixels) and `input_channels="bgr"` on the
`TimmTaggerConfig` (the flip in TimmTagger.forward). `release_layout` / `release_problem` tell a
release folder, a WD v2 (ONNX-only) release or an incomplete download from a checkpoint, so that
a user who passes one where a checkpoint is expected hears what it is.

Our own exports are the same layout (plus export_report.json, whose calibration shifts
`remove_calibration=True` takes out of the head bias again). It imports model_architecture,
timm_tagger, image_preprocess, wd_format and timm_layout (file names).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from file_io import load_json_file
from image_preprocess import PreprocessParams
from timm_layout import TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE
from timm_tagger import TimmTagger, TimmTaggerConfig, timm_body
from wd_format import CATEGORY_CHARACTER, LABELS_FILE, ONNX_FILE, RATING_NAMES, REPORT_FILE, LabelTable

__all__ = [
    "TRAINING_ONLY_ARGS",
    "ReleaseConfig",
    "WdRelease",
    "calibration_shifts",
    "label_categories",
    "tag_bias",
    "read_release",
    "read_release_config",
    "read_release_labels",
    "release_layout",
    "release_problem",
]

RELEASE_PAD_COLOR = (255, 255, 255)
_FILTERS = ("bicubic", "bilinear", "lanczos")  # pretrained_cfg interpolations our pipeline has
# model_args that change how a model trains, not the weights' layout: the run's own config decides them.
TRAINING_ONLY_ARGS = ("drop_path_rate", "dynamic_img_size")
NUM_RATINGS = len(RATING_NAMES)


def release_layout(path: str | Path) -> str | None:
    """What a folder holds: "wd_v3" (config.json + model.safetensors + selected_tags.csv), "onnx_only"
    (selected_tags.csv + model.onnx, no weights: a WD v2 release), "no_weights" (config.json and
    selected_tags.csv without model.safetensors), "no_labels" (a timm folder without
    selected_tags.csv); None for anything else (e.g. a checkpoint folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    has = {name: (folder / name).is_file() for name in (TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE, LABELS_FILE, ONNX_FILE)}
    if has[LABELS_FILE] and has[TIMM_CONFIG_FILE] and has[TIMM_WEIGHTS_FILE]:
        return "wd_v3"
    if has[LABELS_FILE] and has[TIMM_CONFIG_FILE]:
        return "no_weights"
    if has[LABELS_FILE] and has[ONNX_FILE]:
        return "onnx_only"
    if has[TIMM_CONFIG_FILE] and has[TIMM_WEIGHTS_FILE]:
        return "no_labels"
    return None


def release_problem(path: str | Path) -> str | None:
    """Why a release-shaped folder cannot give a model (one line naming what is missing), None when it can
    or when it is no release at all."""
    folder = Path(path)
    layout = release_layout(folder)
    if layout == "onnx_only":
        return (
            f"{folder} is a WD tagger release with only {ONNX_FILE} and {LABELS_FILE} (a WD v2 / ONNX-only release): "
            f"it has no {TIMM_WEIGHTS_FILE} and {TIMM_CONFIG_FILE}, the timm weights and architecture a model is built from; "
            "use a v3 release (SmilingWolf/wd-*-tagger-v3 publish both)"
        )
    if layout == "no_weights":
        return f"{folder} is a WD tagger release folder without {TIMM_WEIGHTS_FILE} (an incomplete download?): download it next to {TIMM_CONFIG_FILE}"
    if layout == "no_labels":
        return f"{folder} is a timm model folder ({TIMM_CONFIG_FILE} + {TIMM_WEIGHTS_FILE}) without {LABELS_FILE}: a tagger release names its outputs there"
    return None


def _number_list(value: Any, length: int, where: str) -> tuple[float, ...]:
    """A list of `length` finite numbers, else ValueError naming `where`."""
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where} must be a list of {length} numbers, got {value!r:.80}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{where} must hold finite numbers, got {value!r:.80}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ReleaseConfig:
    """config.json of a release, checked: the timm architecture, its arguments and the input convention."""

    path: Path
    architecture: str
    model_args: dict[str, Any]
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    num_features: int | None = None
    dropped_args: dict[str, Any] = field(default_factory=dict)  # TRAINING_ONLY_ARGS found in model_args

    @property
    def num_tags(self) -> int:
        """Outputs after the four ratings."""
        return self.num_classes - NUM_RATINGS

    def preprocess(self) -> PreprocessParams:
        """Our preprocessing that gives the reference recipe's pixels: white pad to a square, then the filter to input_size."""
        return PreprocessParams(
            image_size=self.image_size,
            pad_color=RELEASE_PAD_COLOR,
            mean=self.mean,
            std=self.std,
            resample=self.interpolation,
            layout="pad_then_resize",
        )

    def tagger_config(self, num_tags: int | None = None, **training: Any) -> TimmTaggerConfig:
        """The TimmTaggerConfig of this architecture taking BGR like the release (num_tags: the release's
        own by default; `training`: drop_path_rate, dynamic_img_size, grad_checkpoint_every, tag_bias_init)."""
        return TimmTaggerConfig(
            architecture=self.architecture,
            model_args=dict(self.model_args),
            num_tags=self.num_tags if num_tags is None else num_tags,
            num_ratings=NUM_RATINGS,
            image_size=self.image_size,
            input_channels="bgr",
            **training,
        )


def read_release_config(folder: str | Path) -> ReleaseConfig:
    """Read and check a release's config.json; ValueError naming the file and the key at fault."""
    path = Path(folder) / TIMM_CONFIG_FILE
    data = load_json_file(path, "a WD tagger release's config.json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be an object")
    architecture = data.get("architecture")
    if not isinstance(architecture, str) or not architecture.strip():
        raise ValueError(f"{path}: 'architecture' must name a timm model, got {architecture!r:.80}")
    args = data.get("model_args", {})
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'model_args' must be an object, got {type(args).__name__}")
    num_classes = data.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= NUM_RATINGS:
        raise ValueError(f"{path}: 'num_classes' must be an integer above {NUM_RATINGS} (ratings plus tags), got {num_classes!r:.80}")
    args = dict(args)
    if "num_classes" in args:
        if args.pop("num_classes") != num_classes:
            raise ValueError(f"{path}: 'model_args.num_classes' differs from 'num_classes' ({num_classes})")
    dropped = {key: args.pop(key) for key in TRAINING_ONLY_ARGS if key in args}
    pretrained = data.get("pretrained_cfg", {})
    if not isinstance(pretrained, dict):
        raise ValueError(f"{path}: 'pretrained_cfg' must be an object, got {type(pretrained).__name__}")
    size = pretrained.get("input_size", [3, 224, 224])
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"{path}: 'pretrained_cfg.input_size' must be [3, H, W] with positive integers, got {size!r:.80}")
    if size[0] != 3 or size[1] != size[2]:
        raise ValueError(f"{path}: 'pretrained_cfg.input_size' {size}: our pipeline feeds square 3-channel images")
    crop_pct = pretrained.get("crop_pct", 1.0)
    if crop_pct != 1.0:
        raise ValueError(f"{path}: 'pretrained_cfg.crop_pct' is {crop_pct!r}: the WD recipe resizes the padded square without cropping (1.0)")
    interpolation = pretrained.get("interpolation", "bicubic")
    if interpolation not in _FILTERS:
        raise ValueError(f"{path}: 'pretrained_cfg.interpolation' must be one of {_FILTERS}, got {interpolation!r:.80}")
    mean = _number_list(pretrained.get("mean", [0.5, 0.5, 0.5]), 3, f"{path}: 'pretrained_cfg.mean'")
    std = _number_list(pretrained.get("std", [0.5, 0.5, 0.5]), 3, f"{path}: 'pretrained_cfg.std'")
    if not all(s > 0 for s in std):
        raise ValueError(f"{path}: 'pretrained_cfg.std' must be positive, got {list(std)}")
    num_features = data.get("num_features")
    if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0):
        raise ValueError(f"{path}: 'num_features' must be a positive integer, got {num_features!r:.80}")
    try:  # the argument rules of our timm configs (JSON-plain values, nothing we set ourselves)
        TimmTaggerConfig(architecture=architecture, model_args=args, num_tags=num_classes - NUM_RATINGS, image_size=size[1])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return ReleaseConfig(path, architecture, args, num_classes, size[1], mean, std, interpolation, num_features, dropped)  # type: ignore[arg-type]


def read_release_labels(folder: str | Path) -> LabelTable:
    """selected_tags.csv of a release folder (rating rows checked)."""
    labels = LabelTable.read(Path(folder) / LABELS_FILE)
    if labels.ratings != RATING_NAMES:
        raise ValueError(f"{Path(folder) / LABELS_FILE}: rating rows {labels.ratings} are not {RATING_NAMES}")
    return labels


def label_categories(labels: LabelTable) -> dict[str, str]:
    """Our category of each release tag: "character" for the character block, else "general"."""
    codes = labels.tag_category_codes()
    names = [*labels.general, *labels.character]
    return {n: ("character" if c == CATEGORY_CHARACTER else "general") for n, c in zip(names, codes)}


def calibration_shifts(folder: Path) -> dict[str, float]:
    """Per-tag logit shifts one of our exports folded into its head (export_report.json), {} when there is none."""
    path = folder / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        shifts = json.loads(path.read_text(encoding="utf-8")).get("logit_shifts", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable export report ({exc})") from None
    if not isinstance(shifts, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in shifts.values()):
        raise ValueError(f"{path}: 'logit_shifts' must map tag names to numbers")
    return {str(k): float(v) for k, v in shifts.items()}


def tag_bias(head_bias: torch.Tensor, names: list[str], folder: Path, remove_calibration: bool) -> torch.Tensor:
    """The tag rows' biases (T,) float64 of a classifier bias (4 + T,): with remove_calibration, less
    the per-tag shifts one of our exports folded in (ValueError when the folder has none)."""
    bias = head_bias[NUM_RATINGS:].double().clone()  # (T,)
    if remove_calibration:
        shifts = calibration_shifts(folder)
        if not shifts:
            raise ValueError(f"{folder}: remove_calibration needs {REPORT_FILE} with 'logit_shifts'")
        bias -= torch.tensor([shifts.get(n, 0.0) for n in names], dtype=torch.float64)
    return bias


@dataclass
class WdRelease:
    """A release folder read: its config, labels, body weights (timm's keys) and classifier rows by tag name."""

    folder: Path
    config: ReleaseConfig
    labels: LabelTable
    body: dict[str, torch.Tensor]  # timm's state dict without the classifier
    tag_weight: dict[str, torch.Tensor]  # tag name -> classifier row (C,)
    tag_bias: dict[str, float]  # tag name -> classifier bias (calibration removed on request)
    rating_weight: torch.Tensor  # (4, C)
    rating_bias: torch.Tensor  # (4,)

    def tag_categories(self) -> dict[str, str]:
        """Our category of each release tag ("character" or "general")."""
        return label_categories(self.labels)

    def tagger_config(self, **training: Any) -> TimmTaggerConfig:
        """The release's own model: its architecture, its tags in selected_tags.csv order, BGR input."""
        return self.config.tagger_config(**training)

    def load_body(self, model: TimmTagger) -> None:
        """Copy the body weights into `model` exactly (strict: every key and shape); ValueError naming the folder."""
        result = model.body.load_state_dict(self.body, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{self.folder}: {TIMM_WEIGHTS_FILE} does not fit {self.config.architecture} with model_args {self.config.model_args}: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )

    def build_model(self) -> TimmTagger:
        """The release as a TimmTagger (tags in selected_tags.csv order): its outputs are the reference's logits."""
        model = TimmTagger(self.tagger_config())
        self.load_body(model)
        names = [*self.labels.general, *self.labels.character]
        with torch.no_grad():
            model.tag_head.weight.copy_(torch.stack([self.tag_weight[n] for n in names]))
            model.tag_head.bias.copy_(torch.tensor([self.tag_bias[n] for n in names], dtype=torch.float64))
            model.rating_head.weight.copy_(self.rating_weight)
            model.rating_head.bias.copy_(self.rating_bias)
        return model.eval()


def _classifier_keys(state: Mapping[str, torch.Tensor], config: ReleaseConfig, weights: Path) -> tuple[str, str]:
    """(weight, bias) keys of the classifier: the tensors timm's headless body does not have. ValueError
    when the body's tensors (names and shapes, from a meta-device build) are not all there."""
    try:
        body = timm_body(config.tagger_config(), device="meta").state_dict()
    except ValueError as exc:
        raise ValueError(f"{config.path}: {exc}") from None
    wrong = [k for k, v in body.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        found = tuple(state[k].shape) if k in state else "missing"
        raise ValueError(
            f"{weights} does not fit {config.architecture} with model_args {config.model_args}: {len(wrong)} body tensors "
            f"differ, e.g. {k} (expected {tuple(body[k].shape)}, found {found})"
        )
    extra = sorted(set(state) - set(body))
    weight = [k for k in extra if k.endswith("weight") and state[k].ndim == 2]
    bias = [k for k in extra if k.endswith("bias") and state[k].ndim == 1]
    if len(weight) != 1 or len(bias) != 1 or len(extra) != 2:
        raise ValueError(f"{weights}: expected one classifier weight and bias besides the {config.architecture} body, found {extra[:6]}")
    rows = state[weight[0]].shape[0]
    if rows != config.num_classes or state[bias[0]].shape != (rows,):
        raise ValueError(f"{weights}: the classifier {weight[0]} has {rows} rows, config.json says num_classes={config.num_classes}")
    return weight[0], bias[0]


def read_release(folder: str | Path, *, remove_calibration: bool = False) -> WdRelease:
    """Read config.json, selected_tags.csv and model.safetensors; ValueError when they disagree or are malformed."""
    folder = Path(folder)
    problem = release_problem(folder)
    if problem is not None:
        raise ValueError(problem)
    if release_layout(folder) != "wd_v3":
        raise FileNotFoundError(f"{folder}: not a WD tagger release folder ({TIMM_CONFIG_FILE} + {TIMM_WEIGHTS_FILE} + {LABELS_FILE})")
    config = read_release_config(folder)
    labels = read_release_labels(folder)
    if NUM_RATINGS + labels.num_tags != config.num_classes:
        raise ValueError(f"{folder}: {LABELS_FILE} lists {NUM_RATINGS + labels.num_tags} outputs but config.json num_classes is {config.num_classes}")
    weights = folder / TIMM_WEIGHTS_FILE
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: unreadable safetensors file ({exc})") from None
    weight_key, bias_key = _classifier_keys(state, config, weights)
    head_weight, head_bias = state.pop(weight_key), state.pop(bias_key)  # (4 + T, C), (4 + T,)
    names = [*labels.general, *labels.character]
    bias = tag_bias(head_bias, names, folder, remove_calibration)
    return WdRelease(
        folder=folder,
        config=config,
        labels=labels,
        body=state,
        tag_weight={n: head_weight[NUM_RATINGS + i] for i, n in enumerate(names)},
        tag_bias={n: float(bias[i]) for i, n in enumerate(names)},
        rating_weight=head_weight[:NUM_RATINGS],
        rating_bias=head_bias[:NUM_RATINGS],
    )
