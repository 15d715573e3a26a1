"""Tagging images with a model: opening it, batched inference, thresholds (fixed, per tag, MCut) and caption text.

The library behind the two tagging tools, `tag_images.py` (a folder into caption files) and
`tag_app.py` (the local page): both open a model with `open_model`, decode with `read_image`, run
batches with `predict`, choose tags with `Thresholds.decide` and write the caption with
`caption_tags`, so the page's caption line is the one tag_images.py writes for the same settings.

A model is anything the other tools accept (`open_model`):

- an exported WD folder (model.onnx + selected_tags.csv, SmilingWolf's releases too): onnxruntime,
  the input size from the ONNX input shape, the pixels as the model expects them (our export: its
  export_report.json's layout and filter, white pad; a release: its config.json's, the reference
  recipe's white pad to a square then resize);
- one of our ViT's timm-layout folders without model.onnx (config.json + model.safetensors +
  selected_tags.csv, as export_model writes next to the ONNX): PyTorch, through timm_layout's reader;
- any other timm folder without model.onnx: a released WD v3 tagger, a timm-family export
  (config.json + model.safetensors + selected_tags.csv): PyTorch, built by timm through
  checkpoint_eval (wd_release's reader: the release's outputs on the reference recipe's pixels;
  an incomplete release is refused naming what is missing);
- a training checkpoint (a step folder or a last/best pointer) or a run folder (its best
  checkpoint, else its last): PyTorch, raw (uncalibrated) probabilities in selected_tags.csv order.

Each opened model (`TaggingModel`) maps RGB uint8 images (B, S, S, 3), decoded with its own
`preprocess`, to probabilities (B, 4 + T): sigmoid over the tags; softmax over the four ratings for
our models (trained as one choice), sigmoid for a released WD tagger's (as its reference code reads
them; `timm_layout.ratings_are_softmax` tells the two timm folders apart).
`model_thresholds` finds the model's own thresholds file (an export's thresholds.json, a
checkpoint's `<run>/eval/<step>/thresholds.json` from validation_loop.py).

Thresholds: a tag is chosen when its probability is at or above its threshold (wd_format's rule);
per category a fixed value, per-tag values from a thresholds.json, or MCut (maximum cut: sort
the category's probabilities of one image, cut in the middle of the largest gap between neighbours;
a character cut is never below 0.15, as SmilingWolf's wd-tagger page does).

It imports checkpoint_eval, checkpoint_store, image_preprocess, model_architecture, timm_layout,
wd_format, wd_model and wd_release.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from checkpoint_eval import load_checkpoint_for_eval
from checkpoint_store import COMPLETE_MARKER, resolve_checkpoint, run_dir_of
from dataset_scan import IMAGE_EXTENSIONS
from image_preprocess import IMAGE_ERRORS, PreprocessParams, load_image
from model_architecture import SimplifiedTagger
from timm_layout import TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE, is_vit_export, ratings_are_softmax, read_timm_folder
from wd_format import (
    DEFAULT_CHARACTER_THRESHOLD,
    DEFAULT_GENERAL_THRESHOLD,
    LABELS_FILE,
    ONNX_FILE,
    REPORT_FILE,
    THRESHOLDS_FILE,
    LabelTable,
    TagDecision,
    onnx_session,
    rgb_to_wd_input,
    select_tags,
)
from wd_model import WDTagger, fused_head, plan_outputs, resized_tagger
from wd_release import read_release_config, release_layout

__all__ = [
    "KAOMOJIS",
    "MCUT_CHARACTER_FLOOR",
    "CaptionOptions",
    "OnnxModel",
    "TaggingModel",
    "Thresholds",
    "TimmFolderModel",
    "TorchCheckpointModel",
    "caption_tags",
    "find_images",
    "format_tag",
    "load_thresholds",
    "mcut_threshold",
    "merge_caption",
    "model_reader",
    "model_thresholds",
    "onnx_preprocess",
    "open_model",
    "predict",
    "read_image",
    "resolve_model_path",
    "thresholds_for",
]

# Tags made of punctuation and underscores that must keep their underscores (the wd-tagger app's list).
KAOMOJIS = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)
WHITE = (255, 255, 255)
# SmilingWolf's wd-tagger page never lets MCut drop the character threshold below this.
MCUT_CHARACTER_FLOOR = 0.15


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


@dataclass
class CaptionOptions:
    """How chosen tags become caption text."""

    remove_underscore: bool = False
    escape_parentheses: bool = False
    character_first: bool = False
    rating: bool = False
    undesired: frozenset[str] = frozenset()
    separator: str = ", "


def format_tag(name: str, options: CaptionOptions) -> str:
    """One tag as caption text: underscores to spaces (not in kaomoji or tags of 3 characters or fewer), \\( \\)."""
    text = name
    if options.remove_underscore and len(name) > 3 and name not in KAOMOJIS:
        text = text.replace("_", " ")
    if options.escape_parentheses:
        text = text.replace("(", "\\(").replace(")", "\\)")
    return text


def caption_tags(decision: TagDecision, options: CaptionOptions) -> list[str]:
    """Caption tags of one image: [rating], general and character tags (characters first on request), formatted."""

    def wanted(name: str) -> bool:
        return name not in options.undesired and format_tag(name, options) not in options.undesired

    general = [format_tag(n, options) for n, _ in decision.general if wanted(n)]
    character = [format_tag(n, options) for n, _ in decision.character if wanted(n)]
    tags = character + general if options.character_first else general + character
    if options.rating and wanted(decision.rating):
        tags.insert(0, format_tag(decision.rating, options))
    return tags


def merge_caption(existing: str, new_tags: Sequence[str], separator: str) -> str:
    """Existing caption text followed by the new tags it does not already hold (compared stripped)."""
    old = [t.strip() for t in existing.replace("\n", ",").split(",") if t.strip()]
    seen = set(old)
    merged = list(old)
    for tag in new_tags:
        if tag not in seen:
            merged.append(tag)
            seen.add(tag)
    return separator.join(merged)


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------


def load_thresholds(path: str | Path, labels: LabelTable, general: float, character: float) -> tuple[dict[str, float], float, float]:
    """(per-tag thresholds, general, character) from export_model's or validation_loop's thresholds.json.

    Tags without a per-tag value (null) use the file's per-category value, else its global
    threshold, else the command-line thresholds. Unknown tags in the file are ignored.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--thresholds: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--thresholds: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("per_tag"), dict):
        raise ValueError(f"--thresholds: {path} has no 'per_tag' object")
    fallback = data.get("global_threshold")
    per_category = data.get("per_category") if isinstance(data.get("per_category"), dict) else {}
    general = _threshold(per_category.get("general", fallback), general, path)
    character = _threshold(per_category.get("character", fallback), character, path)
    known = set(labels.general) | set(labels.character)
    per_tag = {name: _threshold(value, math.nan, path) for name, value in data["per_tag"].items() if name in known and value is not None}
    return per_tag, general, character


def _threshold(value: Any, default: float, path: Path) -> float:
    """A threshold from the file, or `default` when absent; ValueError outside [0, 1]."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"--thresholds: {path} holds {value!r}, not a threshold in [0, 1]")
    return float(value)


def mcut_threshold(values: Sequence[float] | np.ndarray) -> float:
    """The maximum cut of a set of scores: sorted high to low, the midpoint of the largest gap between neighbours.

    Every score above the returned value is on the high side of that gap. With fewer than two
    (finite) scores there is no gap: nan (the caller keeps its fixed threshold).
    """
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    scores = np.sort(scores[np.isfinite(scores)])[::-1]  # (K,) high to low
    if scores.shape[0] < 2:
        return math.nan
    gaps = scores[:-1] - scores[1:]  # (K - 1,)
    cut = int(np.argmax(gaps))  # the first (highest) of equal largest gaps
    return float((scores[cut] + scores[cut + 1]) / 2.0)


@dataclass(frozen=True)
class Thresholds:
    """How one output row becomes tags: a threshold per category, per-tag overrides, or MCut per category."""

    general: float = DEFAULT_GENERAL_THRESHOLD
    character: float = DEFAULT_CHARACTER_THRESHOLD
    per_tag: Mapping[str, float] = field(default_factory=dict)
    general_mcut: bool = False
    character_mcut: bool = False
    source: str = ""  # the thresholds file the values came from ("" for none)

    def __post_init__(self) -> None:
        """ValueError for a category threshold outside [0, 1]."""
        for name in ("general", "character"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"the {name} threshold must be in [0, 1], got {value!r}")

    def cuts(self, row: np.ndarray, labels: LabelTable) -> tuple[float, float]:
        """The (general, character) thresholds applied to one output row (4 + T,): fixed or its MCut."""
        general, character = float(self.general), float(self.character)
        if self.general_mcut:
            cut = mcut_threshold(row[4 : 4 + len(labels.general)])
            general = general if math.isnan(cut) else cut
        if self.character_mcut:
            cut = mcut_threshold(row[4 + len(labels.general) : 4 + labels.num_tags])
            character = character if math.isnan(cut) else max(MCUT_CHARACTER_FLOOR, cut)
        return general, character

    def decide(self, row: Sequence[float] | np.ndarray, labels: LabelTable) -> TagDecision:
        """The tags of one output row: wd_format's rule with these thresholds (MCut replaces per-tag values in its category)."""
        values = np.asarray(row, dtype=np.float64).reshape(-1)
        general, character = self.cuts(values, labels)
        replaced = set(labels.general if self.general_mcut else ()) | set(labels.character if self.character_mcut else ())
        per_tag = {k: v for k, v in self.per_tag.items() if k not in replaced}
        return select_tags(values, labels, general_threshold=general, character_threshold=character, per_tag_thresholds=per_tag)


def thresholds_for(
    labels: LabelTable,
    general: float,
    character: float,
    thresholds_file: str | Path | None = None,
    general_mcut: bool = False,
    character_mcut: bool = False,
) -> Thresholds:
    """The thresholds of tag_images.py's options: category values, or a thresholds.json (its values win), MCut per category."""
    per_tag: dict[str, float] = {}
    if thresholds_file:
        per_tag, general, character = load_thresholds(thresholds_file, labels, general, character)
    return Thresholds(general, character, per_tag, general_mcut, character_mcut, source=str(thresholds_file or ""))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class TaggingModel(Protocol):
    """An opened model: its labels and preprocessing, and RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""

    labels: LabelTable
    preprocess: PreprocessParams
    source: Path  # the folder or checkpoint it was opened from
    kind: str  # "onnx", "timm" or "checkpoint"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""
        ...


def onnx_preprocess(folder: Path, image_size: int) -> PreprocessParams:
    """The pixels an ONNX WD folder expects at `image_size`, always padded with white: our export's layout and
    filter (export_report.json), else a release's (config.json: pad to a square, then its filter), else a white letterbox."""
    report = folder / REPORT_FILE
    if report.is_file():
        try:
            stored = json.loads(report.read_text(encoding="utf-8")).get("preprocess")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"{report}: unreadable export report ({exc})") from None
        if stored is not None:
            params = PreprocessParams.from_dict(stored)
            return PreprocessParams(image_size=image_size, pad_color=WHITE, resample=params.resample, layout=params.layout)
    if release_layout(folder) is not None and (folder / TIMM_CONFIG_FILE).is_file():
        release = read_release_config(folder).preprocess()
        return PreprocessParams(image_size=image_size, pad_color=WHITE, resample=release.resample, layout=release.layout)
    return PreprocessParams(image_size=image_size, pad_color=WHITE)


class OnnxModel:
    """A WD-tagger folder (model.onnx + selected_tags.csv) run by onnxruntime."""

    kind = "onnx"

    def __init__(self, folder: Path, device: str) -> None:
        """Open the session, read the labels, take the input size from the ONNX input shape."""
        self.source = folder
        self.labels = LabelTable.read(folder / LABELS_FILE)
        self.session = onnx_session(folder / ONNX_FILE, "cuda" if device.startswith("cuda") else "cpu")
        node = self.session.get_inputs()[0]
        shape = node.shape  # [N, S, S, 3]
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{folder / ONNX_FILE}: input shape {shape} is not [N, S, S, 3] with a fixed S")
        self.input_name = node.name
        self.one_at_a_time = shape[0] == 1  # some releases fix the batch size at 1
        self.image_size = int(shape[1])
        self.preprocess = onnx_preprocess(folder, self.image_size)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != 4 + self.labels.num_tags:
            raise ValueError(f"{folder}: the model has {outputs[-1]} outputs but {LABELS_FILE} describes {4 + self.labels.num_tags}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""
        batch = rgb_to_wd_input(images)  # (B, S, S, 3) float32 BGR
        if self.one_at_a_time:
            return np.concatenate([self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(batch.shape[0])])
        return self.session.run(None, {self.input_name: batch})[0]


class _TorchWDModel:
    """A WDTagger run by PyTorch behind the same contract."""

    labels: LabelTable
    preprocess: PreprocessParams
    source: Path
    kind: str
    model: WDTagger
    device: torch.device
    rating_softmax: bool = True  # False for a released WD tagger: its ratings are sigmoid outputs, like its tags

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        with torch.inference_mode():
            logits = self.model.logits_from_rgb(batch)  # (B, 4 + T)
            return WDTagger.probabilities(logits, self.rating_softmax).float().cpu().numpy()


class TorchCheckpointModel(_TorchWDModel):
    """A training checkpoint (raw, uncalibrated probabilities), or a timm folder (a WD release, a timm-family
    export: its own outputs, kind "timm"), run by PyTorch."""

    kind = "checkpoint"

    def __init__(self, checkpoint: Path, device: str, ema: bool) -> None:
        """Load the checkpoint or folder (checkpoint_eval); outputs in selected_tags.csv order (all categories, as export_model's default)."""
        self.device = torch.device(device)
        ck = load_checkpoint_for_eval(checkpoint, self.device, ema=ema)
        self.kind = "timm" if ck.kind == "release" else "checkpoint"
        self.rating_softmax = ck.kind != "release" or ratings_are_softmax(ck.folder)
        self.source = ck.folder
        self.step = ck.step
        plan = plan_outputs(ck.vocab)
        self.labels = plan.labels
        self.image_size = ck.preprocess.image_size
        self.preprocess = ck.preprocess
        model = resized_tagger(ck.model, self.image_size)
        self.model = WDTagger(model, fused_head(model, plan), ck.preprocess.mean, ck.preprocess.std).eval()


class TimmFolderModel(_TorchWDModel):
    """A timm-layout folder (config.json + model.safetensors + selected_tags.csv) of our ViT, run by PyTorch."""

    kind = "timm"

    def __init__(self, folder: Path, device: str) -> None:
        """Read the folder (timm_layout refuses another architecture); the head's rows follow selected_tags.csv."""
        self.device = torch.device(device)
        self.source = folder
        self.labels = LabelTable.read(folder / LABELS_FILE)
        timm = read_timm_folder(folder)
        rows = timm.head_weight.shape[0]
        if rows != 4 + self.labels.num_tags:
            raise ValueError(f"{folder}: the head has {rows} outputs but {LABELS_FILE} describes {4 + self.labels.num_tags}")
        backbone = SimplifiedTagger(timm.cfg)
        state = backbone.state_dict()
        missing = sorted(k for k in state if not k.startswith(("tag_head.", "rating_head.")) and k not in timm.backbone)
        if missing:
            raise ValueError(f"{folder / TIMM_WEIGHTS_FILE}: tensors missing: {missing[:5]}")
        state.update({k: v for k, v in timm.backbone.items() if k in state})
        backbone.load_state_dict(state)
        head = torch.nn.Linear(timm.head_weight.shape[1], rows)
        with torch.no_grad():
            head.weight.copy_(timm.head_weight)
            head.bias.copy_(timm.head_bias)
        self.image_size = timm.cfg.image_size
        # The WD contract: the image padded with white; mean/std from the folder (inside the graph).
        self.preprocess = PreprocessParams(image_size=self.image_size, pad_color=WHITE, mean=timm.mean, std=timm.std)
        self.model = WDTagger(backbone.eval(), head, timm.mean, timm.std).to(self.device).eval()


# Any of these in a folder makes it model-like: checkpoint_store then says what a damaged one lacks.
_MODEL_FILES = (COMPLETE_MARKER, "config.yaml", "model.safetensors", TIMM_CONFIG_FILE, LABELS_FILE, ONNX_FILE)


def resolve_model_path(model: str | Path) -> Path:
    """A run folder -> its best checkpoint (else last); anything else as given. FileNotFoundError when absent."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (an export folder with {ONNX_FILE}, a timm-layout folder, a run folder or a checkpoint)")
    checkpoints = path / "checkpoints"
    if path.is_dir() and checkpoints.is_dir() and not (path / COMPLETE_MARKER).exists():
        for pointer in ("best", "last"):
            if (checkpoints / pointer).is_file():
                return checkpoints / pointer
        raise FileNotFoundError(f"{path} is a run folder without a finished checkpoint ({checkpoints} has no best or last pointer)")
    return path


def open_model(model: str | Path, device: str = "cpu", ema: bool = False) -> TaggingModel:
    """Open any model the tools accept (see the module docstring); FileNotFoundError / ValueError say what is wrong.

    The one place a model is opened for tagging: a new kind of model folder is one more branch here.
    """
    path = resolve_model_path(model)
    kind = model_reader(path)
    if kind == "onnx":
        return OnnxModel(path, device)
    if kind == "timm_vit":
        return TimmFolderModel(path, device)
    return TorchCheckpointModel(path, device, ema)


def model_reader(path: Path) -> str:
    """How open_model reads a resolved model path: "onnx" (model.onnx), "timm_vit" (our ViT's timm folder) or
    "torch" (a checkpoint, a WD release or a timm-family folder: checkpoint_eval); ValueError for a folder that is none."""
    if path.is_dir() and (path / ONNX_FILE).is_file():
        return "onnx"
    if path.is_dir() and (path / TIMM_CONFIG_FILE).is_file() and (path / LABELS_FILE).is_file() and is_vit_export(path):
        return "timm_vit"
    if path.is_dir() and not any((path / name).exists() for name in _MODEL_FILES):
        raise ValueError(
            f"{path} is not a model: expected an export folder ({ONNX_FILE} + {LABELS_FILE}), a timm-layout folder "
            f"({TIMM_CONFIG_FILE} + {TIMM_WEIGHTS_FILE} + {LABELS_FILE}), a run folder or a checkpoint (step_<N> folder or last/best pointer)"
        )
    return "torch"


def model_thresholds(model: TaggingModel) -> Path | None:
    """The model's own thresholds file: an export's thresholds.json, a checkpoint's <run>/eval/<step>/thresholds.json."""
    if model.kind == "checkpoint":
        candidate = run_dir_of(resolve_checkpoint(model.source)) / "eval" / Path(model.source).name / THRESHOLDS_FILE
    else:
        candidate = Path(model.source) / THRESHOLDS_FILE
    return candidate if candidate.is_file() else None


# --------------------------------------------------------------------------------------------
# Images and inference
# --------------------------------------------------------------------------------------------


def find_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under root (sorted; subfolders only when recursive)."""
    if recursive:
        found = [Path(d) / f for d, _, files in os.walk(root) for f in files]
    else:
        found = [p for p in root.iterdir() if p.is_file()]
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: str | Path, params: PreprocessParams) -> tuple[np.ndarray | None, str | None]:
    """(letterboxed (S, S, 3) uint8 RGB, None), or (None, reason) for a file that cannot be used as an image."""
    try:
        with warnings.catch_warnings():
            # load_image raises past the pixel limit itself; the warning below it is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_image(path, params), None
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}"


def predict(model: TaggingModel, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities (N, 4 + T) of RGB uint8 images (N, S, S, 3), run batch_size at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.shape[0] == 0:
        return np.zeros((0, 4 + model.labels.num_tags), dtype=np.float32)
    return np.concatenate([model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
