"""Text: UTF-8 captions → open_clip BPE tokens in workers → transformer tower on the device."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from clipkit.config import AugmentConfig, ModelConfig, check_ranges
from clipkit.data.captions import parse_captions
from clipkit.modalities.base import FieldDecoder, Modality, register_modality

@dataclass
class TextTowerConfig:
    """A transformer over open_clip's BPE tokens, pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    causal: bool = True
    # Freeze the whole text tower.
    lock: bool = False

    def __post_init__(self) -> None:
        check_ranges(
            ("heads", self.heads >= 1 and self.width % self.heads == 0,
             f"must divide width ({self.width}) into attention heads of equal size"),
            ("context_length", self.context_length >= 2, "must be at least 2 (start and end tokens)"),
        )


TEXT_EXTENSIONS = ("txt",)


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped in its wheel, no network)."""
    return SimpleTokenizer(context_length=context_length)


# The longest token of CLIP's BPE vocabulary, end-of-word mark included, is 32 characters: a context
# of 77 tokens never reaches further into a (whitespace-collapsed) text than 77 × 32 characters.
MAX_CHARS_PER_TOKEN = 32


def bound_text(text: str, context_length: int) -> str:
    """``text`` cut to what its first ``context_length`` tokens can span. BPE is super-linear in a
    word's length (a 20,000-letter word took 7 s, a 1 MB one hangs a data worker), and the tokens
    past the context are dropped anyway; texts within the bound are returned unchanged."""
    limit = context_length * MAX_CHARS_PER_TOKEN
    return text if len(text) <= limit else " ".join(text.split())[:limit]


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Strings → (N, context_length) int64 token ids, padded with 0 and truncated keeping EOT."""
    return get_tokenizer(context_length)([bound_text(text, context_length) for text in texts])


@dataclass
class CaptionDecoder:
    """Decodes a UTF-8 caption field to a (context_length,) token tensor; rejects empty captions.

    A field with several captions (one per line, or a JSON list: :mod:`clipkit.data.captions`) gives
    one of them: in training drawn from the per-sample ``rng`` (another each epoch), in evaluation
    the first.
    """

    context_length: int
    train: bool = True
    # A model's own tokenizer (an open_clip model's: strings → (N, context_length) ids); None: CLIP's BPE.
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        captions = parse_captions(data.decode("utf-8"))
        if not captions:
            raise ValueError("empty caption")
        caption = rng.choice(captions) if self.train and len(captions) > 1 else captions[0]
        if self.tokenizer is not None:
            return self.tokenizer([bound_text(caption, self.context_length)])[0]
        return tokenize([caption], self.context_length)[0]


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


@register_modality
class TextModality(Modality):
    name = "text"
    config_section = TextTowerConfig

    def __init__(self, config: TextTowerConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "TextModality":
        return cls(model_config.text)

    def field(self, train: bool) -> FieldDecoder:
        return FieldDecoder(self.name, TEXT_EXTENSIONS, CaptionDecoder(self.config.context_length, train))

    def build_tower(self, embed_dim: int) -> nn.Module:
        return build_text_tower(self.config, embed_dim)
