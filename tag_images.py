"""Tag a folder of images and write one caption file per image, as kohya-ss's WD14 tagger does.

    python tag_images.py --model exports/X --input DIR            # a WD-tagger folder, onnxruntime
    python tag_images.py --model runs/X/checkpoints/best --input DIR   # a checkpoint, PyTorch

--model is anything tagging.open_model opens: an export folder (onnxruntime), a timm-layout folder,
a run folder, a checkpoint. Each image `a.png` gets `a.txt` (UTF-8, tags joined by ", "): general
tags at or above --general-threshold, character tags at or above --character-threshold (or
per-tag thresholds from --thresholds thresholds.json; or, with --general-mcut / --character-mcut,
each image's own maximum cut), in selected_tags.csv order. kohya's options work the same:
--remove-underscore (short tags and kaomoji like ^_^ keep theirs), --escape-parentheses,
--character-first, --rating, --undesired-tags, --caption-extension. Existing captions are left
alone and counted unless --append (merge, no duplicates) or --overwrite. --json OUT writes every
chosen tag with its probability.

Images are decoded by the training pipeline's loader (EXIF orientation, transparency composited
on white, CMYK and 16-bit converted, the pixel limit enforced) in DataLoader workers; one that
cannot be read is skipped and named, with its reason, in the summary at the end. Progress goes to
stderr. Any WD-format folder works (SmilingWolf's releases too): the input size comes from the
ONNX input shape. A checkpoint's probabilities are not calibrated: give it the thresholds.json
that validation_loop.py wrote, or export it first. Opening the model, decoding, thresholds and
caption text are the tagging library's (shared with tag_app.py, the page); this module owns the
folder walk, the caption files, progress and the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from file_io import atomic_write_text
from image_preprocess import PreprocessParams
from monitor_progress import format_duration
from tagging import CaptionOptions, Thresholds, caption_tags, find_images, merge_caption, open_model, read_image, thresholds_for
from wd_format import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, ONNX_FILE, LabelTable

__all__ = ["Progress", "RunSummary", "main", "parse_args", "run", "thresholds_from_args"]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Letterboxed RGB uint8 arrays of image files; a file that fails carries its reason instead."""

    def __init__(self, paths: Sequence[Path], params: PreprocessParams) -> None:
        """Keep the paths (as strings, cheap to send to spawned workers) and the preprocessing."""
        self.paths = [str(p) for p in paths]
        self.params = params

    def __len__(self) -> int:
        """Number of files."""
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"index", "image": (S, S, 3) uint8 or None, "error": reason or None}."""
        image, error = read_image(self.paths[index], self.params)
        return {"index": index, "image": image, "error": error}


def collate_images(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack the readable images (k, S, S, 3) uint8; keep (index, reason) of the others."""
    good = [s for s in batch if s["image"] is not None]
    images = np.stack([s["image"] for s in good]) if good else None
    return {"images": images, "indices": [s["index"] for s in good], "errors": [(s["index"], s["error"]) for s in batch if s["image"] is None]}


def _worker_init(worker_id: int) -> None:
    """One compute thread per worker: many workers x many threads thrash the cores."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Progress and the run
# --------------------------------------------------------------------------------------------


class Progress:
    """A progress line with rate and ETA on stderr: redrawn in place on a terminal, a new line every 10 s elsewhere."""

    def __init__(self, total: int, stream: Any = None) -> None:
        """Start the clock."""
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Logs captured from a pipe would fill with carriage-return frames: print seldom there.
        self.interval = 0.25 if self.tty else 10.0
        self.started = time.perf_counter()
        self.last = self.started

    def update(self, count: int) -> None:
        """Add count finished images and redraw when due."""
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        """Write the line: bar, count, rate, time left."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(share * 24)
        line = f"tagging [{bar:<24}] {self.done}/{self.total} {rate:.1f} img/s ETA {format_duration(left)}"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class RunSummary:
    """What a run did, for the end summary and for tests."""

    written: int = 0
    appended: int = 0
    kept_existing: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # image path -> reason
    results: dict[str, Any] = field(default_factory=dict)  # --json payload


def _caption_path(image: Path, extension: str) -> Path:
    """Caption file of an image: same folder, same stem, the caption extension."""
    return image.with_name(image.stem + extension)


def _plan_images(images: list[Path], extension: str, append: bool, overwrite: bool, summary: RunSummary) -> list[Path]:
    """Images to tag: drop those whose caption exists (unless append/overwrite) or is shared with another image."""
    chosen: list[Path] = []
    owners: dict[Path, Path] = {}
    for image in images:
        caption = _caption_path(image, extension)
        if caption in owners:
            summary.skipped[str(image)] = f"its caption {caption.name} is also {owners[caption].name}'s"
            continue
        owners[caption] = image
        if caption.exists() and not (append or overwrite):
            summary.kept_existing += 1
            continue
        chosen.append(image)
    return chosen


def _write_caption(image: Path, tags: list[str], args: argparse.Namespace, summary: RunSummary) -> None:
    """Write, overwrite or merge one caption file (atomically); a file that cannot be read or written is reported."""
    caption = _caption_path(image, args.caption_extension)
    try:
        if args.append and caption.exists():
            existing = caption.read_text(encoding="utf-8")
            atomic_write_text(caption, merge_caption(existing, tags, args.separator))
            summary.appended += 1
        else:
            atomic_write_text(caption, args.separator.join(tags))
            summary.written += 1
    except (OSError, UnicodeDecodeError) as exc:
        summary.skipped[str(image)] = f"caption {caption.name} not written ({type(exc).__name__}: {exc})"


def thresholds_from_args(args: argparse.Namespace, labels: LabelTable) -> Thresholds:
    """The thresholds the command line asks for: category values, a thresholds.json, MCut per category."""
    return thresholds_for(labels, args.general_threshold, args.character_threshold, args.thresholds, args.general_mcut, args.character_mcut)


def run(args: argparse.Namespace) -> RunSummary:
    """Tag every image under args.input; errors about the arguments raise ValueError / FileNotFoundError."""
    root = Path(args.input)
    if not root.is_dir():
        raise FileNotFoundError(f"--input: folder not found: {root}")
    if args.append and args.overwrite:
        raise ValueError("--append and --overwrite exclude each other")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not (Path(args.model) / ONNX_FILE).is_file():
        raise ValueError("--device cuda: this PyTorch sees no CUDA device")
    try:
        backend = open_model(args.model, device, ema=args.ema)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--model: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    thresholds = thresholds_from_args(args, backend.labels)
    options = CaptionOptions(
        args.remove_underscore,
        args.escape_parentheses,
        args.character_first,
        args.rating,
        frozenset(t.strip() for t in args.undesired_tags.split(",") if t.strip()),
        args.separator,
    )
    summary = RunSummary()
    images = _plan_images(find_images(root, args.recursive), args.caption_extension, args.append, args.overwrite, summary)
    dataset = ImageFileDataset(images, backend.preprocess)
    extra: dict[str, Any] = {}
    if args.num_workers > 0:
        extra = {"worker_init_fn": _worker_init, "multiprocessing_context": args.worker_start_method or None}
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False, collate_fn=collate_images, **extra)
    progress = Progress(len(images))
    for batch in loader:
        for index, reason in batch["errors"]:
            summary.skipped[str(images[index])] = reason
        if batch["images"] is not None:
            probs = backend(batch["images"])  # (k, 4 + T)
            for row, index in zip(probs, batch["indices"]):
                decision = thresholds.decide(row, backend.labels)
                _write_caption(images[index], caption_tags(decision, options), args, summary)
                if args.json:
                    key = images[index].relative_to(root).as_posix()
                    summary.results[key] = {"rating": decision.ratings, "general": dict(decision.general), "character": dict(decision.character)}
        progress.update(len(batch["indices"]) + len(batch["errors"]))
    progress.close()
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"images": summary.results, "skipped": summary.skipped}, indent=1, ensure_ascii=False))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; kohya's spellings (--general_threshold, ...) are accepted as aliases."""
    p = argparse.ArgumentParser(description="Write a caption file of tags for every image in a folder.")
    p.add_argument("--model", required=True, help="export folder (model.onnx + selected_tags.csv) or checkpoint")
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    p.add_argument("--caption-extension", "--caption_extension", default=".txt")
    p.add_argument("--separator", "--caption_separator", default=", ", help="between tags in a caption")
    p.add_argument("--general-threshold", "--general_threshold", type=float, default=DEFAULT_GENERAL_THRESHOLD)
    p.add_argument("--character-threshold", "--character_threshold", type=float, default=DEFAULT_CHARACTER_THRESHOLD)
    p.add_argument("--thresholds", default="", help="thresholds.json: per-tag thresholds (export_model or validation_loop)")
    p.add_argument("--general-mcut", action="store_true", help="general tags by MCut: each image cut at the largest gap of its sorted general scores")
    p.add_argument("--character-mcut", action="store_true", help="character tags by MCut (never below 0.15, as SmilingWolf's page)")
    p.add_argument("--remove-underscore", "--remove_underscore", action="store_true", help="underscores to spaces (not in kaomoji / short tags)")
    p.add_argument("--escape-parentheses", action="store_true", help="write ( ) as \\( \\)")
    p.add_argument("--character-first", "--character_tags_first", action="store_true", help="character tags before general tags")
    p.add_argument("--rating", "--use_rating_tags", action="store_true", help="put the rating tag first")
    p.add_argument("--undesired-tags", "--undesired_tags", default="", help="comma-separated tags never written")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", "--append_tags", action="store_true", help="merge new tags into existing captions")
    mode.add_argument("--overwrite", action="store_true", help="replace existing captions")
    p.add_argument(
        "--json",
        default="",
        help="also write the chosen tags with their probabilities to this file (images whose caption is left alone are not tagged)",
    )
    p.add_argument("--batch-size", "--batch_size", type=int, default=8)
    p.add_argument("--num-workers", "--max_data_loader_n_workers", type=int, default=2, help="image-decoding worker processes (0 = none)")
    p.add_argument("--worker-start-method", default="", choices=("", "spawn", "fork", "forkserver"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--ema", action="store_true", help="checkpoint: use the EMA weights")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error("--batch-size must be >= 1 and --num-workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run and print the summary; 0 when the run finished (skipped images included), 2 on bad arguments."""
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    tagged = summary.written + summary.appended
    print(
        f"tagged {tagged} images in {seconds:.1f}s: {summary.written} captions written, {summary.appended} merged; "
        f"{summary.kept_existing} existing captions left alone"
        + ("" if args.append or args.overwrite else " (--append or --overwrite to change them)")
    )
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} images:")
        for path, reason in summary.skipped.items():
            print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
