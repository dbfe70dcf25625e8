"""Text: UTF-8 captions → open_clip BPE tokens in workers → transformer tower on the device."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from clipkit.config import AugmentConfig, ModelConfig, TextTowerConfig
from clipkit.modalities.base import FieldDecoder, Modality

TEXT_EXTENSIONS = ("txt",)


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped in its wheel, no network)."""
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Strings → (N, context_length) int64 token ids, padded with 0 and truncated keeping EOT."""
    return get_tokenizer(context_length)(list(texts))


@dataclass
class CaptionDecoder:
    """Decodes a UTF-8 caption to a (context_length,) token tensor; rejects empty captions."""

    context_length: int

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        text = data.decode("utf-8").strip()
        if not text:
            raise ValueError("empty caption")
        return tokenize([text], self.context_length)[0]


def build_text_tower(config: TextTowerConfig, embed_dim: int) -> nn.Module:
    """open_clip's text transformer (so weights map 1:1 to open_clip), pooled at the EOT token.

    Input (B, context_length) token ids → (B, embed_dim) unnormalised features.
    """
    return TextTransformer(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        mlp_ratio=config.mlp_ratio,
        output_dim=embed_dim,
        no_causal_mask=not config.causal,
        pool_type="argmax",
    )


class TextModality(Modality):
    name = "text"

    def __init__(self, config: TextTowerConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "TextModality":
        return cls(model_config.text)

    def field(self, train: bool) -> FieldDecoder:
        return FieldDecoder(self.name, TEXT_EXTENSIONS, CaptionDecoder(self.config.context_length))

    def build_tower(self, embed_dim: int) -> nn.Module:
        return build_text_tower(self.config, embed_dim)
