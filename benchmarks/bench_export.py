"""Export time and peak memory: export_model.py run as a user runs it, printed as JSON.

Owns one measurement: the wall time and the peak resident memory of `export_model.py` (the
largest process, as `/usr/bin/time -v` reports it: the rusage of the child, os.wait4) for

- the demo model (configs/demo.yaml: a ViT 128 wide, 4 blocks, patch 8, 28 tags) at its native
  64 px and at 448 px, the size kohya's tagger feeds (3137 tokens a block);
- a large model, by default a ViT-B/16 at 448 px (768 wide, 12 blocks, 12 heads) with 10,000 tags.

The checkpoints hold random weights (time and memory do not depend on them) and are written with
checkpoint_store into a temporary folder, next to generated demo datasets (--demo-images images,
of which a fifth are the validation split; --large-images for the large model). Next to the
measured peak it prints the export's own estimate (export_report.json "memory"), and for a run the
export refused (exit 2) the refusal line.

    python benchmarks/bench_export.py [--demo-images 2400] [--sizes 64,448] [--large-images 160]
                                      [--large 448,16,768,12,12,10000] [--verify-images 64]
                                      [--large-verify-images 8] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

# Run as a script from anywhere: the project root holds the modules.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkpoint_store import CheckpointManager, CheckpointPayload, checkpoint_files  # noqa: E402
from Configuration_System import load_config  # noqa: E402
from dataset_scan import scan_dataset  # noqa: E402
from demo_dataset import generate_demo_dataset  # noqa: E402
from image_preprocess import PreprocessParams  # noqa: E402
from model_architecture import SimplifiedTagger, VisionTransformerConfig  # noqa: E402
from vocabulary import TagVocabulary, create_vocabulary_from_datasets  # noqa: E402

DEMO_SHAPE = (64, 8, 128, 4, 4)  # image size, patch, width, depth, heads: configs/demo.yaml
VAL_FRACTION = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-images", type=int, default=2400, help="images of the demo dataset (a fifth are validation images)")
    p.add_argument("--sizes", default="64,448", help="export sizes of the demo model (its native size is 64)")
    p.add_argument("--large", default="448,16,768,12,12,10000", help="the large model: image size, patch, width, depth, heads, tags")
    p.add_argument("--large-images", type=int, default=160, help="images of the large model's dataset (a fifth are validation images)")
    p.add_argument("--verify-images", type=int, default=64, help="--verify-images of the demo exports (export_model's default)")
    p.add_argument("--large-verify-images", type=int, default=8, help="--verify-images of the large export")
    p.add_argument("--skip-large", action="store_true", help="measure only the demo model")
    p.add_argument("--timeout", type=float, default=1800, help="seconds an export may take before it counts as failed")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        args.large = tuple(int(s) for s in args.large.split(","))
    except ValueError:
        p.error("--sizes and --large take comma-separated integers")
    if len(args.large) != 6:
        p.error("--large takes six integers: image size, patch, width, depth, heads, tags")
    return args


def make_checkpoint(folder: Path, data: Path, shape: tuple[int, ...], extra_tags: int) -> Path:
    """A random-weight checkpoint of a ViT of `shape` (size, patch, width, depth, heads) whose vocabulary is the
    dataset's tags plus `extra_tags` tags no image carries; the run config points at `data`."""
    size, patch, width, depth, heads = shape
    records = scan_dataset(data).records
    found = create_vocabulary_from_datasets(records)
    names = list(found.index_to_tag) + [f"extra_tag_{i:05d}" for i in range(extra_tags)]
    vocab = TagVocabulary(names, {**found.tag_frequencies, **dict.fromkeys(names[len(found) :], 1)}, found.tag_categories)
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"data.root={data}", f"data.demo_images={len(records)}", f"data.val_fraction={VAL_FRACTION}", f"output_root={folder}"],
    )
    model_cfg = VisionTransformerConfig(image_size=size, patch_size=patch, num_tags=len(vocab), embed_dim=width, depth=depth, num_heads=heads)
    torch.manual_seed(0)
    model = SimplifiedTagger(model_cfg)
    files = checkpoint_files(cfg, json.dumps(vocab.to_dict()), model_cfg, PreprocessParams(image_size=size))
    return CheckpointManager(folder / "checkpoints").write(CheckpointPayload(1, model.state_dict(), {}, files))


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """(exit status, peak RSS bytes of the largest process) of a child: its rusage where the OS gives
    one (os.wait4: what /usr/bin/time -v reports), else the child's RSS sampled every 50 ms."""
    if hasattr(os, "wait4"):
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            if time.monotonic() > deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(0.05)
    peak, watched = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss, *(c.memory_info().rss for c in watched.children(recursive=True)))
        except psutil.Error:  # the process or a worker ended between the calls
            pass
        time.sleep(0.05)
    return proc.returncode, peak


def run_export(checkpoint: Path, out: Path, image_size: int, verify_images: int, timeout: float) -> dict[str, Any]:
    """export_model.py as a user runs it: wall time, peak memory, the export's own plan and estimate."""
    cmd = [sys.executable, str(ROOT / "export_model.py"), "--checkpoint", str(checkpoint), "--out", str(out)]
    cmd += ["--image-size", str(image_size), "--verify-images", str(verify_images)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stdout, tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=out.parent, text=True)
        code, peak = _wait(proc, timeout)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    result: dict[str, Any] = {"image_size": image_size, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 1e6)}
    if code == 0:
        report = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
        memory = report["memory"]
        result.update(
            validation_images=report["validation_samples"],
            verified_images=report["onnx_vs_pytorch"]["images"],
            max_abs_diff=report["onnx_vs_pytorch"]["max_abs_diff"],
            batch_size=memory["batch_size"],
            onnxruntime_images_a_call=memory["onnxruntime_images_a_call"],
            estimated_peak_mb=round(memory["estimated_peak_bytes"] / 1e6),
            seconds=report["seconds"],
        )
    else:
        lines = [line for line in errors.splitlines() if line.startswith("error:")] or (printed + errors).splitlines()[-3:]
        result["message"] = " ".join(lines)
    return result


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoints, run the exports, print one JSON object."""
    args = parse_args(argv)
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "platform": platform.platform()},
        "command": "python benchmarks/bench_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        demo_data = generate_demo_dataset(work / "demo_data", num_images=args.demo_images, seed=0)
        demo = make_checkpoint(work / "demo_run", demo_data, DEMO_SHAPE, extra_tags=0)
        for size in args.sizes:
            out["runs"][f"demo_{size}"] = run_export(demo, work / f"demo_{size}", size, args.verify_images, args.timeout)
        if not args.skip_large:
            size, patch, width, depth, heads, tags = args.large
            large_data = generate_demo_dataset(work / "large_data", num_images=args.large_images, seed=1)
            found = len(create_vocabulary_from_datasets(scan_dataset(large_data).records))
            large = make_checkpoint(work / "large_run", large_data, (size, patch, width, depth, heads), extra_tags=max(0, tags - found))
            name = f"vit_{width}x{depth}_p{patch}_{size}_{tags}_tags"
            out["runs"][name] = run_export(large, work / name, size, args.large_verify_images, args.timeout)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
