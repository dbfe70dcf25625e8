"""The interface every modality plug-in implements."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import nn

from clipkit.config import AugmentConfig, ConfigError, ModelConfig, ViewsConfig


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
    """A modality: its shard decoding (in data workers) and its tower (on the device)."""

    name: ClassVar[str]

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

    def view_field(self, name: str, views: ViewsConfig) -> FieldDecoder:
        """The decoder of one independently augmented view of this modality's member, batched as ``name``
        (the self-supervised methods compare views). Modalities without views refuse."""
        raise ConfigError(f"the {self.name} modality has no augmented views for a self-supervised method")
