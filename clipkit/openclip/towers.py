"""An open_clip model taken apart into clipkit towers: its visual tower, its text tower, its
temperature and (SigLIP) bias.

Each tower keeps open_clip's own modules and forward code, so embeddings are open_clip's
``encode_image`` / ``encode_text`` and parameter names map back by stripping the tower prefix:
``towers.image.visual.*`` → ``visual.*``, ``towers.text.*`` → ``*`` (``CLIP``, whose text modules sit
on the model itself) or ``towers.text.text.*`` → ``text.*`` (``CustomTextCLIP``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.transformer import lock_text_tower
from torch import nn

from clipkit.config import OpenClipConfig
from clipkit.openclip.factory import architecture_config, create_open_clip

TOWER_PREFIXES = ("towers.image.", "towers.text.")


class OpenClipImageTower(nn.Module):
    """open_clip's visual tower behind clipkit's image input.

    Input (B, 3, S, S): uint8 in [0, 255] or float in [0, 1]. It is normalised here with the model's
    mean and std, exactly as open_clip's ``ToTensor`` + ``Normalize`` would have in its transform, then
    embedded by ``visual`` (ViT, ModifiedResNet or timm tower) → (B, embed_dim) unnormalised features.
    """

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return self.visual((images - self.mean) / self.std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def lock(self, unlocked_groups: int) -> None:
        """Freeze all but the last ``unlocked_groups`` layer groups (open_clip's ``lock_image_tower``)."""
        try:
            self.visual.lock(unlocked_groups=unlocked_groups)
        except AssertionError as err:  # ModifiedResNet asserts; it has no layer groups to leave unlocked
            raise ValueError(f"open_clip's {type(self.visual).__name__} image tower locks only as a whole "
                             f"(model.open_clip.lock_image_unlocked_groups must be 0): {err}") from err


class ClipTextTower(nn.Module):
    """The text half of open_clip's ``CLIP``, whose text modules sit on the model itself: the same
    modules under the same names, run by ``CLIP.encode_text``. (B, context_length) token ids →
    (B, embed_dim) unnormalised features."""

    MODULES = ("transformer", "token_embedding", "ln_final")
    PARAMETERS = ("positional_embedding", "text_projection")
    SETTINGS = ("context_length", "vocab_size", "text_pool_type", "text_eos_id")

    def __init__(self, clip: open_clip.CLIP) -> None:
        super().__init__()
        for name in self.MODULES + self.PARAMETERS + self.SETTINGS:
            setattr(self, name, getattr(clip, name))
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return open_clip.CLIP.encode_text(self, tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def lock(self, unlocked_layers: int) -> None:
        """Freeze all but the last ``unlocked_layers`` layer groups (open_clip's ``lock_text_tower``)."""
        lock_text_tower(self, unlocked_layers)


class CustomTextTower(nn.Module):
    """``CustomTextCLIP``'s text tower (a ``TextTransformer`` or Hugging Face encoder) under ``text``,
    as on the open_clip model. (B, context_length) token ids → (B, embed_dim) unnormalised features."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)

    def lock(self, unlocked_layers: int) -> None:
        self.text.lock(unlocked_layers)


@dataclass
class OpenClipParts:
    """An open_clip model as clipkit's parts: two towers, log(1 / temperature), SigLIP's bias (or None)."""

    towers: dict[str, nn.Module]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


def check_supported(config: OpenClipConfig) -> dict[str, Any]:
    """The architecture's ``model_cfg``; an error naming what clipkit's two towers cannot hold."""
    model_cfg = architecture_config(config.name, config.pretrained)
    if "multimodal_cfg" in model_cfg:
        raise ValueError(f"open_clip model {config.name} is a CoCa model: its captioning text decoder has no place "
                         "in clipkit's two contrastive towers (fine-tune it with open_clip, or pick a CLIP or "
                         "SigLIP architecture)")
    return model_cfg


def open_clip_parts(config: OpenClipConfig, *, load_weights: bool = True) -> OpenClipParts:
    """Build the open_clip model ``config`` names (weights loaded unless ``load_weights`` is false) and
    take it apart; the towers keep open_clip's modules, nothing is copied."""
    check_supported(config)
    model = create_open_clip(config.name, config.pretrained, "cpu", allow_download=False, load_weights=load_weights)
    preprocess = model.visual.preprocess_cfg
    image = OpenClipImageTower(model.visual, preprocess["mean"], preprocess["std"])
    text = CustomTextTower(model.text) if hasattr(model, "text") else ClipTextTower(model)
    bias = model.logit_bias.detach().reshape(()) if model.logit_bias is not None else None
    return OpenClipParts({"image": image, "text": text}, model.logit_scale.detach().reshape(()), bias)


def to_open_clip_state(state: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A clipkit state dict of open_clip towers → the open_clip model's (tower prefixes stripped,
    the temperature and bias in open_clip's shape), tensors contiguous on the CPU for safetensors."""
    shape = [1] if model_cfg.get("nonscalar_logit_scale") else []
    converted = {}
    for key, tensor in state.items():
        for prefix in TOWER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key in ("logit_scale", "logit_bias"):
            tensor = tensor.reshape(shape)
        converted[key] = tensor.detach().cpu().contiguous()
    return converted
