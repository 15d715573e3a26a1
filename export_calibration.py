"""Calibration of an exported tagger to the WD consumers' fixed thresholds, and the export's metrics.

Consumers of a WD tagger cut at fixed thresholds (0.35 for general tags, 0.85 for character tags).
Our asymmetric loss pushes probabilities up, so at those cuts a raw checkpoint over-tags. The
export therefore folds a per-tag logit shift into the head bias:

    calibrated_logit_t = logit_t + shift_t
    shift_t = w_t * (logit(target_c) - logit(theta_t)) + (1 - w_t) * (logit(target_c) - logit(theta_c))
    w_t     = n_t / (n_t + prior)

theta_t is tag t's F1-optimal threshold on the validation split, theta_c the F1-optimal single
threshold of its block (general or character, all its tags pooled), n_t the tag's validation
positives and target_c the consumer default of its block. A tag with many positives is moved so
that target_c falls exactly on its own F1-optimal point; a rare tag (few positives, a noisy
theta_t) leans on its block's shift; a tag with none gets the block's shift. The shift is
monotonic per tag, so ranking metrics (AP, mAP) are unchanged.

`ExportMetrics` accumulates the exported model's outputs (calibrated probabilities, WD order)
over the validation split and reports mAP, exact micro-F1 at the consumer thresholds, the F1 at
tuned per-tag thresholds, and those thresholds (per tag and per block) for thresholds.json.
It imports evaluation_metrics and wd_model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evaluation_metrics import MetricComputer
from wd_format import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, RATING_NAMES
from wd_model import OutputPlan

__all__ = ["PROB_CLAMP", "Calibration", "ExportMetrics", "fit_calibration", "pooled_best_threshold"]

# Thresholds are clamped to [PROB_CLAMP, 1 - PROB_CLAMP] before the logit: "predict everything"
# (threshold 0) becomes a large but finite shift.
PROB_CLAMP = 1e-4
BLOCKS = ("general", "character")


def _logit(p: float) -> float:
    """log(p / (1 - p)) of p clamped to [PROB_CLAMP, 1 - PROB_CLAMP]."""
    p = min(max(float(p), PROB_CLAMP), 1.0 - PROB_CLAMP)
    return math.log(p / (1.0 - p))


def _gap_threshold(computer: MetricComputer, occupied: torch.Tensor, k: int) -> float:
    """Probability midway (in logit space) between the highest occupied bin below k and bin k's lower edge."""
    if k <= 0:
        return 0.0
    below = torch.nonzero(occupied[:k]).flatten()
    j = int(below[-1]) if below.numel() else -1
    width = 2.0 * computer.logit_range / computer.num_bins
    low = -computer.logit_range + (j + 1) * width
    high = -computer.logit_range + k * width
    return 1.0 / (1.0 + math.exp(-(low + high) / 2.0))


def _pooled_histograms(computer: MetricComputer, tags: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) score counts summed over `tags`, each (K,) int64."""
    pos = torch.zeros(computer.num_bins, dtype=torch.int64)
    neg = torch.zeros(computer.num_bins, dtype=torch.int64)
    for tag in tags:
        p, n = computer.histograms(int(tag))
        pos += p
        neg += n
    return pos, neg


def pooled_best_threshold(computer: MetricComputer, tags: Sequence[int]) -> tuple[float, float]:
    """(threshold, micro-F1) of the single threshold that maximises micro-F1 over `tags` pooled; (nan, nan) without positives."""
    pos, neg = _pooled_histograms(computer, tags)
    total_pos = int(pos.sum())
    if total_pos == 0:
        return math.nan, math.nan
    tp = pos.flip(0).cumsum(0).flip(0).double()  # (K,) positives at or above bin k
    pp = (pos + neg).flip(0).cumsum(0).flip(0).double()  # (K,) predicted at or above bin k
    f1 = 2.0 * tp / (pp + total_pos)
    k = int(torch.argmax(f1))  # first maximum: the lowest bin, the most recall for the same F1
    return _gap_threshold(computer, (pos + neg) > 0, k), float(f1[k])


def _counts_at(computer: MetricComputer, edges: torch.Tensor, tag: int, threshold: float) -> tuple[int, int, int]:
    """(TP, predicted, positives) of one tag at a threshold lying between bins (as tuned thresholds do)."""
    pos, neg = computer.histograms(tag)
    keep = edges >= threshold  # (K,) bins whose scores are all at or above the threshold
    return int(pos[keep].sum()), int((pos + neg)[keep].sum()), int(pos.sum())


@dataclass
class Calibration:
    """Per-tag logit shifts in output order and what they were fitted from."""

    shifts: torch.Tensor  # (T,) float32, added to the tag logits
    targets: dict[str, float]  # consumer threshold per block
    prior: float  # the n / (n + prior) blending strength
    block_thresholds: dict[str, float]  # raw-probability F1-optimal threshold per block
    block_shifts: dict[str, float]
    tag_thresholds: torch.Tensor  # (T,) raw F1-optimal threshold per tag (nan: no positive)
    support: torch.Tensor  # (T,) validation positives per tag

    def summary(self) -> dict[str, Any]:
        """Plain-type description for the export report and the model card."""
        finite = self.shifts[torch.isfinite(self.shifts)]
        return {
            "method": "per-tag logit shift, blended toward the block's shift by n / (n + prior)",
            "targets": dict(self.targets),
            "prior": self.prior,
            "raw_block_thresholds": {k: (v if math.isfinite(v) else None) for k, v in self.block_thresholds.items()},
            "block_shifts": dict(self.block_shifts),
            "shift_min": float(finite.min()) if finite.numel() else None,
            "shift_median": float(finite.median()) if finite.numel() else None,
            "shift_max": float(finite.max()) if finite.numel() else None,
            "tags_with_own_threshold": int((self.support > 0).sum()),
            "tags_on_block_shift_only": int((self.support == 0).sum()),
        }


def fit_calibration(
    computer: MetricComputer,
    plan: OutputPlan,
    *,
    general_target: float = DEFAULT_GENERAL_THRESHOLD,
    character_target: float = DEFAULT_CHARACTER_THRESHOLD,
    prior: float = 10.0,
) -> Calibration:
    """Fit the per-tag logit shifts from a MetricComputer of the raw model over the vocabulary's columns."""
    for name, value in (("general_target", general_target), ("character_target", character_target)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if prior < 0 or not math.isfinite(prior):
        raise ValueError(f"calibration prior must be a finite number >= 0, got {prior!r}")
    per_tag = computer.per_tag()
    columns = torch.tensor(plan.columns, dtype=torch.long)
    thresholds = per_tag["best_threshold"].double()[columns]  # (T,)
    support = per_tag["support"].double()[columns]  # (T,)
    masks = plan.category_masks()
    targets = {"general": float(general_target), "character": float(character_target)}
    shifts = torch.zeros(len(plan.columns), dtype=torch.float64)
    block_thresholds: dict[str, float] = {}
    block_shifts: dict[str, float] = {}
    for block in BLOCKS:
        mask = masks[block]
        if not bool(mask.any()):
            continue
        vocab_tags = columns[mask].tolist()
        theta_block, _ = pooled_best_threshold(computer, vocab_tags)
        block_thresholds[block] = theta_block
        # A block without any validation positive keeps the raw probabilities (shift 0).
        block_shift = _logit(targets[block]) - _logit(theta_block) if math.isfinite(theta_block) else 0.0
        block_shifts[block] = block_shift
        for i in torch.nonzero(mask).flatten().tolist():
            n = float(support[i])
            theta = float(thresholds[i])
            if n > 0 and math.isfinite(theta):
                weight = n / (n + prior) if prior > 0 else 1.0
                own = _logit(targets[block]) - _logit(theta)
                shifts[i] = weight * own + (1.0 - weight) * block_shift
            else:
                shifts[i] = block_shift
    return Calibration(shifts.float(), targets, float(prior), block_thresholds, block_shifts, thresholds.float(), support.long())


class ExportMetrics:
    """Streaming metrics of the exported model's outputs (4 + T probabilities, WD order) on labelled images."""

    def __init__(self, plan: OutputPlan, targets: dict[str, float], device: torch.device | str = "cpu") -> None:
        """Empty state; `targets` are the consumer thresholds per block ({"general": .35, "character": .85})."""
        self.plan = plan
        self.targets = dict(targets)
        masks = plan.category_masks()
        self.masks = masks
        cut = torch.where(masks["general"], targets["general"], targets["character"])  # (T,)
        self.cut = cut.to(device=device, dtype=torch.float32)
        self.computer = MetricComputer(len(plan.columns), threshold=0.5, device=device, tag_names=plan.labels.names[len(RATING_NAMES) :])
        self.tp = torch.zeros(len(plan.columns), dtype=torch.int64, device=device)
        self.pred = torch.zeros(len(plan.columns), dtype=torch.int64, device=device)

    def update(self, probs: torch.Tensor, vocab_targets: torch.Tensor, ratings: torch.Tensor) -> None:
        """Add a batch: probs (B, 4 + T), multi-hot targets over the vocabulary (B, V), ratings (B,) with -1 unknown."""
        columns = torch.tensor(self.plan.columns, dtype=torch.long, device=vocab_targets.device)
        targets = vocab_targets.index_select(1, columns)  # (B, T) in output order
        tags = probs[:, len(RATING_NAMES) :].float()  # (B, T)
        self.computer.update(tags, targets)
        # Ratings: argmax of the softmax = argmax of the logits; log() keeps the order.
        self.computer.update_rating(probs[:, : len(RATING_NAMES)].float().clamp_min(1e-30).log(), ratings)
        predicted = tags >= self.cut  # (B, T)
        self.pred += predicted.sum(0)
        self.tp += (predicted & (targets > 0.5)).sum(0)

    def _f1_at_cuts(self, mask: torch.Tensor, support: torch.Tensor) -> dict[str, float]:
        """Exact micro precision / recall / F1 at the consumer thresholds over the tags in mask."""
        tp = float(self.tp.cpu()[mask].sum())
        pred = float(self.pred.cpu()[mask].sum())
        pos = float(support[mask].sum())
        return {
            "precision": tp / pred if pred else math.nan,
            "recall": tp / pos if pos else math.nan,
            "f1": 2.0 * tp / (pred + pos) if (pred + pos) else math.nan,
        }

    def compute(self) -> dict[str, Any]:
        """mAP, F1 at the consumer thresholds and at tuned per-tag thresholds, tuned thresholds per tag and block."""
        headline = self.computer.compute()
        per_tag = self.computer.per_tag()
        support = per_tag["support"]
        block_thresholds: dict[str, float] = {}
        for block, mask in self.masks.items():
            if bool(mask.any()):
                block_thresholds[block] = pooled_best_threshold(self.computer, torch.nonzero(mask).flatten().tolist())[0]
        tuned = per_tag["best_threshold"].clone()  # (T,) calibrated space; nan where no positive
        for block, mask in self.masks.items():
            fill = block_thresholds.get(block, math.nan)
            tuned[mask & torch.isnan(tuned)] = fill if math.isfinite(fill) else self.targets[block]
        tp = pred = pos = 0
        edges = self.computer.bin_edges()  # (K,) lower edge of each bin
        for i in range(len(self.plan.columns)):
            a, b, c = _counts_at(self.computer, edges, i, float(tuned[i]))
            tp, pred, pos = tp + a, pred + b, pos + c
        all_tags = torch.ones(len(self.plan.columns), dtype=torch.bool)
        result = {
            "num_samples": headline["num_samples"],
            "mAP": headline["mAP"],
            "rating_accuracy": headline["rating_accuracy"],
            "at_consumer_thresholds": {"all": self._f1_at_cuts(all_tags, support)},
            "f1_micro_tuned_per_tag": 2.0 * tp / (pred + pos) if (pred + pos) else math.nan,
            "tuned_block_thresholds": block_thresholds,
            "tuned_tag_thresholds": per_tag["best_threshold"],
        }
        for block, mask in self.masks.items():
            if bool(mask.any()):
                result["at_consumer_thresholds"][block] = self._f1_at_cuts(mask, support)
        return result
