"""An evaluation's reports and its kept predictions: what validation_loop.py writes and tag_app.py shows.

It owns:

- `run_evaluation`: a loaded checkpoint evaluated over its evaluation data (checkpoint_eval's
  `evaluate`), the metrics that validation_loop.py reports, and, on request, every sample's
  predictions;
- the report files (`write_reports`: `metrics.json`, `per_tag.csv`, `thresholds.json`,
  `report.md`) and their builders (`per_tag_rows`, `thresholds_dict`, `report_markdown`);
- the predictions file (`predictions.npz` next to the reports: per sample its image path, tag
  probabilities, labels, rating logits and rating; `PredictionRecorder`, `save_predictions`,
  `load_predictions`) and `result_from_predictions`, which rebuilds the evaluation's metric state
  from it: the same per-tag figures without running the model again.

Reports go to `<run>/eval/<step>` by default (`default_eval_dir`), never into the dataset
(`check_out_location`). It imports checkpoint_eval, checkpoint_store, Configuration_System,
data_setup, evaluation_metrics, file_io, scan_limits, training_utils, vocabulary and wd_format.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoint_eval import EvalResult, LoadedCheckpoint, evaluate
from checkpoint_store import run_dir_of
from Configuration_System import ConfigError
from data_setup import DataBundle, build_eval_loader, is_inside
from evaluation_metrics import MetricComputer, json_safe
from file_io import atomic_write_bytes, atomic_write_text
from scan_limits import printable
from training_utils import autocast_context, resolve_precision
from vocabulary import TagVocabulary
from wd_format import RATING_NAMES

__all__ = [
    "PREDICTIONS_FILE",
    "Evaluation",
    "PredictionRecorder",
    "Predictions",
    "check_out_location",
    "default_eval_dir",
    "load_predictions",
    "named_tag_rows",
    "per_tag_rows",
    "report_markdown",
    "result_from_predictions",
    "run_evaluation",
    "save_predictions",
    "thresholds_dict",
    "write_per_tag_csv",
    "write_reports",
]

PREDICTIONS_FILE = "predictions.npz"
PREDICTIONS_FORMAT = 1

# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def per_tag_rows(result: EvalResult, vocab: TagVocabulary) -> list[dict[str, Any]]:
    """One row per tag: name, category, training frequency, support, AP, P/R/F1, best threshold."""
    per_tag = result.computer.per_tag()
    rows = []
    for i, tag in enumerate(vocab.index_to_tag):
        rows.append(
            {
                "tag": tag,
                "category": vocab.tag_categories.get(tag, ""),
                "train_frequency": vocab.tag_frequencies.get(tag, 0),
                "support": int(per_tag["support"][i]),
                "ap": _num(per_tag["ap"][i]),
                "precision": _num(per_tag["precision"][i]),
                "recall": _num(per_tag["recall"][i]),
                "f1": _num(per_tag["f1"][i]),
                "best_threshold": _num(per_tag["best_threshold"][i]),
                "best_f1": _num(per_tag["best_f1"][i]),
            }
        )
    return rows


def _num(value: Any) -> float:
    v = float(value)
    return v if math.isfinite(v) else float("nan")


def write_per_tag_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """per_tag.csv, one row per tag."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["tag"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def thresholds_dict(result: EvalResult, vocab: TagVocabulary) -> dict[str, Any]:
    """Per-tag F1-optimal thresholds and the global precision=recall threshold, for inference."""
    per_tag = result.computer.per_tag()
    return {
        "global_threshold": result.metrics.get("global_threshold_p_eq_r"),
        "default_threshold": result.computer.threshold,
        "per_tag": {tag: _none_if_nan(per_tag["best_threshold"][i]) for i, tag in enumerate(vocab.index_to_tag)},
    }


def _none_if_nan(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def report_markdown(metrics: dict[str, Any], rows: list[dict[str, Any]], source: str, top_n: int = 15) -> str:
    """report.md: headline metrics, best and worst tags, the rating confusion matrix."""
    lines = [f"# Evaluation of {source}", "", "| metric | value |", "| --- | --- |"]
    for key in (
        "mAP",
        "f1_micro",
        "f1_macro",
        "precision_micro",
        "recall_micro",
        "rating_accuracy",
        "global_threshold_p_eq_r",
        "num_samples",
        "num_skipped",
        "num_tags",
        "num_tags_with_positives",
    ):
        if key in metrics:
            v = metrics[key]
            lines.append(f"| {key} | {v:.4f} |" if isinstance(v, float) else f"| {key} | {v} |")
    rated = [r for r in rows if r["support"] > 0 and math.isfinite(r["ap"])]
    rated.sort(key=lambda r: r["ap"], reverse=True)
    for title, chosen in (("Best tags", rated[:top_n]), ("Worst tags", list(reversed(rated[-top_n:])))):
        lines += ["", f"## {title} (by AP)", "", "| tag | support | AP | F1 | best threshold |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['tag']} | {r['support']} | {r['ap']:.4f} | {r['f1']:.4f} | {r['best_threshold']:.3f} |" for r in chosen]
    confusion = metrics.get("rating_confusion")
    if confusion:
        lines += ["", "## Rating confusion (rows: true, columns: predicted)", "", "| | " + " | ".join(RATING_NAMES) + " |", "| --- " * 5 + "|"]
        lines += [f"| {RATING_NAMES[i]} | " + " | ".join(str(int(c)) for c in row) + " |" for i, row in enumerate(confusion)]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, metrics: dict[str, Any], result: EvalResult, vocab: TagVocabulary, source: str) -> None:
    """metrics.json, per_tag.csv, thresholds.json, report.md."""
    out.mkdir(parents=True, exist_ok=True)
    rows = per_tag_rows(result, vocab)
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=2))
    write_per_tag_csv(rows, out / "per_tag.csv")
    atomic_write_text(out / "thresholds.json", json.dumps(thresholds_dict(result, vocab), indent=2))
    atomic_write_text(out / "report.md", report_markdown(metrics, rows, source))


def named_tag_rows(result: EvalResult, vocab: TagVocabulary, names: list[str]) -> dict[str, Any]:
    """Per-tag metrics of the named tags (mode tags); unknown names are an error."""
    unknown = [n for n in names if n not in vocab.tag_to_index]
    if unknown:
        raise ValueError(f"--tags: not in the checkpoint's vocabulary: {', '.join(unknown)}")
    rows = {r["tag"]: r for r in per_tag_rows(result, vocab)}
    return {n: rows[n] for n in names}


def default_eval_dir(checkpoint_folder: str | Path) -> Path:
    """Where a checkpoint's reports go unless told otherwise: <run>/eval/<step folder name>."""
    return run_dir_of(checkpoint_folder) / "eval" / Path(checkpoint_folder).name


def model_eval_dir(folder: str | Path, has_run: bool) -> Path:
    """Where a model's reports go unless told otherwise: a checkpoint's beside its run (default_eval_dir); a release
    or export folder has no run, and is never written into: eval/<folder name> where the command runs."""
    return default_eval_dir(folder) if has_run else Path("eval") / Path(folder).name


def eval_dir_for(ck: LoadedCheckpoint) -> Path:
    """model_eval_dir of a loaded model."""
    return model_eval_dir(ck.folder, not ck.needs_data)


def check_out_location(out: str | Path, data_folder: str | Path | None) -> None:
    """ConfigError when the report folder lies inside the dataset: nothing is ever written into it."""
    if data_folder is not None and Path(data_folder).is_dir() and is_inside(out, data_folder):
        raise ConfigError(
            f"--out {out} is inside the dataset folder {data_folder}; nothing is ever written into the dataset: choose a folder outside it"
        )


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Every evaluated sample's outputs and labels, with what the metrics need to be rebuilt."""

    tags: list[str]  # (T,) vocabulary order
    categories: list[str]  # (T,)
    frequencies: list[int]  # (T,) training frequencies
    paths: list[str]  # (N,) image files
    probs: np.ndarray  # (N, T) float32 sigmoid of the tag logits
    targets: np.ndarray  # (N, T) bool labels
    rating_logits: np.ndarray  # (N, 4) float32
    ratings: np.ndarray  # (N,) int64, -1 unknown
    threshold: float  # the evaluation's threshold (F1 "at the threshold")
    checkpoint: str = ""
    step: int = -1
    ema: bool = False
    data: str = ""  # the --data folder evaluated ("" for the run's validation split)

    def vocabulary(self) -> TagVocabulary:
        """The tags with their training frequencies and categories."""
        return TagVocabulary(self.tags, dict(zip(self.tags, self.frequencies)), dict(zip(self.tags, self.categories)))


class PredictionRecorder:
    """A `checkpoint_eval.evaluate` observer that keeps every evaluated sample's outputs, in order."""

    def __init__(self, paths: Sequence[str]) -> None:
        """`paths[i]` is the image of dataset index i (the evaluation dataset's records)."""
        self.paths = list(paths)
        self.indices: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.rating_logits: list[np.ndarray] = []
        self.ratings: list[np.ndarray] = []

    def __call__(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        """Keep one evaluated batch: indices (B,), probabilities and labels (B, T), rating logits (B, 4), ratings (B,)."""
        self.indices.append(torch.as_tensor(batch["indices"]).cpu().numpy().astype(np.int64))
        self.probs.append(torch.sigmoid(outputs["tag_logits"].float()).cpu().numpy())  # (B, T) as evaluate computes it
        self.targets.append(batch["tag_targets"].cpu().numpy() > 0.5)  # (B, T)
        self.rating_logits.append(outputs["rating_logits"].float().cpu().numpy())  # (B, 4)
        self.ratings.append(batch["ratings"].cpu().numpy().astype(np.int64))  # (B,)

    def predictions(self, vocab: TagVocabulary, threshold: float, *, checkpoint: str = "", step: int = -1, ema: bool = False) -> Predictions:
        """Everything kept so far, as Predictions."""
        num_tags = len(vocab)
        indices = np.concatenate(self.indices) if self.indices else np.zeros(0, dtype=np.int64)
        return Predictions(
            tags=list(vocab.index_to_tag),
            categories=[vocab.tag_categories.get(t, "") for t in vocab.index_to_tag],
            frequencies=vocab.frequencies_array(),
            paths=[self.paths[int(i)] for i in indices],
            probs=np.concatenate(self.probs) if self.probs else np.zeros((0, num_tags), dtype=np.float32),
            targets=np.concatenate(self.targets) if self.targets else np.zeros((0, num_tags), dtype=bool),
            rating_logits=np.concatenate(self.rating_logits) if self.rating_logits else np.zeros((0, 4), dtype=np.float32),
            ratings=np.concatenate(self.ratings) if self.ratings else np.zeros(0, dtype=np.int64),
            threshold=float(threshold),
            checkpoint=checkpoint,
            step=step,
            ema=ema,
        )


def save_predictions(path: str | Path, predictions: Predictions) -> None:
    """Write predictions.npz atomically (labels bit-packed; no pickled objects)."""
    p = predictions
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        format_version=np.int64(PREDICTIONS_FORMAT),
        tags=np.asarray(p.tags, dtype=str),
        categories=np.asarray(p.categories, dtype=str),
        frequencies=np.asarray(p.frequencies, dtype=np.int64),
        paths=np.asarray(p.paths, dtype=str),
        probs=np.asarray(p.probs, dtype=np.float32),
        targets=np.packbits(np.asarray(p.targets, dtype=bool), axis=1),  # (N, ceil(T / 8)) uint8
        rating_logits=np.asarray(p.rating_logits, dtype=np.float32),
        ratings=np.asarray(p.ratings, dtype=np.int64),
        threshold=np.float64(p.threshold),
        checkpoint=np.asarray(p.checkpoint, dtype=str),
        step=np.int64(p.step),
        ema=np.bool_(p.ema),
        data=np.asarray(p.data, dtype=str),
    )
    atomic_write_bytes(path, [buffer.getvalue()])


def load_predictions(path: str | Path) -> Predictions:
    """Read predictions.npz; FileNotFoundError / ValueError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable predictions file ({exc})") from None
    needed = ("format_version", "tags", "categories", "frequencies", "paths", "probs", "targets", "rating_logits", "ratings", "threshold")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise ValueError(f"{path}: not a predictions file (missing {', '.join(missing)})")
    if int(arrays["format_version"]) != PREDICTIONS_FORMAT:
        raise ValueError(f"{path}: predictions format {int(arrays['format_version'])}, this code reads {PREDICTIONS_FORMAT}")
    tags = [str(t) for t in arrays["tags"].reshape(-1)]
    probs = arrays["probs"]
    n, t = (probs.shape + (0, 0))[:2] if probs.ndim == 2 else (-1, -1)
    shapes_ok = (
        probs.ndim == 2
        and probs.dtype == np.float32
        and t == len(tags)
        and arrays["categories"].shape == (t,)
        and arrays["frequencies"].shape == (t,)
        and arrays["paths"].shape == (n,)
        and arrays["targets"].shape == (n, (t + 7) // 8)
        and arrays["rating_logits"].shape == (n, len(RATING_NAMES))
        and arrays["ratings"].shape == (n,)
    )
    if not shapes_ok:
        raise ValueError(f"{path}: arrays of inconsistent shapes (probs {probs.shape} for {len(tags)} tags)")
    return Predictions(
        tags=tags,
        categories=[str(c) for c in arrays["categories"]],
        frequencies=[int(f) for f in arrays["frequencies"]],
        paths=[str(p) for p in arrays["paths"]],
        probs=probs,
        targets=np.unpackbits(arrays["targets"], axis=1, count=t).astype(bool),
        rating_logits=arrays["rating_logits"].astype(np.float32),
        ratings=arrays["ratings"].astype(np.int64),
        threshold=float(arrays["threshold"]),
        checkpoint=str(arrays["checkpoint"]) if "checkpoint" in arrays else "",
        step=int(arrays["step"]) if "step" in arrays else -1,
        ema=bool(arrays["ema"]) if "ema" in arrays else False,
        data=str(arrays["data"]) if "data" in arrays else "",
    )


def result_from_predictions(predictions: Predictions, batch_size: int = 1024) -> EvalResult:
    """The evaluation's metric state rebuilt from its predictions: per_tag_rows of it are the evaluation's own figures."""
    vocab = predictions.vocabulary()
    computer = MetricComputer(
        len(vocab),
        threshold=predictions.threshold,
        device=torch.device("cpu"),
        tag_names=vocab.index_to_tag,
        tag_categories=predictions.categories,
        tag_frequencies=predictions.frequencies,
    )
    for i in range(0, predictions.probs.shape[0], batch_size):
        computer.update(torch.from_numpy(predictions.probs[i : i + batch_size]), torch.from_numpy(predictions.targets[i : i + batch_size]).float())
        computer.update_rating(
            torch.from_numpy(predictions.rating_logits[i : i + batch_size]), torch.from_numpy(predictions.ratings[i : i + batch_size])
        )
    return EvalResult(metrics=computer.compute(), computer=computer)


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """An evaluation's metrics (as validation_loop reports them), its metric state and, when kept, its predictions."""

    metrics: dict[str, Any]
    result: EvalResult
    predictions: Predictions | None = None


def run_evaluation(
    ck: LoadedCheckpoint,
    data: DataBundle,
    device: torch.device,
    *,
    threshold: float,
    mode: str = "full",
    max_batches: int = 0,
    ema: bool = False,
    data_root: str | None = None,
    keep_predictions: bool = False,
) -> Evaluation:
    """Evaluate a loaded checkpoint over its evaluation data (`data_root`: the --data folder it came from, None for the
    run's validation split): the metrics validation_loop.py reports, and with keep_predictions every sample's outputs."""
    cfg = ck.cfg
    precision = resolve_precision(cfg.training.precision, device)
    autocast = functools.partial(autocast_context, precision, device)
    recorder = PredictionRecorder([r.image_path for r in data.val_records]) if keep_predictions else None

    result = evaluate(
        ck.model,
        build_eval_loader(cfg, data),
        device,
        ck.vocab,
        ck.preprocess,
        threshold=threshold,
        autocast=autocast,
        max_batches=max_batches,
        observe=recorder,
    )
    metrics = dict(result.metrics)
    metrics.update(
        {
            "checkpoint": str(ck.folder),
            "step": ck.step,
            "mode": mode,
            "ema": ema,
            "data": str(data_root or cfg.data.root),
            "skipped_samples": {printable(k): v for k, v in sorted(result.skipped.items())},
            "data_skipped_at_scan": data.report.get("skipped", {}),
        }
    )
    predictions = None
    if recorder is not None:
        predictions = recorder.predictions(ck.vocab, threshold, checkpoint=str(ck.folder), step=ck.step, ema=ema)
        predictions.data = str(data_root or "")
    return Evaluation(metrics, result, predictions)
