"""Check machine_fit's CPU memory estimate against real training steps.

Two child processes: machine_fit's probe (one and two images, one and two blocks, extrapolated),
and a real run of the training step (TrainStep: uint8 batch normalised, forward, MultiTaskLoss,
backward, clipped fused AdamW update, zero_grad) at the full depth and batch for a few steps,
whose peak resident memory is measured the same way (Linux: VmHWM). Both count from a fresh
interpreter with the project imported; the estimate leaves out workers, EMA and the checkpoint
copy, which the measured loop does not have. Prints one JSON object.

    python benchmarks/bench_memory_estimate.py --preset base --image-size 448 --batch-size 8 --steps 2

--timm-arch measures a timm-family model instead (model.family=timm; --timm-args: its model_args
as JSON), e.g. wd-eva02-large-tagger-v3's:

    python benchmarks/bench_memory_estimate.py --timm-arch eva02_large_patch14_448 \
        --timm-args '{"img_size": 448, "ref_feat_shape": [32, 32]}' --image-size 448 --tags 10861 --batch-size 2 --steps 1

--card-gib 12,16,24 (with --precision bf16 --real none) turns the same probe into a GPU sizing: on
a card of that many GiB, less CARD_RESERVE_GIB for the CUDA context and the allocator's slack, the
largest micro-batch whose step fits (float32 weights, gradients and AdamW moments, no EMA, the
batch's images and targets on the device). It is the CPU's bf16 step measured, so a CUDA step
(flash attention) needs somewhat less: a lower bound, to confirm on the card with bench_train_step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script, sys.path[0] is benchmarks/; the project modules live one level up.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from image_preprocess import normalize_images  # noqa: E402
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss  # noqa: E402
from machine_fit import PeakRss, StepShape, estimate_training_memory, profile_step_memory  # noqa: E402
from model_architecture import VisionTransformerConfig  # noqa: E402
from timm_tagger import TaggerConfig, TimmTaggerConfig, build_tagger  # noqa: E402
from training_utils import GuardedOptimizerStep, TrainStep  # noqa: E402

LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CARD_RESERVE_GIB = 1.0  # CUDA context and allocator slack on the card


def model_config(args: argparse.Namespace) -> TaggerConfig:
    """The network of the command line."""
    if args.timm_arch:
        return TimmTaggerConfig(
            args.timm_arch,
            json.loads(args.timm_args),
            num_tags=args.tags,
            image_size=args.image_size,
            input_channels="bgr",
            drop_path_rate=args.drop_path_rate,
            grad_checkpoint_every=args.grad_checkpoint_every,
        )
    overrides = {k: v for k, v in (("embed_dim", args.embed_dim), ("depth", args.depth), ("num_heads", args.heads)) if v}
    return VisionTransformerConfig.from_preset(
        args.preset,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_tags=args.tags,
        drop_path_rate=args.drop_path_rate,
        grad_checkpoint_every=args.grad_checkpoint_every,
        **overrides,
    )


def measure_real(args: argparse.Namespace) -> dict[str, Any]:
    """(In the child) build the model and run real training steps; peak RSS above the start."""
    cfg = model_config(args)
    device = torch.device("cpu")
    start_rss = PeakRss()
    with start_rss:
        model = build_tagger(cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        amp = GuardedOptimizerStep(optimizer, device, args.precision, grad_clip=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        step = TrainStep(model, model, MultiTaskLoss(AsymmetricFocalLoss()), amp, scheduler, None, device)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            raw = torch.randint(0, 256, (args.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
            images = normalize_images(raw, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (B, 3, H, W)
            targets = (torch.rand(args.batch_size, cfg.num_tags) < 0.05).float()  # (B, T)
            ratings = torch.randint(0, cfg.num_ratings, (args.batch_size,))  # (B,)
            step.forward_backward(images, targets, ratings, window=1)
            step.optimizer_step(i)
            del raw, images, targets, ratings
            times.append(time.perf_counter() - t0)
    return {"start_rss": start_rss.start, "peak_above_start": start_rss.peak, "step_seconds": times}


def card_fit(profile: Any, cfg: TaggerConfig, cards_gib: list[float]) -> dict[str, Any]:
    """Per card size: the largest micro-batch whose training step fits (see the module docstring)."""
    shape = StepShape(batch_size=1, precision="bf16", num_workers=0, ema=False, async_checkpoint=False, model_built=False)
    estimate = estimate_training_memory(profile, shape, cfg.image_size, cfg.num_tags, resident_now=0)
    device = replace(estimate, fixed_bytes=profile.step_fixed_bytes)  # the process's runtime (threads, code) stays on the host
    out: dict[str, Any] = {
        "state_gib": round(device.state_bytes / 2**30, 2),
        "per_image_mib": round((device.per_image_step + device.per_image_batch) / 2**20, 1),
    }
    for gib in cards_gib:
        out[f"{gib:g}"] = device.largest_batch(int((gib - CARD_RESERVE_GIB) * 2**30))
    return out


def main(argv: list[str] | None = None) -> int:
    """Estimate, measure, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--embed-dim", type=int, default=0)
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--tags", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--drop-path-rate", type=float, default=0.1)
    p.add_argument("--grad-checkpoint-every", type=int, default=0)
    p.add_argument("--timm-arch", default="", help="a timm model (model.family=timm) instead of our ViT")
    p.add_argument("--timm-args", default="{}", help="its model_args as a JSON object")
    p.add_argument("--card-gib", default="", help="comma-separated GPU memory sizes in GiB: the largest micro-batch that fits on each")
    p.add_argument(
        "--real",
        default="default",
        choices=("none", "default", "live", "both"),
        help="real steps to measure: none (the estimate and its time only), with the default allocator, "
        "live (MALLOC_MMAP_THRESHOLD_ set: freed blocks go back at once, so RSS is live memory) or both",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure_real(args)))
        return 0
    cfg = model_config(args)
    profile = profile_step_memory(cfg, args.precision)
    shape = StepShape(batch_size=args.batch_size, precision=args.precision, num_workers=0, ema=False, async_checkpoint=False, model_built=False)
    estimate = estimate_training_memory(profile, shape, cfg.image_size, cfg.num_tags, resident_now=profile.interpreter_bytes)
    estimated_above_start = estimate.needed(args.batch_size) - estimate.resident_now
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "real")},
        "probe_seconds": round(profile.seconds, 2),
        "parameters": profile.parameters,
        "activation_per_image_mb": round(profile.activation_per_image / 2**20, 1),
        "estimated_above_start_mb": round(estimated_above_start / 2**20, 1),
        "estimated_total_mb": round(estimate.needed(args.batch_size) / 2**20, 1),
    }
    if args.card_gib:
        report["cards"] = card_fit(profile, cfg, [float(v) for v in args.card_gib.split(",")])
    runs = {"none": [], "default": [("", {})], "live": [("live_", LIVE_ENV)], "both": [("", {}), ("live_", LIVE_ENV)]}[args.real]
    child_args = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in ("child", "real")]
    for prefix, env in runs:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *child_args, "--child"],
            capture_output=True,
            text=True,
            timeout=3600,
            encoding="utf-8",
            env=dict(os.environ, **env),
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        real = json.loads(proc.stdout.strip().splitlines()[-1])
        measured_total = real["start_rss"] + real["peak_above_start"]
        report.update(
            {
                f"{prefix}measured_above_start_mb": round(real["peak_above_start"] / 2**20, 1),
                f"{prefix}measured_total_mb": round(measured_total / 2**20, 1),
                f"{prefix}ratio_above_start": round(estimated_above_start / real["peak_above_start"], 3),
                f"{prefix}ratio_total": round(estimate.needed(args.batch_size) / measured_total, 3),
                f"{prefix}real_step_seconds": [round(t, 2) for t in real["step_seconds"]],
            }
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
