"""Any model the tools open, as something to evaluate: the evaluation's one loader.

`load_model_for_eval` takes what `tagging.open_model` takes. A checkpoint, a run folder, a WD
release or a timm-family folder load through checkpoint_eval (the network itself, exact). An
exported model folder (model.onnx, or our ViT's timm folder) is evaluated as the tools run it:
`ProbabilityOutputs` puts the opened model behind the outputs `checkpoint_eval.evaluate` reads,
so the dataset, the metrics, the reports and the kept predictions are the same code for every
model. Such a folder has no run config: its `LoadedCheckpoint` has kind "export", the default
config and no data root, so evaluating it needs a dataset folder (`--data`).

validation_loop.py and tag_app.py call it. It imports checkpoint_eval, Configuration_System,
checkpoint_store, tagging and wd_format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from checkpoint_eval import LoadedCheckpoint, denormalize_images, labels_vocabulary, load_checkpoint_for_eval
from checkpoint_store import is_release_folder, resolve_checkpoint
from Configuration_System import RootConfig
from tagging import TaggingModel, model_reader, open_model, resolve_model_path
from wd_format import RATING_NAMES

__all__ = ["ProbabilityOutputs", "load_model_for_eval", "model_folder"]

# The smallest probability turned back into a logit: float32 sigmoid of the result is the probability again
# (1e-12 and 1 - 1e-12 give +-27.6, beyond float32's resolution of sigmoid).
_EPS = 1e-12


class ProbabilityOutputs(torch.nn.Module):
    """An opened model behind a training model's outputs: normalised RGB (B, 3, S, S) -> {"tag_logits": (B, T),
    "rating_logits": (B, 4)}, the logits of its tag probabilities and the log of its rating probabilities."""

    def __init__(self, model: TaggingModel) -> None:
        """Keep the opened model; its preprocessing undoes the normalisation back to its uint8 pixels."""
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised RGB (B, 3, S, S) -> the model's outputs as logits, on the images' device."""
        rgb = denormalize_images(images, self.model.preprocess).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3) uint8
        probs = torch.from_numpy(np.asarray(self.model(rgb), dtype=np.float64)).clamp(_EPS, 1.0 - _EPS)  # (B, 4 + T)
        ratings, tags = probs[:, : len(RATING_NAMES)], probs[:, len(RATING_NAMES) :]
        return {
            "tag_logits": torch.logit(tags).float().to(images.device),  # (B, T): sigmoid gives the probabilities back
            "rating_logits": torch.log(ratings).float().to(images.device),  # (B, 4): the argmax and the softmax of a softmax
        }


def load_model_for_eval(model: str | Path, device: torch.device, ema: bool = False) -> LoadedCheckpoint:
    """A checkpoint, run, release, timm-family or export folder ready to evaluate (FileNotFoundError / ValueError naming
    what is wrong; --ema only where there are EMA weights)."""
    path = resolve_model_path(model)
    if model_reader(path) == "torch":
        return load_checkpoint_for_eval(path, device, ema=ema)
    if ema:
        raise ValueError(f"{path} is an exported model folder: it has no EMA weights (leave out --ema)")
    opened = open_model(path, device.type)
    cfg = RootConfig()
    cfg.data.root = ""  # no run config: the data must be named (--data)
    return LoadedCheckpoint(path, cfg, ProbabilityOutputs(opened), labels_vocabulary(opened.labels), opened.preprocess, -1, "export")


def model_folder(model: str | Path) -> tuple[Path, bool]:
    """The folder a model is read from (a run folder or last/best pointer resolved to its step folder), and whether it
    is a run's checkpoint (False: a release or export folder, which has no run config and is evaluated on --data)."""
    path = resolve_model_path(model)
    if model_reader(path) != "torch":
        return path, False
    if is_release_folder(path):
        return path, False
    return resolve_checkpoint(path), True
