"""Tests for loss_functions: ASL against BCE and the written-out formula, stability, grad mode, weights, rating CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loss_functions import AsymmetricFocalLoss, MultiTaskLoss, tag_weights_from_frequencies
from mixup import soft_rating_cross_entropy


def reference_asl(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float) -> torch.Tensor:
    """Naive float64 ASL written straight from the paper: (B, T) unreduced loss, fully differentiable."""
    p = torch.sigmoid(logits.double())
    y = targets.double()
    loss_pos = -((1 - p) ** gamma_pos) * torch.log(p)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    loss_neg = -(p_m**gamma_neg) * torch.log(1 - p_m)
    return y * loss_pos + (1 - y) * loss_neg


def test_gamma_zero_clip_zero_equals_bce_sum_over_tags_mean_over_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 37) * 4
    targets = (torch.rand(6, 37) < 0.3).float()
    loss = AsymmetricFocalLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_hand_worked_example_matches_written_out_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    total = 0.0
    for b in range(2):
        for t in range(3):
            x, y = float(logits[b, t]), float(targets[b, t])
            p = 1.0 / (1.0 + math.exp(-x))
            if y == 1.0:
                total += -((1.0 - p) ** gamma_pos) * math.log(p)
            else:
                p_m = max(p - clip, 0.0)
                total += -(p_m**gamma_neg) * math.log(1.0 - p_m)
    expected = total / 2  # sum over tags, mean over the 2 samples
    loss = AsymmetricFocalLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_margin_shifts_negatives_down_so_easy_negatives_cost_nothing() -> None:
    # p = sigmoid(-4) ~ 0.018 < clip: an easy negative must contribute exactly zero loss and gradient.
    logits = torch.tensor([[-4.0, 3.0]], requires_grad=True)
    targets = torch.zeros(1, 2)
    loss_fn = AsymmetricFocalLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.05)
    per = loss_fn.per_element(logits, targets)
    assert per[0, 0].item() == 0.0
    # The hard negative (p ~ 0.953) is charged -log(1 - (p - clip)), which is LESS than plain BCE.
    p = torch.sigmoid(torch.tensor(3.0)).item()
    assert per[0, 1].item() == pytest.approx(-math.log(1 - (p - 0.05)), rel=1e-6)
    assert per[0, 1].item() < F.binary_cross_entropy_with_logits(torch.tensor(3.0), torch.tensor(0.0)).item()
    per.sum().backward()
    assert logits.grad[0, 0].item() == 0.0
    assert logits.grad[0, 1].item() > 0.0


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (4.0, 1.0, 0.05), (2.0, 1.0, 0.0), (0.5, 0.5, 0.1)])
def test_matches_reference_value_and_gradient(detach: bool, gamma_neg: float, gamma_pos: float, clip: float) -> None:
    torch.manual_seed(1)
    logits = (torch.randn(5, 23) * 3).requires_grad_(True)
    targets = (torch.rand(5, 23) < 0.4).float()
    loss = AsymmetricFocalLoss(gamma_neg, gamma_pos, clip, detach_focal_weight=detach)(logits, targets)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference_asl(ref_logits, targets, gamma_neg, gamma_pos, clip).sum(1).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    if detach:
        # Detached focusing weights: d/dx of -w * log(.) with w held constant, written analytically.
        x, y = ref_logits.detach(), targets.double()
        p = torch.sigmoid(x)
        grad_pos = -((1 - p) ** gamma_pos) * (1 - p)
        p_m = (p - clip).clamp(min=0) if clip > 0 else p
        active = (p > clip).double() if clip > 0 else torch.ones_like(p)
        grad_neg = (p_m**gamma_neg) * p * (1 - p) / (1 - p_m) * active
        expected_grad = (y * grad_pos + (1 - y) * grad_neg) / x.shape[0]
    else:
        ref.backward()
        expected_grad = ref_logits.grad
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def test_detach_option_changes_gradient_not_value() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 9) * 2
    targets = (torch.rand(4, 9) < 0.5).float()
    grads, values = [], []
    for detach in (True, False):
        x = logits.clone().requires_grad_(True)
        loss = AsymmetricFocalLoss(4.0, 1.0, 0.05, detach_focal_weight=detach)(x, targets)
        loss.backward()
        grads.append(x.grad)
        values.append(loss.detach())
    torch.testing.assert_close(values[0], values[1])
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("kwargs", [{}, {"clip": 0.0}, {"gamma_pos": 1.0}, {"detach_focal_weight": False}, {"gamma_neg": 0.5}])
def test_extreme_logits_give_finite_loss_and_live_gradients(kwargs: dict) -> None:
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    loss = AsymmetricFocalLoss(**kwargs)(logits, targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # A positive predicted at -100 is maximally wrong: its gradient must be ~ -1, not clamped to 0.
    assert logits.grad[0, 1].item() == pytest.approx(-1.0, abs=1e-4)
    # Its loss must be ~100 (log-sigmoid), not a clamped -log(eps) ~ 18.4.
    per = AsymmetricFocalLoss(**kwargs).per_element(logits.detach(), targets)
    assert per[0, 1].item() == pytest.approx(100.0, rel=1e-4)


def test_bfloat16_autocast_on_cpu_computes_in_float32_with_finite_gradients() -> None:
    torch.manual_seed(3)
    layer = torch.nn.Linear(8, 16)
    with torch.no_grad():
        layer.weight.mul_(200.0)  # drives logits to roughly +-100
    features = torch.randn(4, 8)
    targets = (torch.rand(4, 16) < 0.5).float()
    loss_fn = AsymmetricFocalLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    expected = loss_fn(logits.detach().float(), targets)
    torch.testing.assert_close(loss.detach(), expected)


def test_loss_never_changes_grad_mode() -> None:
    logits = torch.randn(3, 5)
    targets = (torch.rand(3, 5) < 0.5).float()
    loss_fn = AsymmetricFocalLoss(gamma_pos=1.0, detach_focal_weight=False)
    multi = MultiTaskLoss(loss_fn)
    outputs = {"tag_logits": logits, "rating_logits": torch.randn(3, 4)}
    with torch.no_grad():
        loss = loss_fn(logits, targets)
        multi(outputs, targets, torch.tensor([0, -1, 2]))
        assert not torch.is_grad_enabled()
    assert not loss.requires_grad
    with torch.inference_mode():
        loss_fn(logits, targets)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    x = logits.clone().requires_grad_(True)
    assert loss_fn(x, targets).requires_grad
    assert torch.is_grad_enabled()


def test_tag_weights_scale_each_tag_column() -> None:
    torch.manual_seed(4)
    logits = torch.randn(4, 6) * 2
    targets = (torch.rand(4, 6) < 0.5).float()
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 1.0])
    weighted = AsymmetricFocalLoss(tag_weights=weights)(logits, targets)
    per = AsymmetricFocalLoss().per_element(logits, targets)
    torch.testing.assert_close(weighted, (per * weights).sum(1).mean())
    # A zero-weighted tag does not influence the loss at all.
    changed = logits.clone()
    changed[:, 1] = 50.0
    torch.testing.assert_close(AsymmetricFocalLoss(tag_weights=weights)(changed, targets), weighted)
    with pytest.raises(ValueError, match="tag_weights has 6 entries"):
        AsymmetricFocalLoss(tag_weights=weights)(torch.randn(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=">= 0"):
        AsymmetricFocalLoss(tag_weights=torch.tensor([1.0, -1.0]))
    # The weights are a buffer: saved with the module and restored.
    state = AsymmetricFocalLoss(tag_weights=weights).state_dict()
    torch.testing.assert_close(state["tag_weights"], weights)


def test_sum_over_tags_does_not_vanish_with_large_vocabulary() -> None:
    # One wrong positive among 20,000 tags must cost as much as it does among 10 tags.
    small_logits = torch.full((1, 10), -10.0)
    small_targets = torch.zeros(1, 10)
    small_targets[0, 0] = 1.0
    big_logits = torch.full((1, 20000), -10.0)
    big_targets = torch.zeros(1, 20000)
    big_targets[0, 0] = 1.0
    loss_fn = AsymmetricFocalLoss()
    assert loss_fn(big_logits, big_targets).item() == pytest.approx(loss_fn(small_logits, small_targets).item(), rel=1e-5)
    assert loss_fn(big_logits, big_targets).item() > 9.0


def test_shape_validation() -> None:
    with pytest.raises(ValueError, match="targets shape"):
        AsymmetricFocalLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="clip"):
        AsymmetricFocalLoss(clip=1.5)
    with pytest.raises(ValueError, match="gamma_neg"):
        AsymmetricFocalLoss(gamma_neg=-1.0)


def test_tag_weights_from_frequencies_schemes_match_formulas() -> None:
    counts = torch.tensor([1.0, 10.0, 100.0, 1000.0, 0.0])
    num_samples = 1000
    torch.testing.assert_close(tag_weights_from_frequencies(counts, num_samples, "none"), torch.ones(5))

    inv = tag_weights_from_frequencies(counts, num_samples, "inverse_sqrt")
    raw = 1.0 / torch.sqrt(counts.clamp(min=1.0).double() / num_samples)
    torch.testing.assert_close(inv, (raw / raw.mean()).float())

    beta = 0.999
    eff = tag_weights_from_frequencies(counts.tolist(), num_samples, "effective_number", beta=beta)
    raw = torch.tensor([(1 - beta) / (1 - beta ** max(c, 1.0)) for c in counts.tolist()], dtype=torch.float64)
    torch.testing.assert_close(eff, (raw / raw.mean()).float())

    for weights in (inv, eff):
        assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)
        assert weights.dtype == torch.float32
        # Rarer tags weigh more (index 4, unseen, is treated as count 1).
        assert weights[0] > weights[1] > weights[2] > weights[3]
        assert weights[4] == weights[0]


def test_tag_weights_from_frequencies_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown tag weight scheme"):
        tag_weights_from_frequencies([1.0], 10, "bogus")
    with pytest.raises(ValueError, match="num_samples"):
        tag_weights_from_frequencies([1.0], 0, "inverse_sqrt")
    with pytest.raises(ValueError, match="exceeds num_samples=10"):
        tag_weights_from_frequencies([11.0], 10, "inverse_sqrt")
    with pytest.raises(ValueError, match="non-negative"):
        tag_weights_from_frequencies([-1.0], 10, "inverse_sqrt")
    with pytest.raises(ValueError, match="beta"):
        tag_weights_from_frequencies([1.0], 10, "effective_number", beta=1.0)


def test_rating_loss_ignores_unknown_ratings() -> None:
    torch.manual_seed(5)
    rating_logits = torch.randn(6, 4)
    rating_targets = torch.tensor([0, -1, 3, -1, 2, 1])
    known = rating_targets != -1
    multi = MultiTaskLoss(AsymmetricFocalLoss(), tag_weight=1.0, rating_weight=1.0)
    outputs = {"tag_logits": torch.randn(6, 7), "rating_logits": rating_logits}
    tag_targets = (torch.rand(6, 7) < 0.3).float()
    total, parts = multi(outputs, tag_targets, rating_targets)
    expected_rating = F.cross_entropy(rating_logits[known], rating_targets[known])
    torch.testing.assert_close(parts["rating"], expected_rating)
    # Changing the logits of unknown-rating samples does not change the rating loss.
    outputs2 = {"tag_logits": outputs["tag_logits"], "rating_logits": rating_logits.clone()}
    outputs2["rating_logits"][1] = 100.0
    torch.testing.assert_close(multi(outputs2, tag_targets, rating_targets)[1]["rating"], expected_rating)
    torch.testing.assert_close(parts["tags"], AsymmetricFocalLoss()(outputs["tag_logits"], tag_targets))
    torch.testing.assert_close(total, parts["tags"] + parts["rating"])


def test_rating_label_smoothing_and_task_weights() -> None:
    torch.manual_seed(6)
    rating_logits = torch.randn(5, 4)
    rating_targets = torch.tensor([1, -1, 0, 3, -1])
    known = rating_targets != -1
    multi = MultiTaskLoss(AsymmetricFocalLoss(), tag_weight=0.5, rating_weight=2.0, rating_label_smoothing=0.1)
    outputs = {"tag_logits": torch.randn(5, 3), "rating_logits": rating_logits}
    tag_targets = torch.zeros(5, 3)
    total, parts = multi(outputs, tag_targets, rating_targets)
    expected = F.cross_entropy(rating_logits[known], rating_targets[known], label_smoothing=0.1)
    torch.testing.assert_close(parts["rating"], expected)
    torch.testing.assert_close(total, 0.5 * parts["tags"] + 2.0 * parts["rating"])


def test_all_unknown_ratings_give_zero_connected_to_graph() -> None:
    rating_logits = torch.randn(3, 4, requires_grad=True)
    tag_logits = torch.randn(3, 5, requires_grad=True)
    multi = MultiTaskLoss(AsymmetricFocalLoss(), rating_label_smoothing=0.1)
    total, parts = multi({"tag_logits": tag_logits, "rating_logits": rating_logits}, torch.zeros(3, 5), torch.full((3,), -1))
    assert parts["rating"].item() == 0.0
    assert not torch.isnan(total)
    assert parts["rating"].requires_grad
    total.backward()
    assert rating_logits.grad is not None
    assert torch.equal(rating_logits.grad, torch.zeros_like(rating_logits))


def test_rating_shape_validation() -> None:
    multi = MultiTaskLoss(AsymmetricFocalLoss())
    with pytest.raises(ValueError, match="rating logits"):
        multi({"tag_logits": torch.zeros(2, 3), "rating_logits": torch.zeros(2, 4)}, torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_loss_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    loss_fn = MultiTaskLoss(AsymmetricFocalLoss(gamma_pos=1.0, tag_weights=torch.ones(7)), rating_label_smoothing=0.1)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    outputs = {"tag_logits": torch.randn(4, 7), "rating_logits": torch.randn(4, 4)}
    targets = (torch.rand(4, 7) < 0.5).float()
    ratings = torch.tensor([0, -1, 2, 3])
    eager_total, _ = loss_fn(outputs, targets, ratings)
    compiled_total, _ = compiled(outputs, targets, ratings)
    torch.testing.assert_close(compiled_total, eager_total)


def test_soft_one_hot_rating_targets_equal_hard_targets() -> None:
    """One-hot (B, R) targets with zero rows for unknown give exactly the class-id loss and gradient."""
    torch.manual_seed(7)
    hard = torch.tensor([2, -1, 0, 3, -1, 1])
    soft = F.one_hot(hard.clamp(min=0), 4).float() * (hard != -1)[:, None]
    for smoothing in (0.0, 0.2):
        multi = MultiTaskLoss(AsymmetricFocalLoss(), rating_label_smoothing=smoothing)
        logits_hard = torch.randn(6, 4, requires_grad=True)
        logits_soft = logits_hard.detach().clone().requires_grad_(True)
        loss_hard = multi.rating_loss(logits_hard, hard)
        loss_soft = multi.rating_loss(logits_soft, soft)
        torch.testing.assert_close(loss_soft, loss_hard)
        loss_hard.backward()
        loss_soft.backward()
        torch.testing.assert_close(logits_soft.grad, logits_hard.grad)


def test_soft_rating_targets_match_mixup_reference() -> None:
    """Mixed (B, R) targets give mixup.soft_rating_cross_entropy with mask = nonzero rows."""
    torch.manual_seed(8)
    logits = torch.randn(5, 4)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = soft.sum(dim=1) > 0
    for smoothing in (0.0, 0.1):
        got = MultiTaskLoss(AsymmetricFocalLoss(), rating_label_smoothing=smoothing).rating_loss(logits, soft)
        torch.testing.assert_close(got, soft_rating_cross_entropy(logits, soft, mask, label_smoothing=smoothing))
    # Written out by hand for the first known row: -(0.7 log q0 + 0.3 log q1).
    log_q = F.log_softmax(logits, dim=1)
    by_hand = (-(0.7 * log_q[0, 0] + 0.3 * log_q[0, 1]) - (0.25 * log_q[2, 2] + 0.75 * log_q[2, 3]) - log_q[3, 0]) / 3
    torch.testing.assert_close(MultiTaskLoss(AsymmetricFocalLoss()).rating_loss(logits, soft), by_hand)


def test_all_zero_soft_rating_rows_give_zero_connected_to_graph() -> None:
    rating_logits = torch.randn(3, 4, requires_grad=True)
    multi = MultiTaskLoss(AsymmetricFocalLoss(), rating_label_smoothing=0.1)
    total, parts = multi({"tag_logits": torch.randn(3, 5), "rating_logits": rating_logits}, torch.zeros(3, 5), torch.zeros(3, 4))
    assert parts["rating"].item() == 0.0
    total.backward()
    assert torch.equal(rating_logits.grad, torch.zeros_like(rating_logits))


def test_soft_rating_shape_validation() -> None:
    multi = MultiTaskLoss(AsymmetricFocalLoss())
    with pytest.raises(ValueError, match="rating logits"):
        multi.rating_loss(torch.zeros(2, 4), torch.zeros(2, 3))
