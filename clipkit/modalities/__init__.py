"""Modality plug-ins: how a modality's shard bytes become tensors and which tower embeds them.

Each modality is one module defining a :class:`~clipkit.modalities.base.Modality` subclass and
registering it here. The trainer, the loss and the data pipeline only ever talk to this interface,
so adding a modality touches neither of them.
"""

from __future__ import annotations

from clipkit.config import ModelConfig, AugmentConfig
from clipkit.modalities.audio import AudioModality
from clipkit.modalities.base import FieldDecoder, Modality
from clipkit.modalities.image import ImageModality
from clipkit.modalities.openclip import OPEN_CLIP_MODALITIES
from clipkit.modalities.text import TextModality
from clipkit.modalities.video import VideoModality

_REGISTRY: dict[str, type[Modality]] = {
    AudioModality.name: AudioModality,
    ImageModality.name: ImageModality,
    TextModality.name: TextModality,
    VideoModality.name: VideoModality,
}


def available_modalities() -> list[str]:
    return sorted(_REGISTRY)


def get_modality(name: str, model_config: ModelConfig, augment: AugmentConfig | None = None) -> Modality:
    """Instantiate the plug-in for ``name`` from the model config (and training augmentation)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown modality {name!r}; available: {', '.join(available_modalities())}")
    # An open_clip model brings its own image preprocessing and tokenizer.
    registry = OPEN_CLIP_MODALITIES if model_config.open_clip is not None else _REGISTRY
    return registry[name].from_config(model_config, augment or AugmentConfig())


__all__ = ["FieldDecoder", "Modality", "available_modalities", "get_modality"]
