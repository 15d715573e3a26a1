"""The training step's pieces built from the config: model shape, loss, optimizer, schedule, the step.

`train_direct.main` calls these once per run. They also define the schedule a checkpoint records
(`schedule_signature`) and what a resume with another schedule must accept
(`check_resume_compatible`). Imports point down only: config, data bundle, model, loss, schedules
and the training machinery; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from Configuration_System import ConfigError, RootConfig
from data_setup import DataBundle
from layer_decay import param_groups_layer_decay
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss, tag_weights_from_frequencies
from micro_batching import injected_oom_limit
from model_architecture import SimplifiedTagger, VisionTransformerConfig, param_groups_for_weight_decay
from process_group import Distributed
from schedulers import CosineAnnealingWarmupRestarts, LinearWarmupCosineLR
from training_utils import GuardedOptimizerStep, ModelEma, TrainStep

# Config keys whose change alters the schedule, the data order or the loss of a resumed run.
SCHEDULE_KEYS = (
    "data.batch_size",
    "training.grad_accum_steps",
    "training.epochs",
    "training.max_steps",
    "training.learning_rate",
    "training.lr_scaling",
    "training.scheduler",
    "training.warmup_steps",
    "training.warmup_ratio",
    "training.min_lr_ratio",
    "training.seed",
    "training.layer_decay",  # the optimizer's parameter groups
    "data.repeat_factor_threshold",  # the epoch's length and order
    "data.progressive_image_size",
    "data.progressive_share",
    "loss.gamma_neg",  # the tag loss itself: a resumed run must not switch losses silently
    "loss.gamma_pos",
    "loss.clip",
)
# Schedule keys newer than the first checkpoints, with the value those checkpoints were trained with.
SCHEDULE_KEYS_ADDED_LATER: dict[str, Any] = {
    "training.layer_decay": 1.0,
    "data.repeat_factor_threshold": 0.0,
    "data.progressive_image_size": 0,
    "data.progressive_share": 0.7,
    # the asymmetric focal loss was the default until plain BCE replaced it
    "loss.gamma_neg": 4.0,
    "loss.gamma_pos": 0.0,
    "loss.clip": 0.05,
}


def train_image_size(cfg: RootConfig, epoch: int, steps_per_epoch: int, total_steps: int) -> int:
    """The training resolution of `epoch`: data.progressive_image_size for the epochs that start
    before progressive_share of the run's optimizer steps, then data.image_size. A function of the
    epoch and the schedule only, so a resumed run switches where the uninterrupted one did."""
    small = cfg.data.progressive_image_size
    if small and epoch * steps_per_epoch < cfg.data.progressive_share * total_steps:
        return small
    return cfg.data.image_size


def effective_learning_rate(cfg: RootConfig, world_size: int) -> float:
    """learning_rate scaled by effective batch / reference batch (none, linear or sqrt rule)."""
    t = cfg.training
    ratio = cfg.data.batch_size * t.grad_accum_steps * world_size / t.reference_batch_size
    if t.lr_scaling == "linear":
        return t.learning_rate * ratio
    if t.lr_scaling == "sqrt":
        return t.learning_rate * math.sqrt(ratio)
    return t.learning_rate


def steps_per_epoch(batches_per_epoch: int, accum: int) -> int:
    """Optimizer steps in one epoch (a partial accumulation window at the end counts as one)."""
    return math.ceil(batches_per_epoch / accum)


def total_optimizer_steps(cfg: RootConfig, per_epoch: int) -> int:
    """Optimizer steps of the whole run (epochs x steps per epoch, capped by max_steps)."""
    total = cfg.training.epochs * per_epoch
    return min(total, cfg.training.max_steps) if cfg.training.max_steps else total


def model_config(cfg: RootConfig, data: DataBundle) -> VisionTransformerConfig:
    """The tagger's shape, its tag-head biases at the log-odds of each tag's training frequency."""
    m = cfg.model
    overrides = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth), ("num_heads", m.num_heads)) if v}
    freqs = data.vocab.frequencies_array()
    n_train = max(1, len(data.train_records))
    model_cfg = VisionTransformerConfig.from_preset(
        m.preset,
        image_size=cfg.data.image_size,
        patch_size=m.patch_size,
        num_tags=len(data.vocab),
        mlp_ratio=m.mlp_ratio,
        drop_path_rate=m.drop_path_rate,
        layer_scale_init=m.layer_scale_init or None,
        pooling=m.pooling,
        grad_checkpoint_every=m.grad_checkpoint_every,
        tag_bias_init=[f / n_train for f in freqs],
        **overrides,
    )
    return model_cfg


def build_loss(cfg: RootConfig, data: DataBundle, device: torch.device) -> MultiTaskLoss:
    """Asymmetric focal loss for tags plus rating cross-entropy."""
    lc = cfg.loss
    weights = None
    if lc.tag_weighting != "none":
        weights = tag_weights_from_frequencies(data.vocab.frequencies_array(), len(data.train_records), lc.tag_weighting).to(device)
    tag_loss = AsymmetricFocalLoss(gamma_neg=lc.gamma_neg, gamma_pos=lc.gamma_pos, clip=lc.clip, eps=lc.eps, tag_weights=weights)
    return MultiTaskLoss(tag_loss, tag_weight=lc.tag_weight, rating_weight=lc.rating_weight, rating_label_smoothing=lc.rating_label_smoothing).to(
        device
    )


def build_scheduler(cfg: RootConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured learning-rate schedule, stepped once per optimizer update."""
    t = cfg.training
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    if t.scheduler == "cosine_restarts":
        period = t.restart_period_steps or max(1, total_steps // 4)
        return CosineAnnealingWarmupRestarts(
            optimizer,
            first_cycle_steps=period,
            warmup_steps=min(warmup, period - 1),
            cycle_mult=t.restart_period_mult,
            gamma=t.restart_decay,
            min_lr_ratio=t.min_lr_ratio,
        )
    return LinearWarmupCosineLR(optimizer, warmup_steps=min(warmup, total_steps), total_steps=total_steps, min_lr_ratio=t.min_lr_ratio)


def schedule_signature(cfg: RootConfig, world_size: int) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint to continue the same schedule."""
    sig = {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        sig[key] = getattr(getattr(cfg, section), name)
    sig["world_size"] = world_size
    return sig


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], accept: bool) -> list[str]:
    """Refuse (or, with accept, list) schedule changes between a checkpoint and this run."""
    saved = {**SCHEDULE_KEYS_ADDED_LATER, **saved}  # a checkpoint older than a key ran with its then-only value
    changes = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changes and not accept:
        raise ConfigError(
            "resuming would change the schedule ("
            + "; ".join(changes)
            + "). Use the checkpoint's settings, or pass --accept-schedule-change to continue with the new ones"
        )
    return changes


def build_step(
    cfg: RootConfig, dist: Distributed, device: torch.device, data: DataBundle, raw_model: SimplifiedTagger, total_steps: int
) -> TrainStep:
    """Optimizer, schedule, loss, EMA and the step around a built model (unsplit until planned)."""
    model: torch.nn.Module = raw_model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.model.compile:
        model = torch.compile(model)
    lr = effective_learning_rate(cfg, dist.world_size)
    if cfg.training.layer_decay < 1.0:  # group 0 is the heads at the full rate: the logged lr stays the schedule's
        groups = param_groups_layer_decay(raw_model, cfg.training.weight_decay, cfg.training.layer_decay, base_lr=lr)
    else:
        groups = param_groups_for_weight_decay(raw_model, cfg.training.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(cfg.training.beta1, cfg.training.beta2), fused=True)
    return TrainStep(
        model,
        raw_model,
        build_loss(cfg, data, device),
        GuardedOptimizerStep(optimizer, device, cfg.training.precision, cfg.training.grad_clip),
        build_scheduler(cfg, optimizer, total_steps),
        ModelEma(raw_model, cfg.training.ema_decay, cfg.training.ema_warmup_steps) if cfg.training.ema_decay else None,
        device,
        # An out-of-memory error splits further and retries (one process: DDP ranks cannot retry alone).
        adaptive=cfg.training.micro_batch_size == 0 and dist.world_size == 1,
        fault_limit=injected_oom_limit(),
    )
