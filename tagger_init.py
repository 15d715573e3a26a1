"""Start a new model from a released WD tagger: backbone, tag-head rows matched by name, rating rows.

A released tagger is a WD-format folder in timm's layout: `model.safetensors` + `config.json`
(timm) and `selected_tags.csv` (our `export_model.py` output, or a release of the same ViT
architecture). `read_released_tagger` reads it into our layout; `init_from_released` fills a new
`SimplifiedTagger` built for a new vocabulary:

* the backbone is copied as `model_architecture.load_pretrained_backbone` copies a timm ViT (same
  key names; the position embedding resampled when the new image size differs);
* each tag-head row is matched by tag name: a tag the release knows keeps its trained weight row
  and bias; a new tag keeps the row the new model was initialised with (bias at the log-odds of
  its training frequency, `VisionTransformerConfig.tag_bias_init`); release tags missing from the
  new vocabulary are dropped;
* the four rating rows seed the rating head.

`extend_vocabulary` builds the "extend" vocabulary: every tag of the release, then the data's new
tags. Our own exports carry their calibration shift in the head bias; `remove_calibration=True`
subtracts it again (export_report.json's `logit_shifts`), giving back the checkpoint's raw biases.
`init_model_weights` is the one entry point of `--init-from` / `model.init_from` for every source (a
released tagger folder, a checkpoint, timm ViT weights). It imports checkpoint_store,
model_architecture, vocabulary, timm_layout and wd_format; train_direct and data_setup's
`data.vocabulary_mode=extend` use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint_store import is_checkpoint_reference, load_model_state, resolve_checkpoint
from model_architecture import SimplifiedTagger, VisionTransformerConfig, load_backbone_state, load_pretrained_backbone
from timm_layout import TIMM_CONFIG_FILE, read_timm_folder
from vocabulary import TagVocabulary
from wd_format import CATEGORY_CHARACTER, LABELS_FILE, RATING_NAMES, REPORT_FILE, LabelTable

__all__ = [
    "InitReport",
    "ReleasedTagger",
    "extend_vocabulary",
    "init_from_released",
    "init_model_weights",
    "is_released_tagger",
    "read_released_tagger",
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
        codes = self.labels.tag_category_codes()
        names = [*self.labels.general, *self.labels.character]
        return {n: ("character" if c == CATEGORY_CHARACTER else "general") for n, c in zip(names, codes)}


def _calibration_shifts(folder: Path) -> dict[str, float]:
    """Per-tag logit shifts an export folded into its head (export_report.json), {} when there is none."""
    path = folder / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        shifts = json.loads(path.read_text(encoding="utf-8")).get("logit_shifts", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable export report ({exc})") from None
    if not isinstance(shifts, dict) or not all(isinstance(v, (int, float)) for v in shifts.values()):
        raise ValueError(f"{path}: 'logit_shifts' must map tag names to numbers")
    return {str(k): float(v) for k, v in shifts.items()}


def is_released_tagger(path: str | Path) -> bool:
    """Whether `path` is a WD-format folder (selected_tags.csv next to timm's config.json)."""
    folder = Path(path)
    return folder.is_dir() and (folder / LABELS_FILE).is_file() and (folder / TIMM_CONFIG_FILE).is_file()


def read_released_tagger(folder: str | Path, *, remove_calibration: bool = False) -> ReleasedTagger:
    """Read model.safetensors + config.json + selected_tags.csv; ValueError when they disagree or the model is not ours."""
    folder = Path(folder)
    timm = read_timm_folder(folder)
    labels = LabelTable.read(folder / LABELS_FILE)
    rows = timm.head_weight.shape[0]
    if rows != 4 + labels.num_tags:
        raise ValueError(f"{folder}: the head has {rows} outputs but {LABELS_FILE} lists {4 + labels.num_tags}")
    if labels.ratings != RATING_NAMES:
        raise ValueError(f"{folder / LABELS_FILE}: rating rows {labels.ratings} are not {RATING_NAMES}")
    names = [*labels.general, *labels.character]
    bias = timm.head_bias[4:].double().clone()  # (T,)
    if remove_calibration:
        shifts = _calibration_shifts(folder)
        if not shifts:
            raise ValueError(f"{folder}: remove_calibration needs {REPORT_FILE} with 'logit_shifts'")
        bias -= torch.tensor([shifts.get(n, 0.0) for n in names], dtype=torch.float64)
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


def init_from_released(model: SimplifiedTagger, vocab: TagVocabulary, released: ReleasedTagger) -> InitReport:
    """Initialise `model` (built for `vocab`) from a released tagger; returns the kept/new/dropped report."""
    if model.cfg.num_tags != len(vocab):
        raise ValueError(f"the model has {model.cfg.num_tags} tag outputs but the vocabulary {len(vocab)} tags")
    if model.cfg.num_ratings != len(RATING_NAMES):
        raise ValueError(f"the model has {model.cfg.num_ratings} rating outputs; a WD release has {len(RATING_NAMES)}")
    different = [
        f"{name} {getattr(released.cfg, name)!r} vs {getattr(model.cfg, name)!r}"
        for name in _SHAPE_FIELDS
        if getattr(released.cfg, name) != getattr(model.cfg, name)
    ]
    if different:
        raise ValueError(f"{released.folder}: the release's architecture differs from the model's (release vs model): {', '.join(different)}")
    report = InitReport()
    _copy_backbone(model, released, report.notes)
    with torch.no_grad():
        for index, tag in enumerate(vocab.index_to_tag):
            if tag in released.tag_weight:
                model.tag_head.weight[index].copy_(released.tag_weight[tag])
                model.tag_head.bias[index] = released.tag_bias[tag]
                report.kept.append(tag)
            else:
                report.new.append(tag)  # keeps its initial row and frequency-prior bias
        model.rating_head.weight.copy_(released.rating_weight)
        model.rating_head.bias.copy_(released.rating_bias)
    report.dropped = [t for t in released.tag_weight if t not in vocab.tag_to_index]
    return report


def extend_vocabulary(released: ReleasedTagger, data_vocab: TagVocabulary) -> TagVocabulary:
    """Every tag of the release (its order), then the data vocabulary's other tags (their order).

    Frequencies come from the data (0 for a release tag the data never shows); categories from the
    data where it has one, else from the release's block.
    """
    release_categories = released.tag_categories()
    ordered = list(release_categories)
    ordered += [t for t in data_vocab.index_to_tag if t not in release_categories]
    frequencies = {t: data_vocab.tag_frequencies.get(t, 0) for t in ordered}
    categories = {t: (data_vocab.tag_categories.get(t) or release_categories.get(t, "")) for t in ordered}
    return TagVocabulary(ordered, frequencies, categories)


def init_model_weights(model: SimplifiedTagger, vocab: TagVocabulary, path: str | Path) -> tuple[str, dict[str, object]]:
    """--init-from / model.init_from: a released tagger folder (head rows matched by tag name), a checkpoint
    folder (weights only) or timm-layout ViT weights; returns (log line, record for data_report.json)."""
    p = Path(path)
    if is_released_tagger(p):
        report = init_from_released(model, vocab, read_released_tagger(p))
        return report.summary(), {"source": str(p), "kind": "released_tagger", **report.to_dict()}
    if is_checkpoint_reference(p):
        folder = resolve_checkpoint(p)
        missing, unexpected = model.load_state_dict(load_model_state(folder), strict=False)
        line = f"weights from {folder} (missing {len(missing)}, unused {len(unexpected)})"
        return line, {"source": str(folder), "kind": "checkpoint", "missing": len(missing), "unused": len(unexpected)}
    backbone = load_pretrained_backbone(model, p)
    return backbone.summary(), {"source": str(p), "kind": "timm_weights", "summary": backbone.summary()}
