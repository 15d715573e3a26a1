"""The README.md model card of an exported WD tagger folder, written from export_model's report.

It owns only text: what the files are, how each consumer loads them, the data and tags, the
validation metrics before and after calibration, the input contract and the calibration method.
It imports model_architecture (for the config type) and wd_model (for the output plan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from model_architecture import VisionTransformerConfig
from wd_model import OutputPlan

__all__ = ["model_card"]


def _num(value: Any, digits: int = 4) -> str:
    """A metric for a table: fixed digits, or n/a for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _metrics_table(report: Mapping[str, Any]) -> list[str]:
    """Validation metrics of the raw checkpoint and of the export."""
    raw = report["raw_checkpoint"]
    exp = report["exported"]
    cuts = exp["at_consumer_thresholds"]
    targets = report["calibration"].get("targets", {"general": 0.35, "character": 0.85})
    lines = [
        "| metric | value |",
        "| --- | --- |",
        f"| validation images | {exp['num_samples']} |",
        f"| mAP, raw checkpoint (validation_loop) | {_num(raw.get('mAP'))} |",
        f"| mAP, exported model | {_num(exp['mAP'])} |",
        f"| rating accuracy (argmax) | {_num(exp['rating_accuracy'])} |",
    ]
    for block in ("all", "general", "character"):
        if block in cuts:
            c = cuts[block]
            where = f"{targets.get('general')} / {targets.get('character')}" if block == "all" else str(targets.get(block))
            lines.append(f"| micro P / R / F1, {block} tags at {where} | {_num(c['precision'], 3)} / {_num(c['recall'], 3)} / {_num(c['f1'])} |")
    lines.append(f"| micro-F1 at tuned per-tag thresholds (thresholds.json) | {_num(exp['f1_micro_tuned_per_tag'])} |")
    for block, value in exp["tuned_block_thresholds"].items():
        lines.append(f"| tuned single threshold, {block} tags | {_num(value, 3)} |")
    return lines


def _calibration_text(report: Mapping[str, Any]) -> list[str]:
    """The calibration section: method, formula, fitted numbers."""
    cal = report["calibration"]
    if cal.get("method") == "none":
        return ["None (`--no-calibration`): the outputs are the checkpoint's raw probabilities."]
    return [
        (
            "Consumers cut at fixed thresholds (general 0.35, character 0.85 by default), but the training loss "
            "(asymmetric focal loss) pushes probabilities up. The export folds a per-tag logit shift into the head "
            "bias, fitted on the validation split:"
        ),
        "",
        "```",
        "p_calibrated = sigmoid(logit + shift_t)",
        "shift_t = w_t * (logit(target) - logit(theta_t)) + (1 - w_t) * (logit(target) - logit(theta_block))",
        "w_t = n_t / (n_t + prior)",
        "```",
        "",
        (
            "theta_t is tag t's F1-optimal threshold on the validation split, theta_block the best single threshold "
            "of its block (general or character) with all its tags pooled, n_t its validation positives and target "
            "the block's consumer threshold. A frequent tag's F1-balanced point lands exactly on the consumer "
            "threshold; a rare tag leans on its block; a tag without validation positives takes the block's shift. "
            "The shift is monotonic per tag, so ranking (AP, mAP) is unchanged. The rating outputs are not shifted."
        ),
        "",
        f"- targets: {cal['targets']}; prior: {cal['prior']}",
        (
            f"- raw F1-optimal block thresholds: { {k: _num(v, 3) for k, v in cal['raw_block_thresholds'].items()} }; "
            "block shifts (logits): "
            f"{ {k: round(v, 3) for k, v in cal['block_shifts'].items()} }"
        ),
        (
            f"- per-tag shifts: min {_num(cal['shift_min'], 3)}, median {_num(cal['shift_median'], 3)}, "
            f"max {_num(cal['shift_max'], 3)}; {cal['tags_with_own_threshold']} tags with their own threshold, "
            f"{cal['tags_on_block_shift_only']} on the block shift only"
        ),
        (
            "- The metrics above are measured on the split the calibration was fitted on, so the F1 at the consumer "
            "thresholds is an optimistic estimate for new images; mAP is not affected."
        ),
    ]


def _architecture_line(train_cfg: Any) -> str:
    """The card's architecture line: our ViT's shape, or the timm architecture and its arguments."""
    if getattr(train_cfg, "family", "vit") == "timm":
        return f"- architecture: {train_cfg.describe()}; trained at {train_cfg.image_size} px"
    return (
        f"- architecture: ViT {train_cfg.embed_dim} wide, {train_cfg.depth} blocks, {train_cfg.num_heads} heads, "
        f"patch {train_cfg.patch_size}, {train_cfg.pooling} pooling; trained at {train_cfg.image_size} px"
    )


def model_card(report: Mapping[str, Any], train_cfg: VisionTransformerConfig, plan: OutputPlan) -> str:
    """README.md text for an export folder."""
    size = report["image_size"]
    pre = report["preprocess"]
    labels = plan.labels
    check = report["onnx_vs_pytorch"]
    lines = [
        "# OppaiOracle tagger (WD-tagger format)",
        "",
        (
            f"A Vision Transformer that tags images with {len(labels.general) + len(labels.character)} tags and a "
            f"4-class content rating, exported from `{report['checkpoint']}` (step {report['step']}"
            f"{', EMA weights' if report['ema'] else ''})."
        ),
        "",
        "## Files",
        "",
        "| file | what |",
        "| --- | --- |",
        (
            f"| `model.onnx` | input `[N, {size}, {size}, 3]` float32 BGR 0..255; output `[N, {4 + len(plan.columns)}]` "
            "probabilities (softmax over the 4 ratings, sigmoid for the tags), in `selected_tags.csv` order |"
        ),
        "| `selected_tags.csv` | `tag_id,name,category,count`: the ratings (9), general tags (0), character tags (4) |",
        "| `thresholds.json` | tuned per-tag and per-category thresholds on the calibrated probabilities |",
        "| `model.safetensors`, `config.json` | the same model in timm's layout (outputs are logits) |",
        "| `export_report.json` | every number of this card |",
        "",
        "## Use",
        "",
        "```bash",
        "python tag_images.py --model THIS_FOLDER --input IMAGES [--thresholds THIS_FOLDER/thresholds.json]",
        "```",
        "",
        "Taggers that read `selected_tags.csv` and `model.onnx` (kohya-ss `tag_images_by_wd14_tagger.py`, "
        "ComfyUI-WD14-Tagger, the webui tagger extension, wd-tagger, imgutils) use the folder as it is. "
        + (
            "kohya's script feeds 448 px images: "
            + ("this export is 448 px." if size == 448 else f"this export takes {size} px, so re-export with `--image-size 448` for it.")
        ),
        "",
        "timm (the channel flip to BGR is part of the contract, as for WD v3 taggers):",
        "",
        "```python",
        "import timm, torch",
        "model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True).eval()",
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "x = timm.data.create_transform(**cfg)(image_padded_to_square_with_white).unsqueeze(0)[:, [2, 1, 0]]",
        "logits = model(x); ratings = logits[:, :4].softmax(1); tags = logits[:, 4:].sigmoid()",
        "```",
        "",
        "## Data",
        "",
        f"- dataset: `{report['data']}`; validation images: {report['validation_samples']}",
        _architecture_line(train_cfg),
        "",
        "## Tags",
        "",
        (
            f"- {len(labels.general)} general (category 0; copyright, artist and meta tags are exported here, "
            "because consumers read only the rating, general and character blocks, by position)"
        ),
        f"- {len(labels.character)} character (category 4)",
        f"- {len(plan.dropped)} left out (exported categories: {', '.join(report['tags']['categories'])})",
        f"- ratings: {', '.join(labels.ratings)}",
        "",
        "## Validation metrics",
        "",
        *_metrics_table(report),
        "",
        "## Preprocessing",
        "",
        (
            f"- input `[N, {size}, {size}, 3]` float32, BGR order, raw 0..255: the image composited on white, padded "
            f"to a square with white, resized to {size} px"
        ),
        f"- inside the graph: BGR -> RGB, then `(x / 255 - mean) / std` with mean {pre['mean']}, std {pre['std']}",
        (
            f"- training letterboxed each image (resize the long side, then pad with {pre['pad_color']}); padding first "
            "and resizing after gives the same picture up to the resampling of the edges"
            if pre.get("layout", "letterbox") == "letterbox"
            else f"- training padded each image to a square with {pre['pad_color']}, then resized it ({pre.get('resample', 'bicubic')}): the same pixels"
        ),
        f"- batch dimension dynamic; input size fixed at {size} px"
        + ("" if size == train_cfg.image_size else f" (position embedding resampled from the training size {train_cfg.image_size} px)"),
        "",
        "## Calibration",
        "",
        *_calibration_text(report),
        "",
        "## Verification",
        "",
        (
            f"onnxruntime against PyTorch on {check['images']} validation images: max abs difference "
            f"{check['max_abs_diff']:.3g} (limit {check['limit']})."
        ),
        "",
    ]
    return "\n".join(lines)
