"""Tests for mixup.py: MixUp/CutMix outputs against their formulas and timm's box, identity cases, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam

from loss_functions import AsymmetricFocalLoss, MultiTaskLoss
from mixup import MixParams, batch_generator, cutmix_box, mix_batch, soft_rating_cross_entropy

B, T, R, H, W = 6, 9, 4, 16, 12


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images (B,3,H,W), multi-hot tags (B,T) and ratings (B,) with unknowns."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    tags = (torch.rand(B, T, generator=g) < 0.3).float()
    ratings = torch.tensor([0, 3, -1, 1, 2, -1])
    return images, tags, ratings


def _reference_draws(generator: torch.Generator, alpha: float) -> tuple[float, float, float, int, int, torch.Tensor]:
    """The draws mix_batch makes, in its documented order, from a copy of the generator."""
    g = torch.Generator().set_state(generator.get_state())
    apply_u, switch_u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
    perm = torch.randperm(B, generator=g)
    return apply_u, switch_u, float(np.random.default_rng(seed).beta(alpha, alpha)), cy, cx, perm


def test_mixup_images_and_targets_equal_the_formulas() -> None:
    """x = lam x + (1-lam) x[perm]; y likewise; soft ratings per row, masked where a part is unknown."""
    images, tags, ratings = _batch()
    g = torch.Generator().manual_seed(3)
    _, _, lam, _, _, perm = _reference_draws(g, 0.4)
    out = mix_batch(images, tags, ratings, MixParams(mixup_alpha=0.4), g)
    assert out.mode == "mixup" and out.box is None and 0.0 < lam < 1.0
    assert out.lam == lam and torch.equal(out.perm, perm)
    for i in range(B):
        j = int(perm[i])
        torch.testing.assert_close(out.images[i], lam * images[i] + (1 - lam) * images[j], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.tag_targets[i], lam * tags[i] + (1 - lam) * tags[j], rtol=0, atol=1e-7)
        known = int(ratings[i]) >= 0 and int(ratings[j]) >= 0
        assert bool(out.rating_mask[i]) == known
        expected = torch.zeros(R)
        if known:
            expected[int(ratings[i])] += lam
            expected[int(ratings[j])] += 1 - lam
        torch.testing.assert_close(out.rating_targets[i], expected, rtol=0, atol=1e-7)


def test_cutmix_box_and_lam_match_timm() -> None:
    """Our box for timm's centre equals timm's rand_bbox, and lam is corrected by the pasted area."""
    for seed in range(30):
        lam = float(np.random.default_rng(seed).beta(1.0, 1.0))
        np.random.seed(seed)
        cy, cx = np.random.randint(0, H), np.random.randint(0, W)
        np.random.seed(seed)
        (y1, y2, x1, x2), timm_lam = cutmix_bbox_and_lam((B, 3, H, W), lam, correct_lam=True)
        box, got_lam = cutmix_box(H, W, lam, int(cy), int(cx))
        assert box == (int(y1), int(y2), int(x1), int(x2))
        assert got_lam == pytest.approx(timm_lam, abs=1e-15)


def test_cutmix_pastes_the_partner_box_and_mixes_targets_by_area() -> None:
    """Inside the box pixels come from x[perm], outside from x; tag targets use the area lam."""
    images, tags, ratings = _batch(1)
    g = torch.Generator().manual_seed(8)
    _, _, beta_lam, cy, cx, perm = _reference_draws(g, 1.0)
    out = mix_batch(images, tags, ratings, MixParams(cutmix_alpha=1.0), g)
    (y1, y2, x1, x2), lam = cutmix_box(H, W, beta_lam, cy, cx)
    assert out.mode == "cutmix" and out.box == (y1, y2, x1, x2) and out.lam == lam
    assert lam == 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert inside.any()
    for i in range(B):
        assert torch.equal(out.images[i][:, inside], images[int(perm[i])][:, inside])
        assert torch.equal(out.images[i][:, ~inside], images[i][:, ~inside])
    torch.testing.assert_close(out.tag_targets, lam * tags + (1 - lam) * tags[perm], rtol=0, atol=1e-7)


@pytest.mark.parametrize("params", [MixParams(), MixParams(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0)])
def test_disabled_mixing_is_the_identity(params: MixParams) -> None:
    """alpha = 0 or prob = 0: inputs returned unchanged, one-hot ratings, known mask, lam 1."""
    images, tags, ratings = _batch(2)
    out = mix_batch(images, tags, ratings, params, torch.Generator().manual_seed(0))
    assert out.mode == "none" and out.lam == 1.0 and out.box is None
    assert out.images is images and out.tag_targets is tags
    assert torch.equal(out.rating_mask, ratings >= 0)
    expected = F.one_hot(ratings.clamp(min=0), R).float() * (ratings >= 0)[:, None]
    assert torch.equal(out.rating_targets, expected)
    assert not params.enabled


def test_same_generator_state_same_result_and_fixed_draw_count() -> None:
    """Equal generator states give equal outputs; every call consumes the same draws whatever the settings."""
    images, tags, ratings = _batch(3)
    params = MixParams(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5)
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    modes = set()
    for _ in range(12):
        a = mix_batch(images, tags, ratings, params, g1)
        b = mix_batch(images, tags, ratings, params, g2)
        assert a.lam == b.lam and a.mode == b.mode and a.box == b.box
        assert torch.equal(a.images, b.images) and torch.equal(a.rating_targets, b.rating_targets)
        modes.add(a.mode)
    assert modes == {"mixup", "cutmix"}
    g3, g4 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mix_batch(images, tags, ratings, MixParams(), g3)
    mix_batch(images, tags, ratings, params, g4)
    assert torch.equal(g3.get_state(), g4.get_state())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU generator"):
            mix_batch(images, tags, ratings, params, torch.Generator(device="cuda"))


def test_soft_rating_loss_equals_hard_cross_entropy_and_mixes_linearly() -> None:
    """One-hot: equals MultiTaskLoss.rating_loss (with smoothing); mixed: lam CE(r) + (1-lam) CE(r[perm])."""
    images, tags, ratings = _batch(4)
    logits = torch.randn(B, R, generator=torch.Generator().manual_seed(1))
    identity = mix_batch(images, tags, ratings, MixParams(), torch.Generator().manual_seed(0))
    for smoothing in (0.0, 0.1):
        hard = MultiTaskLoss(AsymmetricFocalLoss(), rating_label_smoothing=smoothing).rating_loss(logits, ratings)
        soft = soft_rating_cross_entropy(logits, identity.rating_targets, identity.rating_mask, smoothing)
        torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)
    out = mix_batch(images, tags, ratings, MixParams(mixup_alpha=0.4), torch.Generator().manual_seed(6))
    rows = [i for i in range(B) if bool(out.rating_mask[i])]
    assert rows and len(rows) < B
    ce = -F.log_softmax(logits, dim=1)  # (B, R)
    expected = sum(out.lam * ce[i, int(ratings[i])] + (1 - out.lam) * ce[i, int(ratings[out.perm[i]])] for i in rows)
    got = soft_rating_cross_entropy(logits, out.rating_targets, out.rating_mask)
    assert float(got) == pytest.approx(float(expected) / len(rows), abs=1e-6)
    none = torch.zeros(B, dtype=torch.bool)
    leaf = logits.clone().requires_grad_(True)
    zero = soft_rating_cross_entropy(leaf, out.rating_targets, none)
    zero.backward()
    assert float(zero.detach()) == 0.0 and leaf.grad is not None and not math.isnan(float(leaf.grad.sum()))


def test_bad_settings_raise() -> None:
    """Negative alpha or out-of-range probabilities are ValueErrors naming the setting."""
    with pytest.raises(ValueError, match="mixup_alpha"):
        MixParams(mixup_alpha=-1.0)
    with pytest.raises(ValueError, match="prob"):
        MixParams(prob=1.5)


def test_batch_generator_depends_only_on_the_batch_place() -> None:
    """Same (seed, rank, epoch, batch): the same draws (a resumed run mixes alike); any other: new ones."""

    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=batch_generator(*key))

    assert torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 5))
    for other in ((1, 0, 1, 5), (0, 1, 1, 5), (0, 0, 2, 5), (0, 0, 1, 6)):
        assert not torch.equal(draw(0, 0, 1, 5), draw(*other))
