"""Recipe benchmark: which long-tail techniques help a small ViT tagger, at equal steps or equal wall time.

Owns one measurement. A long-tail tagging set is generated in memory: every tag draws a visible
glyph (one of 5 shapes in one of up to 6 colours) at a random spot inside its own cell of a 4 x 4
grid, so every tag, however rare, is learnable from pixels; tag frequencies follow a Zipf law over
a random rank order, so the rarest tags have a handful of training images. Each image's rating
(0..3, some unknown = -1) is the highest "rating level" among its tags. A held-out split of the
same generator is the validation set.

Each variant trains the same tiny ViT (model_architecture) with the project's pieces (AdamW on
param_groups_for_weight_decay, LinearWarmupCosineLR, MultiTaskLoss / AsymmetricFocalLoss) and
changes one thing against the baseline (the project's defaults: plain BCE): repeat-factor sampling
(repeat_factor.py), MixUp/CutMix (mixup.py), the asymmetric focal loss (the previous default),
per-tag loss weights (loss_functions.tag_weights_from_frequencies), progressive resolution (half
resolution for the first PROGRESSIVE_SHARE of the run; the model resamples its position
embeddings to the smaller grid with model_architecture.resample_pos_embed inside forward), or
fine-tuning a backbone pretrained on an independent draw of the generator, with and without
layer-wise LR decay (layer_decay.py). "combo" stacks every from-scratch technique. Metrics come
from evaluation_metrics.MetricComputer. Within a seed all variants share the dataset, the
initial weights and the pretrained backbone, so per-seed differences are paired.

    python benchmarks/bench_recipe.py [--seeds 3] [--steps 300] [--wall-seconds 0] [--variants a,b]
                                      [--smoke] [--threads 1] [--json-out FILE]

--wall-seconds S > 0 compares at equal wall time: each variant trains S seconds (the schedule and
the progressive switch follow elapsed time) instead of --steps steps. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Run as a script from anywhere: the project root holds the modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation_metrics import MetricComputer, json_safe  # noqa: E402
from layer_decay import param_groups_layer_decay  # noqa: E402
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss, tag_weights_from_frequencies  # noqa: E402
from mixup import MixParams, mix_batch  # noqa: E402
from model_architecture import SimplifiedTagger, VisionTransformerConfig, load_pretrained_backbone, param_groups_for_weight_decay  # noqa: E402
from repeat_factor import RepeatFactorSampler, repeat_factors  # noqa: E402
from schedulers import LinearWarmupCosineLR, warmup_cosine_factor  # noqa: E402

GRID_CELLS = 4  # glyph cells per image side
NUM_SHAPES = 5
PALETTE = np.array([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.15, 0.3, 1.0], [1.0, 0.95, 0.1], [0.95, 0.2, 0.95], [0.1, 0.95, 0.95]], dtype=np.float32)
MAX_TAGS = GRID_CELLS * GRID_CELLS * NUM_SHAPES * len(PALETTE)
RATING_LEVEL_PROBS = (0.7, 0.15, 0.1, 0.05)  # share of tags whose rating level is 0, 1, 2, 3
UNKNOWN_RATING_SHARE = 0.1
PROGRESSIVE_SHARE = 0.7  # progressive resolution: half size for this share of the run
WALL_SCHEDULE_STEPS = 10_000  # resolution of the time-driven LR schedule in --wall-seconds mode
METRIC_KEYS = ("mAP", "f1_micro", "f1_macro_at_pr", "ap_rare_third", "rating_accuracy")
RUN_KEYS = METRIC_KEYS + ("steps", "train_seconds", "steps_per_second", "final_loss")


@dataclass(frozen=True)
class Sizes:
    """Dataset, model and optimisation sizes of one benchmark run."""

    num_tags: int = 240
    train_images: int = 3000
    val_images: int = 1200
    image_size: int = 48
    patch_size: int = 12
    mean_tags: float = 4.0  # tags per image: 1 + Poisson(mean_tags - 1), at most one per cell
    zipf_exponent: float = 1.1
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    batch_size: int = 64
    steps: int = 450
    pretrain_steps: int = 450
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    drop_path_rate: float = 0.1


SMOKE = Sizes(
    num_tags=40, train_images=240, val_images=120, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    batch_size=32, steps=12, pretrain_steps=12,
)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """What a variant changes relative to the baseline (the project's current defaults)."""

    repeat_factor_threshold: float = 0.0  # 0 = uniform shuffled epochs
    mix: bool = False  # MixUp (alpha 0.8) / CutMix (alpha 1.0), switching per batch, as timm's defaults
    gamma_neg: float = 0.0  # plain BCE: the default since this benchmark's 2,000-step run
    clip: float = 0.0
    tag_weighting: str = "none"
    progressive: bool = False
    pretrained: bool = False
    layer_decay: float = 1.0  # 1 = off


RFS_THRESHOLD = 0.02
VARIANTS: dict[str, Recipe] = {
    "baseline": Recipe(),
    "repeat_factor": Recipe(repeat_factor_threshold=RFS_THRESHOLD),
    "mixup_cutmix": Recipe(mix=True),
    "asl_focal": Recipe(gamma_neg=4.0, clip=0.05),  # the previous default: asymmetric focal loss
    "weight_inverse_sqrt": Recipe(tag_weighting="inverse_sqrt"),
    "weight_effective_number": Recipe(tag_weighting="effective_number"),
    "progressive_resolution": Recipe(progressive=True),
    "combo": Recipe(repeat_factor_threshold=RFS_THRESHOLD, mix=True, tag_weighting="inverse_sqrt", progressive=True),
    "finetune": Recipe(pretrained=True),
    "finetune_layer_decay": Recipe(pretrained=True, layer_decay=0.75),
}
# Paired deltas are taken against this variant (fine-tuning against fine-tuning without decay).
REFERENCE = {name: ("finetune" if recipe.pretrained and name != "finetune" else "baseline") for name, recipe in VARIANTS.items()}
MIX_PARAMS = MixParams(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)


@dataclass
class TagData:
    """A generated split: normalised images (N, 3, H, W), tag targets (N, T), ratings (N,), tag lists."""

    images: torch.Tensor
    targets: torch.Tensor
    ratings: torch.Tensor
    tag_lists: list[np.ndarray]


def glyph_stamps(num_tags: int, side: int) -> np.ndarray:
    """Per-tag RGB glyph (T, 3, side, side) and alpha mask folded in: shape t // 16 % 5, colour t // 80."""
    if not 1 <= num_tags <= MAX_TAGS:
        raise ValueError(f"num_tags must be in [1, {MAX_TAGS}], got {num_tags}")
    yy, xx = np.mgrid[0:side, 0:side]
    thick = max(1, side // 4)
    mid = (side - 1) / 2.0
    masks = [
        np.ones((side, side), bool),  # filled square
        (np.minimum(np.minimum(yy, xx), np.minimum(side - 1 - yy, side - 1 - xx)) < thick),  # ring
        (np.abs(yy - mid) < thick / 2 + 0.5) | (np.abs(xx - mid) < thick / 2 + 0.5),  # plus
        (np.abs(yy - xx) < thick) | (np.abs(yy + xx - (side - 1)) < thick),  # X
        ((yy // thick) % 2 == 0),  # horizontal stripes
    ]
    cells = GRID_CELLS * GRID_CELLS
    stamps = np.full((num_tags, 4, side, side), 0.0, dtype=np.float32)  # RGB + mask
    for tag in range(num_tags):
        style = tag // cells
        colour = PALETTE[style // NUM_SHAPES]
        mask = masks[style % NUM_SHAPES]
        stamps[tag, :3] = colour[:, None, None] * mask
        stamps[tag, 3] = mask
    return stamps


def generate_split(sizes: Sizes, num_images: int, probs: np.ndarray, levels: np.ndarray, rng: np.random.Generator) -> TagData:
    """Draw `num_images` images with Zipf tags `probs` (T,), each tag's glyph painted in its cell."""
    size, cells, tags = sizes.image_size, GRID_CELLS * GRID_CELLS, sizes.num_tags
    cell = size // GRID_CELLS
    glyph = max(2, cell - 2)  # small jitter (2 px): a patch-aligned glyph stays easy to read
    stamps = glyph_stamps(tags, glyph)  # (T, 4, g, g)
    images = np.clip(0.5 + 0.08 * rng.standard_normal((num_images, 3, size, size)), 0.0, 1.0).astype(np.float32)
    targets = np.zeros((num_images, tags), dtype=np.float32)
    ratings = np.zeros(num_images, dtype=np.int64)
    tag_lists: list[np.ndarray] = []
    for i in range(num_images):
        wanted = min(cells, 1 + int(rng.poisson(sizes.mean_tags - 1.0)))
        chosen: list[int] = []
        used: set[int] = set()
        for tag in rng.choice(tags, size=4 * wanted, p=probs).tolist():
            if tag % cells not in used:  # one glyph per cell, so glyphs never cover each other
                used.add(tag % cells)
                chosen.append(tag)
                if len(chosen) == wanted:
                    break
        for tag in chosen:
            row, col = divmod(tag % cells, GRID_CELLS)
            dy, dx = rng.integers(0, cell - glyph + 1, size=2)
            y, x = row * cell + dy, col * cell + dx
            mask = stamps[tag, 3]
            patch = images[i, :, y : y + glyph, x : x + glyph]
            images[i, :, y : y + glyph, x : x + glyph] = np.where(mask > 0, stamps[tag, :3], patch)
        targets[i, chosen] = 1.0
        ratings[i] = int(levels[chosen].max()) if chosen else 0
        tag_lists.append(np.asarray(chosen, dtype=np.int64))
    ratings[rng.random(num_images) < UNKNOWN_RATING_SHARE] = -1
    normalised = (torch.from_numpy(images) - 0.5) / 0.25  # (N, 3, H, W)
    return TagData(normalised, torch.from_numpy(targets), torch.from_numpy(ratings), tag_lists)


def generate_dataset(sizes: Sizes, seed: int) -> tuple[TagData, TagData]:
    """(train, validation) splits of one long-tail draw: Zipf frequencies over a seed-dependent rank order."""
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(sizes.num_tags)  # rank of each tag: 0 = most frequent
    probs = (ranks + 1.0) ** -sizes.zipf_exponent
    probs /= probs.sum()
    levels = rng.choice(len(RATING_LEVEL_PROBS), size=sizes.num_tags, p=RATING_LEVEL_PROBS)
    train = generate_split(sizes, sizes.train_images, probs, levels, rng)
    val = generate_split(sizes, sizes.val_images, probs, levels, rng)
    return train, val


def uniform_batches(num_images: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs (drop_last) as (B,) index tensors."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_images)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield torch.from_numpy(order[start : start + batch_size])


def repeat_factor_batches(data: TagData, threshold: float, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless RepeatFactorSampler epochs as (B,) index tensors."""
    factors = repeat_factors(data.tag_lists, data.targets.shape[1], threshold)
    sampler = RepeatFactorSampler(factors, batch_size=batch_size, seed=seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        keys = [key[0] for key in sampler]  # (index, epoch[, copy])
        for start in range(0, len(keys) - batch_size + 1, batch_size):
            yield torch.tensor(keys[start : start + batch_size])
        epoch += 1


def build_model(sizes: Sizes, train: TagData, seed: int) -> SimplifiedTagger:
    """Tiny ViT with the tag-head bias at the training frequencies; initial weights from `seed`."""
    torch.manual_seed(seed)
    cfg = VisionTransformerConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        num_tags=sizes.num_tags,
        embed_dim=sizes.embed_dim,
        depth=sizes.depth,
        num_heads=sizes.num_heads,
        drop_path_rate=sizes.drop_path_rate,
        tag_bias_init=tuple(train.targets.mean(dim=0).tolist()),
    )
    return SimplifiedTagger(cfg)


def make_optimizer(model: SimplifiedTagger, sizes: Sizes, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the weight-decay split, or over layer-decay groups when the recipe asks for it."""
    if recipe.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, sizes.weight_decay, recipe.layer_decay, base_lr=sizes.learning_rate)
    else:
        groups = param_groups_for_weight_decay(model, sizes.weight_decay)
    return torch.optim.AdamW(groups, lr=sizes.learning_rate, betas=(0.9, 0.999))


def make_loss(recipe: Recipe, train: TagData) -> MultiTaskLoss:
    """ASL (or BCE at gamma 0, clip 0) with the recipe's per-tag weights, plus the rating cross-entropy."""
    weights = None
    if recipe.tag_weighting != "none":
        counts = train.targets.sum(dim=0)  # (T,)
        weights = tag_weights_from_frequencies(counts, train.targets.shape[0], recipe.tag_weighting)
    return MultiTaskLoss(AsymmetricFocalLoss(gamma_neg=recipe.gamma_neg, clip=recipe.clip, tag_weights=weights))


def train_model(
    model: SimplifiedTagger, recipe: Recipe, train: TagData, sizes: Sizes, seed: int, steps: int, wall_seconds: float
) -> dict[str, float]:
    """Train for `steps` optimizer steps, or for `wall_seconds` when that is > 0; returns step count and timing."""
    optimizer = make_optimizer(model, sizes, recipe)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    by_time = wall_seconds > 0
    total = WALL_SCHEDULE_STEPS if by_time else steps
    warmup = int(sizes.warmup_ratio * total)
    scheduler = None if by_time else LinearWarmupCosineLR(optimizer, warmup_steps=warmup, total_steps=total, min_lr_ratio=sizes.min_lr_ratio)
    loss_fn = make_loss(recipe, train)
    if recipe.repeat_factor_threshold > 0:
        batches = repeat_factor_batches(train, recipe.repeat_factor_threshold, sizes.batch_size, seed)
    else:
        batches = uniform_batches(len(train.tag_lists), sizes.batch_size, seed)
    mix_generator = torch.Generator().manual_seed(seed)
    model.train()
    step, loss_value, start = 0, math.nan, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = elapsed / wall_seconds if by_time else step / steps
        if progress >= 1.0:
            break
        if by_time:  # the schedule follows elapsed time, so every variant ends its cosine at the budget
            factor = warmup_cosine_factor(int(progress * total), warmup, total, sizes.min_lr_ratio)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
        index = next(batches)
        images, tags, ratings = train.images[index], train.targets[index], train.ratings[index]
        if recipe.progressive and progress < PROGRESSIVE_SHARE:
            images = F.avg_pool2d(images, 2)  # (B, 3, H/2, W/2); forward resamples pos_embed to the half grid
        rating_targets: torch.Tensor = ratings
        if recipe.mix:
            mixed = mix_batch(images, tags, ratings, MIX_PARAMS, mix_generator)
            images, tags, rating_targets = mixed.images, mixed.tag_targets, mixed.rating_targets  # soft (B, R)
        loss, _ = loss_fn(model(images), tags, rating_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sizes.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        loss_value = float(loss.detach())
    seconds = time.perf_counter() - start
    return {"steps": step, "train_seconds": seconds, "steps_per_second": step / max(seconds, 1e-9), "final_loss": loss_value}


@torch.no_grad()
def evaluate(model: SimplifiedTagger, val: TagData, train: TagData) -> dict[str, Any]:
    """Headline metrics on the validation split, rare tags ranked by training frequency."""
    model.eval()
    counts = train.targets.sum(dim=0).to(torch.int64)  # (T,)
    metrics = MetricComputer(val.targets.shape[1], num_bins=1024, tag_frequencies=counts)
    for start in range(0, val.images.shape[0], 256):
        out = model(val.images[start : start + 256])
        metrics.update(torch.sigmoid(out["tag_logits"]), val.targets[start : start + 256])
        metrics.update_rating(out["rating_logits"], val.ratings[start : start + 256])
    result = metrics.compute()
    return {key: result[key] for key in METRIC_KEYS}


def pretrain_backbone(sizes: Sizes, seed: int, folder: Path) -> Path:
    """Train the baseline recipe on an independent draw of the generator; save its backbone as safetensors."""
    pre_train, _ = generate_dataset(sizes, seed + 1_000_003)
    model = build_model(sizes, pre_train, seed + 1_000_003)
    train_model(model, Recipe(), pre_train, sizes, seed, sizes.pretrain_steps, 0.0)
    path = folder / f"backbone_seed{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone_state_dict().items()}, str(path))
    return path


def run_seed(sizes: Sizes, seed: int, names: list[str], wall_seconds: float, folder: Path) -> dict[str, dict[str, Any]]:
    """Every selected variant on one seed's dataset and initial weights."""
    train, val = generate_dataset(sizes, seed)
    backbone = None
    if any(VARIANTS[name].pretrained for name in names):
        backbone = pretrain_backbone(sizes, seed, folder)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        recipe = VARIANTS[name]
        model = build_model(sizes, train, seed)
        if recipe.pretrained:
            report = load_pretrained_backbone(model, backbone)
            if report.missing or report.mismatched:
                raise ValueError(f"pretrained backbone {backbone} did not fit: {report.summary()}")
        timing = train_model(model, recipe, train, sizes, seed, sizes.steps, wall_seconds)
        results[name] = {**evaluate(model, val, train), **timing}
        print(f"seed {seed} {name}: {json.dumps(json_safe(results[name]))}", file=sys.stderr, flush=True)
    return results


def _mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value), NaN-free values only."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """Per variant: mean/std over seeds of every key, and paired deltas against its reference variant."""
    out: dict[str, Any] = {}
    for name in names:
        runs = [per_seed[seed][name] for seed in per_seed]
        entry: dict[str, Any] = {key: _mean_std([run[key] for run in runs]) for key in RUN_KEYS}
        reference = REFERENCE[name]
        if reference != name and reference in names:
            entry["reference"] = reference
            entry["delta_vs_reference"] = {
                key: _mean_std([per_seed[s][name][key] - per_seed[s][reference][key] for s in per_seed]) for key in METRIC_KEYS
            }
        out[name] = entry
    return out


def dataset_stats(sizes: Sizes, seed: int) -> dict[str, Any]:
    """Training positives per tag of the first seed's draw (how long the tail is)."""
    train, _ = generate_dataset(sizes, seed)
    counts = np.sort(train.targets.sum(dim=0).numpy())
    return {
        "train_positives_min": int(counts[0]),
        "train_positives_median": float(np.median(counts)),
        "train_positives_max": int(counts[-1]),
        "tags_under_10_train_images": int((counts < 10).sum()),
        "mean_tags_per_image": float(train.targets.sum(dim=1).mean()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (0 = the size's default)")
    parser.add_argument("--wall-seconds", type=float, default=0.0, help="> 0: train each variant this long instead")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable timing)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 0 or args.threads < 1 or not args.wall_seconds >= 0:
        parser.error("--seeds and --threads must be >= 1, --steps and --wall-seconds >= 0")
    args.variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_names if v not in VARIANTS]
    if unknown or not args.variant_names:
        parser.error(f"unknown or empty --variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every selected variant on every seed and print one JSON document."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else Sizes()
    if args.steps:
        sizes = replace(sizes, steps=args.steps, pretrain_steps=args.steps)
    started = time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_recipe_") as folder:
        for seed in range(args.seeds):
            per_seed[seed] = run_seed(sizes, seed, args.variant_names, args.wall_seconds, Path(folder))
    document = {
        "mode": "wall_seconds" if args.wall_seconds > 0 else "steps",
        "wall_seconds": args.wall_seconds,
        "sizes": asdict(sizes),
        "variants": {name: asdict(VARIANTS[name]) for name in args.variant_names},
        "seeds": args.seeds,
        "threads": args.threads,
        "torch": torch.__version__,
        "dataset": dataset_stats(sizes, 0),
        "summary": summarise(per_seed, args.variant_names),
        "per_seed": {str(seed): runs for seed, runs in per_seed.items()},
        "total_seconds": time.perf_counter() - started,
    }
    text = json.dumps(json_safe(document), allow_nan=False)
    if args.json_out is not None:
        tmp = args.json_out.with_name(args.json_out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, args.json_out)  # atomic: a reader never sees half a file
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
