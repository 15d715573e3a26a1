"""Our tagger behind the WD-tagger contract: output plan, fixed-size backbone, fused head, `WDTagger`.

`export_model.py` traces `WDTagger` to model.onnx and writes its weights in timm's layout;
`tag_images.py` runs it directly on a checkpoint. Keeping the PyTorch graph in one module means
the ONNX graph, the timm weights and the PyTorch backend of the tagger compute one function:

    input  (N, S, S, 3) float32, BGR, 0..255 (the image padded to a square with white, resized to S)
    -> RGB, (x / 255 - mean) / std              the checkpoint's normalisation, done in the graph
    -> the backbone at S                        SimplifiedTagger: position embedding resampled once to S;
                                                TimmTagger: built at S, its weights through timm's
                                                checkpoint filter (its own BGR flip inside)
    -> fused head (C -> 4 + T)                  rating rows, then tag rows in selected_tags.csv order,
                                                tag biases plus the calibration's per-tag logit shift
    -> softmax over the 4 rating outputs, sigmoid over the T tag outputs

It imports model_architecture, timm_tagger, vocabulary and wd_format.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from model_architecture import SimplifiedTagger, resample_pos_embed
from timm_tagger import Tagger, TimmTagger, checkpoint_filter, fixed_input_size, input_size_error
from vocabulary import TagVocabulary
from wd_format import CATEGORY_CHARACTER, RATING_NAMES, LabelTable, category_code

__all__ = ["OUR_CATEGORIES", "OutputPlan", "WDTagger", "fused_head", "plan_outputs", "resized_tagger"]

# Our tag categories (vocabulary.json); "" (unknown) is exported with "general".
OUR_CATEGORIES: tuple[str, ...] = ("general", "character", "copyright", "artist", "meta")


@dataclass(frozen=True)
class OutputPlan:
    """Which vocabulary column feeds each tag output, in selected_tags.csv order."""

    labels: LabelTable
    columns: tuple[int, ...]  # vocabulary index of tag output i (output 4 + i)
    dropped: tuple[str, ...]  # vocabulary tags left out (category not exported)

    @property
    def num_outputs(self) -> int:
        """Outputs of the exported model: 4 ratings + tags."""
        return len(RATING_NAMES) + len(self.columns)

    def category_masks(self) -> dict[str, torch.Tensor]:
        """Boolean (T,) masks over the tag outputs: {"general": ..., "character": ...}."""
        general = torch.zeros(len(self.columns), dtype=torch.bool)
        general[: len(self.labels.general)] = True
        return {"general": general, "character": ~general}


def plan_outputs(vocab: TagVocabulary, categories: Collection[str] = OUR_CATEGORIES) -> OutputPlan:
    """Order the exported tags: general block (general, copyright, artist, meta, unknown), then characters.

    Tags whose category is not in `categories` are left out (a tag without a category counts as
    "general"). Within a block the vocabulary order (most frequent first) is kept.
    """
    unknown = sorted(set(categories) - set(OUR_CATEGORIES))
    if unknown:
        raise ValueError(f"unknown tag categories {unknown}; expected some of {list(OUR_CATEGORIES)}")
    general: list[int] = []
    character: list[int] = []
    dropped: list[str] = []
    for index, tag in enumerate(vocab.index_to_tag):
        category = vocab.tag_categories.get(tag, "") or "general"
        if category not in categories:
            dropped.append(tag)
        elif category_code(category) == CATEGORY_CHARACTER:
            character.append(index)
        else:
            general.append(index)
    if not general and not character:
        raise ValueError(f"no tag of the vocabulary is in the exported categories {sorted(categories)}")
    names = vocab.index_to_tag
    freqs = vocab.tag_frequencies
    labels = LabelTable(
        ratings=RATING_NAMES,
        general=tuple(names[i] for i in general),
        character=tuple(names[i] for i in character),
        general_counts=tuple(freqs[names[i]] for i in general),
        character_counts=tuple(freqs[names[i]] for i in character),
    )
    return OutputPlan(labels, tuple(general + character), tuple(dropped))


def _fixed_timm_tagger(model: TimmTagger, image_size: int) -> TimmTagger:
    """An inference copy of a timm-family model (no drop path, no checkpointing, fixed input size) at `image_size`:
    at another size than trained, built with that img_size and loaded through timm's own checkpoint filter of the
    architecture (position embeddings resampled, as timm loads pretrained weights at another size); ValueError
    when the architecture cannot take that size."""
    cfg = replace(model.cfg, tag_bias_init=None, grad_checkpoint_every=0, drop_path_rate=0.0, dynamic_img_size=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if image_size != model.cfg.image_size:
        args = dict(cfg.model_args)
        if "img_size" in args or fixed_input_size(model.body) is not None:
            args["img_size"] = image_size
        cfg = replace(cfg, image_size=image_size, model_args=args)
        problem = input_size_error(cfg, image_size)
        if problem is not None:
            raise ValueError(f"a timm-family model ({cfg.architecture}) cannot be exported at {image_size} px: {problem}")
    fixed = TimmTagger(cfg)
    if image_size != model.cfg.image_size:
        body = {k[len("body.") :]: v for k, v in state.items() if k.startswith("body.")}
        fitted = checkpoint_filter(fixed.body)(body, fixed.body)
        state = {**{k: v for k, v in state.items() if not k.startswith("body.")}, **{f"body.{k}": v for k, v in fitted.items()}}
    fixed.load_state_dict(state)
    return fixed.to(next(model.parameters()).device).eval()


def resized_tagger(model: Tagger, image_size: int) -> Tagger:
    """A copy of `model` built for a fixed input size, its position embedding resampled once (eval mode; a
    timm-family model through timm's own filter)."""
    if isinstance(model, TimmTagger):
        return _fixed_timm_tagger(model, image_size)
    patch = model.cfg.patch_size
    if image_size <= 0 or image_size % patch != 0:
        raise ValueError(f"image size {image_size} is not a positive multiple of the patch size {patch}")
    cfg = replace(model.cfg, image_size=image_size, tag_bias_init=None, grad_checkpoint_every=0)
    resized = SimplifiedTagger(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid_size, model.cfg.grid_size)
    resized.load_state_dict(state)
    return resized.to(next(model.parameters()).device).eval()


def fused_head(model: Tagger, plan: OutputPlan, logit_shift: torch.Tensor | None = None) -> nn.Linear:
    """One Linear(C, 4 + T): the rating head's rows, then the tag rows of `plan`, biases plus `logit_shift` (T,)."""
    rating_w = model.rating_head.weight.detach()  # (4, C)
    if rating_w.shape[0] != len(RATING_NAMES):
        raise ValueError(f"the WD contract needs 4 rating outputs, the model has {rating_w.shape[0]}")
    columns = torch.tensor(plan.columns, dtype=torch.long, device=rating_w.device)
    tag_w = model.tag_head.weight.detach().index_select(0, columns)  # (T, C)
    tag_b = model.tag_head.bias.detach().index_select(0, columns)  # (T,)
    if logit_shift is not None:
        if tuple(logit_shift.shape) != (len(plan.columns),):
            raise ValueError(f"logit_shift has shape {tuple(logit_shift.shape)}, expected ({len(plan.columns)},)")
        tag_b = tag_b + logit_shift.to(tag_b)
    head = nn.Linear(rating_w.shape[1], plan.num_outputs).to(rating_w.device)
    with torch.no_grad():
        head.weight.copy_(torch.cat([rating_w, tag_w], dim=0))
        head.bias.copy_(torch.cat([model.rating_head.bias.detach(), tag_b], dim=0))
    return head


class WDTagger(nn.Module):
    """The backbone at a fixed size with the fused head: WD input (N, S, S, 3) BGR 0..255 -> (N, 4 + T) probabilities."""

    def __init__(self, backbone: Tagger, head: nn.Linear, mean: Sequence[float], std: Sequence[float]) -> None:
        """Keep the backbone (its own heads are unused) and the fused head; store the normalisation."""
        super().__init__()
        self.backbone = backbone.eval()
        self.head = head
        self.image_size = backbone.cfg.image_size
        mean64 = torch.as_tensor(list(mean), dtype=torch.float64)
        std64 = torch.as_tensor(list(std), dtype=torch.float64)
        # The same two constants as dataset_loader.normalize_images: x * 1/(255 std) - mean/std.
        self.register_buffer("scale", (1.0 / (255.0 * std64)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", (mean64 / std64).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bgr_to_rgb", torch.tensor([2, 1, 0], dtype=torch.long), persistent=False)

    def logits_from_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised RGB images (N, 3, S, S) -> fused-head logits (N, 4 + T)."""
        pooled = self.backbone.forward_pooled(images)  # (N, C)
        return self.head(pooled)

    def logits_from_rgb(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images (N, 3, S, S), uint8 or float in 0..255 -> logits (N, 4 + T)."""
        normalized = images.float() * self.scale - self.offset  # (N, 3, S, S)
        return self.logits_from_normalized(normalized)

    @staticmethod
    def probabilities(logits: torch.Tensor, rating_softmax: bool = True) -> torch.Tensor:
        """Logits (N, 4 + T) -> softmax over the 4 rating outputs (our runs train the rating as one choice), sigmoid over
        the tags; rating_softmax=False: sigmoid everywhere, as a released WD v3 tagger's reference code reads its outputs."""
        if not rating_softmax:
            return torch.sigmoid(logits)
        ratings = torch.softmax(logits[:, : len(RATING_NAMES)], dim=1)  # (N, 4)
        tags = torch.sigmoid(logits[:, len(RATING_NAMES) :])  # (N, T)
        return torch.cat([ratings, tags], dim=1)

    def forward(self, images_bgr: torch.Tensor) -> torch.Tensor:
        """WD input (N, S, S, 3) float32 BGR 0..255 -> probabilities (N, 4 + T)."""
        rgb = images_bgr.permute(0, 3, 1, 2).index_select(1, self.bgr_to_rgb)  # (N, 3, S, S)
        return self.probabilities(self.logits_from_rgb(rgb))
