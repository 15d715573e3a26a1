"""Time from upload to tags on the page (tag_app.py) against tag_images.py on the same images, printed as JSON.

Owns one measurement: for a model folder (an export: model.onnx + selected_tags.csv, random weights
built in a temporary folder; speed does not depend on them) and a set of uploaded image files,

- page: what tag_app does once a batch of uploads has arrived: decode each file with the model's
  preprocessing, run the model in batches, choose tags, build the caption and the HTML
  (`TagPage.tag` + the Tag tab's render). The model is opened once, before the clock (its opening
  time is reported apart); the browser's transfer over loopback is not counted;
- tag_images.py as a user runs it on a folder of the same images: the whole process (interpreter,
  imports, opening the model, tagging, writing captions), with its default workers ("cli"); and its
  `run` in this process without workers ("run": opening the model, decoding, tagging, captions).

Images are random-noise JPEGs of --width x --height (a typical upload), written before the clock
starts. Models (bench_tagging's): "demo" (the demo config's ViT: 64 px, patch 8, width 128, depth 4,
28 tags) and "vit_b_448" (ViT-B/16 at 448 px with 10,000 tags, WD-v3-like). Each page figure is the median of
--repeats runs.

    python benchmarks/bench_app.py [--models demo,vit_b_448] [--counts 1,32] [--repeats 3]
                                   [--batch-size 8] [--threads 0] [--width 1024 --height 768]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Run as a script from anywhere: the project root holds the modules, this folder the model builder.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tagging import MODELS, build  # noqa: E402

import tag_images  # noqa: E402
from export_model import export_onnx  # noqa: E402
from tag_app import TagPage, caption_options, render_tag_tab  # noqa: E402
from wd_format import LABELS_FILE, ONNX_FILE, RATING_NAMES, LabelTable  # noqa: E402

TAGS_PER_IMAGE = 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,vit_b_448", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--counts", default="1,32", help="numbers of uploaded images to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="both tools' batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = default)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; expected some of {sorted(MODELS)}")
    try:
        args.count_list = [int(c) for c in args.counts.split(",")]
    except ValueError:
        p.error(f"--counts: {args.counts!r} is not a comma-separated list of integers")
    if min(args.count_list) < 1 or args.repeats < 1 or args.batch_size < 1 or args.threads < 0:
        p.error("--counts, --repeats and --batch-size must be >= 1, --threads >= 0")
    return args


def build_export(name: str, folder: Path, seed: int) -> Path:
    """A random-weight export folder (model.onnx + selected_tags.csv) of the named size."""
    folder.mkdir(parents=True)
    wd = build(name, seed)  # bench_tagging's model: tags tag_0 ... in vocabulary order, all general
    # A trained tagger gives an image a few dozen tags, random weights half of them all: bias the head
    # so that TAGS_PER_IMAGE tags (a quarter of a small vocabulary) sit high and the rest low: the page's work grows with the tags shown.
    tags = MODELS[name][5]
    with torch.no_grad():
        shift = torch.full((tags,), -8.0)
        shift[torch.randperm(tags, generator=torch.Generator().manual_seed(seed))[: min(TAGS_PER_IMAGE, tags // 4)]] = 8.0
        wd.head.bias[4:] += shift
    export_onnx(wd, folder / ONNX_FILE)
    labels = LabelTable(RATING_NAMES, tuple(f"tag_{i}" for i in range(MODELS[name][5])), ())
    (folder / LABELS_FILE).write_text(labels.to_csv_text(), encoding="utf-8")
    return folder


def write_images(folder: Path, count: int, width: int, height: int, seed: int) -> list[Path]:
    """Random-noise JPEGs (noise: the decoder does real work)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"upload_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def time_page(page: TagPage, name: str, paths: list[Path], repeats: int) -> tuple[float, int]:
    """Median seconds from the uploaded files to the Tag tab's HTML, and the number of tags shown."""
    settings = {name: page.models[name].default_settings()}
    options = caption_options(False, False, False, False, "")
    times, shown = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tagged = page.tag([str(p) for p in paths], [name])  # decode, batches, probabilities
        html = render_tag_tab(page, tagged, [name], settings, options)  # thresholds, captions, the page
        times.append(time.perf_counter() - start)
        shown = html.count('class="oo-tag')
    return statistics.median(times), shown


def time_tag_images(model: Path, folder: Path, batch_size: int) -> float:
    """Wall seconds of `python tag_images.py` on the folder, as a user runs it (captions overwritten each time)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tag_images.py"), "--model", str(model), "--input", str(folder), "--overwrite", "--batch-size", str(batch_size)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"tag_images.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def time_tag_images_in_process(model: Path, folder: Path, batch_size: int) -> float:
    """Seconds of tag_images.run in this process, no workers: opening the model, decoding, tagging, writing captions."""
    args = tag_images.parse_args(
        ["--model", str(model), "--input", str(folder), "--overwrite", "--batch-size", str(batch_size), "--num-workers", "0"]
    )
    start = time.perf_counter()
    tag_images.run(args)
    return time.perf_counter() - start


def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One model: open time, then per image count the page and tag_images.py."""
    folder = build_export(name, workdir / name, args.seed)
    page = TagPage(batch_size=args.batch_size)
    start = time.perf_counter()
    opened = page.open(folder)
    result: dict[str, Any] = {"image_size": MODELS[name][0], "tags": MODELS[name][5], "page_open_model_s": round(time.perf_counter() - start, 3)}
    for count in args.count_list:
        paths = write_images(workdir / f"{name}_{count}", count, args.width, args.height, args.seed)
        seconds, shown = time_page(page, opened.name, paths, args.repeats)
        result[f"page_{count}_images_s"] = round(seconds, 3)
        result[f"page_{count}_images_tags_shown"] = shown
        result[f"tag_images_cli_{count}_images_s"] = round(time_tag_images(folder, paths[0].parent, args.batch_size), 3)
        result[f"tag_images_run_{count}_images_s"] = round(time_tag_images_in_process(folder, paths[0].parent, args.batch_size), 3)
    return result


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages where the OS has them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Measure each model and print one JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image": f"{args.width}x{args.height} jpeg",
        "repeats": args.repeats,
        "load_before": load_average(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result["models"][name] = measure(name, args, Path(tmp))
    result["load_after"] = load_average()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
