"""Loading a checkpoint for evaluation and evaluating a model: the library the evaluation tools call.

It owns:

- `model_from_checkpoint`: the one place a network is built from a checkpoint's contents (its
  model config and weights);
- `load_checkpoint_for_eval` / `LoadedCheckpoint`: a step folder or last/best pointer -> the
  model (or its EMA) on a device, its vocabulary, preprocessing, run config and step;
- `evaluate` / `EvalResult` / `EvalExamples`: a model run over a loader into a `MetricComputer`
  (tagging and rating metrics, all-reduced under DDP), the skipped samples named.

Training's inline validation (train_direct), the evaluation CLI (validation_loop), the export
(export_model) and the tagger's PyTorch backend (tag_images) all call it; none of those entry
points imports another. It imports batching, checkpoint_store, Configuration_System,
evaluation_metrics, image_preprocess, model_architecture and vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batching import ImagePreFetcher
from checkpoint_store import CheckpointContents, read_checkpoint, read_run_config, resolve_checkpoint
from Configuration_System import RootConfig
from evaluation_metrics import MetricComputer
from image_preprocess import PreprocessParams
from model_architecture import SimplifiedTagger
from vocabulary import TagVocabulary

# Called with each evaluated batch (as ImagePreFetcher yields it: normalised images, "tag_targets",
# "ratings") and the model's outputs for it.
BatchObserver = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], None]

__all__ = ["BatchObserver", "EvalExamples", "EvalResult", "LoadedCheckpoint", "evaluate", "load_checkpoint_for_eval", "model_from_checkpoint"]


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


def _denormalize(images: torch.Tensor, preprocess: PreprocessParams) -> torch.Tensor:
    """Normalised float (N, 3, H, W) back to uint8 for display."""
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
                    examples = EvalExamples(_denormalize(batch["images"][:n], preprocess), probs[:n].cpu(), batch["tag_targets"][:n].cpu())
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


def model_from_checkpoint(contents: CheckpointContents) -> SimplifiedTagger:
    """The network a checkpoint describes, with its weights loaded (on the CPU)."""
    model = SimplifiedTagger(contents.model_config)
    model.load_state_dict(contents.state_dict)
    return model


@dataclass
class LoadedCheckpoint:
    """What a checkpoint folder describes, ready to evaluate."""

    folder: Path
    cfg: RootConfig
    model: SimplifiedTagger
    vocab: TagVocabulary
    preprocess: PreprocessParams
    step: int


def load_checkpoint_for_eval(path: str | Path, device: torch.device, ema: bool = False) -> LoadedCheckpoint:
    """Model (or its EMA), vocabulary, preprocessing and config from a step folder or pointer file."""
    folder = resolve_checkpoint(path)
    cfg = read_run_config(folder)
    contents = read_checkpoint(folder, ema=ema)
    model = model_from_checkpoint(contents)
    step = contents.step if contents.step is not None else -1
    return LoadedCheckpoint(folder, cfg, model.to(device), contents.vocab, contents.preprocess, step)
