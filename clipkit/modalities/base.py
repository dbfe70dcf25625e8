"""The interface every modality plug-in implements, and the registry of plug-ins by name."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import nn

from clipkit.config import AugmentConfig, ConfigError, ModelConfig, ViewsConfig, register_modality_section


@dataclass(frozen=True)
class FieldDecoder:
    """Turns the bytes of one shard member into a tensor (or, for metadata, a plain value) for
    the batch key ``name``.

    ``extensions`` are tried in order (e.g. ``("jpg", "jpeg", "png", "webp")``); the first one the
    sample has is decoded. ``decode(data, rng)`` must be picklable: it runs inside data-loader workers.
    It must take every random draw (crop, flip, ...) from ``rng``, which the pipeline seeds per sample,
    epoch and field, so that a sample's augmentation does not depend on the worker count, the
    worker it lands on or the process RNG state; decoders without randomness ignore it.
    """

    name: str
    extensions: tuple[str, ...]
    decode: Callable[[bytes, random.Random], Any]
    # The decoder may run threads of its own (FFmpeg, libsndfile): data workers must then not be forked
    # mid-flight, and "auto" starts them with forkserver.
    threaded: bool = False


class Modality(ABC):
    """A modality: its config section, its shard decoding (in data workers) and its tower (on the device).

    A plug-in is one module: the section's dataclass and a subclass of this, decorated with
    :func:`register_modality`. Then ``model.modalities`` may name it, a config file may hold its
    section as ``model.<name>``, and training, evaluation and search use it without other changes.
    """

    name: ClassVar[str]
    # The dataclass of the config section model.<name>.
    config_section: ClassVar[type]
    # Built-in sets of zero-shot prompt templates for this modality's inputs, by set name ({} marks the
    # class name); the first is the modality's default, and without any zero-shot uses the "simple" set.
    template_sets: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    @abstractmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "Modality":
        """Build the plug-in from the model config and the training augmentation settings."""

    @abstractmethod
    def field(self, train: bool) -> FieldDecoder:
        """The decoder for this modality's shard members, with training or evaluation transforms."""

    @abstractmethod
    def build_tower(self, embed_dim: int) -> nn.Module:
        """A module mapping a batch of decoded inputs to features of shape (B, embed_dim)."""

    def link_towers(self, towers: nn.ModuleDict) -> None:
        """Share modules between this modality's tower (``towers[self.name]``) and the model's other
        towers once all are built: a video tower embeds its frames with the image tower. Default: none."""

    def tower_sources(self, tower: nn.Module) -> list[tuple[str, nn.Module]]:
        """Where ``model.init_towers`` may take this tower's weights from in a checkpoint: (state-dict key
        prefix, the module that loads them), the first prefix the checkpoint has wins."""
        return [(f"towers.{self.name}.", tower)]

    def view_field(self, name: str, views: ViewsConfig) -> FieldDecoder:
        """The decoder of one independently augmented view of this modality's member, batched as ``name``
        (the self-supervised methods compare views). Modalities without views refuse."""
        raise ConfigError(f"the {self.name} modality has no augmented views for a self-supervised method")


_REGISTRY: dict[str, type[Modality]] = {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: register the plug-in ``cls`` as modality ``cls.name``, with its config section."""
    known = _REGISTRY.setdefault(cls.name, cls)
    if known is not cls:
        raise ValueError(f"modality {cls.name!r} is registered twice ({known.__module__} and {cls.__module__})")
    register_modality_section(cls.name, cls.config_section)
    return cls


def registered_modalities() -> dict[str, type[Modality]]:
    """Name → plug-in class of every modality registered so far."""
    return dict(_REGISTRY)
