"""The training step's pieces built from the config: model shape, loss, optimizer, schedule, the step.

`train_direct.main` calls these once per run. They also define the schedule a checkpoint records
(`schedule_signature`) and what a resume with another schedule must accept
(`check_resume_compatible`). Imports point down only: config, data bundle, model, loss, schedules
and the training machinery; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from Configuration_System import ConfigError, RootConfig
from data_setup import DataBundle
from layer_decay import param_groups
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss, tag_weights_from_frequencies
from micro_batching import injected_oom_limit
from model_architecture import VisionTransformerConfig
from process_group import Distributed
from schedulers import CosineAnnealingWarmupRestarts, LinearWarmupCosineLR
from tagger_init import timm_source
from timm_tagger import Tagger, TaggerConfig, TimmTaggerConfig, accepts_argument, input_size_error, timm_body
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
    "training.freeze_body_steps",  # which steps train the body
    "training.body_lr_scale",  # the optimizer's parameter groups
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
    "training.freeze_body_steps": 0,
    "training.body_lr_scale": 1.0,
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


def steps_after_resume(cfg: RootConfig, step: int, epoch: int, batches_left: int, per_epoch: int) -> int:
    """The run's last step after a resume that changed the batch layout or the data: the steps done, the rest of the
    current epoch (`batches_left` batches in this layout) and the epochs after it, capped by max_steps, so the
    interrupted epoch is finished whatever the new layout's steps per epoch."""
    total = step + steps_per_epoch(batches_left, cfg.training.grad_accum_steps) + max(0, cfg.training.epochs - epoch - 1) * per_epoch
    return min(total, cfg.training.max_steps) if cfg.training.max_steps else total


def total_optimizer_steps(cfg: RootConfig, per_epoch: int) -> int:
    """Optimizer steps of the whole run (epochs x steps per epoch, capped by max_steps)."""
    total = cfg.training.epochs * per_epoch
    return min(total, cfg.training.max_steps) if cfg.training.max_steps else total


def body_frozen_at(cfg: RootConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based) trains the heads alone (training.freeze_body_steps; -1: every step)."""
    n = cfg.training.freeze_body_steps
    return n == -1 or step < n


def timm_model_config(cfg: RootConfig, num_tags: int, tag_bias_init: list[float] | None) -> TimmTaggerConfig:
    """A timm-family run's model: the architecture of timm_source (config, release or checkpoint); img_size
    from data.image_size where the model takes one and model_args leave it out; dynamic_img_size where
    progressive resolution needs another input size. ValueError naming the key when the model cannot take
    data.image_size or data.progressive_image_size (checked by a forward on the meta device)."""
    m, d = cfg.model, cfg.data
    source = timm_source(cfg)
    args = dict(source.model_args)
    probe = TimmTaggerConfig(source.architecture, args, num_tags=1, image_size=d.image_size)
    if source.origin == "config" and "img_size" not in args and accepts_argument(probe, "img_size"):
        args["img_size"] = d.image_size
        probe = replace(probe, model_args=args)
    error = input_size_error(probe, d.image_size)
    if error:
        raise ValueError(f"data.image_size={d.image_size}: timm model {source.architecture} {args} cannot take it ({error})")
    dynamic = False
    small = d.progressive_image_size
    if small:
        patch = getattr(getattr(timm_body(probe, device="meta"), "patch_embed", None), "patch_size", (1, 1))
        step = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        if small >= d.image_size or small % step:
            raise ValueError(
                f"data.progressive_image_size ({small}) must be a multiple of {source.architecture}'s patch size {step} below data.image_size ({d.image_size})"
            )
        if input_size_error(probe, small):  # a fixed-size model: timm's dynamic_img_size, where it has one
            dynamic = accepts_argument(probe, "dynamic_img_size") and not input_size_error(replace(probe, dynamic_img_size=True), small)
            if not dynamic:
                raise ValueError(
                    f"data.progressive_image_size={small}: timm model {source.architecture} takes only {d.image_size} px images "
                    "(no dynamic_img_size); it cannot train at another resolution: set data.progressive_image_size=0"
                )
    return TimmTaggerConfig(
        architecture=source.architecture,
        model_args=args,
        num_tags=num_tags,
        image_size=d.image_size,
        input_channels=source.input_channels,
        drop_path_rate=m.drop_path_rate,
        dynamic_img_size=dynamic,
        grad_checkpoint_every=m.grad_checkpoint_every,
        tag_bias_init=tag_bias_init,
    )


def model_config(cfg: RootConfig, data: DataBundle) -> TaggerConfig:
    """The tagger's shape (model.family), its tag-head biases at the log-odds of each tag's training frequency."""
    m = cfg.model
    freqs = data.vocab.frequencies_array()
    n_train = max(1, len(data.train_records))
    if m.family == "timm":
        return timm_model_config(cfg, len(data.vocab), [f / n_train for f in freqs])
    overrides = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth), ("num_heads", m.num_heads)) if v}
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


def build_step(cfg: RootConfig, dist: Distributed, device: torch.device, data: DataBundle, raw_model: Tagger, total_steps: int) -> TrainStep:
    """Optimizer, schedule, loss, EMA and the step around a built model (unsplit until planned)."""
    model: torch.nn.Module = raw_model
    t = cfg.training
    if dist.world_size > 1:
        # a frozen body gets no gradient: DDP must look for unused parameters during those steps
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=t.freeze_body_steps != 0
        )
    if cfg.model.compile:
        model = torch.compile(model)
    lr = effective_learning_rate(cfg, dist.world_size)
    # layered groups (layer_decay, body_lr_scale) put the heads first at the full rate: the logged lr stays the schedule's
    groups = param_groups(raw_model, t.weight_decay, t.layer_decay, base_lr=lr, body_lr_scale=t.body_lr_scale)
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
