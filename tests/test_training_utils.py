"""Tests for checkpoints, the async writer, mixed precision skips, restarts schedule, EMA, RNG."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import training_utils as U


def payload(step: int, value: float = 1.0, best: bool = False) -> U.CheckpointPayload:
    return U.CheckpointPayload(step=step, model_state={"w": torch.full((2, 3), value)},
                               training_state={"format_version": U.CHECKPOINT_FORMAT_VERSION, "step": step},
                               files={"config.yaml": "a: 1\n"}, ema_state={"w": torch.zeros(2, 3)}, is_best=best)


def test_checkpoint_layout_pointers_and_prune(tmp_path: Path) -> None:
    mgr = U.CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    mgr.write(payload(10, best=True))
    mgr.write(payload(20))
    mgr.write(payload(30))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "last", "step_10", "step_20", "step_30"]  # step_10 kept: it is the best
    mgr.write(payload(40))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "last", "step_10", "step_30", "step_40"]
    folder = U.CheckpointManager.resolve(tmp_path / "checkpoints" / "last")
    assert folder.name == "step_40"
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "config.yaml", "ema.safetensors",
                                                          "model.safetensors", "training_state.pt"]
    assert U.CheckpointManager.resolve(tmp_path / "checkpoints" / "best").name == "step_10"
    assert torch.equal(U.CheckpointManager.load_model_state(folder)["w"], torch.ones(2, 3))
    assert U.CheckpointManager.load_training_state(folder)["step"] == 40


def test_latest_skips_incomplete_folders(tmp_path: Path) -> None:
    mgr = U.CheckpointManager(tmp_path, keep_last=5)
    mgr.write(payload(5))
    crashed = tmp_path / "step_9"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert mgr.latest().name == "step_5"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        U.CheckpointManager.resolve(crashed)


class Pickled:
    """Any class instance: weights_only loading must refuse it."""


def test_pickled_training_state_refused(tmp_path: Path) -> None:
    folder = tmp_path / "step_1"
    folder.mkdir()
    torch.save({"format_version": U.CHECKPOINT_FORMAT_VERSION, "obj": Pickled()}, folder / "training_state.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        U.CheckpointManager.load_training_state(folder)


def test_async_writer_surfaces_errors_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = U.CheckpointManager(tmp_path, keep_last=3)
    writer = U.AsyncCheckpointWriter(mgr)
    writer.submit(payload(1))
    writer.wait()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(U.torch, "save", disk_full)
    writer.submit(payload(2))
    with pytest.raises(RuntimeError, match="No space left"):
        writer.wait()
    assert mgr.latest().name == "step_1"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert (tmp_path / "last").read_text(encoding="utf-8").strip() == "step_1"


def test_snapshot_is_a_copy() -> None:
    w = torch.ones(3)
    model_state, train_state, _ = U.snapshot_state({"w": w}, {"opt": {"m": w}}, None)
    w.add_(1)
    assert torch.equal(model_state["w"], torch.ones(3)) and torch.equal(train_state["opt"]["m"], torch.ones(3))


def _tiny_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)


def test_nonfinite_loss_skips_update_and_counts() -> None:
    model, opt = _tiny_setup()
    amp = U.MixedPrecisionTrainer(opt, torch.device("cpu"), "fp32", grad_clip=1.0)
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
    amp_a = U.MixedPrecisionTrainer(opt_a, torch.device("cpu"), "fp32")
    amp_a.backward(torch.nn.functional.mse_loss(model_a(x), y), window=1)
    amp_a.step(list(model_a.parameters()))
    model_b, opt_b = _tiny_setup()
    amp_b = U.MixedPrecisionTrainer(opt_b, torch.device("cpu"), "fp32")
    for part in range(3):  # three equal micro-batches of a window of 3
        sl = slice(2 * part, 2 * part + 2)
        amp_b.backward(torch.nn.functional.mse_loss(model_b(x[sl]), y[sl]), window=3)
    amp_b.step(list(model_b.parameters()))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_unfused_optimizer_rejected() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fused"):
        U.MixedPrecisionTrainer(torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), "fp32")


def test_restarts_schedule_points() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = U.CosineAnnealingWarmupRestarts(opt, first_cycle_steps=10, warmup_steps=2, cycle_mult=2.0,
                                            gamma=0.5, min_lr_ratio=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.0)                 # warm-up starts at 0
    assert lrs[2] == pytest.approx(1.0)                 # end of warm-up: the peak
    assert lrs[9] > 0.1 and lrs[9] < 0.2                # end of the first cycle: near the floor
    assert lrs[10] == pytest.approx(0.0)                # restart: warm-up again
    assert lrs[12] == pytest.approx(0.5)                # second peak decayed by gamma
    assert lrs[30] == pytest.approx(0.0)                # third cycle starts after 10 + 20 steps
    assert lrs[32] == pytest.approx(0.25)
    # resume from a state dict mid-cycle continues identically
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = U.CosineAnnealingWarmupRestarts(opt2, first_cycle_steps=10, warmup_steps=2, cycle_mult=2.0, gamma=0.5, min_lr_ratio=0.1)
    s2.load_state_dict(sched.state_dict())
    assert s2.factor(17) == pytest.approx(sched.factor(17))


def test_early_stopping() -> None:
    es = U.EarlyStopping(patience=2, min_delta=0.01)
    assert not es.update(0.5)
    assert not es.update(0.505)  # within min_delta: a bad check
    assert es.update(0.50)
    es2 = U.EarlyStopping(patience=2)
    es2.load_state_dict(es.state_dict())
    assert es2.bad_checks == 2 and es2.best == 0.5


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
    step = U.TrainStep(model, model, loss_fn, U.MixedPrecisionTrainer(opt, torch.device("cpu"), "fp32"), sched,
                       U.ModelEma(model, 0.5), torch.device("cpu"))
    x, tags, ratings = torch.randn(6, 4), (torch.rand(6, 3) < 0.5).float(), torch.tensor([0, 1, 2, 3, -1, 0])
    with torch.no_grad():
        expected = [float(loss_fn(model(x[i:i + 3]), tags[i:i + 3], ratings[i:i + 3])[0]) for i in (0, 3)]
    before = model.tags.weight.detach().clone()
    for i in (0, 3):
        step.forward_backward(x[i:i + 3], tags[i:i + 3], ratings[i:i + 3], window=2, sync=i == 3)
    step.optimizer_step(0)
    values = step.read_and_reset_sums()
    assert values["loss"] == pytest.approx(sum(expected) / 2)
    assert values["grad_norm"] > 0 and set(values) >= {"loss/tags", "loss/rating"}
    assert not torch.equal(before, model.tags.weight)
    torch.testing.assert_close(step.ema.shadow["tags.weight"], 0.5 * before + 0.5 * model.tags.weight.detach())
    assert step.read_and_reset_sums() == {}
