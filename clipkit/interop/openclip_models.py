"""open_clip models behind clipkit's encoder API (``encode``, ``tokenize``, ``eval_decoder``).

Weights come from a local file (``.safetensors``, ``.bin``, ``.pt``; loaded with ``weights_only``),
from a folder open_clip wrote (``local-dir:``), or from a zoo tag whose file is already in the local
Hugging Face cache. clipkit never downloads silently: an uncached tag fails at once with the file to
fetch and where to put it, unless ``allow_download`` is set (:mod:`clipkit.openclip.factory`).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn

from clipkit.fingerprint import weights_fingerprint
from clipkit.openclip.factory import LOCAL_DIR_PREFIX, create_open_clip, eval_transform, open_clip_tokenizer
from clipkit.modalities import FieldDecoder
from clipkit.modalities.image import IMAGE_EXTENSIONS
from clipkit.modalities.text import bound_text

OPEN_CLIP_PREFIX = "open_clip:"
__all__ = ["LOCAL_DIR_PREFIX", "OPEN_CLIP_PREFIX", "OpenClipEncoder", "load_open_clip"]


@dataclass
class PreprocessDecoder:
    """Image bytes → open_clip's own evaluation transform: a (3, S, S) normalised float tensor."""

    transform: Callable[[Image.Image], torch.Tensor]

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            return self.transform(img.convert("RGB"))


class OpenClipEncoder(nn.Module):
    """An open_clip image–text model with the methods clipkit's evaluation and retrieval call."""

    modalities = ("image", "text")

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, modality: str, inputs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images or (B, L) tokens → (B, embed_dim)."""
        if modality == "image":
            return self.model.encode_image(inputs, normalize=normalize)
        if modality == "text":
            return self.model.encode_text(inputs, normalize=normalize)
        raise KeyError(f"open_clip models have image and text towers, not {modality!r}")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("image", images, normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("text", tokens, normalize)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings → (N, context_length) token ids with the model's own tokenizer, on its device (each
        text bounded first, as training's captions are)."""
        context = self.tokenizer.context_length
        return self.tokenizer([bound_text(text, context) for text in texts]).to(self.device)

    def fingerprint(self) -> str:
        """Weights, the model class, its preprocessing settings and its tokenizer (:mod:`clipkit.fingerprint`)."""
        if self._fingerprint is None:  # an evaluation model's weights do not change: hash them once
            description = {"open_clip": type(self.model).__name__,
                           "preprocess": getattr(self.model.visual, "preprocess_cfg", None) or str(self.preprocess),
                           "tokenizer": [type(self.tokenizer).__name__, getattr(self.tokenizer, "context_length", None)]}
            self._fingerprint = weights_fingerprint(self.model, description)
        return self._fingerprint

    def eval_decoder(self, modality: str) -> FieldDecoder:
        if modality != "image":
            raise KeyError(f"open_clip models decode image samples, not {modality!r}")
        return FieldDecoder("image", IMAGE_EXTENSIONS, PreprocessDecoder(self.preprocess))


def load_open_clip(
    arch: str, pretrained: str | None = None, *, device: str = "cpu", allow_download: bool = False
) -> OpenClipEncoder:
    """An open_clip model by architecture name (``ViT-B-32``) or ``local-dir:FOLDER``.

    ``pretrained`` is a weights file or a zoo tag (``laion2b_s34b_b79k``); None keeps random weights.
    """
    model = create_open_clip(arch, pretrained, device, allow_download)
    tokenizer = open_clip_tokenizer(arch)
    name = f"{OPEN_CLIP_PREFIX}{arch}" + (f"/{pretrained}" if pretrained else "")
    return OpenClipEncoder(model, eval_transform(model), tokenizer, name)
