"""Tests for the guarded optimizer step, the train step, best metric, early stopping, EMA, RNG, stops."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import training_utils as U


def _tiny_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)


def test_nonfinite_loss_skips_update_and_counts() -> None:
    model, opt = _tiny_setup()
    amp = U.GuardedOptimizerStep(opt, torch.device("cpu"), "fp32", grad_clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 4)).sum() * float("nan")
    amp.backward(loss, window=1)
    _, skipped = amp.step(list(model.parameters()))
    assert bool(skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(amp.skipped_total) == 1 and int(amp.max_consecutive_skips) == 1
    loss = model(torch.randn(3, 4)).sum()
    amp.backward(loss, window=1)
    _, skipped = amp.step(list(model.parameters()))
    assert not bool(skipped)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(amp.consecutive_skips) == 0 and int(amp.skipped_total) == 1
    assert all(torch.isfinite(s).all() for st in opt.state.values() for s in st.values())


def test_accumulation_matches_full_batch() -> None:
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    model_a, opt_a = _tiny_setup()
    amp_a = U.GuardedOptimizerStep(opt_a, torch.device("cpu"), "fp32")
    amp_a.backward(torch.nn.functional.mse_loss(model_a(x), y), window=1)
    amp_a.step(list(model_a.parameters()))
    model_b, opt_b = _tiny_setup()
    amp_b = U.GuardedOptimizerStep(opt_b, torch.device("cpu"), "fp32")
    for part in range(3):  # three equal micro-batches of a window of 3
        sl = slice(2 * part, 2 * part + 2)
        amp_b.backward(torch.nn.functional.mse_loss(model_b(x[sl]), y[sl]), window=3)
    amp_b.step(list(model_b.parameters()))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_unfused_optimizer_rejected() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fused"):
        U.GuardedOptimizerStep(torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), "fp32")


def test_early_stopping() -> None:
    es = U.EarlyStopping(patience=2, min_delta=0.01)
    assert not es.update(0.5)
    assert not es.update(0.505)  # within min_delta: a bad check
    assert es.update(0.50)
    es2 = U.EarlyStopping(patience=2)
    es2.load_state_dict(es.state_dict())
    assert es2.bad_checks == 2 and es2.baseline == 0.5


def test_best_metric_tracks_value_and_step() -> None:
    best = U.BestMetric("mAP")
    assert best.update(10, 0.30) and (best.value, best.step) == (0.30, 10)
    assert not best.update(20, 0.30)  # a tie is not a new best
    assert best.update(30, 0.305)  # any gain is (early stopping's min_delta is separate)
    assert not best.update(40, float("nan"))  # NaN never beats a number
    assert (best.value, best.step) == (0.305, 30)
    restored = U.BestMetric("mAP")
    restored.load_state_dict(best.state_dict())
    assert (restored.value, restored.step) == (0.305, 30)
    legacy = U.BestMetric("mAP")
    legacy.load_state_dict({"metric": None, "value": 0.25, "step": 12})  # from a run_state before the name was kept
    assert (legacy.value, legacy.step) == (0.25, 12)
    with pytest.raises(ValueError, match="best is by mAP but this run selects by f1_micro"):
        U.BestMetric("f1_micro").load_state_dict(best.state_dict())


def test_early_stopping_baseline_lags_the_best_with_min_delta() -> None:
    """0.5 -> 0.506 -> 0.512 with min_delta 0.01: 0.506 is a new best but not a gain over 0.5 by
    0.01; 0.512 is one over the 0.5 baseline, so the patience count resets."""
    best, es = U.BestMetric("mAP"), U.EarlyStopping(patience=2, min_delta=0.01)
    for step, value in ((1, 0.5), (2, 0.506), (3, 0.512)):
        best.update(step, value)
        assert not es.update(value)
    assert best.value == 0.512 and es.baseline == 0.512 and es.bad_checks == 0


def test_rank_rng_states_round_trip() -> None:
    rng = U.RankRngStates(rank=0, world_size=1)
    U.seed_everything(5)
    states = rng.state_dict()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    U.seed_everything(6)
    rng.load_state_dict(states)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    with pytest.raises(ValueError, match="2 ranks cannot be restored in a job of 1"):
        rng.load_state_dict(states * 2)


def test_ema_update_and_skip() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = U.ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.1))
    ema.update(model, step=1, skipped=torch.tensor(True))
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.1))
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.1))
    assert U.ModelEma(model, 0.999, warmup_steps=10).decay_at(0) == pytest.approx(0.1)


class _TiedHalf(torch.nn.Module):
    """A float32 layer with its weight tied to a second name, and a float16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(2, 2, bias=False)
        self.b = torch.nn.Linear(2, 2, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.zeros(2, dtype=torch.float16))


def test_ema_averaged_model_is_one_kept_copy() -> None:
    model = _TiedHalf()
    with torch.no_grad():
        model.a.weight.fill_(0.0)
    ema = U.ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.a.weight.fill_(1.0)
        model.scale.fill_(1.0)
    ema.update(model, step=0)
    averaged = ema.averaged_model()
    assert averaged is ema.averaged_model() and averaged is not model and not averaged.training
    # the tied weight moved once (0 -> 0.5), not twice; the float16 buffer through its float32 copy
    torch.testing.assert_close(averaged.a.weight, torch.full((2, 2), 0.5))
    assert averaged.b.weight is averaged.a.weight
    torch.testing.assert_close(averaged.scale, torch.full((2,), 0.5, dtype=torch.float16))
    torch.testing.assert_close(model.a.weight, torch.ones(2, 2))  # the trained model is untouched
    target = _TiedHalf()
    ema.copy_to(target)
    torch.testing.assert_close(target.a.weight, averaged.a.weight)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(model, step=1)
    ema.load_state_dict(saved)
    torch.testing.assert_close(ema.averaged_model().a.weight, torch.full((2, 2), 0.5))


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    U.seed_everything(3)
    state = U.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    U.seed_everything(99)
    U.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_stopper_stop_file(tmp_path: Path) -> None:
    stopper = U.GracefulStopper(tmp_path / "STOP")
    assert not stopper.requested
    (tmp_path / "STOP").write_text("", encoding="utf-8")
    assert stopper.requested and "STOP" in stopper.reason


def test_resolve_precision() -> None:
    assert U.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert U.resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        U.resolve_precision("fp16", torch.device("cpu"))
    assert isinstance(U.autocast_context("fp32", torch.device("cpu")), contextlib.nullcontext)
    with U.autocast_context("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


class _TwoHeads(torch.nn.Module):
    """A stand-in tagger: the output dict of SimplifiedTagger from a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.tags = torch.nn.Linear(4, 3)
        self.rating = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"tag_logits": self.tags(x), "rating_logits": self.rating(x)}


def test_train_step_sums_update_and_ema() -> None:
    from loss_functions import AsymmetricFocalLoss, MultiTaskLoss

    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = MultiTaskLoss(AsymmetricFocalLoss())
    step = U.TrainStep(
        model, model, loss_fn, U.GuardedOptimizerStep(opt, torch.device("cpu"), "fp32"), sched, U.ModelEma(model, 0.5), torch.device("cpu")
    )
    x, tags, ratings = torch.randn(6, 4), (torch.rand(6, 3) < 0.5).float(), torch.tensor([0, 1, 2, 3, -1, 0])
    with torch.no_grad():
        expected = [float(loss_fn(model(x[i : i + 3]), tags[i : i + 3], ratings[i : i + 3])[0]) for i in (0, 3)]
    before = model.tags.weight.detach().clone()
    for i in (0, 3):
        step.forward_backward(x[i : i + 3], tags[i : i + 3], ratings[i : i + 3], window=2, sync=i == 3)
    step.optimizer_step(0)
    values = step.read_and_reset_sums()
    assert values["loss"] == pytest.approx(sum(expected) / 2)
    assert values["grad_norm"] > 0 and set(values) >= {"loss/tags", "loss/rating"}
    assert not torch.equal(before, model.tags.weight)
    torch.testing.assert_close(step.ema.shadow["tags.weight"], 0.5 * before + 0.5 * model.tags.weight.detach())
    assert step.read_and_reset_sums() == {}


def _vit_step(adaptive: bool, fault_limit: int | None = None, seed: int = 0) -> U.TrainStep:
    """A TrainStep of a small ViT with the project's loss (fp32, no stochastic depth)."""
    from loss_functions import AsymmetricFocalLoss, MultiTaskLoss
    from model_architecture import SimplifiedTagger, VisionTransformerConfig

    torch.manual_seed(seed)
    model = SimplifiedTagger(
        VisionTransformerConfig(image_size=32, patch_size=8, num_tags=20, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = MultiTaskLoss(AsymmetricFocalLoss(), rating_weight=0.7)
    return U.TrainStep(
        model,
        model,
        loss,
        U.GuardedOptimizerStep(opt, torch.device("cpu"), "fp32", grad_clip=1.0),
        sched,
        None,
        torch.device("cpu"),
        adaptive=adaptive,
        fault_limit=fault_limit,
    )


def _batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ratings = torch.randint(0, 4, (size,), generator=g)
        ratings[:3] = -1  # unknown ratings spread unevenly over the micro-batches
        out.append((torch.randn(size, 3, 32, 32, generator=g), (torch.rand(size, 20, generator=g) < 0.2).float(), ratings))
    return out


@pytest.mark.e2e  # DataLoader worker processes / several re-planned training windows: the slow tier
def test_out_of_memory_splits_further_and_reruns_the_window() -> None:
    """An injected out-of-memory error re-plans at the next smaller equal split and runs the whole
    accumulation window again: gradients, losses and the update equal the unsplit step's, and the
    failed attempts left nothing behind (no update, no doubled gradient or loss)."""
    from micro_batching import MicroBatchPlan, MicroBatchPlanError

    ref, split = _vit_step(adaptive=False), _vit_step(adaptive=True, fault_limit=8)
    replans: list[tuple[MicroBatchPlan, str]] = []
    split.on_replan = lambda plan, reason: replans.append((plan, reason))
    first, second = _batches(2)
    for step in (ref, split):
        step.forward_backward(*first, window=2, sync=False)
    assert replans == []  # batch 8 fits under the fault limit of 8
    split.fault_limit = 2  # the second batch of the window now runs out of memory until micro-batches of 2
    for step in (ref, split):
        step.forward_backward(*second, window=2, sync=True)
    assert [p.micro_batch for p, _ in replans] == [4, 2] and "injected" in replans[0][1]
    assert split.plan == MicroBatchPlan(8, 2) and split.replans == 2
    for (name, a), b in zip(ref.raw_model.named_parameters(), split.raw_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    before = [p.detach().clone() for p in split.params]
    for step in (ref, split):
        step.optimizer_step(0)
    assert not all(torch.equal(a, b) for a, b in zip(before, split.params))  # one update, made after the window
    sums_ref, sums_split = ref.read_and_reset_sums(), split.read_and_reset_sums()
    assert sums_ref.keys() == sums_split.keys()
    for key in sums_ref:
        assert abs(sums_ref[key] - sums_split[key]) <= 1e-6 * abs(sums_ref[key]), key
    for a, b in zip(ref.params, split.params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    stuck = _vit_step(adaptive=True, fault_limit=0)  # every size fails: the message names the key to change
    stuck.plan = MicroBatchPlan(8, 1)
    with pytest.raises(MicroBatchPlanError, match="data.batch_size=8"):
        stuck.forward_backward(*first, window=1)


def test_out_of_memory_without_adaptive_splitting_propagates() -> None:
    from micro_batching import InjectedOutOfMemoryError

    step = _vit_step(adaptive=False, fault_limit=4)
    with pytest.raises(InjectedOutOfMemoryError):
        step.forward_backward(*_batches(1)[0], window=1)
