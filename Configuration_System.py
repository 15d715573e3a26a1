"""The configuration tree: one dataclass per section, YAML loading, validation, overrides, dump.

Every key has a type, a default, a one-line help text and (where it matters) a range or a set of
choices, declared once on the field. Loading rejects unknown keys (naming the nearest valid one),
values of the wrong type and values out of range, before any work starts. The documented
reference file `configs/unified_config.yaml` is generated from these declarations
(`python Configuration_System.py reference`), and a test keeps it in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml

from file_io import atomic_write_text


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key, value or file."""


def _opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
) -> Any:
    """A dataclass field carrying its help text and its allowed range or choices."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the images are, how they are read, split and batched."""

    root: str = _opt("data/demo", "Dataset folder: images with sidecar JSON files (X.json or X.ext.json).")
    manifest: str = _opt(
        "",
        "Optional JSON Lines manifest of {file, tags, rating} records used instead of sidecars, 'file' relative to data.root (or to the manifest's folder when data.root is ''); '' = scan data.root.",
    )
    demo_images: int = _opt(0, "If > 0 and root does not exist, generate the synthetic demo dataset there with this many images.", ge=0)
    image_size: int = _opt(448, "Square training resolution in pixels (images are letterboxed to it).", ge=16)
    batch_size: int = _opt(64, "Images per optimizer micro-batch on each process.", ge=1)
    num_workers: int = _opt(
        -1,
        "DataLoader worker processes: -1 = what the cores allow (the cores this process may use, less one for the main process, shared among torchrun's local processes, at most 8; the resolved number is printed and saved in the run's config.yaml); 0 = load in the main process.",
        ge=-1,
    )
    prefetch_factor: int = _opt(2, "Batches each worker prepares ahead.", ge=1)
    worker_start_method: str = _opt(
        "",
        "How worker processes start: '' (the platform's default), spawn (the only one on Windows), fork or forkserver.",
        choices=("", "spawn", "fork", "forkserver"),
    )
    persistent_workers: bool = _opt(True, "Keep worker processes alive between epochs and validations (epochs start at once, notably on Windows).")
    pin_memory: bool = _opt(True, "Pin host batches for asynchronous copies (only used on CUDA).")
    val_fraction: float = _opt(0.1, "Share of samples held out for validation, chosen by a hash of the seed and the sample id.", ge=0.0, lt=1.0)
    max_val_samples: int = _opt(0, "Cap on validation samples (0 = no cap); capped-out samples are excluded, never moved to training.", ge=0)
    cache_dir: str = _opt(
        "",
        "Prepared cache: every image letterboxed once into memory-mapped shards here (built on first use, refreshed for changed files; must be outside data.root); '' = decode every time.",
    )
    cache_format: str = _opt(
        "raw",
        "How data.cache_dir stores the letterboxed pixels: raw (3 bytes a pixel, 602 KB an image at 448 px, read without decoding, exact) or jpeg (the same pixels JPEG-encoded once at data.cache_quality: 33-54 KB an image at 448 px, decoded again at 1,200-1,400 images/s per worker, mean error 2-3 grey levels). Changing it (or the quality) rebuilds the cache in place.",
        choices=("raw", "jpeg"),
    )
    cache_quality: int = _opt(90, "JPEG quality of a data.cache_format=jpeg cache (4:2:0 chroma); see BENCHMARKS.md 'Cache formats'.", ge=50, le=100)
    decode_on_device: bool = _opt(
        False,
        "With data.cache_format=jpeg: workers hand over the compressed bytes and the batch is decoded on the training device (torchvision.io.decode_jpeg; for CUDA, where nvJPEG frees the CPU workers); flips are applied after decoding. Ignored for raw caches.",
    )
    scan_index: bool = _opt(
        True,
        "Keep the start-up scan's result (the sample table and the skip report) in data.scan_index_dir and reuse it on a resume or the next run over the same data: only files whose size or mtime changed, and new ones, are read again; deleted ones are dropped.",
    )
    scan_index_dir: str = _opt("", "Folder for the scan index ('' = output_root/scan_index); one file per dataset root and scan setting.")
    rescan: bool = _opt(False, "Ignore a saved scan index and scan every file again (the index is rewritten).")
    progressive_image_size: int = _opt(
        0,
        "Progressive resolution: train the epochs that start within the first data.progressive_share of the optimizer steps at this smaller size (each batch resized on the device from data.image_size, position embeddings resampled), then at data.image_size; validation always at data.image_size. 0 = off; a multiple of model.patch_size.",
        ge=0,
    )
    progressive_share: float = _opt(
        0.7, "Share of the optimizer steps trained at data.progressive_image_size (the switch waits for the next epoch boundary).", gt=0.0, lt=1.0
    )
    repeat_factor_threshold: float = _opt(
        0.0,
        "Repeat-factor sampling (LVIS): an image whose rarest tag is on a share f of the training images appears max(1, sqrt(t / f)) times an epoch (copies augmented apart); t is this threshold, e.g. 0.001. 0 = off (BENCHMARKS.md: no gain at our lengths).",
        ge=0.0,
        lt=1.0,
    )
    max_tags_per_sample: int = _opt(
        2048, "A sidecar (or manifest record) with more tags than this is skipped as 'too_many_tags' (no real booru post comes close).", ge=1
    )
    max_tag_chars: int = _opt(256, "A tag longer than this many characters is dropped and counted (booru tag names stay far below).", ge=1)
    max_sidecar_bytes: int = _opt(4_194_304, "A sidecar JSON file larger than this is skipped unread as 'sidecar_too_large'.", ge=1024)
    symlinks: str = _opt(
        "inside_root",
        "Symbolic links to images, folders and sidecars: inside_root follows a link only when its target lies inside data.root (others are skipped and counted); follow follows every link (symlink farms). Loops are skipped either way.",
        choices=("inside_root", "follow"),
    )
    verify: str = _opt(
        "header", "Start-up image check: none, header (open and read size) or decode (full decode, slow).", choices=("none", "header", "decode")
    )
    max_bad_fraction: float = _opt(0.05, "Stop the run when more than this share of the data turns out to be broken.", ge=0.0, le=1.0)
    min_tag_frequency: int = _opt(
        2,
        "Tags seen in fewer training samples than this are left out of the vocabulary (the default 2: a tag only one sample carries can neither be learned nor validated, and one hostile sidecar cannot add columns).",
        ge=1,
    )
    top_k_tags: int = _opt(0, "Keep only the K most frequent tags (0 = no cap).", ge=0)
    max_vocabulary_tags: int = _opt(
        100_000,
        "Hard cap on the vocabulary size, whatever top_k_tags says: the rarest tags beyond it are left out and counted in data_report.json (validation memory grows with the tag count).",
        ge=1,
    )
    ignore_tags_file: str = _opt("configs/ignore_tags.txt", "File of meta tags never used as outputs (one a line); '' = none.")
    vocabulary: str = _opt("", "Use this vocabulary.json instead of building one from the training split; '' = build.")
    vocabulary_mode: str = _opt(
        "build",
        "build: the vocabulary comes from the training split; extend: every tag of the released tagger in model.init_from (a WD-format folder) first, then the training split's new tags.",
        choices=("build", "extend"),
    )
    pad_color: list = _opt([255, 255, 255], "RGB colour of the letterbox padding and of composited transparency.")
    image_layout: str = _opt(
        "letterbox",
        "How an image becomes a square: letterbox (resized to fit data.image_size, then padded; JPEG draft decoding, fast) or pad_then_resize (padded to a square at full resolution, then resized with Pillow: the WD v3 reference recipe, pixel for pixel; slower on large images).",
        choices=("letterbox", "pad_then_resize"),
    )
    resample: str = _opt("bicubic", "Resampling filter of the resize (antialiased).", choices=("bicubic", "bilinear", "lanczos"))
    preprocess_from_init: bool = _opt(
        True,
        "With model.family=timm and model.init_from a released tagger folder (or a checkpoint): data.image_size, mean, std, pad_color, image_layout and resample are taken from it (a release: its config.json pretrained_cfg, white padding, pad_then_resize), replacing the values set here; the resolved values are printed and saved in the run's config.yaml. false = use the values set here.",
    )
    mean: list = _opt([0.5, 0.5, 0.5], "Per-channel mean used to normalise images on the device.")
    std: list = _opt([0.5, 0.5, 0.5], "Per-channel standard deviation used to normalise images on the device.")


@dataclass
class AugmentConfig:
    """Training-time augmentation (validation uses none)."""

    flip_prob: float = _opt(0.5, "Probability of a horizontal flip (left/right tags are swapped; some tags veto it).", ge=0.0, le=1.0)
    orientation_map: str = _opt("configs/orientation_map.json", "Left/right tag pairs and flip-forbidding tags.")
    orientation_safety: str = _opt(
        "conservative",
        "conservative: veto flips of samples with unmapped orientation-looking tags; permissive: only forbid tags veto.",
        choices=("conservative", "permissive"),
    )
    brightness: float = _opt(0.1, "Colour jitter: maximum relative brightness change.", ge=0.0, le=1.0)
    contrast: float = _opt(0.1, "Colour jitter: maximum relative contrast change.", ge=0.0, le=1.0)
    saturation: float = _opt(0.1, "Colour jitter: maximum relative saturation change.", ge=0.0, le=1.0)
    mixup_alpha: float = _opt(
        0.0,
        "MixUp: blend each training batch with a shuffled copy of itself, weight ~ Beta(alpha, alpha); tag and rating targets are blended alike (WD v3 uses 0.8). 0 = off (BENCHMARKS.md: it did not help at our lengths).",
        ge=0.0,
    )
    cutmix_alpha: float = _opt(
        0.0, "CutMix: paste a box of a shuffled partner, box area ~ Beta(alpha, alpha); targets mixed by area. 0 = off.", ge=0.0
    )
    mix_prob: float = _opt(1.0, "Share of training batches that MixUp/CutMix touch (when an alpha is > 0).", ge=0.0, le=1.0)
    mix_switch_prob: float = _opt(0.5, "With both alphas > 0: the share of mixed batches that use CutMix instead of MixUp.", ge=0.0, le=1.0)


@dataclass
class ModelConfig:
    """The network: our Vision Transformer (family vit) or a timm model (family timm)."""

    family: str = _opt(
        "vit",
        "Backbone family: vit (our ViT, SimplifiedTagger: the keys preset to pooling below; for training from scratch) or timm (any timm model, e.g. a WD v3 release's ViT, EVA02, SwinV2 or ConvNeXt, named by model.timm_architecture and model.timm_model_args, or by the released tagger folder in model.init_from). Both get the same tag and rating heads.",
        choices=("vit", "timm"),
    )
    timm_architecture: str = _opt(
        "",
        "model.family=timm: the timm model name (e.g. vit_base_patch16_224, eva02_large_patch14_448, swinv2_base_window8_256, convnext_base, vit_base_patch16_siglip_224); '' = the architecture of model.init_from (a released tagger folder's config.json, or a timm-family checkpoint). Built with pretrained=False: nothing downloads.",
    )
    timm_model_args: dict = _opt(
        {},
        "model.family=timm: keyword arguments of timm.create_model for model.timm_architecture (e.g. {img_size: 448, depth: 12}); img_size defaults to data.image_size where the model takes one. Empty when the architecture comes from model.init_from (its own model_args are used).",
    )
    preset: str = _opt(
        "base", "ViT size: tiny (192x12), small (384x12), base (768x12) or large (1024x24).", choices=("tiny", "small", "base", "large")
    )
    patch_size: int = _opt(16, "Patch size in pixels; data.image_size must be a multiple of it.", ge=1)
    embed_dim: int = _opt(0, "Override the preset's width (0 = preset).", ge=0)
    depth: int = _opt(0, "Override the preset's number of blocks (0 = preset).", ge=0)
    num_heads: int = _opt(0, "Override the preset's attention heads (0 = preset).", ge=0)
    mlp_ratio: float = _opt(4.0, "MLP hidden width as a multiple of the embedding width.", gt=0.0)
    drop_path_rate: float = _opt(
        0.1, "Stochastic depth rate at the last block (linearly increasing); for a timm model, its drop_path_rate argument.", ge=0.0, lt=1.0
    )
    layer_scale_init: float = _opt(0.0, "LayerScale initial value (0 = no LayerScale).", ge=0.0)
    pooling: str = _opt("cls", "Feature fed to the heads: the class token (cls) or the mean of patch tokens (avg).", choices=("cls", "avg"))
    grad_checkpoint_every: int = _opt(
        0,
        "Recompute activations of every n-th block in backward to save memory (0 = off); a timm model checkpoints every block for any value > 0 (timm's set_grad_checkpointing).",
        ge=0,
    )
    init_from: str = _opt(
        "",
        "Start from these weights: a released WD tagger folder (config.json + model.safetensors + selected_tags.csv, e.g. SmilingWolf/wd-vit-tagger-v3 or wd-eva02-large-tagger-v3 downloaded by you; with model.family=timm any timm architecture, weights loaded exactly; tag-head rows matched by tag name), a checkpoint folder, or (family vit) ViT weights in timm's layout (.safetensors or .pth, backbone only); '' = random.",
    )
    compile: bool = _opt(False, "Compile the model with torch.compile.")


@dataclass
class LossConfig:
    """Tag loss (binary cross-entropy by default, asymmetric focal loss when gamma/clip are set) plus cross-entropy for the rating."""

    gamma_neg: float = _opt(
        0.0,
        "Focusing exponent for negative tags (asymmetric focal loss; 0 with clip 0 = plain BCE, the default: on the long-tail benchmark BCE beat gamma_neg 4 / clip 0.05 on mAP, macro-F1 and rare-tag AP, see BENCHMARKS.md).",
        ge=0.0,
    )
    gamma_pos: float = _opt(0.0, "Focusing exponent for positive tags.", ge=0.0)
    clip: float = _opt(0.0, "Probability margin shifting negatives down (0 = none; ASL uses 0.05).", ge=0.0, lt=1.0)
    eps: float = _opt(1e-8, "Numerical floor inside the logarithms.", gt=0.0, lt=1e-2)
    tag_weighting: str = _opt("none", "Per-tag weights from training frequencies.", choices=("none", "inverse_sqrt", "effective_number"))
    tag_weight: float = _opt(1.0, "Weight of the tag loss in the total.", ge=0.0)
    rating_weight: float = _opt(1.0, "Weight of the rating loss in the total.", ge=0.0)
    rating_label_smoothing: float = _opt(0.0, "Label smoothing of the rating cross-entropy.", ge=0.0, lt=1.0)


@dataclass
class TrainingConfig:
    """Optimisation, schedule, precision and reproducibility."""

    epochs: int = _opt(10, "Passes over the training split.", ge=1)
    max_steps: int = _opt(0, "Stop after this many optimizer steps (0 = no cap; the schedule then spans all epochs).", ge=0)
    learning_rate: float = _opt(1e-3, "Peak learning rate of AdamW at the reference batch size.", gt=0.0, le=1.0)
    lr_scaling: str = _opt(
        "none",
        "Scale the learning rate with the effective batch (batch x accumulation x processes) over reference_batch_size: none, linear or sqrt.",
        choices=("none", "linear", "sqrt"),
    )
    reference_batch_size: int = _opt(256, "Effective batch size at which learning_rate applies unscaled.", ge=1)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to biases, norms, position embedding, class token).", ge=0.0)
    layer_decay: float = _opt(
        1.0,
        "Layer-wise learning-rate decay for fine-tuning (BEiT/timm): block i of L trains at lr * layer_decay ** (L + 1 - layer), the heads at lr. 1 = off; 0.65-0.85 is usual with model.init_from.",
        gt=0.0,
        le=1.0,
    )
    beta1: float = _opt(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    beta2: float = _opt(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    scheduler: str = _opt(
        "cosine", "Learning-rate schedule: cosine (linear warm-up then cosine) or cosine_restarts.", choices=("cosine", "cosine_restarts")
    )
    warmup_steps: int = _opt(0, "Linear warm-up in optimizer steps (0 = use warmup_ratio).", ge=0)
    warmup_ratio: float = _opt(0.05, "Warm-up as a share of all optimizer steps, when warmup_steps is 0.", ge=0.0, lt=1.0)
    min_lr_ratio: float = _opt(0.01, "Final learning rate as a share of the peak.", ge=0.0, le=1.0)
    restart_period_steps: int = _opt(0, "cosine_restarts: first cycle length in steps (0 = a quarter of the run).", ge=0)
    restart_period_mult: float = _opt(1.0, "cosine_restarts: each cycle is this many times longer than the last.", ge=1.0)
    restart_decay: float = _opt(1.0, "cosine_restarts: peak learning rate multiplier per restart.", gt=0.0, le=1.0)
    freeze_body_steps: int = _opt(
        0,
        "Fine-tuning: train only the tag and rating heads for the first N optimizer steps (the body frozen: run in eval mode without gradients, so no update, no weight decay, no optimizer state and an unchanged EMA for it), then everything; -1 = the whole run (SmilingWolf's --freeze-model-body); 0 = off.",
        ge=-1,
    )
    body_lr_scale: float = _opt(
        1.0,
        "Fine-tuning: the learning rate of everything but the heads as a share of the heads' (combined with layer_decay), e.g. 0.1 to move a released body less than its new head. 1 = off.",
        gt=0.0,
        le=1.0,
    )
    grad_accum_steps: int = _opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    micro_batch_size: int = _opt(
        0,
        "Images per forward/backward pass: 0 = automatic (on CUDA, a probe before the first step and any out-of-memory error later split each batch into the largest equal micro-batches that fit); N = always split into micro-batches of N (must divide data.batch_size); -1 = never split. The optimizer step, the schedule and the results stay those of data.batch_size.",
        ge=-1,
    )
    memory_check: bool = _opt(
        True,
        "On the CPU, estimate a training step's memory before the first step and stop with a one-line message naming data.batch_size when it cannot fit in the available RAM.",
    )
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this (0 = no clipping).", ge=0.0)
    precision: str = _opt(
        "auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with loss scaling) or fp32.", choices=("auto", "bf16", "fp16", "fp32")
    )
    max_consecutive_skips: int = _opt(10, "Stop (with a checkpoint of the last good state) after this many non-finite steps in a row.", ge=1)
    ema_decay: float = _opt(0.0, "Exponential moving average of the weights (0 = off, e.g. 0.9998).", ge=0.0, lt=1.0)
    ema_warmup_steps: int = _opt(0, "Steps over which the EMA decay ramps up from 0.", ge=0)
    seed: int = _opt(0, "Seed of the split, the sampler, the augmentation and the initial weights.", ge=0)
    device: str = _opt("auto", "auto (CUDA when available), cuda, cuda:N or cpu.")
    deterministic: bool = _opt(False, "Ask PyTorch for deterministic kernels (slower on GPU).")


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    every_steps: int = _opt(0, "Write a checkpoint every N optimizer steps (0 = at the end of each epoch).", ge=0)
    keep_last: int = _opt(3, "Step folders kept besides the best one.", ge=1)
    async_write: bool = _opt(True, "Write checkpoints from a background thread after copying the state to the CPU.")


@dataclass
class ValidationConfig:
    """Inline validation during training."""

    every_steps: int = _opt(0, "Validate every N optimizer steps (0 = at the end of each epoch).", ge=0)
    threshold: float = _opt(0.5, "Probability threshold for F1, precision and recall.", gt=0.0, lt=1.0)
    max_batches: int = _opt(0, "Validate on at most this many batches (0 = the whole split).", ge=0)
    batch_size: int = _opt(0, "Validation batch size (0 = data.batch_size).", ge=0)
    selection_metric: str = _opt("mAP", "Metric that picks the best checkpoint (higher is better).", choices=("mAP", "f1_micro", "f1_macro"))
    use_ema: bool = _opt(False, "Validate and select with the EMA weights (needs training.ema_decay > 0).")
    early_stopping_patience: int = _opt(0, "Stop after this many validations without improvement (0 = never).", ge=0)
    early_stopping_min_delta: float = _opt(0.0, "Improvement smaller than this does not count.", ge=0.0)


@dataclass
class MonitorConfig:
    """Console, TensorBoard and metrics.jsonl."""

    log_every_steps: int = _opt(10, "Write training scalars every N optimizer steps.", ge=1)
    console_interval_s: float = _opt(10.0, "Seconds between console progress lines.", ge=0.0)
    tensorboard: bool = _opt(True, "Write TensorBoard event files to the run folder.")
    system_stats_interval_s: float = _opt(15.0, "Seconds between CPU/RAM/GPU samples (0 = off).", ge=0.0)
    validation_images: int = _opt(8, "Validation images shown in TensorBoard with their true and top predicted tags (0 = none).", ge=0, le=64)
    wandb_project: str = _opt("", "Also log to this Weights & Biases project when wandb is installed ('' = off).")
    wandb_mode: str = _opt(
        "offline", "Weights & Biases mode: offline (no network; sync later with `wandb sync`) or online.", choices=("offline", "online")
    )
    pr_curve_tags: int = _opt(
        3, "Tags whose precision-recall curve is logged at each validation (the most frequent, a median and the rarest).", ge=0, le=3
    )
    sample_log: bool = _opt(False, "Write the ids of the samples every training step trained on to sample_log/rank_<r>.jsonl.")


@dataclass
class RootConfig:
    """The whole run."""

    experiment_name: str = _opt("experiment", "Name of the run folder under output_root.")
    output_root: str = _opt("runs", "Folder holding run folders.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset, split and loading."})
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "Training augmentation."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The Vision Transformer."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Loss functions."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata={"help": "Inline validation."})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"help": "Logging."})

    @property
    def run_dir(self) -> Path:
        """The run folder: output_root/experiment_name."""
        return Path(self.output_root) / self.experiment_name


# --------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key below a section, for 'did you mean' suggestions."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if _is_section(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], name + "."))
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    """'unknown config key', with the nearest valid key: first in the same section, then anywhere."""
    candidates = _all_keys(RootConfig)
    parent = key.rpartition(".")[0]
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check (and where lossless, convert) a value against its field type."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}{key} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads 3e-4 (no dot) as a string: accept what float() reads as a number
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise bad("a string")
    if tp is list or get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad("a list")
    if tp is dict or get_origin(tp) is dict:
        if value is None:
            return {}
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise bad("a mapping with string keys")
    raise ConfigError(f"{where}{key} has an unsupported type {tp!r}")  # a programming error


def _check_range(key: str, value: Any, meta: Mapping[str, Any], where: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{where}{key} must be {word} {limit}; got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, where: str) -> Any:
    """Build one section from a mapping, rejecting unknown keys and bad values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(prefix + str(key), where)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, prefix + name + ".", where)
        else:
            value = _coerce(prefix + name, data[name], tp, where)
            _check_range(prefix + name, value, f.metadata, where)
            kwargs[name] = value
    return cls(**kwargs)


def _check_lists(cfg: RootConfig) -> None:
    for key in ("pad_color", "mean", "std"):
        value = getattr(cfg.data, key)
        if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"data.{key} must be a list of 3 numbers; got {value!r}")
    if not all(0 <= v <= 255 for v in cfg.data.pad_color):
        raise ConfigError(f"data.pad_color values must be in 0..255; got {cfg.data.pad_color!r}")
    if not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"data.std values must be > 0; got {cfg.data.std!r}")


def _check_model_family(cfg: RootConfig) -> None:
    """The patch-size rules of our ViT, and the timm keys only with family timm (a timm model's own
    size rules are checked when it is built: they depend on the architecture)."""
    m = cfg.model
    if m.family == "vit":
        if m.timm_architecture or m.timm_model_args:
            raise ConfigError("model.timm_architecture / model.timm_model_args need model.family=timm")
        if cfg.data.image_size % m.patch_size:
            raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be divisible by model.patch_size ({m.patch_size})")
        small = cfg.data.progressive_image_size
        if small and (small % m.patch_size or small >= cfg.data.image_size):
            raise ConfigError(
                f"data.progressive_image_size ({small}) must be a multiple of model.patch_size ({m.patch_size}) below data.image_size ({cfg.data.image_size})"
            )
    elif m.timm_model_args and not m.timm_architecture:
        raise ConfigError("model.timm_model_args needs model.timm_architecture (a released tagger in model.init_from brings its own model_args)")


def validate_config(cfg: RootConfig) -> RootConfig:
    """Cross-field checks that no single field can make; returns cfg."""
    _check_lists(cfg)
    _check_model_family(cfg)
    m = cfg.model
    if m.embed_dim and m.num_heads and m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim ({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})")
    mb = cfg.training.micro_batch_size
    if mb > 0 and cfg.data.batch_size % mb:
        raise ConfigError(f"training.micro_batch_size ({mb}) must divide data.batch_size ({cfg.data.batch_size})")
    if cfg.data.vocabulary_mode == "extend" and not cfg.model.init_from:
        raise ConfigError("data.vocabulary_mode=extend needs a released tagger folder in model.init_from (or --init-from)")
    if cfg.validation.use_ema and cfg.training.ema_decay == 0:
        raise ConfigError("validation.use_ema needs training.ema_decay > 0")
    if not cfg.experiment_name or any(c in cfg.experiment_name for c in '/\\:*?"<>|'):
        raise ConfigError(f"experiment_name must be a plain folder name; got {cfg.experiment_name!r}")
    return cfg


def config_from_dict(data: Mapping[str, Any], where: str = "") -> RootConfig:
    """Build and validate a RootConfig from a nested mapping (as read from YAML)."""
    return validate_config(_build(RootConfig, data, "", where))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text as a string; the type check judges it
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `section.key=value` overrides to a nested dict (values parsed as YAML scalars)."""
    hints_root = RootConfig
    for text in overrides:
        key, value = _parse_override(text)
        parts = key.split(".")
        cls, node = hints_root, data
        for i, part in enumerate(parts):
            hints = get_type_hints(cls)
            if part not in hints:
                raise _unknown_key_error(key, "--set: ")
            if i == len(parts) - 1:
                tp = hints[part]
                if _is_section(tp):
                    raise ConfigError(f"--set: '{key}' is a section; set one of its keys")
                if tp is str and not isinstance(value, str) and value is not None:
                    value = text.split("=", 1)[1]  # e.g. experiment_name=2024 stays a string
                node[part] = value
            else:
                if not _is_section(hints[part]):
                    raise _unknown_key_error(key, "--set: ")
                cls = hints[part]
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                node = child
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RootConfig:
    """Load a YAML config (or the defaults when path is None) and apply `--set` overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}not valid YAML: {exc}".splitlines()[0]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides)
    return config_from_dict(data, where)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def flat_hparams(cfg: RootConfig) -> dict[str, Any]:
    """The training-relevant sections as flat 'section.key' -> scalar (other values as text), for TensorBoard's hparams."""
    out: dict[str, Any] = {}
    for section in ("data", "model", "loss", "training"):
        for k, v in getattr(cfg, section).__dict__.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def dump_config(cfg: RootConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: RootConfig, path: str | Path) -> None:
    """Write the resolved config to path atomically."""
    atomic_write_text(path, dump_config(cfg))


def reference_yaml() -> str:
    """Every key with its default and help text: the body of configs/unified_config.yaml."""
    lines = [
        "# OppaiOracle trainer: every configuration key, its default and what it does.",
        "# Generated from Configuration_System.py (python Configuration_System.py reference);",
        "# copy what you need into your own file; unknown keys are rejected.",
        "",
    ]

    def emit(cls: type, obj: Any, indent: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            help_text = f.metadata.get("help", "")
            meta = f.metadata
            extra = []
            if meta.get("choices"):
                extra.append("one of: " + ", ".join(map(str, meta["choices"])))
            for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if meta.get(bound) is not None:
                    extra.append(f"{word} {meta[bound]}")
            suffix = f" [{'; '.join(extra)}]" if extra else ""
            if _is_section(hints[f.name]):
                lines.append(f"{indent}# {help_text}")
                lines.append(f"{indent}{f.name}:")
                emit(hints[f.name], value, indent + "  ")
                lines.append("")
            else:
                lines.append(f"{indent}# {help_text}{suffix}")
                rendered = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
                lines.append(f"{indent}{rendered[1:-1]}")

    emit(RootConfig, RootConfig(), "")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI: `reference [--out FILE]` writes the documented reference; `check FILE` validates one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="print or write the documented full config")
    ref.add_argument("--out", type=Path, default=None)
    chk = sub.add_parser("check", help="validate a config file and print the resolved config")
    chk.add_argument("config", type=Path)
    chk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.command == "reference":
        text = reference_yaml()
        if args.out:
            atomic_write_text(args.out, text)
        else:
            sys.stdout.write(text)
        return 0
    try:
        cfg = load_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
