"""Vision Transformer tagger: config, transformer block, `SimplifiedTagger`, and timm-layout weight import.

This module owns the network definition (patch embedding, class token, learned position embedding,
pre-norm transformer blocks, tag and rating heads), position-embedding resampling, the AdamW
weight-decay parameter split, and `load_pretrained_backbone`, which fills the backbone from a ViT
state dict in timm's layout. Our parameter names follow timm's (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`,
`norm`) so that the import is a rename-free copy. It imports none of the project's other modules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "PRESETS",
    "VisionTransformerConfig",
    "DropPath",
    "LayerScale",
    "Attention",
    "Mlp",
    "TransformerBlock",
    "PatchEmbed",
    "SimplifiedTagger",
    "TaggerHeads",
    "HEAD_PREFIXES",
    "as_frequency_tuple",
    "check_tag_bias_init",
    "set_bias_from_frequencies",
    "resample_pos_embed",
    "param_groups_for_weight_decay",
    "LoadReport",
    "load_pretrained_backbone",
]

# (embed_dim, depth, num_heads) of the standard ViT sizes (timm / DeiT naming).
PRESETS: Dict[str, Tuple[int, int, int]] = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}

# Probabilities are clamped to this range before the logit so that a tag seen in every image (or
# never) gets a large but finite bias (about +-13.8) instead of +-inf.
TAG_BIAS_PROB_FLOOR = 1e-6

# timm's ViT uses LayerNorm(eps=1e-6); the same eps keeps imported weights numerically identical.
LAYER_NORM_EPS = 1e-6

NUM_PREFIX_TOKENS = 1  # the class token

# Parameter-name prefixes of the two heads; everything else is the body (frozen by set_body_frozen).
HEAD_PREFIXES: Tuple[str, ...] = ("tag_head.", "rating_head.")


def as_frequency_tuple(values: Optional[Sequence[float]]) -> Optional[Tuple[float, ...]]:
    """A tag_bias_init value (sequence or tensor of per-tag frequencies) as a tuple of floats, None kept."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return tuple(float(v) for v in values.detach().cpu().reshape(-1).tolist())
    return tuple(float(v) for v in values)


def check_tag_bias_init(values: Optional[Sequence[float]], num_tags: int, owner: str) -> None:
    """ValueError (naming `owner`) unless values is None or num_tags frequencies in [0, 1]."""
    if values is None:
        return
    if len(values) != num_tags:
        raise ValueError(f"{owner}.tag_bias_init has {len(values)} values, expected num_tags={num_tags}")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"{owner}.tag_bias_init must hold per-tag frequencies in [0, 1] (positive count / number of images), got e.g. {bad[0]!r}")


@torch.no_grad()
def set_bias_from_frequencies(head: nn.Linear, frequencies: Sequence[float]) -> None:
    """Set a tag head's bias to logit(p) of per-tag frequencies p (clamped), so sigmoid(bias) = p at start."""
    probs = torch.as_tensor(list(frequencies), dtype=torch.float64)
    if probs.shape != (head.out_features,):
        raise ValueError(f"tag frequencies have shape {tuple(probs.shape)}, expected ({head.out_features},)")
    probs = probs.clamp(TAG_BIAS_PROB_FLOOR, 1.0 - TAG_BIAS_PROB_FLOOR)
    head.bias.copy_(torch.log(probs / (1.0 - probs)).to(head.bias.dtype))


@dataclass
class VisionTransformerConfig:
    """Shape and regularisation settings of a `SimplifiedTagger` (stored in checkpoints via to_dict)."""

    image_size: int = 224
    patch_size: int = 16
    num_tags: int = 1000
    num_ratings: int = 4
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    pooling: str = "cls"
    qkv_bias: bool = True
    grad_checkpoint_every: int = 0
    tag_bias_init: Optional[Tuple[float, ...]] = field(default=None)

    def __post_init__(self) -> None:
        """Normalise field types and validate; raises ValueError naming the bad field and value."""
        self.tag_bias_init = as_frequency_tuple(self.tag_bias_init)
        self.validate()

    def validate(self) -> None:
        """Check sizes and options; raises ValueError naming the field and its value."""
        for name in ("image_size", "patch_size", "num_tags", "num_ratings", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VisionTransformerConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"VisionTransformerConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"VisionTransformerConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"VisionTransformerConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not (0.0 <= float(self.drop_path_rate) < 1.0):
            raise ValueError(f"VisionTransformerConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.layer_scale_init is not None and not (isinstance(self.layer_scale_init, (int, float)) and self.layer_scale_init > 0):
            raise ValueError(f"VisionTransformerConfig.layer_scale_init must be None or > 0, got {self.layer_scale_init!r}")
        if self.pooling not in ("cls", "avg"):
            raise ValueError(f"VisionTransformerConfig.pooling must be 'cls' or 'avg', got {self.pooling!r}")
        if isinstance(self.grad_checkpoint_every, bool) or not isinstance(self.grad_checkpoint_every, int) or self.grad_checkpoint_every < 0:
            raise ValueError(f"VisionTransformerConfig.grad_checkpoint_every must be an int >= 0, got {self.grad_checkpoint_every!r}")
        check_tag_bias_init(self.tag_bias_init, self.num_tags, "VisionTransformerConfig")

    def describe(self) -> str:
        """Our ViT's width x depth, for the training log (after the preset's name)."""
        return f"{self.embed_dim}x{self.depth}"

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patch grid (rows, cols) at the configured image size."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at the configured image size."""
        rows, cols = self.grid_size
        return rows * cols

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VisionTransformerConfig":
        """Build a config from a named ViT size (tiny|small|base|large); any field may be overridden."""
        key = str(name).lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        embed_dim, depth, num_heads = PRESETS[key]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown VisionTransformerConfig field(s) {unknown} in overrides for preset {name!r}")
        # None means "not set" so a caller can pass optional CLI values straight through.
        values: Dict[str, Any] = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-type dict (JSON/YAML/safetensors-metadata friendly) of every field."""
        out = asdict(self)
        if out["tag_bias_init"] is not None:
            out["tag_bias_init"] = list(out["tag_bias_init"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VisionTransformerConfig":
        """Rebuild a config from `to_dict()` output; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionTransformerConfig key(s) {unknown}")
        return cls(**dict(data))


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability drop_prob, rescale the rest."""
    if drop_prob <= 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        """Store the per-sample drop probability."""
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply stochastic depth to x of any shape (B, ...)."""
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        """Show the rate in print(model)."""
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (CaiT); parameter named `gamma` as in timm."""

    def __init__(self, dim: int, init_value: float) -> None:
        """Create gamma of shape (dim,) filled with init_value."""
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the last dimension of x (B, N, C)."""
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        """Create the fused qkv and output projections."""
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_queries: Optional[int] = None) -> torch.Tensor:
        """Self-attention of x (B, N, C) -> (B, N, C); with num_queries=n only the first n tokens query -> (B, n, C)."""
        batch, tokens, channels = x.shape
        # Layout (3, B, H, N, D) matches timm's qkv weight order, so imported weights need no permutation.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        if num_queries is not None:
            # Each query row is computed independently, so the kept rows equal the full call's rows.
            q = q[:, :, :num_queries]  # (B, H, n, D)
            tokens = num_queries
        # No mask and no dropout: keeps the call eligible for the flash / memory-efficient kernels.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, n, D)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)  # (B, n, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network (fc1 -> GELU -> fc2), timm's naming."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        """Create fc1 (dim -> hidden_dim) and fc2 (hidden_dim -> dim)."""
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward on x (B, N, C) -> (B, N, C)."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(MLP(LN(x))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = None,
    ) -> None:
        """Create norms, attention, MLP, optional LayerScale and DropPath."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_queries: Optional[int] = None) -> torch.Tensor:
        """Apply the block to tokens x (B, N, C) -> (B, N, C), or only the first num_queries outputs (B, n, C)."""
        # Every token but the attention's keys/values is computed on its own, so outputs nobody reads
        # (the patch tokens of the last block under class-token pooling) can be skipped exactly.
        shortcut = x if num_queries is None else x[:, :num_queries]  # (B, n, C)
        x = shortcut + self.drop_path1(self.ls1(self.attn(self.norm1(x), num_queries)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding; `proj` named as in timm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        """Create the stride-patch convolution."""
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> patch grid (B, C, H/p, W/p)."""
        return self.proj(x)


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int], num_prefix_tokens: int = NUM_PREFIX_TOKENS
) -> torch.Tensor:
    """Bicubically resample the grid part of pos_embed (1, P + Ho*Wo, C) to (1, P + Hn*Wn, C), prefix kept."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix = pos_embed[:, :num_prefix_tokens]  # (1, P, C)
    grid = pos_embed[:, num_prefix_tokens:]  # (1, Ho*Wo, C)
    channels = grid.shape[-1]
    orig_dtype = grid.dtype
    # Same recipe as timm's resample_abs_pos_embed (float32, bicubic, antialias, align_corners=False),
    # so our resampled grid equals theirs and imported models behave like timm's at any size.
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)  # (1, C, Ho, Wo)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], channels).to(orig_dtype)  # (1, Hn*Wn, C)
    return torch.cat([prefix, grid], dim=1)


class TaggerHeads(nn.Module):
    """What both model families share: the `tag_head` and `rating_head` on the pooled features of
    the subclass's body (its `forward_pooled`), and the body freeze (train only the heads)."""

    _body_frozen = False

    def init_tag_bias(self, frequencies: Optional[Sequence[float]]) -> None:
        """Set the tag-head bias to logit(p) of per-tag frequencies p (clamped), so sigmoid(bias) = p at start."""
        if frequencies is not None:
            set_bias_from_frequencies(self.tag_head, frequencies)

    def set_grad_checkpointing(self, every: int) -> None:
        """Checkpoint block i when i % every == 0 during training (0 = off, 1 = all blocks, 2 = every
        other; a timm model checkpoints every block for any every > 0)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"grad checkpoint interval must be an int >= 0, got {every!r}")
        self.cfg.grad_checkpoint_every = every

    @property
    def body_frozen(self) -> bool:
        """Whether only the heads train (set_body_frozen)."""
        return self._body_frozen

    def set_body_frozen(self, frozen: bool) -> None:
        """Freeze everything but the heads: the body runs in eval mode (no dropout, stochastic depth or
        norm statistics) and without autograd, so its parameters get no gradient (AdamW then neither
        updates, decays nor keeps state for them)."""
        self._body_frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TaggerHeads":
        """nn.Module.train, keeping a frozen body in eval mode."""
        super().train(mode)
        if mode and self._body_frozen:
            for name, child in self.named_children():
                if name not in ("tag_head", "rating_head"):
                    child.train(False)
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> {"tag_logits": (B, T), "rating_logits": (B, R)}."""
        if self._body_frozen and torch.is_grad_enabled():
            with torch.no_grad():  # a frozen body keeps no activations for backward
                pooled = self.forward_pooled(images)  # (B, C)
        else:
            pooled = self.forward_pooled(images)  # (B, C)
        return {"tag_logits": self.tag_head(pooled), "rating_logits": self.rating_head(pooled)}


class SimplifiedTagger(TaggerHeads):
    """ViT backbone with a multi-label tag head and a content-rating head."""

    def __init__(self, cfg: VisionTransformerConfig) -> None:
        """Build the network from cfg and initialise it (timm-style truncated normal)."""
        super().__init__()
        # A private copy (validated again by __post_init__): set_grad_checkpointing must not edit the caller's config.
        self.cfg = replace(cfg)
        cfg = self.cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + cfg.num_patches, dim))  # (1, 1+N, C)
        # Linearly increasing stochastic-depth rate over depth (DeiT / timm rule).
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path=rates[i], layer_scale_init=cfg.layer_scale_init
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.tag_head = nn.Linear(dim, cfg.num_tags)
        self.rating_head = nn.Linear(dim, cfg.num_ratings)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style init: trunc-normal(0.02) linears and pos_embed, tiny cls token, tag-prior head bias."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale) and self.cfg.layer_scale_init is not None:
                nn.init.constant_(module.gamma, float(self.cfg.layer_scale_init))
        self.init_tag_bias(self.cfg.tag_bias_init)

    def _grid_of(self, images: torch.Tensor) -> Tuple[int, int]:
        """Patch grid of a batch; raises ValueError when the image is not (B, 3, H, W) with H, W multiples of p."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        patch = self.cfg.patch_size
        height, width = images.shape[-2], images.shape[-1]
        if height % patch != 0 or width % patch != 0:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch}")
        return height // patch, width // patch

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> all tokens after the final norm (B, 1 + N, C)."""
        return self._encode(images, None)

    def _encode(self, images: torch.Tensor, last_block_outputs: Optional[int]) -> torch.Tensor:
        """Embed and run the blocks; the last block returns only its first last_block_outputs tokens when set."""
        grid = self._grid_of(images)
        x = self.patch_embed(images)  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        pos_embed = resample_pos_embed(self.pos_embed, grid, self.cfg.grid_size)  # (1, 1+N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + pos_embed  # (B, 1+N, C)
        every = self.cfg.grad_checkpoint_every
        use_checkpoint = every > 0 and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            num_queries = last_block_outputs if index == last else None
            if use_checkpoint and index % every == 0:
                x = torch.utils.checkpoint.checkpoint(block, x, num_queries, use_reentrant=False)
            else:
                x = block(x, num_queries)
        return self.norm(x)  # (B, 1 + N, C), or (B, n, C) with last_block_outputs=n

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + N, C) -> image embedding (B, C): the class token or the mean of patch tokens."""
        if self.cfg.pooling == "avg":
            return tokens[:, NUM_PREFIX_TOKENS:].mean(dim=1)
        return tokens[:, 0]

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> image embedding (B, C); equals pool(forward_features(images))."""
        # Class-token pooling reads one token: the last block skips the attention queries, MLP and norm
        # of the patch tokens (about 3/4 of that block's FLOPs, which timm's ViT computes and discards).
        keep = NUM_PREFIX_TOKENS if self.cfg.pooling == "cls" else None
        return self.pool(self._encode(images, keep))

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """State dict without the heads, in timm's ViT key layout."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(HEAD_PREFIXES)}


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decay on weight matrices/kernels; none on biases, norms, LayerScale, pos_embed, cls_token."""
    no_decay_names = ("pos_embed", "cls_token")
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D tensors are biases, norm affine parameters and LayerScale gammas.
        if param.ndim <= 1 or name.split(".")[-1] in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class LoadReport:
    """What `load_pretrained_backbone` did: keys loaded, ours left fresh, theirs unused, shape mismatches."""

    path: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One-paragraph human summary for logs."""
        lines = [
            f"pretrained backbone {self.path}: loaded {len(self.loaded)} tensors, "
            f"{len(self.missing)} missing (left at init), {len(self.unused)} unused, "
            f"{len(self.mismatched)} shape mismatches"
        ]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  mismatch: {k} ours {ours} theirs {theirs}" for k, ours, theirs in self.mismatched]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """Plain-type dict for JSON run reports."""
        return {
            "path": self.path,
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unused": list(self.unused),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "notes": list(self.notes),
        }


# Keys under which training scripts commonly nest the model state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`).
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a tensor dict from .safetensors or a torch pickle (weights_only); unwrap common wrappers."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported weight file type {suffix!r} for {path}; expected .safetensors, .pth or .pt")
    for _ in range(3):  # wrappers can nest, e.g. {"model": {"state_dict": ...}}
        if not isinstance(raw, Mapping):
            break
        inner = next((raw[k] for k in _WRAPPER_KEYS if k in raw and isinstance(raw[k], Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(raw).__name__})")
    state: Dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    stripped = True
        state[name] = value
    return state


def _square_grid(num_tokens: int) -> Optional[int]:
    """Side of a square grid with num_tokens cells, or None when num_tokens is not a perfect square."""
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens and side > 0 else None


def _convert_pos_embed(theirs: torch.Tensor, ours_shape: Tuple[int, ...], our_grid: Tuple[int, int], notes: List[str]) -> Optional[torch.Tensor]:
    """Map timm's pos_embed (1, [1+]M, C) onto our (1, 1 + N, C) grid; None when it cannot be mapped."""
    if theirs.ndim == 2:
        theirs = theirs.unsqueeze(0)
    if theirs.ndim != 3 or theirs.shape[0] != 1 or theirs.shape[-1] != ours_shape[-1]:
        return None
    tokens = theirs.shape[1]
    with_cls = _square_grid(tokens - NUM_PREFIX_TOKENS) if tokens > NUM_PREFIX_TOKENS else None
    if with_cls is not None:
        their_grid = (with_cls, with_cls)
        merged = theirs
    else:
        side = _square_grid(tokens)
        if side is None:
            return None
        # timm `no_embed_class` models (DeiT-3, big_vision): the class token has no position entry,
        # which equals a zero entry in our layout.
        their_grid = (side, side)
        merged = torch.cat([theirs.new_zeros(1, NUM_PREFIX_TOKENS, theirs.shape[-1]), theirs], dim=1)
        notes.append("pos_embed had no class-token slot (no_embed_class model); used zeros for it")
    if their_grid != tuple(our_grid):
        notes.append(f"pos_embed resampled from grid {their_grid[0]}x{their_grid[1]} to {our_grid[0]}x{our_grid[1]}")
    return resample_pos_embed(merged, tuple(our_grid), their_grid)


def load_pretrained_backbone(model: SimplifiedTagger, path: Union[str, Path]) -> LoadReport:
    """Fill model's backbone from a timm-layout ViT state dict file; heads stay fresh. Returns a LoadReport."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    return load_backbone_state(model, _read_state_dict(path), str(path))


def load_backbone_state(model: SimplifiedTagger, theirs: Mapping[str, torch.Tensor], origin: str) -> LoadReport:
    """Fill model's backbone from a timm-layout ViT state dict (named `origin` in messages); heads stay fresh."""
    report = LoadReport(path=origin)
    ours = model.state_dict()
    used: set = set()
    updates: Dict[str, torch.Tensor] = {}
    for key, target in ours.items():
        if key.startswith(("tag_head.", "rating_head.")):
            continue
        if key not in theirs:
            report.missing.append(key)
            continue
        source = theirs[key]
        used.add(key)
        if key == "pos_embed":
            converted = _convert_pos_embed(source, tuple(target.shape), model.cfg.grid_size, report.notes)
            if converted is None:
                report.mismatched.append((key, tuple(target.shape), tuple(source.shape)))
                continue
            source = converted
        elif key == "cls_token" and source.ndim == 2:
            source = source.reshape(target.shape) if source.numel() == target.numel() else source
        if tuple(source.shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(target.shape), tuple(source.shape)))
            continue
        updates[key] = source
        report.loaded.append(key)
    report.unused = sorted(k for k in theirs if k not in used)
    if not updates:
        raise ValueError(
            f"no usable ViT backbone weights in {origin}: {len(theirs)} tensors, none matching our timm-layout "
            f"names and shapes (mismatched: {[k for k, _, _ in report.mismatched][:5]}, "
            f"their keys e.g. {sorted(theirs)[:5]})"
        )
    layer_scale_keys = [k for k in report.unused if k.endswith((".ls1.gamma", ".ls2.gamma"))]
    if layer_scale_keys:
        report.notes.append(
            "checkpoint has LayerScale weights but the model has layer_scale_init=None; "
            "set layer_scale_init to use them, else the imported blocks behave differently"
        )
    if "blocks.0.attn.qkv.bias" in report.missing and "blocks.0.attn.qkv.weight" in report.loaded:
        report.notes.append("checkpoint has no qkv bias (qkv_bias=False model); our qkv biases stay at zero")
    with torch.no_grad():
        for key, source in updates.items():
            ours[key].copy_(source.to(dtype=ours[key].dtype))
    return report
