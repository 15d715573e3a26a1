"""Tagging throughput of the exported model: onnxruntime and PyTorch side by side, printed as JSON.

Owns one measurement: images per second through the WD-contract model (`wd_model.WDTagger`, the
graph export_model traces) on this machine, for the demo-size model and for a ViT-B/16 at 448 px
with WD-v3-like 10,000 tags (random weights: speed does not depend on them). Images are random
uint8 arrays made before the clock starts, so decoding is not counted (bench_dataloader measures
it); one warm-up batch runs first. Both backends get the same number of CPU threads (--threads;
0 = each library's default). On a machine whose cores are busy with other work, use --threads 1:
spinning thread pools then waste most of their time (PyTorch ran 10x slower with 2 threads on 2
busy cores than with 1).

    python benchmarks/bench_tagging.py [--models demo,vit_b_448] [--images 256] [--large-images 16]
                                       [--batch-size 8] [--threads 0] [--device cpu] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script from anywhere: the project root holds the modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export_model import export_onnx  # noqa: E402
from model_architecture import SimplifiedTagger, VisionTransformerConfig  # noqa: E402
from vocabulary import TagVocabulary  # noqa: E402
from wd_format import import_onnxruntime, onnx_session, rgb_to_wd_input  # noqa: E402
from wd_model import WDTagger, fused_head, plan_outputs  # noqa: E402

# name -> (image size, patch, width, depth, heads, tags)
MODELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "demo": (64, 8, 128, 4, 4, 28),  # configs/demo.yaml
    "vit_b_448": (448, 16, 768, 12, 12, 10_000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,vit_b_448", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--images", type=int, default=256, help="images timed for the demo model")
    parser.add_argument("--large-images", type=int, default=16, help="images timed for the ViT-B at 448 px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each backend (0 = library default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both backends)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {sorted(MODELS)}")
    for name in ("images", "large_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def build(name: str, seed: int) -> WDTagger:
    """A random-weight WDTagger of the named size."""
    size, patch, width, depth, heads, tags = MODELS[name]
    torch.manual_seed(seed)
    cfg = VisionTransformerConfig(image_size=size, patch_size=patch, num_tags=tags, embed_dim=width, depth=depth, num_heads=heads)
    model = SimplifiedTagger(cfg).eval()
    vocab = TagVocabulary([f"tag_{i}" for i in range(tags)])
    return WDTagger(model, fused_head(model, plan_outputs(vocab)), (0.5,) * 3, (0.5,) * 3).eval()


def _rate(run: Callable[[np.ndarray], Any], images: np.ndarray, batch_size: int, sync: Callable[[], None]) -> float:
    """Images per second of run() over images in batches, after one warm-up batch."""
    run(images[:batch_size])
    sync()
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        run(images[i : i + batch_size])
    sync()
    return len(images) / (time.perf_counter() - start)


def measure(name: str, count: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Throughput of one model size through onnxruntime and PyTorch."""
    wd = build(name, args.seed)
    size = wd.image_size
    images = np.random.default_rng(args.seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    started = time.perf_counter()
    path = workdir / f"{name}.onnx"
    export_onnx(wd, path)
    export_seconds = time.perf_counter() - started
    session = onnx_session(path, args.device, threads=args.threads)
    onnx_rate = _rate(lambda batch: session.run(None, {"input": rgb_to_wd_input(batch)}), images, args.batch_size, lambda: None)
    device = torch.device(args.device)
    wd = wd.to(device)

    def torch_run(batch: np.ndarray) -> None:
        with torch.inference_mode():
            rgb = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
            WDTagger.probabilities(wd.logits_from_rgb(rgb)).cpu()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch_rate = _rate(torch_run, images, args.batch_size, sync)
    _, patch, width, depth, heads, tags = MODELS[name]
    return {
        "image_size": size,
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "heads": heads,
        "tags": tags,
        "images": count,
        "onnxruntime_images_per_s": round(onnx_rate, 2),
        "pytorch_images_per_s": round(torch_rate, 2),
        "onnx_file_mb": round(path.stat().st_size / 2**20, 1),
        "export_seconds": round(export_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure each model and print one JSON line."""
    args = parse_args(argv)
    ort = import_onnxruntime()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "device": args.device,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            count = args.large_images if name == "vit_b_448" else args.images
            result["models"][name] = measure(name, count, args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
