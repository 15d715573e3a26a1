"""What an export needs in memory, estimated in microseconds before it starts, and the batches that fit.

The operating system kills a process that runs out of memory without a message, so the export,
like training (machine_fit), checks itself before the heavy part and refuses with one line naming
the flag that makes it fit. The estimate is arithmetic on the model's shape (no probe):

- fixed: what the process holds now (interpreter, libraries, the loaded checkpoint), the weights
  again WEIGHT_COPIES times (the fixed-size copy, the ONNX export's graph and serialised bytes,
  onnxruntime's initialisers and pre-packed matrices) and the metric state (two int32 histograms of
  `METRIC_BINS` bins a tag, for the larger of the vocabulary and the exported tags) with the
  temporaries of computing it;
- the backbone pass, per image of its batch: the widest point of an inference block (PyTorch's
  scaled_dot_product_attention keeps no tokens x tokens matrix on the CPU) of 4-byte tokens, the
  normalised input, and the uint8 batches the DataLoader workers hold ahead;
- the onnxruntime check, per image of its chunk: the two heads x tokens^2 float matrices of the
  exported attention (scores and softmax; the graph has no fused attention), its block activations
  and the PyTorch reference's.

Peak = fixed + the larger of the two phases (they run one after the other). On this machine the
demo model at 448 px (patch 8, 128 wide) measured 19 MB an image in the backbone pass and 316 MB
in onnxruntime (estimated here 25 and 358, loader batches included); the whole export peaked at
2.1 GB against 2.5 GB estimated, ViT-B/448 with 10,000 tags at 3.1 GB (27 images) against 6.0 GB
(a full batch of 64). benchmarks/bench_export.py prints the estimate next to the measured peak.
It imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "METRIC_BINS",
    "ORT_CHUNK_TARGET",
    "WEIGHT_COPIES",
    "ExportEstimate",
    "ExportMemoryError",
    "ExportPlan",
    "ExportShape",
    "estimate_export_memory",
    "plan_export",
    "timm_shape",
]

FLOAT_BYTES = 4
METRIC_BINS = 4096  # MetricComputer's default, used by both the raw and the exported metrics
METRIC_COMPUTE_BYTES = 256 << 20  # the chunked per-tag curve computation's temporaries (4M-cell slices)
WEIGHT_COPIES = 6
# The largest onnxruntime call the check makes: beyond a few images a call is no faster per image,
# and every image costs heads x tokens^2 floats twice.
ORT_CHUNK_TARGET = 1 << 30


class ExportMemoryError(ValueError):
    """The export would not fit in the memory it may use; the message names the flag that makes it fit."""


@dataclass(frozen=True)
class ExportShape:
    """What the export's memory depends on."""

    image_size: int
    patch_size: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    num_params: int
    vocab_tags: int  # outputs of the checkpoint's tag head (the raw metrics)
    exported_tags: int  # tag outputs of model.onnx (the exported metrics)
    loader_batches: int = 5  # uint8 batches the DataLoader holds at once (workers x prefetch + 1)
    host_passes: bool = True  # PyTorch passes and metric state in this process's memory (False on CUDA)

    @property
    def tokens(self) -> int:
        """Tokens a block sees: the class token and one per patch."""
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ExportEstimate:
    """Bytes: fixed, and per image of the backbone pass and of the onnxruntime check."""

    resident: int  # held by the process when estimated
    weights: int  # the further copies of the weights
    metrics: int  # metric state and its computation
    per_image_pass: int
    per_image_verify: int

    @property
    def fixed(self) -> int:
        """Bytes whatever the batch sizes."""
        return self.resident + self.weights + self.metrics

    def needed(self, batch: int, chunk: int) -> int:
        """Peak bytes with backbone batches of `batch` images and onnxruntime calls of `chunk`."""
        return self.fixed + max(batch * self.per_image_pass, chunk * self.per_image_verify)

    def largest_batch(self, budget: int) -> int:
        """The largest backbone batch that fits in `budget` bytes (0: none)."""
        return max(0, (budget - self.fixed) // max(1, self.per_image_pass))

    def largest_chunk(self, budget: int) -> int:
        """The largest onnxruntime chunk that fits in `budget` bytes and ORT_CHUNK_TARGET (0: none fits)."""
        fits = max(0, (budget - self.fixed) // max(1, self.per_image_verify))
        return min(fits, max(1, ORT_CHUNK_TARGET // max(1, self.per_image_verify))) if fits else 0


def _block_activations(shape: ExportShape) -> int:
    """Bytes of one image's widest inference block: the residual stream plus the larger of
    attention (norm, qkv, q/k/v, output, projection: ~10 widths) and MLP (two hidden widths)."""
    width = shape.embed_dim
    hidden = int(width * shape.mlp_ratio)
    return FLOAT_BYTES * shape.tokens * (width + max(10 * width, width + 2 * hidden))


def timm_shape(body: Any, architecture: str) -> dict[str, float]:
    """patch_size, embed_dim, num_heads and mlp_ratio of a timm body that is a plain stack of attention blocks
    (ViT, EVA02: `patch_embed`, `blocks[i].attn.num_heads`, an MLP with fc1 or fc1_x); ExportMemoryError otherwise."""
    patch = getattr(getattr(body, "patch_embed", None), "patch_size", None)
    blocks = getattr(body, "blocks", None)
    first = blocks[0] if blocks is not None and len(blocks) else None
    heads = getattr(getattr(first, "attn", None), "num_heads", None)
    mlp = getattr(first, "mlp", None)
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_x", None)
    width = getattr(body, "embed_dim", None)
    if patch is None or heads is None or fc1 is None or not isinstance(width, int):
        raise ExportMemoryError(
            f"the export's memory check can estimate timm models that are a plain stack of attention blocks (ViT, EVA02), "
            f"not {architecture} (a staged model): it cannot check that this export fits"
        )
    patch_size = int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)
    return {"patch_size": patch_size, "embed_dim": width, "num_heads": int(heads), "mlp_ratio": float(fc1.out_features) / width}


def estimate_export_memory(shape: ExportShape, resident: int) -> ExportEstimate:
    """The export's memory from the model's shape; `resident` is what the process holds now."""
    pixels = 3 * shape.image_size**2
    activations = _block_activations(shape)
    passes = activations + 2 * FLOAT_BYTES * pixels if shape.host_passes else 0  # float input and its normalised copy
    per_image_pass = passes + shape.loader_batches * pixels  # + the uint8 batches in flight
    attention = 2 * shape.num_heads * shape.tokens**2 * FLOAT_BYTES
    per_image_verify = attention + activations + passes + (1 + FLOAT_BYTES) * pixels  # + uint8 and the float BGR input
    metrics = 2 * METRIC_BINS * 4 * max(shape.vocab_tags, shape.exported_tags) + METRIC_COMPUTE_BYTES if shape.host_passes else 0
    return ExportEstimate(int(resident), WEIGHT_COPIES * FLOAT_BYTES * shape.num_params, metrics, per_image_pass, per_image_verify)


@dataclass(frozen=True)
class ExportPlan:
    """The batch sizes the export runs with, and what they need."""

    batch_size: int  # backbone batch
    verify_chunk: int  # images an onnxruntime call
    needed: int  # estimated peak bytes
    budget: int  # bytes the export may use
    how: str  # how the batch was chosen

    def describe(self) -> str:
        """One line for the console: the batches and the memory they need."""
        return (
            f"batches of {self.batch_size} ({self.how}), onnxruntime {self.verify_chunk} images a call: "
            f"about {_size(self.needed)} of memory, {_size(self.budget)} can be used"
        )


def _size(n: float) -> str:
    """Bytes as GB with one decimal, or as whole MB below 1 GB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def plan_export(
    estimate: ExportEstimate, *, image_size: int, requested_batch: int, default_batch: int, budget: int, limit_flag: str = ""
) -> ExportPlan:
    """Batch sizes that fit in `budget` bytes, or ExportMemoryError naming the flag that makes the export fit.

    requested_batch > 0 is the user's --batch-size, kept as given or refused; 0 takes default_batch
    (the run's validation batch) or the largest batch below it that fits. `limit_flag` names the
    flag that set the budget, when one did (a refusal then says it can be raised).
    """
    if default_batch < 1 or requested_batch < 0:
        raise ValueError(f"batch sizes must be positive, got default {default_batch} and requested {requested_batch}")
    batch_fits, chunk_fits = estimate.largest_batch(budget), estimate.largest_chunk(budget)
    if batch_fits < 1 or chunk_fits < 1:
        # What would make it fit: less per image (a smaller input), unless the fixed part alone is too much.
        remedy = "export at a smaller --image-size" if estimate.fixed < budget else "this needs a machine with more free memory"
        raise ExportMemoryError(
            f"an export at {image_size} px needs at least {_size(estimate.needed(1, 1))} of memory (weights, metric state and what this "
            f"process holds: {_size(estimate.fixed)}; one image through onnxruntime's attention: {_size(estimate.per_image_verify)}) "
            f"but {_size(budget)} can be used: {remedy}" + (f", or raise {limit_flag}" if limit_flag else "")
        )
    if requested_batch > batch_fits:
        raise ExportMemoryError(
            f"--batch-size {requested_batch} needs about {_size(estimate.needed(requested_batch, 1))} of memory at {image_size} px "
            f"({_size(estimate.per_image_pass)} an image) but {_size(budget)} can be used: use --batch-size {batch_fits} or lower "
            "(or leave it out: the export picks a batch that fits)"
        )
    if requested_batch:
        batch, how = requested_batch, f"--batch-size {requested_batch}"
    elif default_batch <= batch_fits:
        batch, how = default_batch, "the run's validation batch"
    else:
        batch, how = batch_fits, f"auto: the run's validation batch {default_batch} does not fit in {_size(budget)}"
    chunk = min(chunk_fits, batch)
    return ExportPlan(batch, chunk, estimate.needed(batch, chunk), budget, how)
