"""The long-tail recipe in the training loop: MixUp/CutMix, layer-wise LR decay, repeat-factor
sampling and progressive resolution train, and a run stopped before the resolution switch and
resumed with them on ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli
from test_resume_e2e import final_weights, start_and_interrupt, step_losses, train_args

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")]

RECIPE = [
    "augment.mixup_alpha=0.8",
    "augment.cutmix_alpha=1.0",
    "augment.mix_prob=0.9",
    "training.layer_decay=0.75",
    "data.repeat_factor_threshold=0.3",
    "data.progressive_image_size=16",
    "data.progressive_share=0.5",
    "data.batch_size=32",  # about 19 steps an epoch: the 36-step run switches resolution at its second epoch
]


def test_recipe_runs_and_resumes_bit_identical(demo_data: Path, tmp_path: Path) -> None:
    whole = run_cli(train_args(demo_data, "whole", RECIPE), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    line = next(x for x in whole.stdout.splitlines() if x.startswith("repeat-factor sampling:"))
    train_images = int(next(x for x in whole.stdout.splitlines() if x.startswith("split:")).split()[1])
    assert int(line.split()[2]) > train_images  # rare-tag images repeated: a longer epoch
    run_dir = tmp_path / "runs" / "stopped"
    proc = start_and_interrupt(tmp_path, train_args(demo_data, "stopped", RECIPE), run_dir, after_step=12, how="term")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    resumed = run_cli(train_args(demo_data, "stopped", RECIPE) + ["--resume", "latest"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = step_losses(tmp_path / "runs" / "whole"), step_losses(run_dir)
    assert a == b and len(a) > 12
    wa, wb = final_weights(tmp_path / "runs" / "whole"), final_weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # progressive resolution: 16 px first, 32 px from the first epoch boundary after half the steps,
    # which the resumed run crossed (it stopped after its step-12 checkpoint)
    events = read_jsonl(run_dir / "metrics.jsonl")
    resumed_at = next(e["step"] for e in events if e.get("kind") == "resumed")
    switches = [(e["step"], e["image_size"]) for e in events if e.get("kind") == "resolution"]
    assert switches[0] == (0, 16) and switches[-1][1] == 32 and switches[-1][0] > resumed_at >= 12, switches
    # layer decay is on: the saved optimizer groups keep lr = schedule lr * 0.75 ** (depth from the heads)
    last = (run_dir / "checkpoints" / "last").read_text(encoding="utf-8").strip()
    groups = torch.load(run_dir / "checkpoints" / last / "training_state.pt", weights_only=True)["optimizer"]["param_groups"]
    scales = sorted({round(g["lr_scale"], 12) for g in groups}, reverse=True)
    assert scales == [round(0.75**k, 12) for k in range(len(scales))] and len(scales) == 4  # heads, 2 blocks, embeddings
    assert all(abs(g["lr"] - groups[0]["lr"] * g["lr_scale"]) <= 1e-12 for g in groups)
    # mixing is on: the same recipe without MixUp/CutMix (same seed, batches, resolution and weights
    # at step 0) has another first loss, and that is the only difference between the two runs' step 1
    unmixed = [o for o in RECIPE if not o.startswith(("augment.mixup_alpha", "augment.cutmix_alpha", "augment.mix_prob"))]
    plain = run_cli(train_args(demo_data, "unmixed", [*unmixed, "training.max_steps=3"]), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert len(unmixed) == len(RECIPE) - 3
    plain_losses = step_losses(tmp_path / "runs" / "unmixed")
    assert plain_losses[1] != a[1]
