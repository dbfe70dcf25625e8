"""The contrastive model: one tower per modality, a shared embedding space, a learnable temperature."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.checkpoint_file import load_checkpoint
from clipkit.config import IMAGE_ONLY_METHODS, ConfigError, ModelConfig, section_dict
from clipkit.fingerprint import weights_fingerprint
from clipkit.methods import build_heads
from clipkit.openclip.factory import architecture_config
from clipkit.openclip.towers import open_clip_parts
from clipkit.modalities import FieldDecoder, get_modality
from clipkit.modalities.openclip import open_clip_tokenize, preprocess_config
from clipkit.modalities.text import tokenize

# model.open_clip keys that say which weights train, not how the model embeds.
OPEN_CLIP_LOCK_KEYS = ("lock_image_unlocked_groups", "lock_text_unlocked_layers")


class ContrastiveModel(nn.Module):
    """Towers keyed by modality name, each ending in a projection to ``embed_dim``, and the heads of
    the training method (``model.method``: :mod:`clipkit.methods`) on top of them.

    ``logit_scale`` holds log(1 / temperature); it starts at log(``config.initial_logit_scale``) and
    is clamped to log(max_logit_scale) after every optimizer step (see :meth:`clamp_logit_scale_`).
    ``logit_bias`` is SigLIP's learnable bias (None for InfoNCE). ``name`` identifies the model in
    evaluation reports and index manifests (the checkpoint path once loaded from one). The image-only
    methods learn no temperature: their ``logit_scale`` stays as built and takes no gradient.
    """

    name: str = "clipkit"

    def __init__(self, config: ModelConfig, *, load_weights: bool = True) -> None:
        """``load_weights`` false builds an open_clip model's architecture without reading its weights
        file (a checkpoint's state is loaded next)."""
        super().__init__()
        image_only = config.method in IMAGE_ONLY_METHODS
        if len(set(config.modalities)) < 2 and not image_only:
            raise ValueError(f"model.modalities needs at least two distinct modalities, got {config.modalities}")
        self.config = config
        if config.open_clip is not None:
            parts = open_clip_parts(config.open_clip, load_weights=load_weights)
            self.towers = nn.ModuleDict({name: parts.towers[name] for name in config.modalities})
            self.logit_scale = nn.Parameter(parts.logit_scale.clone())
            self._check_open_clip_scale()
            self.logit_bias = self._open_clip_bias(parts.logit_bias)
        else:
            plugins = [get_modality(name, config) for name in config.modalities]
            self.towers = nn.ModuleDict({plugin.name: plugin.build_tower(config.embed_dim) for plugin in plugins})
            for plugin in plugins:
                plugin.link_towers(self.towers)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(config.initial_logit_scale)))
            self.logit_bias = nn.Parameter(torch.tensor(config.init_logit_bias)) if config.loss == "siglip" else None
        for name, checkpoint in config.init_towers.items():
            self._init_tower(name, checkpoint)
        self.locked = {name for name in config.modalities if getattr(getattr(config, name, None), "lock", False)}
        unlocked_groups = open_clip_unlocked_groups(config)
        for name in self.locked:
            if unlocked_groups.get(name):
                self.towers[name].lock(unlocked_groups[name])  # open_clip's partial lock: the tower trains on
            else:
                self.towers[name].requires_grad_(False)
        self.locked -= {name for name, groups in unlocked_groups.items() if groups}
        self.heads = build_heads(config, self.towers)
        if image_only:
            self.logit_scale.requires_grad_(False)

    def _check_open_clip_scale(self) -> None:
        """The open_clip model's temperature must survive :meth:`clamp_logit_scale_` unchanged."""
        scale, limit = self.logit_scale.exp().item(), self.config.max_logit_scale
        if scale > limit * (1 + 1e-6):
            raise ConfigError(f"open_clip model {self.config.open_clip.name} has a logit scale of {scale:.4g}, above "
                              f"model.max_logit_scale ({limit:g}), which the first step would clamp it to: raise "
                              f"model.max_logit_scale")

    def _open_clip_bias(self, checkpoint_bias: torch.Tensor | None) -> nn.Parameter | None:
        """SigLIP's bias: the open_clip model's own, or ``init_logit_bias`` for a CLIP model fine-tuned with
        the sigmoid loss. A SigLIP model's bias does not fit InfoNCE, so that pairing is refused."""
        config, name = self.config, self.config.open_clip.name
        if checkpoint_bias is None:
            return nn.Parameter(torch.tensor(config.init_logit_bias)) if config.loss == "siglip" else None
        if config.loss != "siglip":
            raise ConfigError(f"open_clip model {name} is a SigLIP model (it has a logit bias): set model.loss: siglip")
        if config.init_logit_bias != ModelConfig.init_logit_bias:
            raise ConfigError(f"model.init_logit_bias is set by the open_clip model {name} (its own bias, "
                              f"{checkpoint_bias.item():.4g}) and must be left out")
        return nn.Parameter(checkpoint_bias.clone())

    def _init_tower(self, name: str, checkpoint: str) -> None:
        """Copy tower ``name`` from a clipkit checkpoint, from the first of the modality's sources the
        checkpoint has (:meth:`~clipkit.modalities.base.Modality.tower_sources`: a video tower takes an
        image tower's weights as its frame encoder when the checkpoint has no video tower)."""
        if name not in self.towers:
            raise ValueError(f"model.init_towers names {name!r}, which is not one of model.modalities")
        weights = load_checkpoint(checkpoint)["model"]
        sources = get_modality(name, self.config).tower_sources(self.towers[name])
        found = [(prefix, target) for prefix, target in sources if any(key.startswith(prefix) for key in weights)]
        if not found:
            wanted = " or ".join(prefix.rstrip(".") for prefix, _ in sources)
            raise ValueError(f"checkpoint {checkpoint} has no {wanted} to initialise the {name} tower")
        source, target = found[0]
        state = {key[len(source):]: value for key, value in weights.items() if key.startswith(source)}
        try:
            target.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"the {name} tower of {checkpoint} does not fit model.{name}: {err}") from err

    def train(self, mode: bool = True) -> "ContrastiveModel":
        """As ``nn.Module.train``, but locked towers stay in eval mode (frozen normalisation statistics)."""
        super().train(mode)
        for name in self.locked:
            self.towers[name].eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward in every tower that supports it (timm trunks, the text tower)."""
        for tower in self.towers.values():
            if hasattr(tower, "set_grad_checkpointing"):
                tower.set_grad_checkpointing(enable)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.towers.keys())

    def encode(self, modality: str, inputs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed a batch of one modality: inputs (B, ...) → (B, embed_dim), unit norm by default."""
        if modality not in self.towers:
            raise KeyError(f"this model has no {modality!r} tower; it has {', '.join(self.modalities)}")
        features = self.towers[modality](inputs)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) uint8 or [0, 1] float images → (B, embed_dim)."""
        return self.encode("image", images, normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, context_length) token ids → (B, embed_dim)."""
        return self.encode("text", tokens, normalize)

    def eval_decoder(self, modality: str) -> FieldDecoder:
        """How evaluation and search decode one raw sample (file bytes) of ``modality`` for :meth:`encode`."""
        return get_modality(modality, self.config).field(train=False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings → (N, context_length) token ids for :meth:`encode_text`, on the model's device."""
        if self.config.open_clip is not None:
            tokens = open_clip_tokenize(self.config.open_clip.name, texts)
        else:
            tokens = tokenize(texts, self.config.text.context_length)
        return tokens.to(self.logit_scale.device)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training method's outputs for a batch holding its inputs (``self.heads.inputs``): for
        CLIP, the unit-norm features (B, embed_dim) of the two aligned modalities."""
        return self.heads(functools.partial(self.encode, normalize=False), batch)

    def fingerprint(self) -> str:
        """The identity of this model's embeddings (:mod:`clipkit.fingerprint`): its weights and the
        config that shapes its towers and preprocessing. Where initial weights came from
        (``pretrained_file``, ``init_towers``) and which towers were locked do not count: the same
        weights embed the same way whatever produced them."""
        identity = self.config_identity()
        return weights_fingerprint(self, {"clipkit": identity})

    def config_identity(self) -> dict:
        """The model config without the keys that only say how the weights were obtained (for an open_clip
        model, with the preprocessing its weights were trained with, which a zoo tag may set)."""
        config = section_dict(self.config)
        # How the towers were trained does not change how they embed; the heads' weights, which only
        # training uses, still count in the weights' hash.
        for key in ("init_towers", "method", "ssl"):
            config.pop(key, None)
        for section in config.values():
            if isinstance(section, dict):
                for key in ("pretrained", "pretrained_file", "lock", *OPEN_CLIP_LOCK_KEYS):
                    section.pop(key, None)
        if self.config.open_clip is not None:
            # A zoo tag may switch the architecture to QuickGELU: the same weights then embed otherwise.
            open_clip = self.config.open_clip
            config["open_clip"]["architecture"] = architecture_config(open_clip.name, open_clip.pretrained)
            config["open_clip"]["preprocess"] = dataclasses.asdict(preprocess_config(open_clip))
        return config

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))


def open_clip_unlocked_groups(config: ModelConfig) -> dict[str, int]:
    """Per tower, the layer groups a locked open_clip tower leaves trainable (none without open_clip)."""
    if config.open_clip is None:
        return {}
    return {"image": config.open_clip.lock_image_unlocked_groups, "text": config.open_clip.lock_text_unlocked_layers}


def create_model(config: ModelConfig, *, load_weights: bool = True) -> ContrastiveModel:
    return ContrastiveModel(config, load_weights=load_weights)


def model_for_weights(config: ModelConfig) -> ContrastiveModel:
    """``config``'s architecture, to load trained weights into: it reads no pretrained weights, open_clip
    weights or initial towers (those are in the weights it is given)."""
    image = dataclasses.replace(config.image, pretrained=False, pretrained_file=None)
    return ContrastiveModel(dataclasses.replace(config, image=image, init_towers={}), load_weights=False)
