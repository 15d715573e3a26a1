"""Export a checkpoint as a WD tagger folder that kohya-ss, ComfyUI, the webui tagger, wd-tagger and imgutils read.

    python export_model.py --checkpoint runs/X/checkpoints/best --out exports/X [--ema]
        [--categories general,character,...] [--data DIR] [--image-size S] [--batch-size N]

writes into --out:

    model.onnx          input (N, S, S, 3) float32 BGR 0..255, output (N, 4 + T) probabilities
    selected_tags.csv   tag_id,name,category,count: 4 ratings (9), general tags (0), character tags (4)
    thresholds.json     tuned per-tag and per-category thresholds, in the exported (calibrated) space
    model.safetensors   timm's layout, with config.json: timm.create_model("local-dir:exports/X", pretrained=True)
    config.json
    README.md           model card: data, tags, validation metrics, preprocessing, calibration
    export_report.json  every number of the card, machine-readable

Steps: load the checkpoint (checkpoint_eval.load_checkpoint_for_eval), fix the input size (the
position embedding is resampled once when --image-size differs from training), check that the
export fits in memory (export_memory: refused in seconds, exit 2, naming --batch-size or
--image-size, where it would not; without --batch-size the run's validation batch, or the largest
that fits), evaluate the raw model on the run's validation split (checkpoint_eval.evaluate, or
every sample of --data) while spilling each image's embedding to a temporary file
(export_passes), fit the calibration (export_calibration), trace the calibrated graph to ONNX,
compute the exported model's metrics from the spill through the calibrated head (no second
backbone pass), then run onnxruntime against PyTorch on the first --verify-images images, a few
at a time (max abs diff printed; above --max-diff the export fails with exit 1). Memory peaks with
the batch, never with the number of validation images.
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

import psutil
import torch

from batching import build_dataloader
from checkpoint_eval import LoadedCheckpoint, evaluate, load_checkpoint_for_eval
from Configuration_System import ConfigError
from data_setup import DataBundle, build_eval_loader, prepare_eval_data
from dataset_scan import DataQualityError
from evaluation_metrics import json_safe
from export_calibration import Calibration, fit_calibration
from export_card import model_card
from export_memory import ExportMemoryError, ExportPlan, ExportShape, estimate_export_memory, plan_export, timm_stages, vit_stages
from export_passes import FeatureSpill, PooledTagger, exported_metrics, verify_onnx
from file_io import atomic_write_text, replace_with_retry
from image_preprocess import PreprocessParams
from machine_fit import memory_budget
from timm_layout import timm_config, timm_family_config, timm_family_state_dict, timm_state_dict, write_timm_folder
from timm_tagger import Tagger, TimmTagger
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
)
from wd_model import OUR_CATEGORIES, OutputPlan, WDTagger, fused_head, plan_outputs, resized_tagger

__all__ = ["CARD_FILE", "export_onnx", "main", "thresholds_document"]

CARD_FILE = "README.md"
WHITE = (255, 255, 255)


def export_onnx(wd: WDTagger, path: Path, opset: int = 17) -> None:
    """Trace `wd` to an ONNX file with a dynamic batch dimension (temp file, then os.replace)."""
    size = wd.image_size
    # A model already on the CPU is traced as it is: a copy would hold its weights twice.
    on_cpu = all(t.device.type == "cpu" for t in (*wd.parameters(), *wd.buffers()))
    cpu_copy = wd.eval() if on_cpu else copy.deepcopy(wd).to("cpu").eval()
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
    """The exported model's metrics and the onnxruntime check."""

    metrics: dict[str, Any]
    max_abs_diff: float
    verified_images: int
    seconds: dict[str, float]  # wall time of each step


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
    p.add_argument(
        "--data",
        default=None,
        help="calibrate and evaluate on every sample of this dataset folder or sharded dataset (chunk folder, s3:// URL) instead of the run's validation split",
    )
    p.add_argument("--image-size", type=int, default=0, help="input size S of the export (default: the training size)")
    p.add_argument("--general-threshold", type=float, default=DEFAULT_GENERAL_THRESHOLD, help="consumer threshold the general tags are calibrated to")
    p.add_argument(
        "--character-threshold", type=float, default=DEFAULT_CHARACTER_THRESHOLD, help="consumer threshold the character tags are calibrated to"
    )
    p.add_argument(
        "--calibration-prior", type=float, default=10.0, help="validation positives at which a tag's own threshold and its category's weigh equally"
    )
    p.add_argument("--no-calibration", action="store_true", help="export the raw probabilities")
    p.add_argument("--verify-images", type=int, default=64, help="validation images run through onnxruntime and compared with PyTorch (0 = all)")
    p.add_argument("--max-diff", type=float, default=1e-4, help="largest accepted onnxruntime vs PyTorch difference")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images a backbone batch (and at most a onnxruntime call); default: the run's validation batch size, or the largest that fits in memory",
    )
    p.add_argument(
        "--memory-limit", type=float, default=0.0, help="GB this export may use (default: what is available, less 10%% of the machine's memory)"
    )
    p.add_argument("--num-workers", type=int, default=-1, help="default: the run's data.num_workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the PyTorch passes")
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclasses.dataclass
class Loaded:
    """Everything the export runs on, read and checked before the heavy part."""

    ck: LoadedCheckpoint  # ck.model is the model at the export size
    trained: Any  # the model config as trained (the card reports its size)
    plan: OutputPlan
    preprocess: PreprocessParams
    memory: ExportPlan
    data: DataBundle


def _memory_plan(args: argparse.Namespace, ck: LoadedCheckpoint, plan: OutputPlan, device: torch.device) -> ExportPlan:
    """The batch sizes that fit in the memory this export may use (ExportMemoryError naming the flag where none does)."""
    cfg, model = ck.cfg, ck.model
    workers = args.num_workers if args.num_workers >= 0 else cfg.data.num_workers
    workers = 2 if workers < 0 else workers  # an unresolved -1 loads with at most 2 workers (build_eval_loader)
    size = model.cfg.image_size
    if isinstance(model, TimmTagger):
        stages = timm_stages(model.body, model.cfg.architecture, size)
    else:
        stages = vit_stages(size, model.cfg.patch_size, model.cfg.embed_dim, model.cfg.num_heads, model.cfg.mlp_ratio)
    shape = ExportShape(
        image_size=size,
        stages=stages,
        num_params=sum(p.numel() for p in model.parameters()),
        vocab_tags=len(ck.vocab),
        exported_tags=len(plan.columns),
        loader_batches=workers * cfg.data.prefetch_factor + 1,  # in flight, and the one in use
        host_passes=device.type == "cpu",
    )
    resident = psutil.Process().memory_info().rss
    budget = memory_budget(resident_now=resident)
    limited = bool(args.memory_limit) and args.memory_limit * 1e9 < budget
    if args.memory_limit:
        budget = min(budget, int(args.memory_limit * 1e9))
    return plan_export(
        estimate_export_memory(shape, resident),
        image_size=model.cfg.image_size,
        requested_batch=args.batch_size,
        default_batch=cfg.validation.batch_size or cfg.data.batch_size,
        budget=budget,
        limit_flag="--memory-limit" if limited else "",
    )


def _load(args: argparse.Namespace, categories: list[str], device: torch.device) -> Loaded:
    """Checkpoint, the model at the export size, output plan, memory plan, validation data (errors propagate)."""
    ck = load_checkpoint_for_eval(args.checkpoint, device, ema=args.ema)
    if ck.kind == "release":
        raise ValueError(
            f"{ck.folder} is a released WD tagger folder, already in the WD layout: export a training checkpoint (step_<N> or last/best)"
        )
    plan = plan_outputs(ck.vocab, categories)
    trained = ck.model.cfg
    size = args.image_size or ck.preprocess.image_size
    ck.model = resized_tagger(ck.model, size)  # the trained-size copy is let go: one copy of the weights
    memory = _memory_plan(args, ck, plan, device)
    ck.cfg.validation.batch_size = memory.batch_size
    if args.num_workers >= 0:
        ck.cfg.data.num_workers = args.num_workers
    preprocess = dataclasses.replace(ck.preprocess, image_size=size)
    data = prepare_eval_data(ck.cfg, ck.vocab, preprocess, data_root=args.data, log=print)
    return Loaded(ck, trained, plan, preprocess, memory, data)


def _verify_loader(data: DataBundle, limit: int, chunk: int) -> Any:
    """The first `limit` validation images (0: all) in batches of `chunk`, decoded in this process."""
    count = len(data.val_dataset) if limit <= 0 else min(limit, len(data.val_dataset))
    return build_dataloader(data.val_dataset, list(range(count)), batch_size=chunk, num_workers=0, pin_memory=False, drop_last=False)


def _report(
    args: argparse.Namespace, loaded: Loaded, categories: list[str], raw_metrics: dict[str, Any], run: ExportRun, calibration: Calibration
) -> dict[str, Any]:
    """export_report.json: every number of the model card."""
    ck, plan, preprocess, memory = loaded.ck, loaded.plan, loaded.preprocess, loaded.memory
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
        "seconds": {name: round(value, 2) for name, value in run.seconds.items()},
        "preprocess": preprocess.to_dict(),
        "memory": {
            "batch_size": memory.batch_size,
            "onnxruntime_images_a_call": memory.verify_chunk,
            "estimated_peak_bytes": memory.needed,
            "budget_bytes": memory.budget,
            "batch_chosen_by": memory.how,
        },
    }


def _publish(stage: Path, out: Path) -> None:
    """Move every file of the staging folder into out (os.replace each), then remove the staging folder."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(stage.iterdir()):
        replace_with_retry(path, out / path.name)
    stage.rmdir()


def _passes(
    args: argparse.Namespace, loaded: Loaded, targets: dict[str, float], stage: Path, device: torch.device
) -> tuple[dict[str, Any], Calibration, WDTagger, ExportRun]:
    """Raw metrics (one backbone pass, embeddings spilled), calibration, model.onnx, exported metrics, the onnxruntime check."""
    ck, plan, preprocess, memory = loaded.ck, loaded.plan, loaded.preprocess, loaded.memory
    model = ck.model
    clock = time.perf_counter()
    with FeatureSpill(model.tag_head.in_features, len(ck.vocab)) as spill:
        raw = evaluate(
            PooledTagger(model),
            build_eval_loader(ck.cfg, loaded.data),
            device,
            ck.vocab,
            preprocess,
            threshold=ck.cfg.validation.threshold,
            observe=spill.observe,
        )
        calibration = (
            _zero_calibration(plan, targets)
            if args.no_calibration
            else fit_calibration(
                raw.computer, plan, general_target=targets["general"], character_target=targets["character"], prior=args.calibration_prior
            )
        )
        raw_metrics = raw.metrics
        del raw  # its metric state (histograms of every vocabulary tag) is not needed again
        seconds = {"backbone_pass": time.perf_counter() - clock}
        clock = time.perf_counter()
        wd = WDTagger(model, fused_head(model, plan, calibration.shifts.to(device)), preprocess.mean, preprocess.std).eval()
        export_onnx(wd, stage / ONNX_FILE, args.opset)
        seconds["onnx_export"] = time.perf_counter() - clock
        clock = time.perf_counter()
        exported = exported_metrics(spill, wd.head, plan, targets, chunk=memory.batch_size, device=device)
        seconds["exported_metrics"] = time.perf_counter() - clock
    clock = time.perf_counter()
    session = onnx_session(stage / ONNX_FILE)
    check = verify_onnx(
        session, wd, _verify_loader(loaded.data, args.verify_images, memory.verify_chunk), limit=args.verify_images, chunk=memory.verify_chunk
    )
    del session  # onnxruntime's arena keeps its largest call's memory until the session goes
    seconds["onnxruntime_check"] = time.perf_counter() - clock
    print("seconds: " + ", ".join(f"{name.replace('_', ' ')} {value:.1f}" for name, value in seconds.items()))
    return raw_metrics, calibration, wd, ExportRun(exported, check.max_abs_diff, check.images, seconds)


def _timm_files(model: Tagger, plan: OutputPlan, preprocess: PreprocessParams, wd: WDTagger) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and model.safetensors of the timm folder: our ViT in timm's ViT layout, a timm-family model as the WD v3 releases are."""
    if isinstance(model, TimmTagger):
        return timm_family_config(model, plan.labels.names, preprocess), timm_family_state_dict(model, wd.head)
    return timm_config(model.cfg, plan.labels.names, preprocess.mean, preprocess.std), timm_state_dict(model, wd.head)


def main(argv: list[str] | None = None) -> int:
    """Export, verify, report; 0 on success, 1 when onnxruntime disagrees with PyTorch, 2 on bad input or too little memory."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = _device(args.device)
    targets = {"general": args.general_threshold, "character": args.character_threshold}
    categories = sorted({c.strip() for c in args.categories.split(",") if c.strip()})
    try:
        for name, value in targets.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"--{name}-threshold must be in (0, 1), got {value}")
        # Fail before the long passes, not after them: torch's exporter needs onnx, the check onnxruntime.
        if importlib.util.find_spec("onnx") is None:
            raise ImportError("the onnx package is needed to write model.onnx; install it with `pip install onnx onnxruntime`")
        import_onnxruntime()
        loaded = _load(args, categories, device)
    except (ConfigError, FileNotFoundError, ExportMemoryError, ValueError, DataQualityError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ck, plan, preprocess, memory = loaded.ck, loaded.plan, loaded.preprocess, loaded.memory
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
    print(
        f"export: {len(plan.labels.general)} general + {len(plan.labels.character)} character tags "
        f"({len(plan.dropped)} left out), input {preprocess.image_size}px, {len(loaded.data.val_records)} validation images; "
        f"{memory.describe()}"
    )
    raw_metrics, calibration, wd, run = _passes(args, loaded, targets, stage, device)
    model = ck.model
    atomic_write_text(stage / LABELS_FILE, plan.labels.to_csv_text())
    write_timm_folder(stage, *_timm_files(model, plan, preprocess, wd))
    atomic_write_text(stage / THRESHOLDS_FILE, json.dumps(thresholds_document(plan, run, calibration), indent=1, ensure_ascii=False))
    report = _report(args, loaded, categories, raw_metrics, run, calibration)
    atomic_write_text(stage / REPORT_FILE, json.dumps(json_safe(report), indent=1, ensure_ascii=False))
    atomic_write_text(stage / CARD_FILE, model_card(report, loaded.trained, plan))
    exported = run.metrics
    cuts = exported["at_consumer_thresholds"]["all"]
    print(
        f"raw checkpoint: mAP {raw_metrics['mAP']:.4f}; exported: mAP {exported['mAP']:.4f}, micro-F1 "
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
