"""The WD-tagger file contract: selected_tags.csv, category codes, rating rows, the model's input layout.

A WD tagger folder (SmilingWolf's wd-*-tagger releases and our `export_model.py` output) is read,
unchanged, by kohya-ss sd-scripts (`tag_images_by_wd14_tagger.py`), ComfyUI-WD14-Tagger, the webui
tagger extension, SmilingWolf's wd-tagger app and dghs-imgutils. They agree on:

* `selected_tags.csv` with the header `tag_id,name,category,count`, one row per model output, in
  output order: the four rating rows (category 9: general, sensitive, questionable, explicit),
  then every general tag (category 0), then every character tag (category 4). kohya takes
  `prob[:4]` as the ratings and `prob[4:]` as the general block followed by the character block
  *by position*, so a row of any other category would shift every tag after it.
* `model.onnx` taking `[N, S, S, 3]` float32, BGR channel order, raw 0..255 values of the image
  padded to a square with white and resized to S, and returning `[N, 4 + T]` probabilities.
* Default thresholds 0.35 for general tags and 0.85 for character tags; the rating is the argmax
  of the four rating outputs.

This module owns those rules: the folder's file names, writing and reading the CSV
(`LabelTable`), the category codes, turning our letterboxed RGB uint8 batches into the model's
NHWC BGR input (`rgb_to_wd_input`), opening model.onnx (`onnx_session`) and the consumers'
decision rule that turns one output row into tags (`select_tags`). It is a bottom module: it
imports no project module (onnxruntime, an optional dependency, only inside `onnx_session`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CATEGORY_CHARACTER",
    "CATEGORY_GENERAL",
    "CATEGORY_RATING",
    "CSV_HEADER",
    "DEFAULT_CHARACTER_THRESHOLD",
    "DEFAULT_GENERAL_THRESHOLD",
    "LABELS_FILE",
    "ONNX_FILE",
    "ONNX_INPUT",
    "ONNX_OUTPUT",
    "RATING_NAMES",
    "THRESHOLDS_FILE",
    "REPORT_FILE",
    "LabelTable",
    "TagDecision",
    "category_code",
    "import_onnxruntime",
    "onnx_session",
    "rgb_to_wd_input",
    "select_tags",
]

ONNX_FILE = "model.onnx"
LABELS_FILE = "selected_tags.csv"
THRESHOLDS_FILE = "thresholds.json"
REPORT_FILE = "export_report.json"  # our exports only: metrics and the calibration's per-tag logit shifts
ONNX_INPUT = "input"
ONNX_OUTPUT = "output"

CSV_HEADER: tuple[str, str, str, str] = ("tag_id", "name", "category", "count")
CATEGORY_RATING = 9
CATEGORY_GENERAL = 0
CATEGORY_CHARACTER = 4
# The rating rows, in the order of the model's first four outputs (and of our rating head).
RATING_NAMES: tuple[str, str, str, str] = ("general", "sensitive", "questionable", "explicit")
DEFAULT_GENERAL_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85


def category_code(category: str) -> int:
    """WD category code of one of our tag categories: character -> 4, every other category -> 0.

    Copyright, artist, meta and unknown tags go to the general block on purpose: consumers only
    know codes 9, 0 and 4, and read the blocks by position.
    """
    return CATEGORY_CHARACTER if category == "character" else CATEGORY_GENERAL


@dataclass(frozen=True)
class LabelTable:
    """The rows of selected_tags.csv: rating, general and character names (and counts), in output order."""

    ratings: tuple[str, ...]
    general: tuple[str, ...]
    character: tuple[str, ...]
    general_counts: tuple[int, ...] = ()
    character_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Check the rating rows, name uniqueness and the count lengths; raises ValueError."""
        if len(self.ratings) != len(RATING_NAMES):
            raise ValueError(f"a WD label table needs exactly {len(RATING_NAMES)} rating rows, got {len(self.ratings)}")
        for counts, names, what in ((self.general_counts, self.general, "general"), (self.character_counts, self.character, "character")):
            if counts and len(counts) != len(names):
                raise ValueError(f"{what}_counts has {len(counts)} values for {len(names)} {what} tags")
        seen: set[str] = set()
        for name in (*self.general, *self.character):
            if not name:
                raise ValueError("a WD label table holds an empty tag name")
            if name in seen:
                raise ValueError(f"tag {name!r} appears twice in the label table")
            seen.add(name)

    @property
    def names(self) -> list[str]:
        """Every output's name in output order: ratings, general block, character block."""
        return [*self.ratings, *self.general, *self.character]

    @property
    def num_tags(self) -> int:
        """Outputs after the four rating outputs."""
        return len(self.general) + len(self.character)

    def tag_category_codes(self) -> list[int]:
        """The WD category code of each output after the ratings (0 for the general block, 4 after)."""
        return [CATEGORY_GENERAL] * len(self.general) + [CATEGORY_CHARACTER] * len(self.character)

    def to_csv_text(self) -> str:
        """selected_tags.csv as text: the exact header, then ratings, general and character rows.

        tag_id is the row number (our tags have no booru ids); names are CSV-quoted where needed
        (commas, quotes), as Python's csv module and pandas read them back.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(CSV_HEADER)
        row_id = 0
        for name in self.ratings:
            writer.writerow((row_id, name, CATEGORY_RATING, 0))
            row_id += 1
        for names, counts, code in (
            (self.general, self.general_counts, CATEGORY_GENERAL),
            (self.character, self.character_counts, CATEGORY_CHARACTER),
        ):
            for index, name in enumerate(names):
                writer.writerow((row_id, name, code, int(counts[index]) if counts else 0))
                row_id += 1
        return buffer.getvalue()

    @classmethod
    def from_csv_text(cls, text: str, source: str = "selected_tags.csv") -> LabelTable:
        """Parse selected_tags.csv text; raises ValueError naming the source and the bad row.

        Accepts what the consumers accept and nothing they would misread: the header must start
        with tag_id,name,category; rows must be ratings, then general, then character (the
        position-based reading of kohya depends on it); other category codes are refused.
        """
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            raise ValueError(f"{source}: empty file")
        header = [cell.strip() for cell in rows[0]]
        if header[:3] != list(CSV_HEADER[:3]):
            raise ValueError(f"{source}: header must start with tag_id,name,category, got {rows[0]!r}")
        has_count = len(header) > 3 and header[3] == "count"
        blocks: dict[int, list[tuple[str, int]]] = {CATEGORY_RATING: [], CATEGORY_GENERAL: [], CATEGORY_CHARACTER: []}
        order = (CATEGORY_RATING, CATEGORY_GENERAL, CATEGORY_CHARACTER)
        stage = 0
        for line_number, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) < 3:
                raise ValueError(f"{source}: line {line_number} has {len(row)} fields, expected at least 3")
            try:
                code = int(row[2])
            except ValueError:
                raise ValueError(f"{source}: line {line_number}: category {row[2]!r} is not an integer") from None
            if code not in blocks:
                raise ValueError(
                    f"{source}: line {line_number}: category {code} for {row[1]!r}; only 9 (rating), "
                    "0 (general) and 4 (character) can be read by position"
                )
            position = order.index(code)
            if position < stage:
                raise ValueError(
                    f"{source}: line {line_number}: {row[1]!r} (category {code}) comes after a later "
                    "block; rows must be ratings, then general, then character"
                )
            stage = position
            count = 0
            if has_count and len(row) > 3 and row[3].strip():
                try:
                    count = int(float(row[3]))
                except ValueError:
                    raise ValueError(f"{source}: line {line_number}: count {row[3]!r} is not a number") from None
            blocks[code].append((row[1], count))
        return cls(
            ratings=tuple(name for name, _ in blocks[CATEGORY_RATING]),
            general=tuple(name for name, _ in blocks[CATEGORY_GENERAL]),
            character=tuple(name for name, _ in blocks[CATEGORY_CHARACTER]),
            general_counts=tuple(count for _, count in blocks[CATEGORY_GENERAL]),
            character_counts=tuple(count for _, count in blocks[CATEGORY_CHARACTER]),
        )

    @classmethod
    def read(cls, path: str | Path) -> LabelTable:
        """Read selected_tags.csv from disk; FileNotFoundError / ValueError name the path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return cls.from_csv_text(text, source=str(path))


def rgb_to_wd_input(images_uint8: np.ndarray) -> np.ndarray:
    """Letterboxed RGB uint8 (B, 3, S, S) or (B, S, S, 3) -> the WD model input (B, S, S, 3) float32 BGR 0..255."""
    if images_uint8.ndim != 4:
        raise ValueError(f"expected a batch of images (B, 3, S, S) or (B, S, S, 3), got shape {images_uint8.shape}")
    if images_uint8.shape[1] == 3 and images_uint8.shape[-1] != 3:
        images_uint8 = images_uint8.transpose(0, 2, 3, 1)  # (B, S, S, 3)
    if images_uint8.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {images_uint8.shape}")
    return np.ascontiguousarray(images_uint8[..., ::-1], dtype=np.float32)  # RGB -> BGR


@dataclass
class TagDecision:
    """Tags chosen from one output row: rating probabilities, and (name, probability) per block."""

    ratings: dict[str, float]
    general: list[tuple[str, float]]
    character: list[tuple[str, float]]

    @property
    def rating(self) -> str:
        """The rating with the highest probability (the consumers' argmax)."""
        return max(self.ratings, key=lambda name: self.ratings[name])


def select_tags(
    probs: Sequence[float] | np.ndarray,
    labels: LabelTable,
    *,
    general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
    per_tag_thresholds: Mapping[str, float] | None = None,
) -> TagDecision:
    """Apply the consumers' rule to one output row (4 + T,): p >= threshold, blocks read by position.

    `per_tag_thresholds` (tag name -> threshold) overrides the block threshold for the tags it names.
    """
    row = np.asarray(probs, dtype=np.float64).reshape(-1)
    if row.shape[0] != 4 + labels.num_tags:
        raise ValueError(f"output row has {row.shape[0]} values, the label table {4 + labels.num_tags}")
    overrides = per_tag_thresholds or {}
    ratings = {name: float(row[i]) for i, name in enumerate(labels.ratings)}
    chosen: list[list[tuple[str, float]]] = [[], []]
    offset = 4
    for block, (names, default) in enumerate(((labels.general, general_threshold), (labels.character, character_threshold))):
        values = row[offset : offset + len(names)]
        for name, value in zip(names, values):
            threshold = overrides.get(name, default)
            if not math.isnan(value) and value >= threshold:
                chosen[block].append((name, float(value)))
        offset += len(names)
    return TagDecision(ratings, chosen[0], chosen[1])


def import_onnxruntime() -> Any:
    """The onnxruntime module; ImportError saying how to install it when it is missing."""
    # Imported here, not at the top: onnxruntime is an optional extra that only the ONNX paths need.
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"onnxruntime is needed for model.onnx ({exc}); install it with `pip install onnx onnxruntime`") from None
    return onnxruntime


def onnx_session(path: str | Path, device: str = "cpu", threads: int = 0) -> Any:
    """An onnxruntime InferenceSession on CPU, or CUDA first when asked (ValueError when that provider is missing).

    threads > 0 caps onnxruntime's intra-op threads (0: its default, one per core).
    """
    ort = import_onnxruntime()
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
