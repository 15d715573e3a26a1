"""Export a checkpoint as a WD tagger folder that kohya-ss, ComfyUI, the webui tagger, wd-tagger and imgutils read.

    python export_model.py --checkpoint runs/X/checkpoints/best --out exports/X [--ema]
        [--categories general,character,...] [--data DIR] [--image-size S]

writes into --out:

    model.onnx          input (N, S, S, 3) float32 BGR 0..255, output (N, 4 + T) probabilities
    selected_tags.csv   tag_id,name,category,count: 4 ratings (9), general tags (0), character tags (4)
    thresholds.json     tuned per-tag and per-category thresholds, in the exported (calibrated) space
    model.safetensors   timm's layout, with config.json: timm.create_model("local-dir:exports/X", pretrained=True)
    config.json
    README.md           model card: data, tags, validation metrics, preprocessing, calibration
    export_report.json  every number of the card, machine-readable

Steps: load the checkpoint (checkpoint_eval.load_checkpoint_for_eval), fix the input size (the
position embedding is resampled once when --image-size differs from training), evaluate the raw
model on the run's validation split (checkpoint_eval.evaluate, or every sample of --data), fit the
calibration (export_calibration), trace the calibrated graph to ONNX, then run the validation
split again: metrics of the exported model, and onnxruntime against PyTorch on the first
--verify-images images (max abs diff printed; above --max-diff the export fails with exit 1).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batching import targets_from_indices
from checkpoint_eval import LoadedCheckpoint, evaluate, load_checkpoint_for_eval
from Configuration_System import ConfigError
from data_setup import build_eval_loader, prepare_eval_data
from dataset_scan import DataQualityError
from evaluation_metrics import json_safe
from export_calibration import Calibration, ExportMetrics, fit_calibration
from export_card import model_card
from file_io import atomic_write_text, replace_with_retry
from timm_layout import timm_config, timm_state_dict, write_timm_folder
from wd_format import (
    DEFAULT_CHARACTER_THRESHOLD,
    DEFAULT_GENERAL_THRESHOLD,
    LABELS_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    RATING_NAMES,
    REPORT_FILE,
    THRESHOLDS_FILE,
    import_onnxruntime,
    onnx_session,
    rgb_to_wd_input,
)
from wd_model import OUR_CATEGORIES, OutputPlan, WDTagger, fused_head, plan_outputs, resized_tagger

__all__ = ["CARD_FILE", "export_onnx", "main", "thresholds_document"]

CARD_FILE = "README.md"
WHITE = (255, 255, 255)


def export_onnx(wd: WDTagger, path: Path, opset: int = 17) -> None:
    """Trace `wd` to an ONNX file with a dynamic batch dimension (temp file, then os.replace)."""
    size = wd.image_size
    cpu_copy = copy.deepcopy(wd).to("cpu").eval()
    dummy = torch.zeros(2, size, size, 3)  # (N, S, S, 3); N is exported as dynamic
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # Shape checks in forward_features see the traced input's fixed S: constant by design.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch >= 2.9 prefers the torch.export-based exporter, which needs onnxscript; the
        # TorchScript exporter used here needs only onnx and gives the same graph for this model.
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*")
        torch.onnx.export(
            cpu_copy,
            (dummy,),
            str(tmp),
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        )
    replace_with_retry(tmp, path)


@dataclasses.dataclass
class ExportRun:
    """Outputs of the second validation pass."""

    metrics: dict[str, Any]
    max_abs_diff: float
    verified_images: int


def _second_pass(
    wd: WDTagger, session: Any, loader: Any, plan: OutputPlan, num_tags: int, targets: dict[str, float], device: torch.device, verify_images: int
) -> ExportRun:
    """Exported-model metrics over the loader; onnxruntime vs PyTorch on the first verify_images images."""
    metrics = ExportMetrics(plan, targets, device=device)
    max_diff = 0.0
    verified = 0
    with torch.inference_mode():
        for batch in loader:
            images = batch["images"]  # (B, 3, S, S) uint8 RGB, letterboxed
            probs = WDTagger.probabilities(wd.logits_from_rgb(images.to(device)))  # (B, 4 + T)
            vocab_targets = targets_from_indices(batch["tag_indices"].to(device), num_tags)  # (B, V)
            metrics.update(probs, vocab_targets, batch["ratings"].to(device))
            take = images.shape[0] if verify_images <= 0 else min(images.shape[0], verify_images - verified)
            if take > 0:
                onnx_probs = session.run([ONNX_OUTPUT], {ONNX_INPUT: rgb_to_wd_input(images[:take].numpy())})[0]
                diff = np.abs(onnx_probs - probs[:take].cpu().numpy()).max()
                max_diff = max(max_diff, float(diff))
                verified += take
    return ExportRun(metrics.compute(), max_diff, verified)


def thresholds_document(plan: OutputPlan, run: ExportRun, calibration: Calibration) -> dict[str, Any]:
    """thresholds.json: tuned thresholds per tag (null without validation positives) and per category."""
    tuned = run.metrics["tuned_tag_thresholds"]
    names = plan.labels.names[len(RATING_NAMES) :]
    return json_safe(
        {
            "space": "probabilities of model.onnx (calibrated), the values tag_images.py compares",
            "consumer_defaults": dict(calibration.targets),
            "per_category": dict(run.metrics["tuned_block_thresholds"]),
            "per_tag": {name: float(tuned[i]) for i, name in enumerate(names)},
            "rating": "argmax of the four rating outputs",
            "validation_samples": run.metrics["num_samples"],
        }
    )


def _zero_calibration(plan: OutputPlan, targets: dict[str, float]) -> Calibration:
    """The identity calibration (--no-calibration): every shift 0."""
    zeros = torch.zeros(len(plan.columns))
    return Calibration(zeros, targets, 0.0, {}, {}, torch.full_like(zeros, math.nan), zeros.long())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description="Export a checkpoint as a WD-tagger folder (ONNX + selected_tags.csv + timm).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_N folder or a last/best pointer file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument(
        "--categories",
        default=",".join(OUR_CATEGORIES),
        help="tag categories to export (character -> code 4, the others -> general code 0); tags without a category count as general",
    )
    p.add_argument("--data", default=None, help="calibrate and evaluate on every sample of this dataset folder instead of the run's validation split")
    p.add_argument("--image-size", type=int, default=0, help="input size S of the export (default: the training size)")
    p.add_argument("--general-threshold", type=float, default=DEFAULT_GENERAL_THRESHOLD, help="consumer threshold the general tags are calibrated to")
    p.add_argument(
        "--character-threshold", type=float, default=DEFAULT_CHARACTER_THRESHOLD, help="consumer threshold the character tags are calibrated to"
    )
    p.add_argument(
        "--calibration-prior", type=float, default=10.0, help="validation positives at which a tag's own threshold and its category's weigh equally"
    )
    p.add_argument("--no-calibration", action="store_true", help="export the raw probabilities")
    p.add_argument("--verify-images", type=int, default=512, help="validation images run through onnxruntime and compared with PyTorch (0 = all)")
    p.add_argument("--max-diff", type=float, default=1e-4, help="largest accepted onnxruntime vs PyTorch difference")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's validation batch size")
    p.add_argument("--num-workers", type=int, default=-1, help="default: the run's data.num_workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the PyTorch passes")
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(args: argparse.Namespace, categories: list[str], device: torch.device) -> tuple[LoadedCheckpoint, OutputPlan, Any, Any]:
    """Checkpoint, output plan, the fixed-size preprocessing and the validation data (errors propagate)."""
    ck = load_checkpoint_for_eval(args.checkpoint, device, ema=args.ema)
    plan = plan_outputs(ck.vocab, categories)
    size = args.image_size or ck.preprocess.image_size
    preprocess = dataclasses.replace(ck.preprocess, image_size=size)
    if args.batch_size:
        ck.cfg.validation.batch_size = args.batch_size
    if args.num_workers >= 0:
        ck.cfg.data.num_workers = args.num_workers
    data = prepare_eval_data(ck.cfg, ck.vocab, preprocess, data_root=args.data, log=print)
    return ck, plan, preprocess, data


def _report(
    args: argparse.Namespace,
    ck: LoadedCheckpoint,
    plan: OutputPlan,
    preprocess: Any,
    categories: list[str],
    raw_metrics: dict[str, Any],
    run: ExportRun,
    calibration: Calibration,
) -> dict[str, Any]:
    """export_report.json: every number of the model card."""
    return {
        "checkpoint": str(ck.folder),
        "step": ck.step,
        "ema": args.ema,
        "image_size": preprocess.image_size,
        "data": str(args.data or ck.cfg.data.root),
        "validation_samples": run.metrics["num_samples"],
        "tags": {
            "general": len(plan.labels.general),
            "character": len(plan.labels.character),
            "left_out": len(plan.dropped),
            "categories": categories,
        },
        "raw_checkpoint": {k: raw_metrics.get(k) for k in ("mAP", "f1_micro", "f1_macro", "rating_accuracy", "threshold", "global_threshold_p_eq_r")},
        "exported": {k: v for k, v in run.metrics.items() if k != "tuned_tag_thresholds"},
        "calibration": calibration.summary() if not args.no_calibration else {"method": "none"},
        "logit_shifts": dict(zip(plan.labels.names[len(RATING_NAMES) :], calibration.shifts.tolist())),
        "onnx_vs_pytorch": {"max_abs_diff": run.max_abs_diff, "images": run.verified_images, "limit": args.max_diff},
        "preprocess": preprocess.to_dict(),
    }


def _publish(stage: Path, out: Path) -> None:
    """Move every file of the staging folder into out (os.replace each), then remove the staging folder."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(stage.iterdir()):
        replace_with_retry(path, out / path.name)
    stage.rmdir()


def main(argv: list[str] | None = None) -> int:
    """Export, verify, report; 0 on success, 1 when onnxruntime disagrees with PyTorch, 2 on bad input."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = _device(args.device)
    targets = {"general": args.general_threshold, "character": args.character_threshold}
    categories = sorted({c.strip() for c in args.categories.split(",") if c.strip()})
    try:
        # Fail before the long passes, not after them: torch's exporter needs onnx, the check onnxruntime.
        if importlib.util.find_spec("onnx") is None:
            raise ImportError("the onnx package is needed to write model.onnx; install it with `pip install onnx onnxruntime`")
        import_onnxruntime()
        ck, plan, preprocess, data = _load(args, categories, device)
        model = resized_tagger(ck.model, preprocess.image_size)
        for name, value in targets.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"--{name}-threshold must be in (0, 1), got {value}")
    except (ConfigError, FileNotFoundError, ValueError, DataQualityError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if tuple(preprocess.pad_color) != WHITE:
        print(
            f"warning: the model was trained with pad colour {tuple(preprocess.pad_color)}; WD consumers pad with "
            "white, so letterboxed images will look different to it",
            file=sys.stderr,
        )
    out = Path(args.out)
    # Everything is written to a staging folder first and moved into --out at the end, so a failed
    # export never leaves a model.onnx next to another export's selected_tags.csv.
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    loader = build_eval_loader(ck.cfg, data)
    print(
        f"export: {len(plan.labels.general)} general + {len(plan.labels.character)} character tags "
        f"({len(plan.dropped)} left out), input {preprocess.image_size}px, {len(data.val_records)} validation images"
    )
    raw = evaluate(model, loader, device, ck.vocab, preprocess, threshold=ck.cfg.validation.threshold)
    calibration = (
        _zero_calibration(plan, targets)
        if args.no_calibration
        else fit_calibration(
            raw.computer, plan, general_target=targets["general"], character_target=targets["character"], prior=args.calibration_prior
        )
    )
    wd = WDTagger(model, fused_head(model, plan, calibration.shifts.to(device)), preprocess.mean, preprocess.std).eval()
    export_onnx(wd, stage / ONNX_FILE, args.opset)
    run = _second_pass(wd, onnx_session(stage / ONNX_FILE), loader, plan, len(ck.vocab), targets, device, args.verify_images)
    atomic_write_text(stage / LABELS_FILE, plan.labels.to_csv_text())
    write_timm_folder(stage, timm_config(model.cfg, plan.labels.names, preprocess.mean, preprocess.std), timm_state_dict(model, wd.head))
    atomic_write_text(stage / THRESHOLDS_FILE, json.dumps(thresholds_document(plan, run, calibration), indent=1, ensure_ascii=False))
    report = _report(args, ck, plan, preprocess, categories, raw.metrics, run, calibration)
    atomic_write_text(stage / REPORT_FILE, json.dumps(json_safe(report), indent=1, ensure_ascii=False))
    atomic_write_text(stage / CARD_FILE, model_card(report, ck.model.cfg, plan))
    exported = run.metrics
    cuts = exported["at_consumer_thresholds"]["all"]
    print(
        f"raw checkpoint: mAP {raw.metrics['mAP']:.4f}; exported: mAP {exported['mAP']:.4f}, micro-F1 "
        f"{cuts['f1']:.4f} at {targets['general']}/{targets['character']} (P {cuts['precision']:.3f} "
        f"R {cuts['recall']:.3f}), {exported['f1_micro_tuned_per_tag']:.4f} at tuned per-tag thresholds"
    )
    print(f"onnxruntime vs PyTorch: max abs diff {run.max_abs_diff:.3g} on {run.verified_images} images")
    if not run.max_abs_diff <= args.max_diff:
        print(
            f"error: onnxruntime and PyTorch differ by {run.max_abs_diff:.3g} > --max-diff {args.max_diff}; "
            f"the files are left in {stage} for inspection",
            file=sys.stderr,
        )
        return 1
    _publish(stage, out)
    print(f"wrote {out} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
