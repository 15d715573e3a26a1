"""The export's work on validation images, each step bounded by a batch it is given, never by the data.

An export needs three things from the validation images: the raw model's metrics (to fit the
calibration), the exported model's metrics (for the card and thresholds.json) and onnxruntime's
outputs next to PyTorch's (the self-check). The backbone, the expensive part, runs once:

1. `PooledTagger` runs the model as `SimplifiedTagger.forward` does (the same calls, so the raw
   metrics and the calibration fitted on them are today's) and also hands out the pooled image
   embedding (B, C). `checkpoint_eval.evaluate` streams the raw metrics; its observer writes the
   embeddings, the targets (one bit a tag) and the ratings to a `FeatureSpill`: files in a
   temporary folder, a few KB an image, nothing of it held in memory.
2. After the calibration is fitted, `exported_metrics` replays the spill in chunks through the
   fused, calibrated head: the exported model's probabilities are softmax/sigmoid of
   head(embedding), the function model.onnx computes after the backbone, so no second backbone
   pass is needed.
3. `verify_onnx` runs model.onnx and the PyTorch `WDTagger` on the same few images, a chunk at a
   time (onnxruntime materialises every attention matrix: heads x tokens^2 floats an image, 157 MB
   for a patch-8 model at 448 px), and returns the largest difference.

It imports export_calibration, wd_format and wd_model.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export_calibration import ExportMetrics
from wd_format import ONNX_INPUT, ONNX_OUTPUT, rgb_to_wd_input
from wd_model import OutputPlan, WDTagger

__all__ = ["FeatureSpill", "PooledTagger", "SpillChunk", "VerifyResult", "exported_metrics", "verify_onnx"]


class PooledTagger(nn.Module):
    """A tagger whose outputs also carry the pooled embedding: {"tag_logits", "rating_logits", "pooled": (B, C)}."""

    def __init__(self, model: nn.Module) -> None:
        """Wrap a model with forward_pooled, tag_head and rating_head (either family)."""
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> the model's two heads and the embedding they read."""
        pooled = self.model.forward_pooled(images)  # (B, C)
        return {"tag_logits": self.model.tag_head(pooled), "rating_logits": self.model.rating_head(pooled), "pooled": pooled}


@dataclass
class SpillChunk:
    """Consecutive spilled images: embeddings, targets over the vocabulary, ratings."""

    pooled: torch.Tensor  # (k, C) float32
    targets: torch.Tensor  # (k, V) float32 in {0, 1}
    ratings: torch.Tensor  # (k,) int64, -1 unknown


class FeatureSpill:
    """Per-image embeddings, targets and ratings appended to files and read back a chunk at a time.

    Use it as a context manager: the temporary folder is removed on exit. Memory holds one
    appended batch or one read chunk, whatever the number of images.
    """

    def __init__(self, width: int, num_tags: int, folder: str | Path | None = None) -> None:
        """An empty spill for embeddings of `width` floats and targets over `num_tags` tags."""
        self.width = int(width)
        self.num_tags = int(num_tags)
        self._dir = tempfile.TemporaryDirectory(prefix="export-spill-", dir=folder)
        root = Path(self._dir.name)
        self._paths = {"pooled": root / "pooled.f32", "targets": root / "targets.bits", "ratings": root / "ratings.i8"}
        self._row_bytes = {"pooled": 4 * self.width, "targets": math.ceil(self.num_tags / 8), "ratings": 1}
        self._handles = {name: open(path, "wb") for name, path in self._paths.items()}  # noqa: SIM115 (closed in close())
        self.rows = 0

    def __enter__(self) -> FeatureSpill:
        """The spill itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the files and remove the folder."""
        self.close()

    def close(self) -> None:
        """Close the files and remove the folder (idempotent)."""
        for handle in self._handles.values():
            handle.close()
        self._dir.cleanup()

    def append(self, pooled: torch.Tensor, targets: torch.Tensor, ratings: torch.Tensor) -> None:
        """Add a batch: embeddings (B, C), multi-hot targets (B, V), ratings (B,) with -1 unknown."""
        if (
            pooled.shape[1:] != (self.width,)
            or targets.shape[1:] != (self.num_tags,)
            or ratings.shape != pooled.shape[:1]
            or targets.shape[0] != pooled.shape[0]
        ):
            raise ValueError(
                f"spill expects pooled (B, {self.width}), targets (B, {self.num_tags}), ratings (B,); got "
                f"{tuple(pooled.shape)}, {tuple(targets.shape)}, {tuple(ratings.shape)}"
            )
        bits = np.packbits(targets.detach().cpu().numpy() > 0.5, axis=1, bitorder="little")  # (B, ceil(V / 8)) uint8
        self._handles["pooled"].write(pooled.detach().float().cpu().numpy().astype("<f4", copy=False).tobytes())
        self._handles["targets"].write(bits.tobytes())
        self._handles["ratings"].write(ratings.detach().cpu().numpy().astype(np.int8).tobytes())
        self.rows += int(pooled.shape[0])

    def observe(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        """A `checkpoint_eval.evaluate` observer: spill the batch's embeddings, targets and ratings."""
        self.append(outputs["pooled"], batch["tag_targets"], batch["ratings"])

    def chunks(self, rows: int) -> Iterator[SpillChunk]:
        """Everything appended so far, in order, at most `rows` images a chunk."""
        if rows < 1:
            raise ValueError(f"chunk rows must be >= 1, got {rows}")
        for handle in self._handles.values():
            handle.flush()
        files = {name: open(path, "rb") for name, path in self._paths.items()}  # noqa: SIM115 (closed below)
        try:
            for start in range(0, self.rows, rows):
                k = min(rows, self.rows - start)
                raw = {name: files[name].read(k * self._row_bytes[name]) for name in files}
                pooled = np.frombuffer(raw["pooled"], dtype="<f4").reshape(k, self.width)
                bits = np.frombuffer(raw["targets"], dtype=np.uint8).reshape(k, self._row_bytes["targets"])
                targets = np.unpackbits(bits, axis=1, count=self.num_tags, bitorder="little")  # (k, V) uint8
                ratings = np.frombuffer(raw["ratings"], dtype=np.int8)
                yield SpillChunk(torch.from_numpy(pooled.copy()), torch.from_numpy(targets).float(), torch.from_numpy(ratings.astype(np.int64)))
        finally:
            for handle in files.values():
                handle.close()


def exported_metrics(
    spill: FeatureSpill, head: nn.Linear, plan: OutputPlan, targets: dict[str, float], *, chunk: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """ExportMetrics of the exported model: the spilled embeddings through the fused head, `chunk` images at a time."""
    metrics = ExportMetrics(plan, targets, device=device)
    with torch.inference_mode():
        for part in spill.chunks(chunk):
            probs = WDTagger.probabilities(head(part.pooled.to(device)))  # (k, 4 + T)
            metrics.update(probs, part.targets.to(device), part.ratings.to(device))
    return metrics.compute()


@dataclass
class VerifyResult:
    """onnxruntime against PyTorch: the largest absolute difference and the images compared."""

    max_abs_diff: float
    images: int


def verify_onnx(session: Any, wd: WDTagger, batches: Iterable[Mapping[str, Any]], *, limit: int, chunk: int) -> VerifyResult:
    """Run model.onnx and `wd` on the first `limit` images of `batches` (0: all), `chunk` images a call."""
    if chunk < 1:
        raise ValueError(f"verification chunk must be >= 1, got {chunk}")
    device = next(wd.parameters()).device
    max_diff, done = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            if batch.get("encoded"):
                raise ValueError("the export's verification reads decoded pixels; a batch held undecoded JPEG bytes")
            images = batch["images"]  # (B, 3, S, S) uint8 RGB, letterboxed
            for start in range(0, images.shape[0], chunk):
                take = min(images.shape[0] - start, chunk) if limit <= 0 else min(images.shape[0] - start, chunk, limit - done)
                if take <= 0:
                    return VerifyResult(max_diff, done)
                part = images[start : start + take]  # (k, 3, S, S)
                onnx_probs = session.run([ONNX_OUTPUT], {ONNX_INPUT: rgb_to_wd_input(part.numpy())})[0]  # (k, 4 + T)
                torch_probs = WDTagger.probabilities(wd.logits_from_rgb(part.to(device))).cpu().numpy()  # (k, 4 + T)
                max_diff = max(max_diff, float(np.abs(onnx_probs - torch_probs).max()))
                done += take
    return VerifyResult(max_diff, done)
