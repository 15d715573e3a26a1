"""Tests for augmentation: parameters, per-sample randomness, the device colour jitter against the direct formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from augmentation import AugmentParams, apply_color_jitter, sample_rng


def test_augment_params_round_trip_and_validation() -> None:
    """to_dict/from_dict round-trip through JSON; out-of-range strengths raise ValueError naming the field."""
    p = AugmentParams(flip_prob=0.25, brightness=0.2, contrast=0.0, saturation=0.5)
    assert AugmentParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    for field, value in (("flip_prob", 1.5), ("flip_prob", -0.1), ("brightness", 1.0), ("saturation", -0.2)):
        with pytest.raises(ValueError, match=field):
            AugmentParams(**{field: value})


def test_sample_rng_depends_only_on_its_key() -> None:
    """The same (seed, epoch, index, extra) key gives the same stream in any order; any other key another."""
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 1), (-1, 0, 0)]
    draws = {k: sample_rng(*k).random(4).tolist() for k in keys}
    assert {k: sample_rng(*k).random(4).tolist() for k in reversed(keys)} == draws
    assert len({tuple(v) for v in draws.values()}) == len(keys)
    # a negative seed is taken modulo 2**64 (numpy seeds must be non-negative)
    assert draws[(-1, 0, 0)] == np.random.default_rng([2**64 - 1, 0, 0]).random(4).tolist()


def test_color_jitter_matches_direct_formula() -> None:
    """apply_color_jitter equals the sequential brightness/contrast/saturation formula inside
    the content box and leaves the letterbox untouched; factors of 1 change nothing."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 3, 6, 7)).astype(np.float64)  # (B, 3, H, W)
    boxes = np.array([[1, 2, 6, 5], [0, 0, 7, 6]])
    factors = np.array([[1.2, 0.8, 1.1], [0.9, 1.1, 0.7]])
    out = apply_color_jitter(torch.tensor(img, dtype=torch.float32), torch.tensor(factors, dtype=torch.float32), torch.tensor(boxes)).numpy()
    luma = np.array([0.299, 0.587, 0.114])
    for b, (x0, y0, x1, y1) in enumerate(boxes):
        x = img[b, :, y0:y1, x0:x1].transpose(1, 2, 0) * factors[b, 0]  # (h, w, 3)
        m = (x @ luma).mean()
        x = (x - m) * factors[b, 1] + m
        g = (x @ luma)[..., None]
        x = np.clip((x - g) * factors[b, 2] + g, 0, 255)
        np.testing.assert_allclose(out[b, :, y0:y1, x0:x1].transpose(1, 2, 0), x, atol=1e-3)
        outside = np.ones(img.shape[2:], dtype=bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(out[b][:, outside], img[b][:, outside])
    same = apply_color_jitter(torch.tensor(img, dtype=torch.float32), torch.ones(2, 3), torch.tensor(boxes))
    np.testing.assert_allclose(same.numpy(), img, atol=1e-3)
