"""Benchmark one full training step of SimplifiedTagger (and timm's ViT of the same shape, when installed).

A step is: uint8 images normalised on the device, forward, MultiTaskLoss(AsymmetricFocalLoss),
backward, AdamW step (fused on CUDA), zero_grad(set_to_none=True). Reports images/s, step time,
peak memory (CUDA: max_memory_allocated; CPU: RSS growth sampled with psutil), and on CUDA the
FLOPs of one forward+backward (FlopCounterMode), achieved TFLOP/s and MFU against a bf16 matmul
peak measured in the same run. Prints a short table to stderr and one JSON object to stdout.

With --timm-arch (any timm model, e.g. a WD v3 release's architecture and --timm-args its
model_args) the comparison is our training step with that timm backbone (timm_tagger.TimmTagger:
BGR flip, two heads, plain-BCE MultiTaskLoss, guarded fused AdamW, schedule, EMA) against a plain
timm loop of the same model: timm.create_model with a 4 + T classifier, the same flip, BCE on the
tags + cross-entropy on the ratings, backward, gradient clipping, fused AdamW, zero_grad.

Fairness: every variant is built and warmed up first, then timed in --rounds rounds of --steps
steps that alternate between the variants in one process (A B, B A, A B, ...), so slow drifts and
bursts of load from other processes fall on both; each variant reports its best round.

Example (GPU): python benchmarks/bench_train_step.py --preset base --image-size 448 --tags 10000 \
    --batch-size 64 --compile --json-out /tmp/bench.json
Example (a WD v3 release's EVA02-L, GPU): python benchmarks/bench_train_step.py --timm-arch eva02_large_patch14_448 \
    --timm-args '{"img_size": 448, "ref_feat_shape": [32, 32]}' --image-size 448 --tags 10861 --batch-size 32 --ema-decay 0
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script, sys.path[0] is benchmarks/; the project modules live one level up.
    sys.path.insert(0, str(REPO_ROOT))

from augmentation import AugmentParams  # noqa: E402
from batching import ImagePreFetcher, ResumableSampler, SidecarJsonDataset, build_dataloader, targets_from_indices  # noqa: E402
from dataset_scan import scan_dataset  # noqa: E402
from file_io import atomic_write_text  # noqa: E402
from image_preprocess import PreprocessParams, normalize_images  # noqa: E402
from layer_decay import param_groups  # noqa: E402
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss  # noqa: E402
from model_architecture import SimplifiedTagger, VisionTransformerConfig  # noqa: E402
from prepared_cache import PreparedCache, prepare_cache  # noqa: E402
from schedulers import LinearWarmupCosineLR  # noqa: E402
from timm_tagger import TimmTagger as OurTimmTagger  # noqa: E402
from timm_tagger import TimmTaggerConfig  # noqa: E402
from training_utils import GuardedOptimizerStep, ModelEma, TrainStep  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NUM_RATINGS = 4
POSITIVE_RATE = 0.01  # share of positive tags in the synthetic targets, typical for booru vocabularies


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("tiny", "small", "base", "large"), default="base")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--tags", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, alternating between variants; the best round is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (at least one is run: it measures peak memory)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for every variant (0 = torch's default); on a machine shared "
        "with other work, 1 avoids threads stalling on each other at every op",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--grad-checkpoint-every", type=int, default=0)
    parser.add_argument("--no-timm", action="store_true", help="skip the timm reference even if installed")
    parser.add_argument(
        "--timm-arch",
        default="",
        help="compare our step with this timm backbone (model.family=timm) against a plain timm loop of the same model; '' = our ViT against timm's ViT of the same shape",
    )
    parser.add_argument("--timm-args", default="{}", help="model_args of --timm-arch as a JSON object (e.g. a release's config.json model_args)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 matmul used for the peak")
    parser.add_argument("--ema-decay", type=float, default=0.9998, help="weight EMA as in training (0 = off)")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--pipeline-images",
        type=int,
        default=0,
        help="also train ours from a prepared cache of this many generated 1.5 MP JPEGs, with DataLoader workers on every CPU core (0 = skip)",
    )
    parser.add_argument("--pipeline-workers", type=int, default=0, help="default: os.cpu_count()")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    for name in ("image_size", "patch_size", "tags", "batch_size", "steps", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    try:
        args.timm_model_args = json.loads(args.timm_args)
    except json.JSONDecodeError as exc:
        parser.error(f"--timm-args is not JSON: {exc}")
    if not isinstance(args.timm_model_args, dict):
        parser.error("--timm-args must be a JSON object")
    return args


class TimmTagger(nn.Module):
    """timm VisionTransformer backbone with the same tag and rating heads as SimplifiedTagger."""

    def __init__(self, cfg: VisionTransformerConfig) -> None:
        """Build timm's ViT (no classifier) of cfg's shape plus two linear heads."""
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.backbone = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            num_classes=0,
            global_pool="token",
        )
        if cfg.grad_checkpoint_every > 0:
            self.backbone.set_grad_checkpointing(True)
        self.tag_head = nn.Linear(cfg.embed_dim, cfg.num_tags)
        self.rating_head = nn.Linear(cfg.embed_dim, cfg.num_ratings)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Images (B, 3, H, W) -> {"tag_logits": (B, T), "rating_logits": (B, R)}."""
        pooled = self.backbone(images)  # (B, C): class token after the final norm
        return {"tag_logits": self.tag_head(pooled), "rating_logits": self.rating_head(pooled)}


def timm_available() -> bool:
    """True when timm's VisionTransformer can be imported."""
    try:
        from timm.models.vision_transformer import VisionTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def release_host_memory() -> None:
    """Collect garbage and, on glibc, return freed heap to the OS so the next RSS baseline is honest."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the RSS growth may then under-count memory reused from an earlier run


def measure_matmul_peak_tflops(device: torch.device, size: int, iters: int = 20) -> float:
    """Achieved bf16 TFLOP/s of size^3 matmuls: the MFU reference measured on this very GPU."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b)
    end.record()
    sync(device)
    seconds = start.elapsed_time(end) / 1000.0
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * size**3 * iters / seconds / 1e12


class StepRunner:
    """One model with the synthetic batch and training_utils.TrainStep: the step train_direct.py
    runs (uint8 normalised and multi-hot targets built on the device, MultiTaskLoss with
    AsymmetricFocalLoss, guarded fused AdamW with clipping, the warm-up/cosine schedule, EMA)."""

    def __init__(self, model: nn.Module, cfg: Any, args: argparse.Namespace, device: torch.device) -> None:
        """Create the batch on the device and the training step around `model` (cfg: its num_tags)."""
        self.model = model
        self.device = device
        self.num_tags = cfg.num_tags
        gen = torch.Generator().manual_seed(0)
        batch, size = args.batch_size, args.image_size
        self.images_u8 = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8).to(device)
        per_image = max(1, int(POSITIVE_RATE * cfg.num_tags))
        self.tag_indices = torch.randint(0, cfg.num_tags, (batch, per_image), generator=gen).to(device)  # (B, L)
        self.rating_targets = torch.randint(-1, NUM_RATINGS, (batch,), generator=gen).to(device)  # -1 = unknown
        self.params = PreprocessParams(size)
        optimizer = torch.optim.AdamW(param_groups(model, 0.05, 1.0, base_lr=1e-4), lr=1e-4, fused=True)
        # the timm comparison uses train_direct's default loss (plain BCE), as the plain loop does
        tag_loss = AsymmetricFocalLoss(gamma_neg=0.0, clip=0.0) if args.timm_arch else AsymmetricFocalLoss()
        self.train_step = TrainStep(
            model,
            model,
            MultiTaskLoss(tag_loss).to(device),
            GuardedOptimizerStep(optimizer, device, args.dtype, grad_clip=args.grad_clip),
            LinearWarmupCosineLR(optimizer, warmup_steps=10, total_steps=100_000),
            ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None,
            device,
        )
        self.updates = 0
        self.sample_rss = device.type == "cpu"
        self.rss_peak = 0

    @property
    def forward_fn(self) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
        """What forward runs (the model, or its compiled form)."""
        return self.train_step.model

    @forward_fn.setter
    def forward_fn(self, fn: nn.Module) -> None:
        self.train_step.model = fn

    def step(self, batch: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """One training step on the synthetic batch (or a real device batch); no host sync."""
        if batch is None:
            images = normalize_images(self.images_u8, self.params.mean, self.params.std)  # (B, 3, H, W)
            targets = targets_from_indices(self.tag_indices, self.num_tags)  # (B, T)
            batch = {"images": images, "tag_targets": targets, "ratings": self.rating_targets}
        self.train_step.forward_backward(batch["images"], batch["tag_targets"], batch["ratings"], window=1)
        if self.sample_rss:
            self.rss_peak = max(self.rss_peak, rss_bytes())
        self.train_step.optimizer_step(self.updates)
        self.updates += 1

    def forward_loss(self) -> torch.Tensor:
        """Forward and loss of the synthetic batch (for FLOP counting and the final loss)."""
        images = normalize_images(self.images_u8, self.params.mean, self.params.std)
        with self.train_step.amp.autocast():
            outputs = self.forward_fn(images)
        total, _parts = self.train_step.loss_fn(outputs, targets_from_indices(self.tag_indices, self.num_tags), self.rating_targets)
        return total

    def count_flops(self) -> int:
        """FLOPs of one forward + backward, counted once with FlopCounterMode (no optimizer step)."""
        from torch.utils.flop_counter import FlopCounterMode

        saved = self.forward_fn
        self.forward_fn = self.model  # count the eager graph; compiled graphs hide ops from the counter
        counter = FlopCounterMode(display=False)
        with counter:
            total = self.forward_loss()
            total.backward()
        self.train_step.amp.optimizer.zero_grad(set_to_none=True)
        self.forward_fn = saved
        return int(counter.get_total_flops())


class PlainTimmRunner(StepRunner):
    """A plain timm training loop of the same model: timm.create_model with a 4 + T classifier, the
    release's BGR flip, BCE on the tags + cross-entropy on the known ratings, backward, gradient
    clipping, fused AdamW (timm's weight-decay groups), zero_grad. No EMA, no schedule, no guard."""

    def __init__(self, model: nn.Module, cfg: Any, args: argparse.Namespace, device: torch.device) -> None:
        """The same synthetic batch as StepRunner; the loop's own optimizer."""
        from timm.optim import param_groups_weight_decay

        super().__init__(model, cfg, args, device)
        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05, no_weight_decay_list=no_decay), lr=1e-4, fused=True)
        self.dtype = DTYPES[args.dtype]
        self.grad_clip = args.grad_clip
        self._forward = model

    @property
    def forward_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What forward runs (the model, or its compiled form)."""
        return self._forward

    @forward_fn.setter
    def forward_fn(self, fn: nn.Module) -> None:
        self._forward = fn

    def forward_loss(self) -> torch.Tensor:
        """BCE (summed over tags, mean over the batch) + cross-entropy over known ratings."""
        images = normalize_images(self.images_u8, self.params.mean, self.params.std).flip(1)  # (B, 3, H, W) BGR
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self._forward(images)  # (B, 4 + T)
        logits = logits.float()
        targets = targets_from_indices(self.tag_indices, self.num_tags)  # (B, T)
        tags = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, NUM_RATINGS:], targets, reduction="sum") / logits.shape[0]
        return tags + torch.nn.functional.cross_entropy(logits[:, :NUM_RATINGS], self.rating_targets, ignore_index=-1)

    def step(self, batch: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """One step of the plain loop on the synthetic batch."""
        self.forward_loss().backward()
        if self.sample_rss:
            self.rss_peak = max(self.rss_peak, rss_bytes())
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def count_flops(self) -> int:
        """FLOPs of one forward + backward of the eager model."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.forward_loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def plain_timm_model(args: argparse.Namespace) -> nn.Module:
    """timm's own model of --timm-arch with a 4 + T classifier (the released layout)."""
    import timm

    model = timm.create_model(args.timm_arch, pretrained=False, num_classes=NUM_RATINGS + args.tags, **args.timm_model_args)
    model.set_grad_checkpointing(args.grad_checkpoint_every > 0)  # as ours does
    return model


def time_steps(runner: StepRunner, steps: int) -> List[float]:
    """Per-step times in seconds: CUDA events around each step (read after one final sync), perf_counter on CPU."""
    device = runner.device
    sync(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            runner.step()
            events[i + 1].record()
        sync(device)
        return [events[i].elapsed_time(events[i + 1]) / 1000.0 for i in range(steps)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Variant:
    """One built and warmed-up model under test, with what was measured before the timed rounds."""

    name: str
    compiled: bool
    runner: StepRunner
    params: int
    peak_memory_bytes: int
    memory_kind: str
    compile_s: Optional[float]
    flops: Optional[int]
    rounds: List[List[float]] = field(default_factory=list)  # per round, per step seconds


def prepare_variant(name: str, build: Callable[[], nn.Module], cfg: Any, args: argparse.Namespace, device: torch.device, compiled: bool) -> Variant:
    """Build, (optionally compile,) warm up one model and measure its peak memory over the warm-up steps."""
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    else:
        base_mem = rss_bytes()
    torch.manual_seed(0)
    model = build().to(device).train()
    params = sum(p.numel() for p in model.parameters())
    runner = (PlainTimmRunner if name.startswith("timm") and args.timm_arch else StepRunner)(model, cfg, args, device)
    flops = runner.count_flops() if device.type == "cuda" else None
    compile_s = None
    if compiled:
        runner.forward_fn = torch.compile(model)
        start = time.perf_counter()
        runner.step()  # the first call compiles forward and backward
        sync(device)
        compile_s = time.perf_counter() - start
    for _ in range(max(args.warmup, 1)):
        runner.step()
    sync(device)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) - base_mem
        memory_kind = "cuda_max_memory_allocated"
    else:
        peak_mem = max(runner.rss_peak, rss_bytes()) - base_mem
        memory_kind = "cpu_rss_growth"
    # The other variants' steps change the process RSS from now on, so sampling it would mislead.
    runner.sample_rss = False
    return Variant(name, compiled, runner, params, peak_mem, memory_kind, compile_s, flops)


def time_alternating(variants: Sequence[Variant], steps: int, rounds: int) -> None:
    """Time `rounds` rounds of `steps` steps per variant, alternating the order each round (A B, B A, ...)."""
    for index in range(rounds):
        order = variants if index % 2 == 0 else list(reversed(variants))
        for variant in order:
            variant.rounds.append(time_steps(variant.runner, steps))


def finish_variant(variant: Variant, args: argparse.Namespace, matmul_peak: Optional[float]) -> Dict[str, Any]:
    """Metrics of one variant from its best timed round (lowest mean step time) plus its final loss."""
    times = min(variant.rounds, key=statistics.fmean)
    final_loss = float(variant.runner.forward_loss().detach().float().cpu())  # outside the timed rounds
    mean_step = statistics.fmean(times)
    flops = variant.flops
    result: Dict[str, Any] = {
        "name": variant.name,
        "compiled": variant.compiled,
        "params": variant.params,
        "images_per_s": args.batch_size / mean_step,
        "step_time_ms": mean_step * 1000.0,
        "step_time_ms_median": statistics.median(times) * 1000.0,
        "step_time_ms_min": min(times) * 1000.0,
        "peak_memory_mib": variant.peak_memory_bytes / 2**20,
        "memory_kind": variant.memory_kind,
        "compile_s": variant.compile_s,
        "flops_per_step": flops,
        "achieved_tflops": None,
        "mfu": None,
        "final_loss": final_loss,
    }
    if flops:
        result["achieved_tflops"] = flops / mean_step / 1e12
        if matmul_peak:
            result["mfu"] = result["achieved_tflops"] / matmul_peak
    return result


def run_pipeline(
    cfg: VisionTransformerConfig, args: argparse.Namespace, device: torch.device, compiled: bool, synthetic_images_per_s: float
) -> Dict[str, Any]:
    """Our step fed by the real data pipeline: generated 1.5 MP JPEGs, prepared cache, flip and
    jitter augmentation, DataLoader workers on every core, ImagePreFetcher; images/s and its share
    of the synthetic-input rate."""
    import tempfile

    from bench_dataloader import generate  # sibling script: the same generated JPEGs

    from orientation_handler import OrientationHandler

    workers = args.pipeline_workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        root = Path(tmp)
        generate(root, args.pipeline_images, 1414, 1061)
        scan = scan_dataset(root / "data", verify="none")
        names = sorted({t for r in scan.records for t in r.tags})
        tag_to_index = {t: i % cfg.num_tags for i, t in enumerate(names)}
        params = PreprocessParams(cfg.image_size)
        started = time.perf_counter()
        prepare_cache(scan.records, root / "cache", params, num_workers=workers, data_root=root / "data")
        prepare_s = time.perf_counter() - started
        dataset = SidecarJsonDataset(
            scan.records,
            tag_to_index,
            params,
            augment=AugmentParams(),
            orientation=OrientationHandler.default(),
            seed=0,
            cache=PreparedCache(root / "cache", params),
        )
        sampler = ResumableSampler(len(dataset), batch_size=args.batch_size, shuffle=True, seed=0, drop_last=True)
        loader = build_dataloader(
            dataset,
            sampler,
            batch_size=args.batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            prefetch_factor=4,
            persistent_workers=workers > 0,
            generator_seed=0,
        )
        torch.manual_seed(0)
        model = SimplifiedTagger(cfg).to(device).train()
        runner = StepRunner(model, cfg, args, device)
        if compiled:
            runner.forward_fn = torch.compile(model)

        def batches() -> Any:
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from ImagePreFetcher(loader, device, params, cfg.num_tags)
                epoch += 1

        stream = batches()
        for _ in range(args.warmup + 1):
            runner.step(next(stream))
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            runner.step(next(stream))
        sync(device)
        seconds = time.perf_counter() - started
    rate = args.batch_size * args.steps / seconds
    return {
        "name": f"ours_{'compiled' if compiled else 'eager'}_pipeline",
        "images_per_s": rate,
        "share_of_synthetic": rate / synthetic_images_per_s,
        "workers": workers,
        "images": args.pipeline_images,
        "cache_prepare_s": prepare_s,
    }


def prime_runtime(args: argparse.Namespace, device: torch.device, with_timm: bool) -> None:
    """One untimed step of a micro model (ours and timm's) so one-time library start-up costs
    (allocator pools, kernel caches, lazy imports) are not charged to the first measured variant."""
    micro = argparse.Namespace(**vars(args))
    micro.batch_size, micro.image_size = 2, args.patch_size * 2
    cfg = VisionTransformerConfig.from_preset(
        "tiny", image_size=micro.image_size, patch_size=args.patch_size, num_tags=8, embed_dim=64, depth=1, num_heads=4
    )
    builders: List[Callable[[], nn.Module]] = [functools.partial(SimplifiedTagger, cfg)]
    if with_timm:
        builders.append(functools.partial(TimmTagger, cfg))
    for build in builders:
        runner = StepRunner(build().to(device).train(), cfg, micro, device)
        runner.step()
        del runner
    sync(device)


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    """Human-readable summary lines for stderr."""
    lines = [f"{'variant':<16}{'img/s':>10}{'step ms':>10}{'mem MiB':>10}{'TFLOP/s':>10}{'MFU':>8}"]
    for key, r in results.items():
        tflops = f"{r['achieved_tflops']:.1f}" if r["achieved_tflops"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        lines.append(f"{key:<16}{r['images_per_s']:>10.1f}{r['step_time_ms']:>10.2f}{r['peak_memory_mib']:>10.1f}{tflops:>10}{mfu:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark and print/write its JSON report; returns the report."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = VisionTransformerConfig.from_preset(
        args.preset,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_tags=args.tags,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        grad_checkpoint_every=args.grad_checkpoint_every,
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    matmul_peak = measure_matmul_peak_tflops(device, args.matmul_size) if device.type == "cuda" else None

    with_timm = not args.no_timm and timm_available()
    step_cfg: Any = cfg
    variants: List[Tuple[str, Callable[[], nn.Module]]] = [("ours", functools.partial(SimplifiedTagger, cfg))]
    if args.timm_arch:  # our step with the timm backbone against a plain timm loop of the same model
        step_cfg = TimmTaggerConfig(
            args.timm_arch,
            args.timm_model_args,
            num_tags=args.tags,
            image_size=args.image_size,
            input_channels="bgr",
            grad_checkpoint_every=args.grad_checkpoint_every,
        )
        variants = [("ours", functools.partial(OurTimmTagger, step_cfg)), ("timm", functools.partial(plain_timm_model, args))]
        with_timm = True
    elif with_timm:
        variants.append(("timm", functools.partial(TimmTagger, cfg)))
    modes = [False, True] if args.compile else [False]
    prime_runtime(args, device, with_timm)
    results: Dict[str, Dict[str, Any]] = {}
    round_ms: Dict[str, List[float]] = {}
    for compiled in modes:
        # Eager and compiled are separate comparisons: only one mode's models are alive at a time.
        prepared = [
            prepare_variant(f"{name}_{'compiled' if compiled else 'eager'}", build, step_cfg, args, device, compiled) for name, build in variants
        ]
        time_alternating(prepared, args.steps, args.rounds)
        for variant in prepared:
            results[variant.name] = finish_variant(variant, args, matmul_peak)
            round_ms[variant.name] = [1000.0 * statistics.fmean(times) for times in variant.rounds]
            print(
                f"[bench] {variant.name}: {results[variant.name]['images_per_s']:.1f} img/s (best of "
                f"{args.rounds} rounds; round means ms {[round(ms, 2) for ms in round_ms[variant.name]]})",
                file=sys.stderr,
                flush=True,
            )
        del prepared, variant  # free this mode's models before the next mode or the pipeline run
        release_host_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pipeline = None
    if args.pipeline_images > 0 and not args.timm_arch:
        compiled = bool(args.compile)
        synthetic = results[f"ours_{'compiled' if compiled else 'eager'}"]["images_per_s"]
        pipeline = run_pipeline(cfg, args, device, compiled, synthetic)
        print(
            f"[bench] {pipeline['name']}: {pipeline['images_per_s']:.1f} img/s "
            f"({pipeline['share_of_synthetic']:.1%} of synthetic input, {pipeline['workers']} workers)",
            file=sys.stderr,
            flush=True,
        )

    ratios: Dict[str, Dict[str, float]] = {}
    for mode in ("eager", "compiled"):
        ours, theirs = results.get(f"ours_{mode}"), results.get(f"timm_{mode}")
        if ours and theirs:
            # Rounds i of the two variants ran next to each other: their ratio cancels slow drifts in
            # the machine's load, and the median of the rounds' ratios ignores one lucky or unlucky round.
            paired = [b / a for a, b in zip(round_ms[f"ours_{mode}"], round_ms[f"timm_{mode}"])]
            ratios[mode] = {
                "images_per_s_ours_over_timm": ours["images_per_s"] / theirs["images_per_s"],
                "images_per_s_ours_over_timm_paired_median": statistics.median(paired),
                "peak_memory_ours_over_timm": (ours["peak_memory_mib"] / theirs["peak_memory_mib"] if theirs["peak_memory_mib"] > 0 else math.nan),
            }
    report: Dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "dtype": args.dtype,
        "config": {
            "preset": args.preset,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "tags": cfg.num_tags,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "embed_dim": cfg.embed_dim,
            "depth": cfg.depth,
            "heads": cfg.num_heads,
            "grad_checkpoint_every": cfg.grad_checkpoint_every,
            "timm_arch": args.timm_arch,
            "timm_args": args.timm_model_args,
        },
        "timm_available": with_timm,
        "matmul_peak_tflops": matmul_peak,
        "results": results,
        "round_step_time_ms": round_ms,
        "pipeline": pipeline,
        "step": {"ema_decay": args.ema_decay, "grad_clip": args.grad_clip, "what": "training_utils.TrainStep, as train_direct.py runs it"},
        "ratios": ratios,
    }
    print(format_table(results), file=sys.stderr)
    for mode, r in ratios.items():
        print(
            f"ours/timm {mode}: images/s x{r['images_per_s_ours_over_timm']:.3f} (best rounds), "
            f"x{r['images_per_s_ours_over_timm_paired_median']:.3f} (median of paired rounds), memory x{r['peak_memory_ours_over_timm']:.3f}",
            file=sys.stderr,
        )
    if pipeline:
        print(
            f"end to end from the prepared cache: {pipeline['images_per_s']:.1f} img/s = "
            f"{pipeline['share_of_synthetic']:.1%} of the synthetic-input rate",
            file=sys.stderr,
        )
    text = json.dumps(report, indent=2, allow_nan=True)
    if args.json_out is not None:
        atomic_write_text(args.json_out, text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
