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
- the onnxruntime check, per image of its chunk: the two heads x tokens x window float matrices of
  the exported attention (scores and softmax; the graph has no fused attention; window = tokens for
  global attention), its block activations and the PyTorch reference's.

A model is a list of stages (`StageShape`): a plain ViT is one (`vit_stages`); a timm body is read
from its `feature_info` (`timm_stages`: ViT and EVA02 list a stage a block, SwinV2 and ConvNeXt a
stage of blocks at a reduction each), and the estimate takes the widest stage.

Peak = fixed + the larger of the two phases (they run one after the other). On this machine the
demo model at 448 px (patch 8, 128 wide) measured 19 MB an image in the backbone pass and 316 MB
in onnxruntime (estimated here 25 and 358, loader batches included); the whole export peaked at
2.1 GB against 2.5 GB estimated, ViT-B/448 with 10,000 tags at 3.1 GB (27 images) against 6.0 GB
(a full batch of 64). benchmarks/bench_export.py prints the estimate next to the measured peak.
It imports nothing from the project.
"""

from __future__ import annotations

import math
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
    "StageShape",
    "estimate_export_memory",
    "plan_export",
    "timm_stages",
    "vit_stages",
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
class StageShape:
    """One stage of blocks as the export's memory sees it (one image)."""

    tokens: int  # tokens (positions) a block of this stage sees
    width: int  # channels of the residual stream
    hidden: int  # the MLP's hidden width
    heads: int = 0  # attention heads (0: a convolution block, no attention)
    window: int = 0  # tokens one attention window sees (the stage's tokens for global attention)

    def block_activations(self) -> int:
        """Bytes of the widest point of one block: the residual stream plus the larger of attention (norm, qkv,
        q/k/v, output, projection: ~10 widths) or a convolution (~3 widths), and the MLP (two hidden widths)."""
        mixer = 10 * self.width if self.heads else 3 * self.width
        return FLOAT_BYTES * self.tokens * (self.width + max(mixer, self.width + 2 * self.hidden))

    def attention_matrices(self) -> int:
        """Bytes of the exported attention's scores and softmax (no fused attention in the graph): heads x tokens x window."""
        return 2 * self.heads * self.tokens * self.window * FLOAT_BYTES


def vit_stages(image_size: int, patch_size: int, embed_dim: int, num_heads: int, mlp_ratio: float, prefix_tokens: int = 1) -> tuple[StageShape, ...]:
    """A plain ViT's one stage: a token a patch (plus the class token), global attention."""
    tokens = prefix_tokens + (image_size // patch_size) ** 2
    return (StageShape(tokens, embed_dim, int(embed_dim * mlp_ratio), num_heads, tokens),)


def _hidden_width(block: Any) -> int | None:
    """The MLP's hidden width of a timm block (fc1, or SwiGLU's fc1_x; a Linear or a 1x1 convolution)."""
    mlp = getattr(block, "mlp", None)
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_x", None)
    width = getattr(fc1, "out_features", None) or getattr(fc1, "out_channels", None)
    return int(width) if width else None


def timm_stages(body: Any, architecture: str, image_size: int) -> tuple[StageShape, ...]:
    """The stages of any timm body that lists them (`feature_info`: ViT and EVA02 a block each, SwinV2 and ConvNeXt
    a stage each): tokens from the stage's reduction, its first block's MLP and attention; ExportMemoryError when
    the body does not say."""
    refusal = (
        f"the export's memory check reads a timm model's stages from its feature_info and blocks (ViT, EVA02, SwinV2, "
        f"ConvNeXt and the like); {architecture} does not describe them that way: it cannot check that this export fits"
    )
    infos = getattr(body, "feature_info", None)
    if not isinstance(infos, (list, tuple)) or not infos:
        raise ExportMemoryError(refusal)
    prefix = int(getattr(body, "num_prefix_tokens", 0) or 0)
    stages = []
    for info in infos:
        try:
            stage = body.get_submodule(str(info["module"]))
            reduction, width = int(info["reduction"]), int(info["num_chs"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ExportMemoryError(refusal) from None
        block = next((m for m in stage.modules() if _hidden_width(m)), None)
        if block is None:
            raise ExportMemoryError(refusal)
        tokens = (image_size // reduction) ** 2 + prefix
        attn = getattr(block, "attn", None)
        heads = int(getattr(attn, "num_heads", 0) or 0)
        window = getattr(attn, "window_size", None)
        window_tokens = min(tokens, math.prod(int(w) for w in window)) if isinstance(window, (tuple, list)) else tokens
        stages.append(StageShape(tokens, width, _hidden_width(block) or 0, heads, window_tokens if heads else 0))
    return tuple(stages)


@dataclass(frozen=True)
class ExportShape:
    """What the export's memory depends on."""

    image_size: int
    stages: tuple[StageShape, ...]  # vit_stages / timm_stages
    num_params: int
    vocab_tags: int  # outputs of the checkpoint's tag head (the raw metrics)
    exported_tags: int  # tag outputs of model.onnx (the exported metrics)
    loader_batches: int = 5  # uint8 batches the DataLoader holds at once (workers x prefetch + 1)
    host_passes: bool = True  # PyTorch passes and metric state in this process's memory (False on CUDA)

    def __post_init__(self) -> None:
        """An estimate needs at least one stage."""
        if not self.stages:
            raise ValueError("ExportShape needs at least one stage")


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


def estimate_export_memory(shape: ExportShape, resident: int) -> ExportEstimate:
    """The export's memory from the model's shape; `resident` is what the process holds now."""
    pixels = 3 * shape.image_size**2
    activations = max(stage.block_activations() for stage in shape.stages)
    passes = activations + 2 * FLOAT_BYTES * pixels if shape.host_passes else 0  # float input and its normalised copy
    per_image_pass = passes + shape.loader_batches * pixels  # + the uint8 batches in flight
    attention = max(stage.attention_matrices() for stage in shape.stages)
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
