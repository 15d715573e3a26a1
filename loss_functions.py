"""Training losses: asymmetric focal loss for multi-label tags, per-tag weights, and the tag + rating multi-task loss.

`AsymmetricFocalLoss` follows ASL (Ridnik et al., 2021, "Asymmetric Loss For Multi-Label
Classification"): positives are weighted by (1 - p)^gamma_pos, negatives use a probability shifted
DOWN by the margin `clip` (p_m = max(p - clip, 0)) and are weighted by p_m^gamma_neg. Everything is
computed in float32 from logits through log-sigmoid forms, so it stays finite (with finite
gradients) for logits of +-100 and under autocast. The loss is summed over tags and averaged over
the batch, so its scale does not shrink as the vocabulary grows. It imports none of the project's
other modules.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AsymmetricFocalLoss", "MultiTaskLoss", "known_ratings", "tag_weights_from_frequencies", "WEIGHT_SCHEMES"]

WEIGHT_SCHEMES = ("none", "inverse_sqrt", "effective_number")


class AsymmetricFocalLoss(nn.Module):
    """ASL for multi-label logits (B, T) and {0,1} targets (B, T); returns sum over tags, mean over batch."""

    tag_weights: Optional[torch.Tensor]

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        detach_focal_weight: bool = True,
        tag_weights: Optional[torch.Tensor] = None,
    ) -> None:
        """Store the focusing parameters, the negative margin and optional per-tag weights (T,)."""
        super().__init__()
        if gamma_neg < 0 or not math.isfinite(gamma_neg):
            raise ValueError(f"gamma_neg must be a finite value >= 0, got {gamma_neg!r}")
        if gamma_pos < 0 or not math.isfinite(gamma_pos):
            raise ValueError(f"gamma_pos must be a finite value >= 0, got {gamma_pos!r}")
        if not (0.0 <= clip < 1.0):
            raise ValueError(f"clip must be in [0, 1), got {clip!r}")
        if not (0.0 <= eps < 1e-2):
            raise ValueError(f"eps must be in [0, 0.01), got {eps!r}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.detach_focal_weight = bool(detach_focal_weight)
        if tag_weights is not None:
            tag_weights = torch.as_tensor(tag_weights, dtype=torch.float32).detach().clone()
            if tag_weights.ndim != 1:
                raise ValueError(f"tag_weights must be 1-D (T,), got shape {tuple(tag_weights.shape)}")
            if not bool(torch.isfinite(tag_weights).all()) or bool((tag_weights < 0).any()):
                raise ValueError("tag_weights must be finite and >= 0")
        # A buffer moves with .to(device) and lands in the state dict, so resumed runs keep their weights.
        self.register_buffer("tag_weights", tag_weights, persistent=True)

    def per_element(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unreduced, unweighted float32 loss (B, T) for logits (B, T) and targets (B, T)."""
        if logits.shape != targets.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} != targets shape {tuple(targets.shape)}")
        x = logits.float()  # (B, T); float32 even under autocast
        y = targets.float()  # (B, T)
        log_p = F.logsigmoid(x)  # log p, exact for large |x|
        log_one_minus_p = F.logsigmoid(-x)  # log(1 - p)

        # Positives: -(1 - p)^gamma_pos * log p; the weight as exp(gamma * log(1-p)) has no 0^gamma edge.
        if self.gamma_pos > 0:
            weight_pos = torch.exp(self.gamma_pos * log_one_minus_p)
            if self.detach_focal_weight:
                weight_pos = weight_pos.detach()
            term_pos = weight_pos * log_p
        else:
            term_pos = log_p

        # Negatives: the probability is shifted DOWN by the margin, p_m = max(p - clip, 0), so easy
        # negatives (p <= clip) contribute nothing. 1 - p_m = min(1 - p + clip, 1) >= clip, so its log
        # needs no eps; the clamp's zero gradient where p < clip is the intended hard threshold.
        if self.clip > 0:
            p_m = (torch.sigmoid(x) - self.clip).clamp(min=0.0)
            log_one_minus_pm = torch.log((torch.sigmoid(-x) + self.clip).clamp(max=1.0))
        else:
            p_m = torch.sigmoid(x)
            log_one_minus_pm = log_one_minus_p
        if self.gamma_neg > 0:
            # eps floors the base only so that d(p_m^gamma)/dp_m stays finite at p_m = 0 for gamma < 1.
            weight_neg = p_m.clamp(min=self.eps).pow(self.gamma_neg)
            if self.detach_focal_weight:
                weight_neg = weight_neg.detach()
            term_neg = weight_neg * log_one_minus_pm
        else:
            term_neg = log_one_minus_pm

        return -(y * term_pos + (1.0 - y) * term_neg)  # (B, T)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss: per-tag weighted ASL summed over tags (dim 1), averaged over the batch (dim 0)."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, T), got shape {tuple(logits.shape)}")
        loss = self.per_element(logits, targets)  # (B, T)
        if self.tag_weights is not None:
            if self.tag_weights.shape[0] != loss.shape[1]:
                raise ValueError(f"tag_weights has {self.tag_weights.shape[0]} entries but logits have {loss.shape[1]} tags")
            loss = loss * self.tag_weights.to(loss.device)  # (B, T) * (T,)
        return loss.sum(dim=1).mean()

    def extra_repr(self) -> str:
        """Show the settings in print(module)."""
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
            f"detach_focal_weight={self.detach_focal_weight}, tag_weights={'yes' if self.tag_weights is not None else 'no'}"
        )


def tag_weights_from_frequencies(
    freqs: Union[Sequence[float], torch.Tensor], num_samples: int, scheme: str = "none", beta: float = 0.999
) -> torch.Tensor:
    """Per-tag loss weights (T,) with mean 1 from positive counts per tag over num_samples training images.

    Schemes: "none" (all ones), "inverse_sqrt" (w ~ 1/sqrt(count / num_samples)), "effective_number"
    (Cui et al. 2019: w ~ (1 - beta) / (1 - beta^count)). Counts below 1 are treated as 1 so unseen
    tags get the largest, finite weight.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown tag weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    counts = torch.as_tensor(freqs, dtype=torch.float64).detach().reshape(-1)
    if counts.numel() == 0:
        raise ValueError("freqs is empty")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("freqs must be finite, non-negative positive-sample counts per tag")
    if bool((counts > num_samples).any()):
        raise ValueError(f"a tag count exceeds num_samples={num_samples} (max count {float(counts.max())})")
    if scheme == "none":
        return torch.ones(counts.numel(), dtype=torch.float32)
    counts = counts.clamp(min=1.0)
    if scheme == "inverse_sqrt":
        weights = 1.0 / torch.sqrt(counts / num_samples)
    else:
        if not (0.0 < beta < 1.0):
            raise ValueError(f"beta must be in (0, 1) for effective_number, got {beta!r}")
        # 1 - beta^n computed as -expm1(n log beta) keeps precision when beta is close to 1.
        weights = (1.0 - beta) / (-torch.expm1(counts * math.log(beta)))
    return (weights / weights.mean()).to(torch.float32)


def known_ratings(rating_targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which rows carry a rating; hard targets (B,) use -1, soft ones (B, R) an all-zero row."""
    if rating_targets.ndim == 2:
        return rating_targets.sum(dim=1) > 0
    return rating_targets != -1


class MultiTaskLoss(nn.Module):
    """Weighted sum of a tag loss and a rating cross-entropy that ignores unknown ratings (-1)."""

    def __init__(self, tag_loss: nn.Module, tag_weight: float = 1.0, rating_weight: float = 1.0, rating_label_smoothing: float = 0.0) -> None:
        """Wrap tag_loss (logits, targets) -> scalar and set the task weights and rating label smoothing."""
        super().__init__()
        if not (0.0 <= rating_label_smoothing < 1.0):
            raise ValueError(f"rating_label_smoothing must be in [0, 1), got {rating_label_smoothing!r}")
        if tag_weight < 0 or rating_weight < 0:
            raise ValueError(f"task weights must be >= 0, got tag_weight={tag_weight!r}, rating_weight={rating_weight!r}")
        self.tag_loss = tag_loss
        self.tag_weight = float(tag_weight)
        self.rating_weight = float(rating_weight)
        self.rating_label_smoothing = float(rating_label_smoothing)

    def rating_loss(self, rating_logits: torch.Tensor, rating_targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over known ratings; exactly 0 (graph-connected, no NaN) when none is known.

        Targets are either hard class ids (B,) with -1 = unknown, or soft distributions (B, R) such as
        MixUp/CutMix produce (mixup.mix_batch), where an all-zero row = unknown.
        """
        if rating_logits.ndim != 2 or rating_targets.shape not in (rating_logits.shape[:1], rating_logits.shape):
            raise ValueError(
                f"rating logits {tuple(rating_logits.shape)} and targets {tuple(rating_targets.shape)} must be (B, R) and (B,) or (B, R)"
            )
        if rating_targets.ndim == 2:
            return self._soft_rating_loss(rating_logits, rating_targets)
        targets = rating_targets.long()
        summed = F.cross_entropy(rating_logits.float(), targets, ignore_index=-1, reduction="sum", label_smoothing=self.rating_label_smoothing)
        # Dividing by max(known, 1) as a tensor avoids both 0/0 = NaN and a host sync (.item()).
        known = known_ratings(targets).sum().clamp(min=1).to(summed.dtype)
        return summed / known

    def _soft_rating_loss(self, rating_logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against soft targets (B, R), averaged over rows that are not all zero."""
        targets = soft_targets.float()  # (B, R)
        known = known_ratings(targets).to(torch.float32)  # (B,)
        if self.rating_label_smoothing > 0.0:
            # Same smoothing as F.cross_entropy's: (1 - s) * target + s / R, only on known rows.
            smoothed = targets * (1.0 - self.rating_label_smoothing) + self.rating_label_smoothing / targets.shape[1]
            targets = smoothed * known[:, None]
        per_row = -(targets * F.log_softmax(rating_logits.float(), dim=1)).sum(dim=1)  # (B,)
        return (per_row * known).sum() / known.sum().clamp(min=1.0)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], tag_targets: torch.Tensor, rating_targets: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Model outputs + targets (B, T) float and ratings (B,) long or soft (B, R) -> (total, {"tags", "rating"})."""
        tags = self.tag_loss(outputs["tag_logits"], tag_targets)
        rating = self.rating_loss(outputs["rating_logits"], rating_targets)
        total = self.tag_weight * tags + self.rating_weight * rating
        return total, {"tags": tags, "rating": rating}
