"""One entry point for the models evaluation, embedding and search take: clipkit or open_clip."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from clipkit.interop.openclip_models import OPEN_CLIP_PREFIX, load_open_clip
from clipkit.modalities import FieldDecoder


class Encoder(Protocol):
    """What evaluation and retrieval need of a model (clipkit's ``ContrastiveModel`` or open_clip's)."""

    name: str

    @property
    def modalities(self) -> tuple[str, ...]: ...

    def encode(self, modality: str, inputs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, ...) inputs decoded by :meth:`eval_decoder` → (B, embed_dim)."""

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings → (N, context_length) token ids on the model's device."""

    def eval_decoder(self, modality: str) -> FieldDecoder:
        """The decoder of one raw sample of ``modality`` for evaluation."""


def encoder_device(encoder: Encoder) -> torch.device:
    return next(encoder.parameters()).device  # type: ignore[attr-defined]


def load_encoder(
    model: str, pretrained: str | None = None, device: str = "cpu", allow_download: bool = False
) -> Encoder:
    """``model`` is a clipkit checkpoint path or ``open_clip:ARCH`` / ``open_clip:local-dir:FOLDER``
    (then ``pretrained`` is a weights file or zoo tag). Returns the model in eval mode on ``device``."""
    if model.startswith(OPEN_CLIP_PREFIX):
        return load_open_clip(model[len(OPEN_CLIP_PREFIX):], pretrained, device=device, allow_download=allow_download)
    if pretrained is not None:
        raise ValueError("--pretrained applies to open_clip models; a clipkit checkpoint holds its own weights")
    from clipkit.train.checkpoint import load_model

    encoder, _ = load_model(Path(model), map_location=device)
    return encoder
