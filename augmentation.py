"""Training augmentation: strengths, the colour jitter applied on the device, per-sample randomness.

This module owns ``AugmentParams`` (flip probability and colour jitter ranges),
``apply_color_jitter`` (brightness, contrast and saturation inside each sample's content box,
run on the device on whole batches) and ``sample_rng`` (one random generator per sample from
(seed, epoch, index), so augmentation does not depend on worker count or order). The flip
itself, which must also swap left/right tags, is done by the dataset with an
``orientation_handler.OrientationHandler``. It imports numpy and torch and no project module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["AugmentParams", "apply_color_jitter", "sample_rng"]


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation strengths: flip probability and colour jitter ranges."""

    flip_prob: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self) -> None:
        """Validate ranges."""
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    def to_dict(self) -> dict[str, float]:
        """Plain dict."""
        return {"flip_prob": self.flip_prob, "brightness": self.brightness, "contrast": self.contrast, "saturation": self.saturation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentParams":
        """Inverse of to_dict."""
        return cls(**{k: float(v) for k, v in data.items()})


_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def apply_color_jitter(images: torch.Tensor, factors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation factors (B, 3) (1.0 = unchanged) applied inside each
    sample's content box (B, 4: x0, y0, x1, y1) of float images (B, 3, H, W) in [0, 255].

    Runs on the device: workers only draw the factors, so a worker spends no time on it. The
    letterbox outside the box keeps exactly the pad colour.
    """
    b, _, h, w = images.shape
    f = factors.to(images.device, images.dtype).view(b, 3, 1, 1)
    boxes = boxes.to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (
        (rows >= boxes[:, 1].view(b, 1, 1))
        & (rows < boxes[:, 3].view(b, 1, 1))
        & (cols >= boxes[:, 0].view(b, 1, 1))
        & (cols < boxes[:, 2].view(b, 1, 1))
    ).unsqueeze(1)  # (B, 1, H, W)
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = images * f[:, 0:1]  # brightness
    area = inside.sum(dim=(2, 3), keepdim=True).clamp_min(1)  # (B, 1, 1, 1)
    gray_mean = ((x * luma).sum(1, keepdim=True) * inside).sum(dim=(2, 3), keepdim=True) / area
    x = (x - gray_mean) * f[:, 1:2] + gray_mean  # contrast
    gray = (x * luma).sum(1, keepdim=True)  # (B, 1, H, W)
    x = ((x - gray) * f[:, 2:3] + gray).clamp_(0.0, 255.0)  # saturation
    return torch.where(inside, x, images)


def sample_rng(seed: int, epoch: int, index: int, *extra: int) -> np.random.Generator:
    """Generator for one sample from (seed, epoch, index): independent of workers and order."""
    words = [seed & 0xFFFFFFFFFFFFFFFF, epoch & 0xFFFFFFFFFFFFFFFF, index, *extra]
    return np.random.default_rng(words)
