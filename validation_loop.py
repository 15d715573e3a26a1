"""Evaluate a checkpoint from the command line, and write its reports.

    python validation_loop.py --checkpoint runs/demo/checkpoints/best [--data DIR]
        [--mode full|fast|tags|hierarchical] [--out DIR] [--ema]

A checkpoint folder is all it needs: weights, model shape, vocabulary, preprocessing and the
config (for the dataset and its split) are read from it. Without `--data` it evaluates the run's
validation split (recomputed from the seed and the sample ids, so it is the same split); with
`--data DIR` every usable sample of DIR. It writes `metrics.json`, `per_tag.csv`,
`thresholds.json` and `report.md` to `--out`.

Loading the checkpoint and evaluating it are checkpoint_eval's (shared with training's inline
validation, the export and the tagger); this module owns the CLI and the report files
(`per_tag_rows`, `thresholds_dict`, `report_markdown`, `write_reports`, `select_tags`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from checkpoint_eval import EvalResult, evaluate, load_checkpoint_for_eval
from checkpoint_store import run_dir_of
from Configuration_System import ConfigError
from data_setup import build_eval_loader, is_inside, prepare_eval_data
from dataset_scan import DataQualityError
from evaluation_metrics import json_safe
from file_io import atomic_write_text
from scan_limits import printable
from training_utils import autocast_context, resolve_precision
from vocabulary import TagVocabulary
from wd_format import RATING_NAMES

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


def select_tags(result: EvalResult, vocab: TagVocabulary, names: list[str]) -> dict[str, Any]:
    """Per-tag metrics of the named tags (mode tags); unknown names are an error."""
    unknown = [n for n in names if n not in vocab.tag_to_index]
    if unknown:
        raise ValueError(f"--tags: not in the checkpoint's vocabulary: {', '.join(unknown)}")
    rows = {r["tag"]: r for r in per_tag_rows(result, vocab)}
    return {n: rows[n] for n in names}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description="Evaluate a tagger checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_N folder or a last/best pointer file")
    p.add_argument("--data", default=None, help="evaluate every usable sample of this dataset folder instead of the run's validation split")
    p.add_argument("--mode", choices=("full", "fast", "tags", "hierarchical"), default="full")
    p.add_argument("--out", default=None, help="folder for metrics.json, per_tag.csv, thresholds.json, report.md (default: <run>/eval/<step>)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--tags", default="", help="mode tags: comma-separated tag names")
    p.add_argument("--fast-batches", type=int, default=10, help="mode fast: evaluate only the first N batches")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's validation batch size")
    p.add_argument("--num-workers", type=int, default=-1, help="default: the run's data.num_workers")
    p.add_argument("--threshold", type=float, default=0.0, help="default: the run's validation.threshold")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint, evaluate, write the reports, print the headline."""
    args = parse_args(argv)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else ("cpu" if args.device == "auto" else args.device))
    try:
        ck = load_checkpoint_for_eval(args.checkpoint, device, ema=args.ema)
        cfg = ck.cfg
        if args.batch_size:
            cfg.validation.batch_size = args.batch_size
        if args.num_workers >= 0:
            cfg.data.num_workers = args.num_workers
        threshold = args.threshold or cfg.validation.threshold
        data_folder = Path(args.data) if args.data else (Path(cfg.data.root) if cfg.data.root else None)
        if args.out and data_folder is not None and data_folder.is_dir() and is_inside(args.out, data_folder):
            raise ConfigError(
                f"--out {args.out} is inside the dataset folder {data_folder}; nothing is ever written into the dataset: choose a folder outside it"
            )
        data = prepare_eval_data(cfg, ck.vocab, ck.preprocess, data_root=args.data, log=print)
        tag_names = [t.strip() for t in args.tags.split(",") if t.strip()]
        if args.mode == "tags" and not tag_names:
            raise ValueError("--mode tags needs --tags name1,name2")
    except (ConfigError, FileNotFoundError, ValueError, DataQualityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    precision = resolve_precision(cfg.training.precision, device)
    autocast = functools.partial(autocast_context, precision, device)
    loader = build_eval_loader(cfg, data)
    result = evaluate(
        ck.model,
        loader,
        device,
        ck.vocab,
        ck.preprocess,
        threshold=threshold,
        autocast=autocast,
        max_batches=args.fast_batches if args.mode == "fast" else 0,
    )
    metrics = dict(result.metrics)
    metrics.update(
        {
            "checkpoint": str(ck.folder),
            "step": ck.step,
            "mode": args.mode,
            "ema": args.ema,
            "data": str(args.data or cfg.data.root),
            "skipped_samples": {printable(k): v for k, v in sorted(result.skipped.items())},
            "data_skipped_at_scan": data.report.get("skipped", {}),
        }
    )
    if args.mode == "hierarchical":
        metrics["by_category"] = result.computer.by_category()
        metrics["by_frequency_bucket"] = result.computer.by_bucket()
    if args.mode == "tags":
        try:
            metrics["tags"] = select_tags(result, ck.vocab, tag_names)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else run_dir_of(ck.folder) / "eval" / ck.folder.name
    write_reports(out, metrics, result, ck.vocab, str(ck.folder))
    print(
        f"eval {ck.folder.name}: mAP {metrics['mAP']:.4f}  F1 micro {metrics['f1_micro']:.4f}  "
        f"macro {metrics['f1_macro']:.4f}  rating acc {metrics.get('rating_accuracy', float('nan')):.4f}  "
        f"({metrics['num_samples']} samples evaluated, {metrics['num_skipped']} skipped: failed to load) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
