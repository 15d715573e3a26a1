"""Scale benchmark for evaluation_metrics.MetricComputer: stream many samples x tags, print JSON.

Owns one measurement: how long streaming validation metrics take (update + compute) and how much
memory they need at the real scale (20,000 tags x 50,000 images, batches of 256). Random batches
mimic real tags: sparse positives (per-tag density 0.1%..1%) and scores that are sigmoid(normal)
logits with positives shifted up. Data generation is timed separately from the metric work.

    python benchmarks/bench_metrics.py [--tags 20000] [--samples 50000] [--batch-size 256]
                                       [--bins 4096] [--device cpu] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
import torch

# Run as a script from anywhere: the project root holds evaluation_metrics.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation_metrics import MetricComputer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bins", type=int, default=4096)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("tags", "samples", "batch_size", "bins"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _os_peak_rss() -> int:
    """Peak resident memory of this process as the OS recorded it (bytes), 0 if unavailable."""
    try:
        import resource  # POSIX only
    except ImportError:
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", 0))  # Windows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchGenerator:
    """Cheap random (probs, targets) batches with realistic sparsity and score distributions."""

    def __init__(self, num_tags: int, device: torch.device, seed: int) -> None:
        """Draw fixed per-tag positive densities (0.1%..1%) and per-tag score offsets."""
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.density = torch.empty(num_tags, device=device).uniform_(0.001, 0.01, generator=self.generator)  # (T,)
        self.tag_bias = torch.randn(num_tags, device=device, generator=self.generator) - 5.0
        self.separation = torch.empty(num_tags, device=device).uniform_(1.0, 7.0, generator=self.generator)  # (T,)

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: probs (B, T) float32 and targets (B, T) bool."""
        num_tags = self.density.numel()
        targets = torch.rand(batch, num_tags, device=self.device, generator=self.generator)
        targets = targets < self.density  # (B, T)
        logits = torch.randn(batch, num_tags, device=self.device, generator=self.generator)
        logits.mul_(1.5).add_(self.tag_bias).add_(targets * self.separation)
        return logits.sigmoid_(), targets


def run(args: argparse.Namespace) -> dict[str, object]:
    """Stream args.samples samples through a MetricComputer and return the measurements."""
    device = torch.device(args.device)
    process = psutil.Process()
    rss_start = process.memory_info().rss
    peak_rss = rss_start
    make_batch = BatchGenerator(args.tags, device, args.seed)
    metrics = MetricComputer(args.tags, num_bins=args.bins, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    gen_seconds = 0.0
    update_seconds = 0.0
    seen = 0
    while seen < args.samples:
        batch = min(args.batch_size, args.samples - seen)
        t0 = time.perf_counter()
        probs, targets = make_batch(batch)
        _sync(device)
        t1 = time.perf_counter()
        metrics.update(probs, targets)
        _sync(device)
        t2 = time.perf_counter()
        gen_seconds += t1 - t0
        update_seconds += t2 - t1
        seen += batch
        # RSS sampled every batch: the histograms are allocated up front, so this catches peaks.
        peak_rss = max(peak_rss, process.memory_info().rss)

    t3 = time.perf_counter()
    result = metrics.compute()
    t4 = time.perf_counter()
    peak_rss = max(peak_rss, process.memory_info().rss, _os_peak_rss())
    compute_seconds = t4 - t3
    out: dict[str, object] = {
        "tags": args.tags,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "bins": args.bins,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "seconds_update": round(update_seconds, 3),
        "seconds_compute": round(compute_seconds, 3),
        "seconds_metrics": round(update_seconds + compute_seconds, 3),
        "seconds_data_generation": round(gen_seconds, 3),
        "seconds_total": round(update_seconds + compute_seconds + gen_seconds, 3),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "state_bytes": sum(t.numel() * t.element_size() for t in metrics.state_tensors()),
        "mAP": result["mAP"],
        "f1_micro": result["f1_micro"],
        "num_samples": result["num_samples"],
        "num_tags_with_positives": result["num_tags_with_positives"],
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark and print one JSON object."""
    args = parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
