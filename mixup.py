"""Batch MixUp and CutMix on the device for multi-label tags and a content-rating head.

One lam per batch (timm's batch mode): lam ~ Beta(alpha, alpha), a partner perm[i] for every
row, then either MixUp (images blended: lam * x + (1 - lam) * x[perm]) or CutMix (a box of
x[perm] pasted into x, with lam corrected to the share of x left visible, as in timm's
`cutmix_bbox_and_lam` with correct_lam=True).

Tag targets are mixed with the same weight: lam * y + (1 - lam) * y[perm]. Some multi-label
trainers use the union max(y, y[perm]) instead, arguing that a tag visible in a blended image is
still "present". We keep the weighted form because (a) the tag losses here (ASL, BCE) are linear
in the target, so the weighted target gives exactly the MixUp objective
lam * L(y) + (1 - lam) * L(y[perm]) and keeps the scores calibrated, while the union trains every
partner tag towards 1 and inflates scores; and (b) under CutMix a partner tag whose region was not
pasted (or an own tag whose region was covered) is simply absent, and the union would call it a
full positive.

Ratings become soft targets (B, R): lam * onehot(r) + (1 - lam) * onehot(r[perm]). A row whose
mixture includes an unknown rating (-1) with nonzero weight cannot be labelled, so it is masked
out (its soft row is all zeros); `soft_rating_cross_entropy` is the matching loss (mean over
unmasked rows, like MultiTaskLoss.rating_loss over known ratings). The rating scale is ordinal
(an image half explicit is arguably explicit); the weighted form is kept for the same
calibration reason as tags.

All randomness comes from a CPU torch.Generator the caller owns: lam, the MixUp/CutMix switch,
the box and the permutation are drawn on the host (no device sync), always the same count of
draws per call so one setting never shifts the others' randomness, and saving
generator.get_state() in a checkpoint makes a resumed run mix identically. It imports no
project module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MixParams", "MixedBatch", "batch_generator", "cutmix_box", "mix_training_batch", "mix_batch", "soft_rating_cross_entropy"]


@dataclass(frozen=True)
class MixParams:
    """MixUp/CutMix settings: alphas of Beta(alpha, alpha) (0 = that mode off), apply probability, switch share."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # with both modes on: chance of CutMix instead of MixUp
    num_ratings: int = 4

    def __post_init__(self) -> None:
        """ValueError on a negative alpha, a probability outside [0, 1] or num_ratings < 1."""
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite value >= 0, got {value!r}")
        for name in ("prob", "switch_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.num_ratings < 1:
            raise ValueError(f"num_ratings must be >= 1, got {self.num_ratings!r}")

    @property
    def enabled(self) -> bool:
        """True when some batch can be mixed (a positive alpha and prob > 0)."""
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)


@dataclass
class MixedBatch:
    """A mixed batch: images, soft tag and rating targets, the rating mask and how it was mixed."""

    images: torch.Tensor  # (B, 3, H, W) float
    tag_targets: torch.Tensor  # (B, T) float in [0, 1]
    rating_targets: torch.Tensor  # (B, R) float, rows sum to 1 (0 where masked)
    rating_mask: torch.Tensor  # (B,) bool: rows whose rating target is known
    lam: float  # weight of the row's own sample (after CutMix's area correction)
    mode: str  # "none", "mixup" or "cutmix"
    perm: torch.Tensor  # (B,) long partner of each row (on the batch's device)
    box: tuple[int, int, int, int] | None  # CutMix (y1, y2, x1, x2), else None


def batch_generator(seed: int, rank: int, epoch: int, batch_index: int) -> torch.Generator:
    """A CPU generator for one training batch's draws, a function of its place only: a resumed run
    (or another worker count) mixes every batch exactly as the uninterrupted run."""
    key = np.random.SeedSequence([int(seed), int(rank), int(epoch), int(batch_index), 0x6D6978])  # 0x6D6978: "mix"
    return torch.Generator().manual_seed(int(key.generate_state(1, dtype=np.uint64)[0] >> 1))


def mix_training_batch(
    images: torch.Tensor, tag_targets: torch.Tensor, ratings: torch.Tensor, params: MixParams, place: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, tag targets, rating targets) of a training batch, mixed with draws keyed by its
    place (seed, rank, epoch, batch index); unchanged when `params` mixes nothing."""
    if not params.enabled:
        return images, tag_targets, ratings
    mixed = mix_batch(images, tag_targets, ratings, params, batch_generator(*place))
    return mixed.images, mixed.tag_targets, mixed.rating_targets


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[tuple[int, int, int, int], float]:
    """Box (y1, y2, x1, x2) of side sqrt(1 - lam) around (cy, cx), clipped; and lam = 1 - box area / image area."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    # (cut + 1) // 2 above the centre: an unclipped box is exactly cut_h x cut_w (timm's rand_bbox).
    y1, y2 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    x1, x2 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    # Clipping at the border shrinks the box, so lam is recomputed from the area actually pasted.
    return (y1, y2, x1, x2), 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)


def _one_hot_ratings(ratings: torch.Tensor, num_ratings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratings (B,) long, -1 unknown -> (one-hot (B, R) float with zero rows for unknown, known (B,) bool).

    dataset_scan.parse_rating yields only -1..3; anything outside [0, R) is masked like -1 here,
    because checking it would cost a device-to-host sync every batch.
    """
    known = (ratings >= 0) & (ratings < num_ratings)  # (B,)
    one_hot = F.one_hot(ratings.clamp(min=0).long(), num_ratings).float() * known[:, None]  # (B, R)
    return one_hot, known


def mix_batch(images: torch.Tensor, tag_targets: torch.Tensor, ratings: torch.Tensor, params: MixParams, generator: torch.Generator) -> MixedBatch:
    """Mix a batch (images (B,3,H,W) float, tags (B,T) float, ratings (B,) long) with MixUp or CutMix.

    Draws from `generator` (CPU) in a fixed order: apply, switch, Beta seed, box centre, permutation.
    A batch left unmixed (prob, alphas) comes back with lam 1, mode "none" and the inputs unchanged.
    """
    if images.dim() != 4 or tag_targets.dim() != 2 or ratings.shape != images.shape[:1] or tag_targets.shape[:1] != images.shape[:1]:
        raise ValueError(
            f"expected images (B,3,H,W), tag targets (B,T), ratings (B,); got {tuple(images.shape)}, "
            f"{tuple(tag_targets.shape)}, {tuple(ratings.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be float (normalised), got {images.dtype}")
    if generator.device.type != "cpu":
        raise ValueError(f"the mix generator must be a CPU generator (host-side draws), got {generator.device}")
    batch, height, width = images.shape[0], images.shape[2], images.shape[3]
    apply_u, switch_u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    beta_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    cy, cx = (int(torch.randint(0, height, (1,), generator=generator)), int(torch.randint(0, width, (1,), generator=generator)))
    perm = torch.randperm(batch, generator=generator).to(images.device)  # (B,)
    one_hot, known = _one_hot_ratings(ratings, params.num_ratings)  # (B, R), (B,)

    use_cutmix = params.cutmix_alpha > 0.0 and (params.mixup_alpha <= 0.0 or switch_u < params.switch_prob)
    alpha = params.cutmix_alpha if use_cutmix else params.mixup_alpha
    if not (alpha > 0.0 and apply_u < params.prob):
        return MixedBatch(images, tag_targets, one_hot, known, 1.0, "none", perm, None)
    # torch has no generator-driven Beta sampler; numpy's, seeded from the torch generator, keeps
    # the whole draw reproducible from the one generator state.
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    box = None
    if use_cutmix:
        box, lam = cutmix_box(height, width, lam, cy, cx)
        y1, y2, x1, x2 = box
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = images[:, :, y1:y2, x1:x2][perm]  # gathers only the box
    else:
        mixed = images * lam + images[perm] * (1.0 - lam)  # (B, 3, H, W)
    tags = tag_targets * lam + tag_targets[perm] * (1.0 - lam)  # (B, T)
    # A row is labelled only if every part with nonzero weight has a known rating.
    mask = (known | (lam == 0.0)) & (known[perm] | (lam == 1.0))  # (B,)
    soft = (one_hot * lam + one_hot[perm] * (1.0 - lam)) * mask[:, None]  # (B, R)
    return MixedBatch(mixed, tags, soft, mask, lam, "cutmix" if use_cutmix else "mixup", perm, box)


def soft_rating_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (B, R) against soft targets (B, R) over rows where mask (B,); 0 if none.

    With one-hot targets it equals F.cross_entropy(..., ignore_index=-1, label_smoothing=s) averaged
    over known rows (MultiTaskLoss.rating_loss). The division by max(count, 1) as a tensor avoids
    both 0/0 and a host sync; an all-masked batch gives an exact, graph-connected 0.
    """
    if logits.dim() != 2 or soft_targets.shape != logits.shape or mask.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (B, R), soft targets (B, R), mask (B,); got {tuple(logits.shape)}, {tuple(soft_targets.shape)}, {tuple(mask.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    targets = soft_targets.float()
    if label_smoothing > 0.0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    keep = mask.to(torch.float32)  # (B,)
    per_row = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)  # (B,)
    return (per_row * keep).sum() / keep.sum().clamp(min=1.0)
