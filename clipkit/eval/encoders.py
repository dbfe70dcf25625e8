"""One entry point for the models evaluation, embedding and search take: clipkit or open_clip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from clipkit.interop.openclip_models import LOCAL_DIR_PREFIX, OPEN_CLIP_PREFIX, load_open_clip
from clipkit.modalities import FieldDecoder


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model again from anywhere: ``load_encoder(spec.model, spec.pretrained)``, with
    local paths made absolute. Recorded as a hint beside embeddings and indexes; the model's
    fingerprint, not this, says whether two models are the same."""

    model: str
    pretrained: str | None = None


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

    def fingerprint(self) -> str:
        """The identity of the model's embeddings (:mod:`clipkit.fingerprint`)."""


def encoder_device(encoder: Encoder) -> torch.device:
    return next(encoder.parameters()).device  # type: ignore[attr-defined]


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when there is a GPU, else ``cpu``; other names as they are."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_spec(model: str, pretrained: str | None) -> ModelSpec:
    """``model`` / ``pretrained`` as given on the command line, with local paths made absolute."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    if model.startswith(OPEN_CLIP_PREFIX):
        arch = model[len(OPEN_CLIP_PREFIX):]
        if arch.startswith(LOCAL_DIR_PREFIX):
            arch = LOCAL_DIR_PREFIX + absolute(arch[len(LOCAL_DIR_PREFIX):])
        weights = absolute(pretrained) if pretrained and Path(pretrained).expanduser().is_file() else pretrained
        return ModelSpec(OPEN_CLIP_PREFIX + arch, weights)
    return ModelSpec(absolute(model), pretrained)


def load_encoder(
    model: str, pretrained: str | None = None, device: str = "cpu", allow_download: bool = False
) -> Encoder:
    """``model`` is a clipkit checkpoint path or ``open_clip:ARCH`` / ``open_clip:local-dir:FOLDER``
    (then ``pretrained`` is a weights file or zoo tag). Returns the model in eval mode on ``device``
    (``auto``: a GPU when there is one), with ``spec`` set to a :class:`ModelSpec` that reloads it."""
    device = resolve_device(device)
    spec = model_spec(model, pretrained)
    if model.startswith(OPEN_CLIP_PREFIX):
        encoder = load_open_clip(model[len(OPEN_CLIP_PREFIX):], pretrained, device=device,
                                 allow_download=allow_download)
    elif pretrained is not None:
        raise ValueError("--pretrained applies to open_clip models; a clipkit checkpoint holds its own weights")
    else:
        from clipkit.train.checkpoint import load_model

        encoder, _ = load_model(Path(model), map_location=device)
    encoder.spec = spec
    return encoder
