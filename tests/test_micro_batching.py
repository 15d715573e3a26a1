"""micro_batching.py: a batch as equal micro-batches gives the unsplit loss and gradient; the planner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loss_functions import AsymmetricFocalLoss, MultiTaskLoss
from micro_batching import (
    OOM_FAULT_ENV,
    InjectedOutOfMemoryError,
    MicroBatchPlan,
    MicroBatchPlanError,
    agree_across_ranks,
    forward_backward_split,
    injected_oom_limit,
    is_out_of_memory,
    make_step_probe,
    micro_batch_candidates,
    plan_micro_batches,
)
from mixup import MixParams, mix_batch
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from training_utils import GuardedOptimizerStep

NUM_TAGS = 40
CPU = torch.device("cpu")


def tiny_vit(seed: int = 0) -> SimplifiedTagger:
    """A small ViT in fp32 with stochastic depth off (its draws differ between split and unsplit runs)."""
    torch.manual_seed(seed)
    cfg = VisionTransformerConfig(
        image_size=32, patch_size=8, num_tags=NUM_TAGS, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0, layer_scale_init=0.1
    )
    return SimplifiedTagger(cfg).train()


def project_loss() -> MultiTaskLoss:
    """The training loss with every option that changes its reduction turned on."""
    weights = torch.linspace(0.5, 2.0, NUM_TAGS)
    return MultiTaskLoss(
        AsymmetricFocalLoss(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, tag_weights=weights),
        tag_weight=1.0,
        rating_weight=0.7,
        rating_label_smoothing=0.1,
    )


def guard(model: torch.nn.Module) -> GuardedOptimizerStep:
    """The optimizer-step guard train_direct builds (its backward divides by the window)."""
    return GuardedOptimizerStep(torch.optim.AdamW(model.parameters(), fused=True), CPU, "fp32")


def batch(size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, 32, 32), tag targets (B, T), ratings (B,) with unknown ratings unevenly spread:
    the first quarter of the batch has none known, so equal micro-batches hold different counts."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size, 3, 32, 32, generator=g)
    targets = (torch.rand(size, NUM_TAGS, generator=g) < 0.2).float()
    ratings = torch.randint(0, 4, (size,), generator=g)
    ratings[: size // 4] = -1
    ratings[size // 2] = -1
    return images, targets, ratings


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter's gradient."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (norms), the error of a against reference b."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("micro_batch", [4, 2, 1])
@pytest.mark.parametrize("soft", [False, True], ids=["hard_ratings", "mixup_soft_ratings"])
def test_split_equals_unsplit_loss_and_gradient(micro_batch: int, soft: bool) -> None:
    images, targets, ratings = batch()
    if soft:  # MixUp's (B, R) targets: all-zero rows are unknown, as -1 is for hard ones
        mixed = mix_batch(images, targets, ratings, MixParams(mixup_alpha=0.4), torch.Generator().manual_seed(1))
        assert mixed.mode == "mixup" and 0 < int(mixed.rating_mask.sum()) < len(ratings)
        images, targets, ratings = mixed.images, mixed.tag_targets, mixed.rating_targets
    loss_fn = project_loss()
    reference_model = tiny_vit()
    # Reference: the unsplit batch through the model and loss directly, window 2 as in accumulation.
    total, parts = loss_fn(reference_model(images), targets, ratings)
    (total / 2).backward()
    reference = grads(reference_model)

    model = tiny_vit()
    split_total, split_parts = forward_backward_split(model, loss_fn, guard(model), images, targets, ratings, micro_batch=micro_batch, window=2)
    assert relative(split_total, total.detach()) < 1e-6
    for name in ("tags", "rating"):
        assert relative(split_parts[name], parts[name].detach()) < 1e-6
    got = grads(model)
    assert got.keys() == reference.keys() and len(got) > 10
    for name, g in reference.items():
        assert relative(got[name], g) < 1e-6, name


def test_plain_mean_of_micro_batch_losses_would_differ() -> None:
    """The per-part weighting is needed: averaging the micro-batches' own losses is not the batch loss
    when their numbers of known ratings differ (this is what the split must not do)."""
    images, targets, ratings = batch()
    loss_fn = project_loss()
    model = tiny_vit()
    with torch.no_grad():
        total, _ = loss_fn(model(images), targets, ratings)
        naive = sum(loss_fn(model(images[i : i + 2]), targets[i : i + 2], ratings[i : i + 2])[0] for i in range(0, 8, 2)) / 4
    assert relative(naive, total) > 1e-3


def test_unsplit_call_is_the_plain_step() -> None:
    images, targets, ratings = batch()
    loss_fn = project_loss()
    reference_model, model = tiny_vit(), tiny_vit()
    total, parts = loss_fn(reference_model(images), targets, ratings)
    total.backward()
    got_total, got_parts = forward_backward_split(model, loss_fn, guard(model), images, targets, ratings, micro_batch=8)
    assert torch.equal(got_total, total.detach()) and torch.equal(got_parts["rating"], parts["rating"].detach())
    for name, g in grads(reference_model).items():
        assert torch.equal(grads(model)[name], g)


def test_split_rejects_unequal_parts() -> None:
    images, targets, ratings = batch(6)
    model = tiny_vit()
    with pytest.raises(ValueError, match="micro_batch=4 does not divide the batch of 6"):
        forward_backward_split(model, project_loss(), guard(model), images, targets, ratings, micro_batch=4)


def test_injected_fault_is_explicit_and_strict() -> None:
    assert injected_oom_limit({}) is None
    assert injected_oom_limit({OOM_FAULT_ENV: "16"}) == 16
    for bad in ("", "0", "-1", "abc", "16.5", "1e3"):
        with pytest.raises(ValueError, match=OOM_FAULT_ENV):
            injected_oom_limit({OOM_FAULT_ENV: bad})
    images, targets, ratings = batch()
    model = tiny_vit()
    with pytest.raises(InjectedOutOfMemoryError, match=f"injected by {OOM_FAULT_ENV}=2"):
        forward_backward_split(model, project_loss(), guard(model), images, targets, ratings, micro_batch=4, fault_limit=2)
    forward_backward_split(model, project_loss(), guard(model), images, targets, ratings, micro_batch=2, fault_limit=2)


def test_out_of_memory_recognition() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(InjectedOutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_planner_finds_the_largest_equal_split_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OOM_FAULT_ENV, "12")
    model = tiny_vit()
    probe = make_step_probe(
        model,
        project_loss(),
        guard(model),
        num_tags=NUM_TAGS,
        num_ratings=4,
        image_size=32,
        device=CPU,
        reserve_bytes=1 << 20,
        fault_limit=injected_oom_limit(),
    )
    tried: list[int] = []

    def recorded(m: int) -> None:
        tried.append(m)
        probe(m)

    rng_before = torch.get_rng_state()
    messages: list[str] = []
    plan = plan_micro_batches(48, recorded, log=messages.append)
    assert tried == [48, 24, 16, 12]
    assert (plan.micro_batch, plan.accumulation) == (12, 4)
    assert messages == [("micro-batches: a batch of 48 does not fit in memory at once; training it as 4 micro-batches of 12 (same gradient)")]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    assert torch.equal(torch.get_rng_state(), rng_before)  # nor a changed random stream
    assert plan_micro_batches(12, probe, log=messages.append) == MicroBatchPlan(12, 12) and len(messages) == 1


def test_planner_gives_up_in_one_line_and_lets_other_errors_through() -> None:
    def never_fits(m: int) -> None:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {m}\nmore lines")

    with pytest.raises(MicroBatchPlanError) as info:
        plan_micro_batches(6, never_fits)
    assert len(str(info.value).splitlines()) == 1 and "data.batch_size=6" in str(info.value)
    assert "CUDA out of memory at 1" in str(info.value)

    def broken(m: int) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        plan_micro_batches(6, broken)


def test_plan_round_trip_and_helpers() -> None:
    assert micro_batch_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(7) == [7, 1]
    plan = MicroBatchPlan(64, 16)
    assert plan.to_dict() == {"batch_size": 64, "micro_batch": 16, "accumulation": 4}
    assert MicroBatchPlan.from_dict(plan.to_dict()) == plan
    for bad in ({"batch_size": 64, "micro_batch": 10}, {"batch_size": "64", "micro_batch": 16}, [64, 16]):
        with pytest.raises(ValueError):
            MicroBatchPlan.from_dict(bad)
    assert agree_across_ranks(plan, CPU) == plan  # no process group: nothing to agree with


DDP_RANKS = """
import os
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as tdist
from micro_batching import MicroBatchPlan, agree_across_ranks, forward_backward_split
from process_group import exit_process
from test_micro_batching import batch, grads, guard, project_loss, relative, tiny_vit

tdist.init_process_group("gloo")
rank = tdist.get_rank()
images, targets, ratings = batch(8)
images = images + rank  # each rank its own data
results = {{}}
for micro in (8, 2):
    raw = tiny_vit()
    model = torch.nn.parallel.DistributedDataParallel(raw)
    # window 2: the first batch does not all-reduce (sync=False), the second does
    for i, sync in enumerate((False, True)):
        forward_backward_split(model, project_loss(), guard(raw), images.flip(0) if i else images, targets, ratings,
                               micro_batch=micro, window=2, sync=sync)
    results[micro] = grads(raw)
worst = max(relative(results[2][n], g) for n, g in results[8].items())
plan = agree_across_ranks(MicroBatchPlan(8, 4 if rank == 0 else 2), torch.device("cpu"))
# one write per line: the ranks share the pipe, and print's separate newline write interleaves
os.write(1, (f"rank {{rank}} worst {{worst:.3g}} agreed {{plan.micro_batch}}" + chr(10)).encode())
tdist.destroy_process_group()
exit_process(0)
"""


@pytest.mark.e2e
def test_split_under_ddp_equals_unsplit_and_ranks_agree(tmp_path: Path) -> None:
    """Under DDP the micro-batches skip the all-reduce except the window's last one; the reduced
    gradient is the unsplit one on every rank, and ranks agree on the smallest micro-batch."""
    tests = Path(__file__).resolve().parent
    script = tmp_path / "ddp.py"
    script.write_text(DDP_RANKS.format(root=str(tests.parent), tests=str(tests)), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2
    for line in lines:
        worst, agreed = float(line.split()[3]), int(line.split()[5])
        assert worst < 1e-6 and agreed == 2, line
