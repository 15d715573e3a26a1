"""Evaluate a checkpoint from the command line, and write its reports.

    python validation_loop.py --checkpoint runs/demo/checkpoints/best [--data DIR]
        [--mode full|fast|tags|hierarchical] [--out DIR] [--ema]

A checkpoint folder is all it needs: weights, model shape, vocabulary, preprocessing and the
config (for the dataset and its split) are read from it. A released WD v3 tagger folder
(config.json + model.safetensors + selected_tags.csv) is evaluated as published (the reference
recipe's pixels), and an exported model folder (model.onnx + selected_tags.csv) through onnxruntime
as tag_images.py runs it; neither has a run config, so they need `--data DIR`, and their reports
go to `eval/<folder name>` unless `--out` says otherwise. Without `--data` it evaluates the run's
validation split (recomputed from the seed and the sample ids, so it is the same split); with
`--data DIR` every usable sample of DIR (a dataset folder, or a sharded dataset: a chunk folder or
an s3:// URL). It writes `metrics.json`, `per_tag.csv`,
`thresholds.json`, `report.md` and `skipped_samples.csv` (every sample left out, by path) to `--out`, and with `--save-predictions` every sample's
probabilities and labels (`predictions.npz`, what tag_app.py's validation tab shows).

Loading the model is model_eval's and evaluating it checkpoint_eval's (shared with training's
inline validation, the export, the tagger and the page); the report files and the predictions are eval_reports'
(shared with tag_app.py). This module owns the CLI.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from Configuration_System import ConfigError
from data_setup import prepare_eval_data
from dataset_scan import DataQualityError
from eval_reports import PREDICTIONS_FILE, check_out_location, eval_dir_for, named_tag_rows, run_evaluation, save_predictions, write_reports
from model_eval import load_model_for_eval
from skip_list import SKIP_LIST_FILE, failure_rows, write_skip_list

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description="Evaluate a tagger checkpoint.")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoints/step_N folder, a last/best pointer, a run folder, or (with --data) a WD v3 release or export folder",
    )
    p.add_argument(
        "--data",
        default=None,
        help="evaluate every usable sample of this dataset folder or sharded dataset (chunk folder, s3:// URL) instead of the run's validation split",
    )
    p.add_argument("--mode", choices=("full", "fast", "tags", "hierarchical"), default="full")
    p.add_argument("--out", default=None, help="folder for metrics.json, per_tag.csv, thresholds.json, report.md (default: <run>/eval/<step>)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--save-predictions", action="store_true", help=f"also write every sample's probabilities and labels ({PREDICTIONS_FILE})")
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
        ck = load_model_for_eval(args.checkpoint, device, ema=args.ema)
        if ck.needs_data and not args.data:
            what = "a released WD tagger folder" if ck.kind == "release" else "an exported model folder"
            raise ValueError(f"{ck.folder} is {what} with no run config (no dataset, no split): name the images with --data DIR")
        cfg = ck.cfg
        if args.batch_size:
            cfg.validation.batch_size = args.batch_size
        if args.num_workers >= 0:
            cfg.data.num_workers = args.num_workers
        threshold = args.threshold or cfg.validation.threshold
        data_folder = Path(args.data) if args.data else (Path(cfg.data.root) if cfg.data.root else None)
        if args.out:
            check_out_location(args.out, data_folder)
        data = prepare_eval_data(cfg, ck.vocab, ck.preprocess, data_root=args.data, log=print)
        tag_names = [t.strip() for t in args.tags.split(",") if t.strip()]
        if args.mode == "tags" and not tag_names:
            raise ValueError("--mode tags needs --tags name1,name2")
    except (ConfigError, FileNotFoundError, ValueError, DataQualityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    evaluation = run_evaluation(
        ck,
        data,
        device,
        threshold=threshold,
        mode=args.mode,
        max_batches=args.fast_batches if args.mode == "fast" else 0,
        ema=args.ema,
        data_root=args.data,
        keep_predictions=args.save_predictions,
    )
    metrics, result = evaluation.metrics, evaluation.result
    if args.mode == "hierarchical":
        metrics["by_category"] = result.computer.by_category()
        metrics["by_frequency_bucket"] = result.computer.by_bucket()
    if args.mode == "tags":
        try:
            metrics["tags"] = named_tag_rows(result, ck.vocab, tag_names)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else eval_dir_for(ck)
    write_reports(out, metrics, result, ck.vocab, str(ck.folder))
    if evaluation.predictions is not None:
        save_predictions(out / PREDICTIONS_FILE, evaluation.predictions)
    failed = {sid: (reason, "validation") for sid, reason in result.skipped.items()}
    listed = write_skip_list(out / SKIP_LIST_FILE, itertools.chain(data.skipped_rows, failure_rows(failed, [data.val_records])))
    print(
        f"eval {ck.folder.name}: mAP {metrics['mAP']:.4f}  F1 micro {metrics['f1_micro']:.4f}  "
        f"macro {metrics['f1_macro']:.4f}  rating acc {metrics.get('rating_accuracy', float('nan')):.4f}  "
        f"({metrics['num_samples']} samples evaluated, {metrics['num_skipped']} skipped: failed to load) -> {out}"
    )
    if listed:
        print(f"skipped: every one of the {listed} samples left out, with its reason, is listed in {out / SKIP_LIST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
