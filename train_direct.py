"""Train a ViT tagger: config -> data -> model -> loss -> optimizer/schedule -> resume -> loop.

    python train_direct.py --config configs/demo.yaml [--set section.key=value ...] [--resume latest|PATH]

`main()` wires the phases top to bottom; per-step work lives in small functions below it. The same
script runs unchanged under `torchrun --nproc-per-node N` (DDP; rank 0 writes files).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from batching import FailureTracker, ImagePreFetcher, ShardedEpochSampler, build_dataloader
from checkpoint_eval import EvalResult, evaluate
from checkpoint_store import (
    BEST_POINTER,
    CHECKPOINT_FORMAT_VERSION,
    AsyncCheckpointWriter,
    CheckpointManager,
    CheckpointPayload,
    checkpoint_files,
    checkpoints_dir,
    find_resume_checkpoint,
    has_ema,
    load_model_state,
    load_training_state,
    snapshot_state,
)
from Configuration_System import ConfigError, RootConfig, dump_config, flat_hparams, load_config
from data_setup import DataBundle, absolute_data_paths, build_eval_loader, build_train_sampler, check_output_locations, prepare_data
from dataset_scan import DataQualityError, write_data_report
from file_io import atomic_write_text, display_path, python_command
from image_preprocess import resize_images
from machine_fit import choose_micro_batches, cpu_memory_message, describe_plan, resolve_num_workers, saved_plan
from micro_batching import MicroBatchPlan, MicroBatchPlanError
from mixup import MixParams, mix_training_batch
from Monitor_log import ThreadSafeMetricsTracker, TrainingMonitor
from process_group import Distributed, any_rank, broadcast_from_rank0, exit_process, init_distributed
from run_folder import NEW_FOLDER_FLAG, RUN_RECORD_NAME, RunClaim, claim_run_folder, is_own_checkpoint, read_run_record, run_record_text
from run_lock import RunLockError
from run_state import RunState, SamplerPosition
from sample_log import SampleLog
from sample_table import as_table
from shard_format import ShardUnavailableError, short_error
from tagger_init import init_model_weights
from timm_tagger import Tagger, build_tagger
from training_setup import (
    body_frozen_at,
    build_step,
    check_resume_compatible,
    effective_learning_rate,
    model_config,
    schedule_signature,
    steps_after_resume,
    steps_per_epoch,
    total_optimizer_steps,
    train_image_size,
)
from training_utils import (
    BestMetric,
    EarlyStopping,
    GracefulStopper,
    GuardedOptimizerStep,
    ModelEma,
    RankRngStates,
    Stateful,
    TrainStep,
    seed_everything,
)


@dataclass
class TrainingRun:
    """Everything the loop touches, built once in main(); `components()` is what a checkpoint saves."""

    cfg: RootConfig
    dist: Distributed
    device: torch.device
    data: DataBundle
    step_fn: TrainStep  # forward, loss, backward, update, schedule, EMA
    optimizer: torch.optim.Optimizer
    sampler: ShardedEpochSampler
    failures: FailureTracker
    best: BestMetric  # the selection metric's best value and step
    early_stopping: EarlyStopping
    writer: AsyncCheckpointWriter
    monitor: TrainingMonitor
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    total_steps: int
    steps_per_epoch: int
    background: ThreadSafeMetricsTracker = field(default_factory=ThreadSafeMetricsTracker)  # other threads' timings
    flips: list[int] = field(default_factory=lambda: [0, 0])  # flipped, vetoed since the last log line
    state: RunState = field(default_factory=RunState)
    run_record: str = ""  # run.json's text (rank 0), copied into every checkpoint: its lineage
    sample_log: SampleLog | None = None  # monitor.sample_log: every step's sample ids

    @property
    def raw_model(self) -> Tagger:
        """The module whose weights are trained and saved."""
        return self.step_fn.raw_model

    @property
    def amp(self) -> GuardedOptimizerStep:
        """Autocast, loss scaling and the guarded update."""
        return self.step_fn.amp

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule."""
        return self.step_fn.scheduler

    @property
    def ema(self) -> ModelEma | None:
        """The weight EMA, if enabled."""
        return self.step_fn.ema

    def components(self) -> dict[str, Stateful]:
        """The stateful pieces, by their key in training_state.pt (the weights go in safetensors).
        Restored in this order: RNG last, so nothing restored after it draws random numbers."""
        return {
            "run_state": self.state,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "amp": self.amp,
            "sampler": SamplerPosition(self.sampler, self.state),
            "early_stopping": self.early_stopping,
            "best": self.best,
            "failures": self.failures,
            "monitor": self.monitor,
            "rng": RankRngStates(self.dist.rank, self.dist.world_size),
        }


# --------------------------------------------------------------------------------------------
# Per-step work
# --------------------------------------------------------------------------------------------


def count_flips(run: TrainingRun, flip: torch.Tensor) -> None:
    """Flips done (1) and vetoed (2) in a host-side batch tensor, for the next log line."""
    run.flips[0] += int((flip == 1).sum())
    run.flips[1] += int((flip == 2).sum())


def log_training(run: TrainingRun, images: int, seconds: float, wait_s: float) -> None:
    """Read the device sums and counters once and hand them to the monitor."""
    values = run.step_fn.read_and_reset_sums(run.dist.world_size)
    values["skipped_steps"] = float(run.amp.skipped_total.item())
    values.update(run.background.snapshot(reset=True))  # e.g. checkpoint/write_seconds from the writer thread
    values["augment/flipped"], values["augment/flip_vetoed"] = float(run.flips[0]), float(run.flips[1])
    values["data/replaced_samples"] = float(run.failures.failed)
    run.flips = [0, 0]
    run.monitor.log_train(
        run.state.step,
        run.state.epoch + 1,
        values,
        images_per_s=images / max(seconds, 1e-9),
        data_wait_share=wait_s / max(seconds, 1e-9),
        lr=run.scheduler.get_last_lr()[0],
    )
    if run.amp.max_consecutive_skips.item() >= run.cfg.training.max_consecutive_skips:
        raise NonFiniteTrainingError(f"{run.cfg.training.max_consecutive_skips} optimizer steps in a row had a non-finite loss or gradient norm")


@dataclass
class CheckpointTimings:
    """Collects the background checkpoint writer's timings for the next training log line."""

    tracker: ThreadSafeMetricsTracker

    def record_write(self, folder: Path, seconds: float) -> None:
        """Called by the writer thread after each checkpoint."""
        self.tracker.update("checkpoint/write_seconds", seconds)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops after saving the last good state."""


# --------------------------------------------------------------------------------------------
# Validation and checkpoints
# --------------------------------------------------------------------------------------------


def run_validation(run: TrainingRun) -> tuple[bool, bool]:
    """Inline validation with the same function validation_loop.py uses; returns (is_new_best,
    should_stop_early). The best is updated before logging, so the monitor shows what
    checkpoints/best holds."""
    model = run.raw_model
    if run.cfg.validation.use_ema and run.ema is not None:
        model = run.ema.averaged_model()
    result = evaluate(
        model,
        run.val_loader,
        run.device,
        run.data.vocab,
        run.data.preprocess,
        threshold=run.cfg.validation.threshold,
        autocast=run.amp.autocast,
        world_size=run.dist.world_size,
        max_batches=run.cfg.validation.max_batches,
        num_examples=run.cfg.monitor.validation_images,
    )
    run.failures.record(result.skipped)  # validation skips, never substituted: in the report and left out next time
    value = float(result.metrics[run.best.name])
    is_best = run.best.update(run.state.step, value)
    stop = run.early_stopping.update(value)
    run.monitor.log_validation(run.state.step, result.metrics, best_name=run.best.name, best_value=run.best.value, best_step=run.best.step)
    log_validation_pictures(run, result)
    run.state.last_val_step = run.state.step
    return is_best, stop


def log_validation_pictures(run: TrainingRun, result: EvalResult) -> None:
    """PR curves of a few tags (most frequent, median, rarest with positives) and an example grid."""
    if not run.dist.is_main:
        return
    vocab, step = run.data.vocab, run.state.step
    support = result.computer.per_tag()["support"]
    with_positives = [i for i in range(len(vocab)) if int(support[i]) > 0]  # index order = frequency order
    if with_positives and run.cfg.monitor.pr_curve_tags:
        picks = {with_positives[0], with_positives[len(with_positives) // 2], with_positives[-1]}
        for i in sorted(picks)[: run.cfg.monitor.pr_curve_tags]:
            pos, neg = result.computer.histograms(i)
            run.monitor.log_pr_curve(step, vocab.index_to_tag[i], pos, neg, bin_edges=result.computer.bin_edges())
    ex = result.examples
    if ex is not None:
        captions = []
        for probs, targets in zip(ex.probs, ex.targets):
            true = [vocab.index_to_tag[i] for i in torch.nonzero(targets).flatten().tolist()]
            top = torch.topk(probs, k=min(5, probs.numel()))
            pred = [f"{vocab.index_to_tag[i]} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist())]
            captions.append("true: " + " ".join(true) + "\npred: " + ", ".join(pred))
        run.monitor.log_image_grid(step, ex.images, captions)


def stop_agreed(run: TrainingRun, stopper: GracefulStopper, poll: bool) -> bool:
    """Whether to stop now. Signals count at once; the STOP file is looked for at polling steps
    only (no file-system call per step). Under DDP the ranks agree (any rank asked) at polling
    steps, so every rank leaves the loop at the same step and no collective is left waiting."""
    if run.dist.world_size == 1:
        return stopper.reason is not None or (poll and stopper.requested)
    return poll and any_rank(stopper.requested, run.dist, run.device)


def training_state_dict(run: TrainingRun) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs (tensors and plain types); a
    collective call under DDP (the RNG states of every rank are gathered)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        **{name: component.state_dict() for name, component in run.components().items()},
        "schedule": schedule_signature(run.cfg, run.dist.world_size),
        "micro_batches": run.step_fn.plan.to_dict(),  # not part of the schedule: a resume may re-plan
        "vocabulary_fingerprint": run.data.vocab.fingerprint(),
        "train_data_fingerprint": run.data.train_fingerprint,
    }


def save_checkpoint(run: TrainingRun, is_best: bool, wait: bool = False) -> None:
    """Snapshot the state to the CPU now, write it in the background (called on every rank;
    rank 0 writes)."""
    run.state.last_ckpt_step = run.state.step
    train_state = training_state_dict(run)  # collective under DDP
    if not run.dist.is_main:
        return
    model_state, train_state, ema_state = snapshot_state(run.raw_model.state_dict(), train_state, run.ema.state_dict() if run.ema else None)
    files = checkpoint_files(run.cfg, run.data.vocab_path.read_text(encoding="utf-8"), run.raw_model.cfg, run.data.preprocess)
    files[RUN_RECORD_NAME] = run.run_record  # the pruner deletes only folders of this run's lineage
    run.writer.submit(
        CheckpointPayload(step=run.state.step, model_state=model_state, training_state=train_state, files=files, ema_state=ema_state, is_best=is_best)
    )
    if wait:
        run.writer.wait()


# Entries older checkpoints lack: "monitor" is newer than format 1's first checkpoints, and a
# missing "failures" was always accepted ("best" is filled in by with_best_entry).
OPTIONAL_STATE = ("monitor", "failures")


def with_best_entry(state: Mapping[str, Any]) -> dict[str, Any]:
    """A training state with a "best" entry: older checkpoints kept the best in run_state."""
    if "best" in state:
        return dict(state)
    saved = state["run_state"]
    return {**state, "best": {"metric": None, "value": saved.get("best_metric"), "step": saved.get("best_step")}}


def restore_checkpoint(run: TrainingRun, folder: Path, state: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Restore weights, EMA and every component of `state` (the folder's training state)."""
    if state["vocabulary_fingerprint"] != run.data.vocab.fingerprint():
        raise ConfigError(
            f"{folder}: the checkpoint's vocabulary differs from this run's ({run.data.vocab_path}); "
            "resume with the run's own vocabulary.json (data.vocabulary)"
        )
    data_changed = state.get("train_data_fingerprint", run.data.train_fingerprint) != run.data.train_fingerprint
    if data_changed and not args.accept_data_change:
        split = run.data.report.get("split", {})
        raise ConfigError(
            f"{folder}: the training samples changed since this checkpoint ({split.get('vanished', 0)} vanished, "
            f"{split.get('added', 0)} added; data_report.json 'split'), so the saved position in the epoch no longer "
            "points at the same samples. Put the files back for an exact resume, or pass --accept-data-change to "
            "continue from this checkpoint with the interrupted epoch started over on the current files"
        )
    changes = check_resume_compatible(state["schedule"], schedule_signature(run.cfg, run.dist.world_size), args.accept_schedule_change)
    run.raw_model.load_state_dict(load_model_state(folder))
    if run.ema is not None:
        if has_ema(folder):
            run.ema.load_state_dict(load_model_state(folder, ema=True))
        else:
            run.step_fn.ema = ModelEma(run.raw_model, run.ema.decay, run.ema.warmup_steps)  # start from the loaded weights
    skip = set()
    if data_changed:
        # Changed data keeps the weights and the optimizer moments but restarts the interrupted epoch: the saved
        # position points into the old sample list. A changed schedule alone continues the epoch (elastic below).
        skip.add("sampler")
    if state["schedule"].get("world_size") != run.dist.world_size:
        skip.add("rng")  # another number of ranks: each rank keeps its freshly seeded streams
    state = with_best_entry(state)
    for name, component in run.components().items():
        if name in skip or (name not in state and name in OPTIONAL_STATE):
            continue
        if name not in state:
            raise ValueError(f"{folder}: training_state.pt has no '{name}' entry")
        if name == "sampler" and changes:
            component.load_state_dict(state[name], elastic=True)  # another batch layout takes the rest of the epoch
        else:
            component.load_state_dict(state[name])
    if data_changed:
        run.state.batch_in_epoch = 0
    if changes or data_changed:
        run.sampler.set_epoch(run.state.epoch, run.state.batch_in_epoch)
        left = run.sampler.batches_per_epoch() - run.state.batch_in_epoch
        run.total_steps = steps_after_resume(run.cfg, run.state.step, run.state.epoch, left, run.steps_per_epoch)
        run.monitor.set_total_steps(run.total_steps)
    if changes:
        run.monitor.log_event(run.state.step, "schedule_changed", changes=changes, total_steps=run.total_steps)
    if data_changed:
        run.monitor.log_event(run.state.step, "data_changed", split=run.data.report.get("split", {}))
    run.monitor.log_event(run.state.step, "resumed", checkpoint=str(folder))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def epoch_batches(run: TrainingRun, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
    """Device batches of one epoch, starting after `start_batch` already-consumed micro-batches."""
    run.sampler.set_epoch(epoch, start_batch=start_batch)
    return iter(ImagePreFetcher(run.train_loader, run.device, run.data.preprocess, len(run.data.vocab)))


def step_inputs(run: TrainingRun, batch: Mapping[str, Any], size: int, mix: MixParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's images (B, 3, size, size), tag targets (B, T) and ratings: resized to the epoch's
    resolution, then MixUp/CutMix-ed by `mix` (ratings then (B, R) soft). The draw depends only on
    (seed, rank, epoch, batch), so a resumed run mixes as the uninterrupted one."""
    place = (run.cfg.training.seed, run.dist.rank, run.state.epoch, run.state.batch_in_epoch)
    return mix_training_batch(resize_images(batch["images"], size), batch["tag_targets"], batch["ratings"], mix, place)


def epoch_resolution(run: TrainingRun, previous: int | None) -> int:
    """This epoch's training image size; with progressive resolution its first epoch and every
    switch are logged."""
    size = train_image_size(run.cfg, run.state.epoch, run.steps_per_epoch, run.total_steps)
    if size != previous and run.cfg.data.progressive_image_size:
        run.monitor.log_event(
            run.state.step, "resolution", image_size=size, epoch=run.state.epoch, say=f"resolution: {size} px from epoch {run.state.epoch + 1}"
        )
    return size


def train(run: TrainingRun, stopper: GracefulStopper) -> str:
    """Run the loop until done, stopped or early-stopped; returns why it ended."""
    cfg, st = run.cfg, run.state
    accum = cfg.training.grad_accum_steps
    # Throughput counts training time only: validation and checkpoint pauses are subtracted.
    t_log, images_since, wait_since, paused = time.perf_counter(), 0, 0.0, 0.0
    a = cfg.augment
    mix = MixParams(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mix_prob, switch_prob=a.mix_switch_prob)
    size = None
    while st.epoch < cfg.training.epochs and st.step < run.total_steps:
        size = epoch_resolution(run, size)
        batches = epoch_batches(run, st.epoch, st.batch_in_epoch)
        per_epoch_batches = run.sampler.batches_per_epoch()  # fewer in an epoch an elastic resume landed in
        if st.batch_in_epoch >= per_epoch_batches:  # such an epoch's rest was less than a batch a rank
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            continue
        while st.batch_in_epoch < per_epoch_batches and st.step < run.total_steps:
            window = min(accum, per_epoch_batches - st.batch_in_epoch)
            run.raw_model.set_body_frozen(body_frozen_at(cfg, st.step))  # a function of the step: exact on resume
            for i in range(window):
                t0 = time.perf_counter()
                batch = next(batches)
                wait_since += time.perf_counter() - t0
                run.failures.observe(batch)
                if run.sample_log is not None:
                    run.sample_log.write(st.step, st.epoch, batch["indices"].tolist())
                count_flips(run, batch["flip"])
                images, tag_targets, ratings = step_inputs(run, batch, size, mix)
                run.step_fn.forward_backward(images, tag_targets, ratings, window, sync=(i == window - 1))
                images_since += batch["images"].shape[0] * run.dist.world_size
                st.batch_in_epoch += 1
            run.step_fn.optimizer_step(st.step)
            st.step += 1
            if st.step % cfg.monitor.log_every_steps == 0 or st.step == run.total_steps:
                now = time.perf_counter()
                st.images_seen += images_since
                log_training(run, images_since, now - t_log - paused, wait_since)
                t_log, images_since, wait_since, paused = now, 0, 0.0, 0.0
            run.writer.check()
            epoch_done = st.batch_in_epoch >= per_epoch_batches
            if epoch_done:
                st.epoch += 1
                st.batch_in_epoch = 0
                run.failures.write_report()  # files that failed to decode this epoch, by path and reason
            t_pause = time.perf_counter()
            outcome = after_step(run, epoch_done, stopper)
            paused += time.perf_counter() - t_pause
            if outcome:
                return outcome
            if epoch_done:
                break
    return "finished"


def after_step(run: TrainingRun, epoch_done: bool, stopper: GracefulStopper) -> str | None:
    """Validation, checkpoints and stop requests at an optimizer-step boundary."""
    cfg, st = run.cfg, run.state
    last = st.step >= run.total_steps or st.epoch >= cfg.training.epochs
    v_every, c_every = cfg.validation.every_steps, cfg.checkpoint.every_steps
    validate = last or (v_every and st.step % v_every == 0) or (not v_every and epoch_done)
    checkpoint = last or (c_every and st.step % c_every == 0) or (not c_every and epoch_done)
    is_best = early_stop = False
    if validate:
        is_best, early_stop = run_validation(run)
    stop_now = stop_agreed(run, stopper, poll=bool(last or validate or checkpoint or st.step % cfg.monitor.log_every_steps == 0))
    if checkpoint or is_best or stop_now or early_stop:
        save_checkpoint(run, is_best=is_best, wait=last or stop_now or early_stop)
    if stop_now:
        return f"stopped ({stopper.reason or 'on another rank'})"
    if early_stop:
        return "early stopping"
    return None


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description="Train a ViT image tagger from images with sidecar JSON tags.")
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from the run's newest checkpoint or a given one")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start from these weights (model.init_from): a released WD tagger folder (head matched by tag name), a checkpoint folder or timm-layout ViT weights",
    )
    p.add_argument("--accept-schedule-change", action="store_true", help="resume even if batch size, epochs or learning rate changed")
    p.add_argument(
        "--accept-data-change", action="store_true", help="resume even if training samples were added or removed (the interrupted epoch starts over)"
    )
    p.add_argument(
        NEW_FOLDER_FLAG,
        dest="new_run_folder",
        action="store_true",
        help="when the run folder already holds a run, start this fresh run in NAME-2, NAME-3, ... instead",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Wire the phases: config, run folder, data, fit to the machine, model, resume, loop, report."""
    args = parse_args(argv)
    try:
        # --init-from is model.init_from (so the config check and config.yaml see it)
        init_override = [f"model.init_from={args.init_from}"] if args.init_from else []
        cfg = load_config(args.config, [*args.set, *init_override])
        absolute_data_paths(cfg)  # so the checkpoint's config finds the data from any working directory
        check_output_locations(cfg)  # nothing is ever written inside the dataset
        if args.new_run_folder and args.resume:
            raise ConfigError(f"{NEW_FOLDER_FLAG} starts a fresh run; it cannot be combined with --resume")
        dist, device = init_distributed(cfg.training.device)
        workers = resolve_num_workers(cfg)
        resume_dir = find_resume_checkpoint(args.resume, cfg.run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # one process per run folder, and no fresh run into an earlier run's folder
        claim = claim_run_folder(
            cfg.run_dir,
            resume=resume_dir is not None,
            new_folder=args.new_run_folder,
            rank=dist.rank,
            share=broadcast_from_rank0 if dist.world_size > 1 else None,
            log=print if dist.is_main else None,
        )
    except RunLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg.experiment_name = claim.run_dir.name  # NAME-2 with --new-run-folder
    if dist.is_main:
        print(f"run: {display_path(claim.run_dir)} (run id {claim.run_id}); {workers}")
        if claim.note:
            print(claim.note)
    try:
        prepared = prepare_run(args, cfg, dist, device, claim, resume_dir)
    except BaseException:
        claim.abandon()
        raise
    if isinstance(prepared, int):  # a setup error, already printed: the folder is left as it was
        claim.abandon()
        return prepared
    try:
        return run_training(prepared, args)
    finally:
        claim.release()


def prepare_run(
    args: argparse.Namespace, cfg: RootConfig, dist: Distributed, device: torch.device, claim: RunClaim, resume_dir: Path | None
) -> TrainingRun | int:
    """Data, memory check, model, micro-batch split, session and resume; an exit code on a setup
    error (printed in one line)."""
    try:
        resume_state = load_training_state(resume_dir) if resume_dir is not None else None
        saved = saved_plan(resume_state)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed_everything(cfg.training.seed + dist.rank)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = cfg.run_dir
    try:
        data = prepare_data(
            cfg, run_dir, rank=dist.rank, world_size=dist.world_size, resume=resume_dir is not None, log=print if dist.is_main else None
        )
        model_cfg = model_config(cfg, data)
        box = [cpu_memory_message(cfg, device, model_cfg, saved) if dist.is_main else None]  # before the model exists
    except (ConfigError, FileNotFoundError, ValueError, DataQualityError, ShardUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist.world_size > 1:
        broadcast_from_rank0(box)
    if box[0] is not None:
        print(f"error: {box[0]}", file=sys.stderr)
        return 2

    raw_model = build_tagger(model_cfg).to(device)
    if cfg.model.init_from and resume_dir is None:
        try:
            line, record = init_model_weights(raw_model, data.vocab, cfg.model.init_from)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"init: {line}")
        data.report["init_from"] = record
        if data.report_path is not None:  # the main process's copy of the report
            write_data_report(data.report_path, data.report)
    try:
        train_sampler = build_train_sampler(cfg, data, rank=dist.rank, world_size=dist.world_size, log=print if dist.is_main else None)
    except ValueError as exc:  # e.g. a batch larger than the training split
        print(f"error: data.batch_size={cfg.data.batch_size}: {exc}; lower it or add data", file=sys.stderr)
        return 2
    per_epoch = steps_per_epoch(train_sampler.full_batches_per_epoch(), cfg.training.grad_accum_steps)
    total_steps = total_optimizer_steps(cfg, per_epoch)
    step_fn = build_step(cfg, dist, device, data, raw_model, total_steps)
    try:
        step_fn.plan, how = choose_micro_batches(cfg, device, step_fn, saved)
    except MicroBatchPlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg.training.micro_batch_size = step_fn.plan.micro_batch  # the resolved split, in config.yaml and checkpoints
    run = build_session(
        cfg,
        dist,
        device,
        data,
        step_fn,
        train_sampler,
        total_steps,
        per_epoch,
        claim,
        resume_step=None if resume_state is None else resume_state["run_state"]["step"],
    )
    if resume_dir is not None:
        try:
            restore_checkpoint(run, resume_dir, resume_state, args)
        except (ConfigError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    step_fn.on_replan = partial(note_replan, run)
    if dist.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(
            f"model: {cfg.model.preset + ' ' if cfg.model.family == 'vit' else ''}{raw_model.cfg.describe()}, {n_params / 1e6:.2f}M parameters, "
            f"{len(data.vocab)} tags; device {device}, precision {run.amp.precision}; "
            f"{run.total_steps} steps ({run.steps_per_epoch}/epoch), lr {effective_learning_rate(cfg, dist.world_size):.3g}"
        )
    run.monitor.log_event(
        run.state.step, "micro_batches", **step_fn.plan.to_dict(), how=how, say=f"micro-batches: {describe_plan(step_fn.plan)} ({how})"
    )
    if dist.is_main:
        run.monitor.log_hparams(flat_hparams(cfg), {})
    return run


def note_replan(run: TrainingRun, plan: MicroBatchPlan, reason: str) -> None:
    """After an out-of-memory error the step split further: log it and record it in config.yaml."""
    run.cfg.training.micro_batch_size = plan.micro_batch
    run.monitor.log_event(
        run.state.step,
        "micro_batches",
        **plan.to_dict(),
        how=f"re-planned after: {reason}",
        say=f"micro-batches: out of memory ({reason}); now {describe_plan(plan)}",
    )
    if run.dist.is_main:
        atomic_write_text(run.cfg.run_dir / "config.yaml", dump_config(run.cfg))


def build_session(
    cfg: RootConfig,
    dist: Distributed,
    device: torch.device,
    data: DataBundle,
    step_fn: TrainStep,
    train_sampler: ShardedEpochSampler,
    total_steps: int,
    per_epoch: int,
    claim: RunClaim,
    resume_step: int | None,
) -> TrainingRun:
    """Loaders, checkpoint writer and monitor around the step."""
    monitor = TrainingMonitor(
        cfg.run_dir,
        enabled=dist.is_main,
        total_steps=total_steps,
        console_interval_s=cfg.monitor.console_interval_s,
        tensorboard=cfg.monitor.tensorboard,
        system_stats_interval_s=cfg.monitor.system_stats_interval_s,
        wandb={"project": cfg.monitor.wandb_project, "mode": cfg.monitor.wandb_mode, "name": cfg.experiment_name}
        if cfg.monitor.wandb_project
        else None,
        resume_step=resume_step,
    )
    background = CheckpointTimings(ThreadSafeMetricsTracker())
    record = read_run_record(claim.run_dir) if dist.is_main else None
    ckpt = CheckpointManager(checkpoints_dir(cfg.run_dir), keep_last=cfg.checkpoint.keep_last, owns=partial(is_own_checkpoint, run_id=claim.run_id))
    return TrainingRun(
        cfg=cfg,
        dist=dist,
        device=device,
        data=data,
        step_fn=step_fn,
        optimizer=step_fn.amp.optimizer,
        sampler=train_sampler,
        failures=data.failure_tracker(cfg.data.max_bad_fraction),
        best=BestMetric(cfg.validation.selection_metric),
        early_stopping=EarlyStopping(cfg.validation.early_stopping_patience, cfg.validation.early_stopping_min_delta),
        writer=AsyncCheckpointWriter(ckpt, enabled=cfg.checkpoint.async_write, on_written=background.record_write),
        monitor=monitor,
        background=background.tracker,
        train_loader=build_dataloader(
            data.train_dataset,
            train_sampler,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and device.type == "cuda",
            drop_last=True,
            prefetch_factor=cfg.data.prefetch_factor,
            persistent_workers=cfg.data.persistent_workers,
            multiprocessing_context=cfg.data.worker_start_method or None,
            generator_seed=cfg.training.seed,
        ),
        val_loader=build_eval_loader(cfg, data, rank=dist.rank, world_size=dist.world_size),
        total_steps=total_steps,
        steps_per_epoch=per_epoch,
        run_record=run_record_text(record) if record is not None else "",
        sample_log=SampleLog(cfg.run_dir, dist.rank, as_table(data.train_records).sample_id, resume_step) if cfg.monitor.sample_log else None,
    )


def run_training(run: TrainingRun, args: argparse.Namespace) -> int:
    """The loop with its stop handling, then the closing report; the process exit code."""
    stopper = GracefulStopper(run.cfg.run_dir / "STOP").install()
    outcome = "failed"
    try:
        outcome = train(run, stopper)
    except NonFiniteTrainingError as exc:
        save_checkpoint(run, is_best=False, wait=True)  # the weights are the last good ones: skipped steps changed nothing
        print(f"error: {exc}; saved the last good state to {checkpoints_dir(run.cfg.run_dir)}", file=sys.stderr)
        return 3
    except (DataQualityError, ShardUnavailableError) as exc:  # the data ran out of good samples, or its storage went away
        save_checkpoint(run, is_best=False, wait=True)
        print(f"error: {short_error(exc)}", file=sys.stderr)
        return 3
    finally:
        stopper.uninstall()
        run.writer.wait()
        run.monitor.log_event(run.state.step, "end", outcome=outcome, say=end_line(run, outcome))
        run.monitor.close()
        if run.sample_log is not None:
            run.sample_log.close()
        if run.dist.world_size > 1:
            tdist.destroy_process_group()
    if run.dist.is_main:
        record_worker_failures(run)
        report_end(run, outcome, args)
    return 0


def record_worker_failures(run: TrainingRun) -> None:
    """Add the samples that failed inside workers (and were replaced) to data_report.json."""
    run.failures.write_report()
    if run.failures.failed:
        print(
            f"data: {run.failures.failed} samples failed in workers and were replaced "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(run.failures.by_reason.items()))})"
        )


def end_line(run: TrainingRun, outcome: str) -> str:
    """The console sentence of the run's end event: what happened and the best checkpoint's score."""
    best_value = run.best.value if run.best.value is not None else float("nan")
    return f"done: {outcome} at step {run.state.step}/{run.total_steps}; best {run.best.name} {best_value:.4f} at step {run.best.step}"


def report_end(run: TrainingRun, outcome: str, args: argparse.Namespace) -> None:
    """The closing lines after the end event: how to resume or evaluate."""
    run_dir = run.cfg.run_dir
    if outcome.startswith("stopped"):
        named = [f"--set experiment_name={run.cfg.experiment_name}"] if args.new_run_folder else []  # NAME-2
        cmd = " ".join(
            [python_command(), "train_direct.py"]
            + (["--config", str(args.config)] if args.config else [])
            + [f"--set {s}" for s in args.set]
            + named
            + ["--resume", "latest"]
        )
        print(f"resume with: {cmd}")
    best = checkpoints_dir(run_dir) / BEST_POINTER
    if best.is_file():
        print(f"evaluate with: {python_command()} validation_loop.py --checkpoint {display_path(best)} --out {display_path(run_dir / 'eval')}")


if __name__ == "__main__":
    exit_process(main())
