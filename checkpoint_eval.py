"""Loading a checkpoint for evaluation and evaluating a model: the library the evaluation tools call.

It owns:

- `model_from_checkpoint`: the one place a network is built from a checkpoint's contents (its
  model config and weights);
- `load_checkpoint_for_eval` / `LoadedCheckpoint`: a step folder or last/best pointer -> the
  model (or its EMA) on a device, its vocabulary, preprocessing, run config and step; a released
  WD v3 tagger folder (config.json + model.safetensors + selected_tags.csv, read by wd_release)
  loads as the release's own model (its tags in selected_tags.csv order, its input convention), with
  the default config and no data root (`LoadedCheckpoint.kind == "release"`: evaluating it needs a
  dataset folder); a WD v2 (ONNX-only) or incomplete release is refused naming what is missing;
- `evaluate` / `EvalResult` / `EvalExamples`: a model run over a loader into a `MetricComputer`
  (tagging and rating metrics, all-reduced under DDP), the skipped samples named.

Training's inline validation (train_direct), the evaluation CLI (validation_loop), the export
(export_model) and the tagger's PyTorch backend (tag_images) all call it; none of those entry
points imports another (model_eval adds the export folders, through tagging). It imports batching,
checkpoint_store, Configuration_System, evaluation_metrics, image_preprocess, timm_tagger, vocabulary,
wd_format and wd_release.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batching import ImagePreFetcher
from checkpoint_store import CheckpointContents, is_release_folder, read_checkpoint, read_run_config, resolve_checkpoint
from Configuration_System import RootConfig
from evaluation_metrics import MetricComputer
from image_preprocess import PreprocessParams
from timm_tagger import Tagger, build_tagger
from vocabulary import TagVocabulary
from wd_format import LabelTable
from wd_release import label_categories, read_release, release_problem

# Called with each evaluated batch (as ImagePreFetcher yields it: normalised images, "tag_targets",
# "ratings") and the model's outputs for it.
BatchObserver = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], None]

__all__ = [
    "BatchObserver",
    "EvalExamples",
    "EvalResult",
    "LoadedCheckpoint",
    "evaluate",
    "load_checkpoint_for_eval",
    "load_release_for_eval",
    "model_from_checkpoint",
    "denormalize_images",
    "labels_vocabulary",
]


@dataclass
class EvalExamples:
    """The first few validation images with their scores, for a picture in TensorBoard."""

    images: torch.Tensor  # (N, 3, H, W) uint8, as the model saw them
    probs: torch.Tensor  # (N, T) float
    targets: torch.Tensor  # (N, T) float in {0, 1}


@dataclass
class EvalResult:
    """Headline metrics and the metric state they came from (for per-tag reports)."""

    metrics: dict[str, Any]
    computer: MetricComputer
    examples: EvalExamples | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> why it could not be evaluated


def denormalize_images(images: torch.Tensor, preprocess: PreprocessParams) -> torch.Tensor:
    """Normalised float (N, 3, H, W) back to the uint8 pixels they came from (on the CPU)."""
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    vocab: TagVocabulary,
    preprocess: PreprocessParams,
    *,
    threshold: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    world_size: int = 1,
    max_batches: int = 0,
    num_examples: int = 0,
    observe: BatchObserver | None = None,
) -> EvalResult:
    """Run the model over a loader and compute tagging and rating metrics (all-reduced under DDP).

    With num_examples > 0 the first images of the first batch are kept with their scores.
    A sample that fails to load is skipped, never replaced: metrics["num_skipped"] counts them
    (this rank's) and result.skipped names them. `observe`, when given, sees every evaluated
    batch with the model's outputs (the export spills what its later steps need).
    """
    was_training = model.training
    model.eval()
    computer = MetricComputer(
        len(vocab),
        threshold=threshold,
        device=device,
        tag_names=vocab.index_to_tag,
        tag_categories=[vocab.tag_categories.get(t, "") for t in vocab.index_to_tag],
        tag_frequencies=vocab.frequencies_array(),
    )
    examples: EvalExamples | None = None
    skipped: dict[str, str] = {}
    try:
        with torch.inference_mode():
            for i, batch in enumerate(ImagePreFetcher(loader, device, preprocess, len(vocab))):
                if max_batches and i >= max_batches:
                    break
                skipped.update((sid, reason) for sid, reason in batch.get("skipped", []))
                if batch["images"].shape[0] == 0:  # every sample of this batch failed to load
                    continue
                with autocast():
                    outputs = model(batch["images"])
                probs = torch.sigmoid(outputs["tag_logits"].float())  # (B, T)
                computer.update(probs, batch["tag_targets"])
                computer.update_rating(outputs["rating_logits"].float(), batch["ratings"])  # (B, 4)
                if observe is not None:
                    observe(batch, outputs)
                if num_examples and examples is None:
                    n = min(num_examples, probs.shape[0])
                    examples = EvalExamples(denormalize_images(batch["images"][:n], preprocess), probs[:n].cpu(), batch["tag_targets"][:n].cpu())
        if world_size > 1:
            computer.all_reduce_()
    finally:
        model.train(was_training)
    metrics = computer.compute()
    metrics["num_skipped"] = len(skipped)
    return EvalResult(metrics=metrics, computer=computer, examples=examples, skipped=skipped)


# --------------------------------------------------------------------------------------------
# Loading a checkpoint folder
# --------------------------------------------------------------------------------------------


def model_from_checkpoint(contents: CheckpointContents) -> Tagger:
    """The network a checkpoint describes (either family: timm_tagger.build_tagger), with its weights loaded (on the CPU)."""
    model = build_tagger(contents.model_config)
    model.load_state_dict(contents.state_dict)
    return model


@dataclass
class LoadedCheckpoint:
    """What a checkpoint folder describes, ready to evaluate."""

    folder: Path
    cfg: RootConfig
    model: torch.nn.Module  # a Tagger, or model_eval.ProbabilityOutputs for an export folder
    vocab: TagVocabulary
    preprocess: PreprocessParams
    step: int
    # "release": a WD tagger release folder, "export": an exported model folder (model_eval); neither has a run
    # config (the default config, no data root): evaluating them needs a dataset folder
    kind: str = "checkpoint"

    @property
    def needs_data(self) -> bool:
        """Whether evaluating it needs a dataset folder named (no run config to find one in)."""
        return self.kind != "checkpoint"


def labels_vocabulary(labels: LabelTable) -> TagVocabulary:
    """A WD folder's tags as a vocabulary: selected_tags.csv order (general, then character), counts and categories."""
    names = [*labels.general, *labels.character]
    counts = [*labels.general_counts, *labels.character_counts]
    frequencies = dict(zip(names, (int(c) for c in counts))) if len(counts) == len(names) else None
    return TagVocabulary(names, frequencies, label_categories(labels))


def load_release_for_eval(folder: str | Path, device: torch.device) -> LoadedCheckpoint:
    """A released WD v3 tagger folder as a loaded model: the release's own outputs on the reference recipe's pixels
    (white pad to a square, its interpolation to its input size, BGR); the default config, no data root."""
    release = read_release(folder)
    model = release.build_model()
    cfg = RootConfig()
    cfg.data.root = ""  # a release has no run config: the data must be named (--data)
    return LoadedCheckpoint(Path(folder), cfg, model.to(device), labels_vocabulary(release.labels), release.config.preprocess(), 0, "release")


def load_checkpoint_for_eval(path: str | Path, device: torch.device, ema: bool = False) -> LoadedCheckpoint:
    """Model (or its EMA), vocabulary, preprocessing and config from a step folder or pointer file, or a WD release folder
    (ValueError for --ema on one, and naming what a WD v2 / incomplete release lacks)."""
    candidate = Path(path)
    if is_release_folder(candidate):
        problem = release_problem(candidate)
        if problem is not None:
            raise ValueError(problem)
        if ema:
            raise ValueError(f"{candidate} is a released WD tagger folder: it has no EMA weights (leave out --ema)")
        return load_release_for_eval(candidate, device)
    folder = resolve_checkpoint(path)
    cfg = read_run_config(folder)
    contents = read_checkpoint(folder, ema=ema)
    model = model_from_checkpoint(contents)
    step = contents.step if contents.step is not None else -1
    return LoadedCheckpoint(folder, cfg, model.to(device), contents.vocab, contents.preprocess, step)
