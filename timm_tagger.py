"""The timm backbone family: any timm model as the body of a tagger, and the one builder of both families.

`TimmTagger` is `timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)`
(never downloads) plus our rating head (4) and tag head (T), with the interface the rest of the
code uses from `SimplifiedTagger`: `forward(images) -> {"tag_logits", "rating_logits"}`,
`forward_pooled`, `cfg`, `init_tag_bias`, `set_grad_checkpointing` (timm's own, every block),
`set_body_frozen` (train only the heads) and the parameter rules of the optimizer:
`weight_decay_flags` (timm's rule: no decay for 1-D tensors and the model's `no_weight_decay()`
names) and `layer_ids` (timm's own layer grouping, `group_matcher(coarse=False)`, as
`timm.optim.param_groups_layer_decay` assigns it, the heads with timm's classifier).

`input_channels="bgr"` reverses the channels of the (RGB, normalised) input before the body: the
WD v3 releases were trained on BGR images and their reference code flips RGB -> BGR after
normalising, so flipping our normalised RGB batch gives the release exactly the tensor it expects,
for any per-channel mean/std (the flip and the per-channel normalisation commute). The release's
weights stay untouched, so a run exports back to the release's own layout.

`TimmTaggerConfig` is stored in checkpoints (model_config.json, with "family": "timm");
`tagger_config_from_dict` reads either family's config (no "family" key: a `SimplifiedTagger`, as
every checkpoint before this family) and `build_tagger` builds the right class. timm itself
(about 2.5 s to import) is imported only when a timm model is built. It imports model_architecture.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from model_architecture import HEAD_PREFIXES, SimplifiedTagger, TaggerHeads, VisionTransformerConfig, as_frequency_tuple, check_tag_bias_init

__all__ = [
    "FAMILIES",
    "INPUT_CHANNELS",
    "TaggerConfig",
    "Tagger",
    "TimmTaggerConfig",
    "TimmTagger",
    "accepts_argument",
    "build_tagger",
    "checkpoint_filter",
    "fixed_input_size",
    "input_size_error",
    "tagger_config_from_dict",
    "timm_body",
    "timm_layer_ids",
    "timm_weight_decay_flags",
    "uniform_depth",
]

FAMILIES = ("vit", "timm")
INPUT_CHANNELS = ("rgb", "bgr")
# create_model arguments that are ours to set (or that would load or download weights).
_RESERVED_ARGS = {
    "num_classes": "the heads are ours (num_tags, num_ratings)",
    "pretrained": "weights come from model.init_from, never from a download",
    "pretrained_cfg": "weights come from model.init_from, never from a download",
    "pretrained_cfg_overlay": "weights come from model.init_from, never from a download",
    "checkpoint_path": "weights come from model.init_from",
    "cache_dir": "nothing downloads",
    "features_only": "a tagger needs the pooled features",
    "in_chans": "the pipeline feeds 3 channels",
    "drop_path_rate": "set TimmTaggerConfig.drop_path_rate (model.drop_path_rate)",
    "dynamic_img_size": "set TimmTaggerConfig.dynamic_img_size (progressive resolution sets it)",
    "device": "the trainer places the model",
    "dtype": "the trainer sets the precision",
}
_PLAIN = (type(None), bool, int, float, str)


def _check_plain(value: Any, where: str) -> None:
    """ValueError unless value is JSON-plain (None, bool, int, float, str, lists and str-keyed dicts of those)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise ValueError(f"{where} must be a number, string, bool, null, list or object, got {type(value).__name__}")


def _plain_copy(value: Any) -> Any:
    """A deep copy with tuples as lists (the JSON form, so a config compares equal after a round trip)."""
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_copy(v) for k, v in value.items()}
    return value


@dataclass
class TimmTaggerConfig:
    """A timm model named by architecture + model_args, with our heads; stored in checkpoints via to_dict."""

    architecture: str = ""
    model_args: Dict[str, Any] = field(default_factory=dict)
    num_tags: int = 1000
    num_ratings: int = 4
    image_size: int = 448  # the input size the run feeds (validation, probes); a fixed-size model must agree
    input_channels: str = "rgb"  # "bgr": reverse the channels before the body (WD v3 releases)
    drop_path_rate: float = 0.0  # stochastic depth for training (not part of the weights' layout)
    dynamic_img_size: bool = False  # timm's any-size input (progressive resolution), same outputs at image_size
    grad_checkpoint_every: int = 0  # > 0: timm's set_grad_checkpointing (every block)
    tag_bias_init: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        """Normalise field types and validate; raises ValueError naming the bad field and value."""
        self.tag_bias_init = as_frequency_tuple(self.tag_bias_init)
        if isinstance(self.model_args, Mapping):
            self.model_args = _plain_copy(self.model_args)
        self.validate()

    def validate(self) -> None:
        """Check every field; ValueError naming the field and its value."""
        if not isinstance(self.architecture, str) or not self.architecture.strip():
            raise ValueError(f"TimmTaggerConfig.architecture must be a timm model name, got {self.architecture!r}")
        if not isinstance(self.model_args, dict):
            raise ValueError(f"TimmTaggerConfig.model_args must be an object, got {type(self.model_args).__name__}")
        _check_plain(self.model_args, "TimmTaggerConfig.model_args")
        for key in self.model_args:
            if key in _RESERVED_ARGS:
                raise ValueError(f"TimmTaggerConfig.model_args may not set {key!r}: {_RESERVED_ARGS[key]}")
        for name in ("num_tags", "num_ratings", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TimmTaggerConfig.{name} must be a positive int, got {value!r}")
        if self.input_channels not in INPUT_CHANNELS:
            raise ValueError(f"TimmTaggerConfig.input_channels must be one of {INPUT_CHANNELS}, got {self.input_channels!r}")
        if isinstance(self.drop_path_rate, bool) or not isinstance(self.drop_path_rate, (int, float)) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"TimmTaggerConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if not isinstance(self.dynamic_img_size, bool):
            raise ValueError(f"TimmTaggerConfig.dynamic_img_size must be true or false, got {self.dynamic_img_size!r}")
        every = self.grad_checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"TimmTaggerConfig.grad_checkpoint_every must be an int >= 0, got {every!r}")
        check_tag_bias_init(self.tag_bias_init, self.num_tags, "TimmTaggerConfig")

    @property
    def family(self) -> str:
        """The backbone family this config builds ("timm")."""
        return "timm"

    def describe(self) -> str:
        """One line for the training log: the timm architecture and its arguments."""
        args = ", ".join(f"{k}={v}" for k, v in self.model_args.items())
        return f"timm {self.architecture}({args})" + (" BGR input" if self.input_channels == "bgr" else "")

    def create_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of timm.create_model: model_args, no classifier, no pretrained download."""
        # drop_path_rate always: timm's own defaults differ by family (SwinV2 trains with 0.1 unless told 0)
        kwargs: Dict[str, Any] = {
            **copy.deepcopy(self.model_args),
            "pretrained": False,
            "num_classes": 0,
            "drop_path_rate": float(self.drop_path_rate),
        }
        if self.dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        return kwargs

    def to_dict(self) -> Dict[str, Any]:
        """Plain-type dict (JSON friendly) of every field, with "family": "timm"."""
        out = asdict(self)
        out["model_args"] = _plain_copy(self.model_args)
        if out["tag_bias_init"] is not None:
            out["tag_bias_init"] = list(out["tag_bias_init"])
        return {"family": "timm", **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TimmTaggerConfig":
        """Rebuild from to_dict() output (untrusted: unknown keys and a wrong family raise ValueError)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a timm tagger config must be an object, got {type(data).__name__}")
        values = dict(data)
        family = values.pop("family", "timm")
        if family != "timm":
            raise ValueError(f"TimmTaggerConfig: family must be 'timm', got {family!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TimmTaggerConfig key(s) {unknown}")
        if "architecture" not in values:
            raise ValueError("TimmTaggerConfig: 'architecture' is missing")
        return cls(**values)


def timm_body(cfg: TimmTaggerConfig, device: Union[str, torch.device, None] = None) -> nn.Module:
    """timm.create_model(architecture, pretrained=False, num_classes=0, **model_args); ValueError naming a
    name timm does not know or an argument the architecture does not take. device="meta": no memory."""
    import timm  # here: 2.5 s of imports only a timm model pays

    if not timm.is_model(cfg.architecture):
        raise ValueError(f"timm {timm.__version__} has no model named {cfg.architecture!r} (TimmTaggerConfig.architecture)")
    try:
        if device is None:
            return timm.create_model(cfg.architecture, **cfg.create_kwargs())
        with torch.device(device):
            return timm.create_model(cfg.architecture, **cfg.create_kwargs())
    except TypeError as exc:  # an argument the model class does not take
        raise ValueError(f"timm model {cfg.architecture!r} rejects model_args {cfg.model_args}: {exc}") from None


def _unchanged(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A checkpoint filter that keeps the state as it is."""
    return state


def checkpoint_filter(body: nn.Module) -> Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]:
    """timm's own filter for loading a state dict into a model of this body's architecture (`checkpoint_filter_fn`
    of its module: e.g. position embeddings resampled to the model's img_size), or one that keeps the state."""
    module = importlib.import_module(type(body).__module__)
    found = getattr(module, "checkpoint_filter_fn", None)
    return found if callable(found) else _unchanged


def fixed_input_size(body: nn.Module) -> Optional[Tuple[int, int]]:
    """The (H, W) a timm model insists on (a strict patch embedding), None when it takes any size."""
    patch_embed = getattr(body, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if patch_embed is None or size is None or not getattr(patch_embed, "strict_img_size", False):
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def input_size_error(cfg: TimmTaggerConfig, size: int) -> str | None:
    """Why the model cannot take (B, 3, size, size) images, None when it can: a forward on the meta
    device (shapes only, no memory; timm asserts on a size a model cannot take)."""
    body = timm_body(cfg, device="meta").eval()
    try:
        with torch.no_grad():
            body(torch.empty(1, 3, size, size, device="meta"))
    except (AssertionError, RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'}"
    return None


def accepts_argument(cfg: TimmTaggerConfig, name: str) -> bool:
    """Whether the architecture's model class takes keyword `name` (a build on the meta device)."""
    body = timm_body(cfg, device="meta")
    return name in inspect.signature(type(body).__init__).parameters


def uniform_depth(cfg: TimmTaggerConfig) -> Optional[int]:
    """Blocks of a plain stack whose count the `depth` argument sets (ViT, EVA), None for staged models
    (SwinV2, ConvNeXt): what the memory probe extrapolates over."""
    body = timm_body(cfg, device="meta")
    blocks = getattr(body, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or "depth" not in inspect.signature(type(body).__init__).parameters:
        return None
    return len(blocks)


def timm_weight_decay_flags(body: nn.Module) -> Dict[str, bool]:
    """timm's weight-decay rule per body parameter (param_groups_weight_decay): none for 1-D tensors
    and for the model's no_weight_decay() names (fnmatch patterns), decay for the rest."""
    import fnmatch

    skip = set(body.no_weight_decay()) if hasattr(body, "no_weight_decay") else set()
    return {name: not (param.ndim <= 1 or any(fnmatch.fnmatch(name, pattern) for pattern in skip)) for name, param in body.named_parameters()}


# A name no group matcher of timm matches: stands for the classifier when grouping a headless body.
_CLASSIFIER_STANDIN = "__tagger_heads__.weight"


def timm_layer_ids(body: nn.Module) -> Tuple[Dict[str, int], int]:
    """Layer-decay layer of each body parameter and of the heads, as timm.optim.param_groups_layer_decay
    numbers a model with a classifier: group_parameters(model, group_matcher(coarse=False), reverse=True);
    unmatched parameters (e.g. fc_norm) share the classifier's, the top layer. Returns (ids, heads' layer)."""
    from timm.models._manipulate import group_with_matcher  # what the public group_parameters calls

    if not hasattr(body, "group_matcher"):
        raise ValueError(f"{type(body).__name__} has no group_matcher(): timm cannot group its layers for training.layer_decay; set it to 1")
    named = [*body.named_parameters(), (_CLASSIFIER_STANDIN, None)]
    layer_map = group_with_matcher(named, body.group_matcher(coarse=False), reverse=True)
    heads = layer_map.pop(_CLASSIFIER_STANDIN)
    return {name: int(layer) for name, layer in layer_map.items()}, int(heads)


class TimmTagger(TaggerHeads):
    """A timm backbone (num_classes=0: pooled features) with a multi-label tag head and a rating head."""

    def __init__(self, cfg: TimmTaggerConfig) -> None:
        """Build the body with timm (random weights), the heads trunc-normal(0.02) with the tag prior bias."""
        super().__init__()
        self.cfg = replace(cfg)  # a private copy: set_grad_checkpointing edits it
        self.body = timm_body(self.cfg)
        fixed = fixed_input_size(self.body)
        if fixed is not None and fixed != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"timm model {cfg.architecture!r} takes {fixed[0]}x{fixed[1]} images but image_size is {cfg.image_size}: "
                "set model_args img_size (data.image_size follows a release's input size)"
            )
        width = int(getattr(self.body, "head_hidden_size", None) or self.body.num_features)  # the pooled features' width
        self.num_features = width
        self.tag_head = nn.Linear(width, cfg.num_tags)
        self.rating_head = nn.Linear(width, cfg.num_ratings)
        for head in (self.tag_head, self.rating_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.init_tag_bias(self.cfg.tag_bias_init)
        if self.cfg.grad_checkpoint_every:
            self.body.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, every: int) -> None:
        """timm's activation checkpointing: any every > 0 checkpoints every block, 0 turns it off."""
        super().set_grad_checkpointing(every)
        self.body.set_grad_checkpointing(every > 0)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised RGB images (B, 3, H, W) -> pooled features (B, C)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.cfg.input_channels == "bgr":
            images = images.flip(1)  # (B, 3, H, W) in BGR order, as the release was trained
        return self.body(images)

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """The body's state dict in timm's own key layout (no "body." prefix, no classifier)."""
        return dict(self.body.state_dict())

    def weight_decay_flags(self) -> Dict[str, bool]:
        """Per parameter name: whether AdamW decays it (timm's rule for the body; head weights yes, biases no)."""
        flags = {f"body.{k}": v for k, v in timm_weight_decay_flags(self.body).items()}
        for name, param in self.named_parameters():
            if name.startswith(HEAD_PREFIXES):
                flags[name] = param.ndim > 1
        return flags

    def layer_ids(self) -> Tuple[Dict[str, int], int]:
        """Layer-decay layer of every parameter name (timm's grouping) and the top layer (the heads')."""
        body_ids, heads = timm_layer_ids(self.body)
        ids = {f"body.{k}": v for k, v in body_ids.items()}
        for name, _ in self.named_parameters():
            if name.startswith(HEAD_PREFIXES):
                ids[name] = heads
        return ids, max([heads, *ids.values()])


TaggerConfig = Union[VisionTransformerConfig, TimmTaggerConfig]
Tagger = Union[SimplifiedTagger, TimmTagger]


def tagger_config_from_dict(data: Mapping[str, Any]) -> TaggerConfig:
    """Either family's config from its to_dict() (model_config.json): "family": "timm", or no family key
    (every checkpoint before the timm family) / "vit" for a SimplifiedTagger. ValueError otherwise."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a model config must be an object, got {type(data).__name__}")
    family = data.get("family", "vit")
    if family == "timm":
        return TimmTaggerConfig.from_dict(data)
    if family == "vit":
        return VisionTransformerConfig.from_dict({k: v for k, v in data.items() if k != "family"})
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def build_tagger(model_config: Union[Mapping[str, Any], TaggerConfig]) -> Tagger:
    """The tagger a model config describes (a dict as in model_config.json, or a config object)."""
    cfg = tagger_config_from_dict(model_config) if isinstance(model_config, Mapping) else model_config
    if isinstance(cfg, TimmTaggerConfig):
        return TimmTagger(cfg)
    if isinstance(cfg, VisionTransformerConfig):
        return SimplifiedTagger(cfg)
    raise ValueError(f"not a model config: {type(model_config).__name__}")
