"""Tag a folder of images and write one caption file per image, as kohya-ss's WD14 tagger does.

    python tag_images.py --model exports/X --input DIR            # a WD-tagger folder, onnxruntime
    python tag_images.py --model runs/X/checkpoints/best --input DIR   # a checkpoint, PyTorch

Each image `a.png` gets `a.txt` (UTF-8, tags joined by ", "): general tags at or above
--general-threshold, character tags at or above --character-threshold (or per-tag thresholds
from --thresholds thresholds.json), in selected_tags.csv order. kohya's options work the same:
--remove-underscore (short tags and kaomoji like ^_^ keep theirs), --escape-parentheses,
--character-first, --rating, --undesired-tags, --caption-extension. Existing captions are left
alone and counted unless --append (merge, no duplicates) or --overwrite. --json OUT writes every
chosen tag with its probability.

Images are decoded by the training pipeline's loader (EXIF orientation, transparency composited
on white, CMYK and 16-bit converted, the pixel limit enforced) in DataLoader workers; one that
cannot be read is skipped and named, with its reason, in the summary at the end. Progress goes to
stderr. Any WD-format folder works (SmilingWolf's releases too): the input size comes from the
ONNX input shape. A checkpoint's probabilities are not calibrated: give it the thresholds.json
that validation_loop.py wrote, or export it first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from checkpoint_eval import load_checkpoint_for_eval
from dataset_scan import IMAGE_EXTENSIONS
from file_io import atomic_write_text
from image_preprocess import IMAGE_ERRORS, PreprocessParams, load_image
from monitor_progress import format_duration
from wd_format import (
    DEFAULT_CHARACTER_THRESHOLD,
    DEFAULT_GENERAL_THRESHOLD,
    LABELS_FILE,
    ONNX_FILE,
    LabelTable,
    TagDecision,
    onnx_session,
    rgb_to_wd_input,
    select_tags,
)
from wd_model import WDTagger, fused_head, plan_outputs, resized_tagger

__all__ = [
    "KAOMOJIS",
    "CaptionOptions",
    "OnnxBackend",
    "TorchBackend",
    "caption_tags",
    "find_images",
    "format_tag",
    "load_thresholds",
    "main",
    "merge_caption",
    "open_backend",
]

# Tags made of punctuation and underscores that must keep their underscores (the wd-tagger app's list).
KAOMOJIS = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


@dataclass
class CaptionOptions:
    """How chosen tags become caption text."""

    remove_underscore: bool = False
    escape_parentheses: bool = False
    character_first: bool = False
    rating: bool = False
    undesired: frozenset[str] = frozenset()
    separator: str = ", "


def format_tag(name: str, options: CaptionOptions) -> str:
    """One tag as caption text: underscores to spaces (not in kaomoji or tags of 3 characters or fewer), \\( \\)."""
    text = name
    if options.remove_underscore and len(name) > 3 and name not in KAOMOJIS:
        text = text.replace("_", " ")
    if options.escape_parentheses:
        text = text.replace("(", "\\(").replace(")", "\\)")
    return text


def caption_tags(decision: TagDecision, options: CaptionOptions) -> list[str]:
    """Caption tags of one image: [rating], general and character tags (characters first on request), formatted."""

    def wanted(name: str) -> bool:
        return name not in options.undesired and format_tag(name, options) not in options.undesired

    general = [format_tag(n, options) for n, _ in decision.general if wanted(n)]
    character = [format_tag(n, options) for n, _ in decision.character if wanted(n)]
    tags = character + general if options.character_first else general + character
    if options.rating and wanted(decision.rating):
        tags.insert(0, format_tag(decision.rating, options))
    return tags


def merge_caption(existing: str, new_tags: Sequence[str], separator: str) -> str:
    """Existing caption text followed by the new tags it does not already hold (compared stripped)."""
    old = [t.strip() for t in existing.replace("\n", ",").split(",") if t.strip()]
    seen = set(old)
    merged = list(old)
    for tag in new_tags:
        if tag not in seen:
            merged.append(tag)
            seen.add(tag)
    return separator.join(merged)


def load_thresholds(path: str | Path, labels: LabelTable, general: float, character: float) -> tuple[dict[str, float], float, float]:
    """(per-tag thresholds, general, character) from export_model's or validation_loop's thresholds.json.

    Tags without a per-tag value (null) use the file's per-category value, else its global
    threshold, else the command-line thresholds. Unknown tags in the file are ignored.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--thresholds: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--thresholds: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("per_tag"), dict):
        raise ValueError(f"--thresholds: {path} has no 'per_tag' object")
    fallback = data.get("global_threshold")
    per_category = data.get("per_category") if isinstance(data.get("per_category"), dict) else {}
    general = _threshold(per_category.get("general", fallback), general, path)
    character = _threshold(per_category.get("character", fallback), character, path)
    known = set(labels.general) | set(labels.character)
    per_tag = {name: _threshold(value, math.nan, path) for name, value in data["per_tag"].items() if name in known and value is not None}
    return per_tag, general, character


def _threshold(value: Any, default: float, path: Path) -> float:
    """A threshold from the file, or `default` when absent; ValueError outside [0, 1]."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"--thresholds: {path} holds {value!r}, not a threshold in [0, 1]")
    return float(value)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class OnnxBackend:
    """A WD-tagger folder (model.onnx + selected_tags.csv) run by onnxruntime."""

    def __init__(self, folder: Path, device: str) -> None:
        """Open the session, read the labels, take the input size from the ONNX input shape."""
        self.labels = LabelTable.read(folder / LABELS_FILE)
        self.session = onnx_session(folder / ONNX_FILE, "cuda" if device.startswith("cuda") else "cpu")
        node = self.session.get_inputs()[0]
        shape = node.shape  # [N, S, S, 3]
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{folder / ONNX_FILE}: input shape {shape} is not [N, S, S, 3] with a fixed S")
        self.input_name = node.name
        self.one_at_a_time = shape[0] == 1  # some releases fix the batch size at 1
        self.image_size = int(shape[1])
        self.preprocess = PreprocessParams(image_size=self.image_size, pad_color=WHITE)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != 4 + self.labels.num_tags:
            raise ValueError(f"{folder}: the model has {outputs[-1]} outputs but {LABELS_FILE} describes {4 + self.labels.num_tags}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""
        batch = rgb_to_wd_input(images)  # (B, S, S, 3) float32 BGR
        if self.one_at_a_time:
            return np.concatenate([self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(batch.shape[0])])
        return self.session.run(None, {self.input_name: batch})[0]


class TorchBackend:
    """A training checkpoint run by PyTorch behind the same contract (raw, uncalibrated probabilities)."""

    def __init__(self, checkpoint: Path, device: str, ema: bool) -> None:
        """Load the checkpoint; outputs in selected_tags.csv order (all categories, as export_model's default)."""
        self.device = torch.device(device)
        ck = load_checkpoint_for_eval(checkpoint, self.device, ema=ema)
        plan = plan_outputs(ck.vocab)
        self.labels = plan.labels
        self.image_size = ck.preprocess.image_size
        self.preprocess = ck.preprocess
        model = resized_tagger(ck.model, self.image_size)
        self.model = WDTagger(model, fused_head(model, plan), ck.preprocess.mean, ck.preprocess.std).eval()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """RGB uint8 (B, S, S, 3) -> probabilities (B, 4 + T)."""
        batch = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        with torch.inference_mode():
            return WDTagger.probabilities(self.model.logits_from_rgb(batch)).float().cpu().numpy()


def open_backend(model: str | Path, device: str, ema: bool = False) -> OnnxBackend | TorchBackend:
    """An export folder (model.onnx inside) -> OnnxBackend; a checkpoint folder or last/best pointer -> TorchBackend."""
    path = Path(model)
    if path.is_dir() and (path / ONNX_FILE).is_file():
        return OnnxBackend(path, device)
    if path.exists():
        return TorchBackend(path, device, ema)
    raise FileNotFoundError(f"--model: {path} not found (an export folder with {ONNX_FILE}, or a checkpoint)")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def find_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under root (sorted; subfolders only when recursive)."""
    if recursive:
        found = [Path(d) / f for d, _, files in os.walk(root) for f in files]
    else:
        found = [p for p in root.iterdir() if p.is_file()]
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)


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
        try:
            with warnings.catch_warnings():
                # load_image raises past the pixel limit itself; the warning below it is noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = load_image(self.paths[index], self.params)
        except IMAGE_ERRORS as exc:
            return {"index": index, "image": None, "error": f"{type(exc).__name__}: {exc}"}
        return {"index": index, "image": image, "error": None}


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
    backend = open_backend(args.model, device, ema=args.ema)
    general, character = args.general_threshold, args.character_threshold
    per_tag: dict[str, float] = {}
    if args.thresholds:
        per_tag, general, character = load_thresholds(args.thresholds, backend.labels, general, character)
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
                decision = select_tags(row, backend.labels, general_threshold=general, character_threshold=character, per_tag_thresholds=per_tag)
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
