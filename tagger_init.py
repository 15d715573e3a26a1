"""Start a new model from released weights: a WD tagger release, our own export, a checkpoint, timm ViT weights.

`init_model_weights` is the one entry point of `--init-from` / `model.init_from`; what it does
depends on the model the run built (training_setup.model_config):

* a `TimmTagger` (model.family=timm) from a released tagger folder (`wd_release`: SmilingWolf's
  wd-*-tagger-v3 of any family, or our own export): the body is the release's architecture
  (config.json) and its weights load exactly (strict); a `SimplifiedTagger` (family vit) from a
  WD folder of our ViT architecture (`timm_layout`: our exports): the backbone is copied as
  `model_architecture.load_pretrained_backbone` copies a timm ViT (the position embedding
  resampled when the image size differs);
* either way each tag-head row is matched by tag name: a tag the release knows keeps its trained
  row and bias; a new tag keeps the row the new model was initialised with (bias at the log-odds
  of its training frequency, the configs' `tag_bias_init`); release tags missing from the new
  vocabulary are dropped; the four rating rows seed the rating head;
* a checkpoint folder: its weights (the same architecture); timm ViT weights (family vit): the backbone.

A folder that looks like a release but cannot give a model (WD v2: ONNX only; no weights) is
refused with what is missing. `extend_vocabulary` builds the "extend" vocabulary: every tag of
the release, then the data's new tags. `timm_source` finds a timm run's architecture (the config,
the release or the checkpoint in init_from) and `apply_init_preprocessing` makes a timm run's
preprocessing that of its init source (data.preprocess_from_init). Our own exports carry their
calibration shift in the head bias; `remove_calibration=True` subtracts it again. It imports
checkpoint_store, model_architecture, timm_tagger, vocabulary, timm_layout, wd_format and
wd_release; train_direct, training_setup and data_setup use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from checkpoint_store import MODEL_CONFIG_FILE, PREPROCESS_FILE, is_checkpoint_reference, load_model_state, read_checkpoint_json, resolve_checkpoint
from Configuration_System import ConfigError, RootConfig
from image_preprocess import PreprocessParams
from model_architecture import SimplifiedTagger, VisionTransformerConfig, load_backbone_state, load_pretrained_backbone
from timm_layout import TIMM_CONFIG_FILE, read_timm_folder
from timm_tagger import Tagger, TimmTagger, TimmTaggerConfig, tagger_config_from_dict
from vocabulary import TagVocabulary
from wd_format import LABELS_FILE, RATING_NAMES, LabelTable
from wd_release import WdRelease, label_categories, read_release, read_release_config, release_layout, release_problem, tag_bias

__all__ = [
    "InitReport",
    "ReleasedTagger",
    "TimmSource",
    "apply_init_preprocessing",
    "extend_vocabulary",
    "init_from_release",
    "init_from_released",
    "init_model_weights",
    "is_released_tagger",
    "read_released_tagger",
    "timm_source",
]

# Shape fields that must agree between the release and the new model (image size may differ).
_SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "pooling")


@dataclass
class ReleasedTagger:
    """A WD tagger folder read into our layout."""

    folder: Path
    cfg: VisionTransformerConfig  # the release's architecture (num_tags = T)
    backbone: dict[str, torch.Tensor]  # our key names, RGB input
    labels: LabelTable
    tag_weight: dict[str, torch.Tensor]  # tag name -> head row (C,)
    tag_bias: dict[str, float]  # tag name -> head bias
    rating_weight: torch.Tensor  # (4, C)
    rating_bias: torch.Tensor  # (4,)

    def tag_categories(self) -> dict[str, str]:
        """Our category of each release tag: "character" for the character block, else "general"."""
        return label_categories(self.labels)


class HeadRows(Protocol):
    """A release's classifier by tag name (ReleasedTagger, wd_release.WdRelease)."""

    folder: Path
    tag_weight: dict[str, torch.Tensor]
    tag_bias: dict[str, float]
    rating_weight: torch.Tensor
    rating_bias: torch.Tensor


def is_released_tagger(path: str | Path) -> bool:
    """Whether `path` is a WD-format folder (selected_tags.csv next to timm's config.json)."""
    folder = Path(path)
    return folder.is_dir() and (folder / LABELS_FILE).is_file() and (folder / TIMM_CONFIG_FILE).is_file()


def read_released_tagger(folder: str | Path, *, remove_calibration: bool = False) -> ReleasedTagger:
    """Read model.safetensors + config.json + selected_tags.csv into our ViT's layout; ValueError when they
    disagree or the model is not our ViT architecture (then it names model.family=timm)."""
    folder = Path(folder)
    try:
        timm = read_timm_folder(folder)
    except ValueError as exc:
        raise ValueError(f"{exc}. A timm release of another architecture loads with model.family=timm (configs/finetune.yaml)") from None
    labels = LabelTable.read(folder / LABELS_FILE)
    rows = timm.head_weight.shape[0]
    if rows != 4 + labels.num_tags:
        raise ValueError(f"{folder}: the head has {rows} outputs but {LABELS_FILE} lists {4 + labels.num_tags}")
    if labels.ratings != RATING_NAMES:
        raise ValueError(f"{folder / LABELS_FILE}: rating rows {labels.ratings} are not {RATING_NAMES}")
    names = [*labels.general, *labels.character]
    bias = tag_bias(timm.head_bias, names, folder, remove_calibration)
    return ReleasedTagger(
        folder=folder,
        cfg=timm.cfg,
        backbone=timm.backbone,
        labels=labels,
        tag_weight={n: timm.head_weight[4 + i] for i, n in enumerate(names)},
        tag_bias={n: float(bias[i]) for i, n in enumerate(names)},
        rating_weight=timm.head_weight[:4],
        rating_bias=timm.head_bias[:4],
    )


@dataclass
class InitReport:
    """What init_from_released did: tag rows kept, new and dropped, and backbone notes."""

    kept: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{"kept": n, "new": n, "dropped": n}."""
        return {"kept": len(self.kept), "new": len(self.new), "dropped": len(self.dropped)}

    def to_dict(self) -> dict[str, object]:
        """The counts, the new and dropped tag names and the notes (for data_report.json)."""
        return {**self.counts(), "new_tags": list(self.new), "dropped_tags": list(self.dropped), "notes": list(self.notes)}

    def summary(self) -> str:
        """One line for the training log."""
        c = self.counts()
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"released tagger: {c['kept']} tags kept with their trained rows, {c['new']} new, {c['dropped']} dropped; rating head seeded{notes}"


def _copy_backbone(model: SimplifiedTagger, released: ReleasedTagger, notes: list[str]) -> None:
    """Copy every backbone tensor as the timm-layout importer does (position embedding resampled to the
    model's grid); ValueError when a tensor is missing from the release or has another shape."""
    missing = sorted(set(model.backbone_state_dict()) - set(released.backbone))
    if missing:
        raise ValueError(f"{released.folder}: backbone tensors missing from the release: {missing[:5]}")
    report = load_backbone_state(model, released.backbone, str(released.folder))
    if report.mismatched:  # the architecture check before makes this a damaged folder, not a user choice
        key, ours, theirs = report.mismatched[0]
        raise ValueError(f"{released.folder}: {key} has shape {theirs}, the model {ours}")
    notes.extend(report.notes)


def _check_head_shape(model: Tagger, vocab: TagVocabulary) -> None:
    """ValueError unless the model has one tag output per vocabulary tag and the four WD ratings."""
    if model.cfg.num_tags != len(vocab):
        raise ValueError(f"the model has {model.cfg.num_tags} tag outputs but the vocabulary {len(vocab)} tags")
    if model.cfg.num_ratings != len(RATING_NAMES):
        raise ValueError(f"the model has {model.cfg.num_ratings} rating outputs; a WD release has {len(RATING_NAMES)}")


def _copy_head_rows(model: Tagger, vocab: TagVocabulary, source: HeadRows, report: InitReport) -> None:
    """Tag rows matched by name (kept, or new with the row and prior bias the model was built with),
    the dropped release tags, and the four rating rows."""
    with torch.no_grad():
        for index, tag in enumerate(vocab.index_to_tag):
            if tag in source.tag_weight:
                model.tag_head.weight[index].copy_(source.tag_weight[tag])
                model.tag_head.bias[index] = source.tag_bias[tag]
                report.kept.append(tag)
            else:
                report.new.append(tag)  # keeps its initial row and frequency-prior bias
        model.rating_head.weight.copy_(source.rating_weight)
        model.rating_head.bias.copy_(source.rating_bias)
    report.dropped = [t for t in source.tag_weight if t not in vocab.tag_to_index]


def init_from_release(model: TimmTagger, vocab: TagVocabulary, release: WdRelease) -> InitReport:
    """Initialise a TimmTagger (built for `vocab`) from a release: the body exactly, head rows by tag name."""
    _check_head_shape(model, vocab)
    ours, theirs = model.cfg, release.config
    if (ours.architecture, ours.model_args) != (theirs.architecture, theirs.model_args) or ours.input_channels != "bgr":
        raise ValueError(
            f"{release.folder}: the model ({ours.architecture} {ours.model_args}, {ours.input_channels}) is not the release's "
            f"({theirs.architecture} {theirs.model_args}, bgr); build it from the release (model.timm_architecture '')"
        )
    report = InitReport()
    release.load_body(model)
    if theirs.dropped_args:
        report.notes.append(f"config.json training arguments {theirs.dropped_args} not used (the run's config sets them)")
    _copy_head_rows(model, vocab, release, report)
    return report


def init_from_released(model: SimplifiedTagger, vocab: TagVocabulary, released: ReleasedTagger) -> InitReport:
    """Initialise `model` (built for `vocab`) from a released tagger; returns the kept/new/dropped report."""
    _check_head_shape(model, vocab)
    different = [
        f"{name} {getattr(released.cfg, name)!r} vs {getattr(model.cfg, name)!r}"
        for name in _SHAPE_FIELDS
        if getattr(released.cfg, name) != getattr(model.cfg, name)
    ]
    if different:
        raise ValueError(f"{released.folder}: the release's architecture differs from the model's (release vs model): {', '.join(different)}")
    report = InitReport()
    _copy_backbone(model, released, report.notes)
    _copy_head_rows(model, vocab, released, report)
    return report


def extend_vocabulary(labels: LabelTable, data_vocab: TagVocabulary) -> TagVocabulary:
    """Every tag of the release's selected_tags.csv (its order), then the data vocabulary's other tags (their order).

    Frequencies come from the data (0 for a release tag the data never shows); categories from the
    data where it has one, else from the release's block.
    """
    release_categories = label_categories(labels)
    ordered = list(release_categories)
    ordered += [t for t in data_vocab.index_to_tag if t not in release_categories]
    frequencies = {t: data_vocab.tag_frequencies.get(t, 0) for t in ordered}
    categories = {t: (data_vocab.tag_categories.get(t) or release_categories.get(t, "")) for t in ordered}
    return TagVocabulary(ordered, frequencies, categories)


def init_model_weights(model: Tagger, vocab: TagVocabulary, path: str | Path) -> tuple[str, dict[str, object]]:
    """--init-from / model.init_from: a released tagger folder (head rows matched by tag name), a checkpoint
    folder (weights only) or (family vit) timm-layout ViT weights; returns (log line, record for data_report.json)."""
    p = Path(path)
    problem = release_problem(p)
    if problem is not None:  # a WD v2 (ONNX only) or incomplete release: say what is missing
        raise ValueError(problem)
    if isinstance(model, TimmTagger):
        if release_layout(p) == "wd_v3":
            report = init_from_release(model, vocab, read_release(p))
            return report.summary(), {"source": str(p), "kind": "released_tagger", **report.to_dict()}
        if not is_checkpoint_reference(p):
            raise ValueError(f"model.init_from={p}: a timm-family model starts from a released tagger folder or a checkpoint folder")
    elif is_released_tagger(p):
        report = init_from_released(model, vocab, read_released_tagger(p))
        return report.summary(), {"source": str(p), "kind": "released_tagger", **report.to_dict()}
    if is_checkpoint_reference(p):
        folder = resolve_checkpoint(p)
        missing, unexpected = model.load_state_dict(load_model_state(folder), strict=False)
        line = f"weights from {folder} (missing {len(missing)}, unused {len(unexpected)})"
        return line, {"source": str(folder), "kind": "checkpoint", "missing": len(missing), "unused": len(unexpected)}
    backbone = load_pretrained_backbone(model, p)
    return backbone.summary(), {"source": str(p), "kind": "timm_weights", "summary": backbone.summary()}


@dataclass(frozen=True)
class TimmSource:
    """Where a timm-family run's architecture comes from, and the preprocessing that source expects."""

    architecture: str
    model_args: dict[str, Any]
    input_channels: str
    origin: str  # "config", "release" or "checkpoint"
    preprocess: PreprocessParams | None  # the release's or checkpoint's preprocessing (None: from the config)


def timm_source(cfg: RootConfig) -> TimmSource:
    """The timm architecture of a model.family=timm run: model.timm_architecture, else the released tagger
    folder or timm-family checkpoint in model.init_from. ConfigError when neither names one, or they disagree."""
    m = cfg.model
    source = Path(m.init_from) if m.init_from else None
    found: TimmSource | None = None
    if source is not None:
        problem = release_problem(source)
        if problem is not None:
            raise ConfigError(f"model.init_from: {problem}")
        if release_layout(source) == "wd_v3":
            release = read_release_config(source)
            found = TimmSource(release.architecture, dict(release.model_args), "bgr", "release", release.preprocess())
        elif is_checkpoint_reference(source):
            folder = resolve_checkpoint(source)
            saved = tagger_config_from_dict(read_checkpoint_json(folder, MODEL_CONFIG_FILE))
            if isinstance(saved, TimmTaggerConfig):
                preprocess = PreprocessParams.from_dict(read_checkpoint_json(folder, PREPROCESS_FILE))
                found = TimmSource(saved.architecture, dict(saved.model_args), saved.input_channels, "checkpoint", preprocess)
    if not m.timm_architecture:
        if found is None:
            raise ConfigError(
                "model.family=timm: name the model with model.timm_architecture (and model.timm_model_args), "
                "or give a released tagger folder or a timm-family checkpoint in model.init_from"
            )
        return found
    if found is not None:
        if (m.timm_architecture, dict(m.timm_model_args)) != (found.architecture, found.model_args):
            raise ConfigError(
                f"model.timm_architecture={m.timm_architecture} {m.timm_model_args} differs from model.init_from's "
                f"{found.architecture} {found.model_args}; leave model.timm_architecture '' to use the init source's"
            )
        return found
    return TimmSource(m.timm_architecture, dict(m.timm_model_args), "rgb", "config", None)


def apply_init_preprocessing(cfg: RootConfig, log: Callable[[str], None] | None = None) -> PreprocessParams | None:
    """data.preprocess_from_init: a timm run initialised from a release or a timm checkpoint takes its
    preprocessing (size, mean, std, white pad, pad_then_resize) into cfg.data; returns it (None: unchanged)."""
    if cfg.model.family != "timm" or not cfg.data.preprocess_from_init or not cfg.model.init_from:
        return None
    params = timm_source(cfg).preprocess
    if params is None:
        return None
    values: Mapping[str, Any] = {
        "image_size": params.image_size,
        "mean": list(params.mean),
        "std": list(params.std),
        "pad_color": list(params.pad_color),
        "image_layout": params.layout,
        "resample": params.resample,
    }
    changed = {k: v for k, v in values.items() if getattr(cfg.data, k) != v}
    for key, value in values.items():
        setattr(cfg.data, key, value)
    if log and changed:
        log(f"preprocessing from {cfg.model.init_from} (data.preprocess_from_init): " + ", ".join(f"data.{k}={v}" for k, v in changed.items()))
    return params
