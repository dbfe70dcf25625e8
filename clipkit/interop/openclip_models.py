"""open_clip models behind clipkit's encoder API (``encode``, ``tokenize``, ``eval_decoder``).

Weights come from a local file (``.safetensors``, ``.bin``, ``.pt``; loaded with ``weights_only``),
from a folder open_clip wrote (``local-dir:``), or from a zoo tag whose file is already in the local
Hugging Face cache. clipkit never downloads silently: an uncached tag fails at once with the file to
fetch and where to put it, unless ``allow_download`` is set.
"""

from __future__ import annotations

import difflib
import io
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from torch import nn

from clipkit.modalities import FieldDecoder
from clipkit.modalities.image import IMAGE_EXTENSIONS
from clipkit.errors import PretrainedWeightsError
from clipkit.fingerprint import weights_fingerprint

OPEN_CLIP_PREFIX = "open_clip:"
LOCAL_DIR_PREFIX = "local-dir:"


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
        """Strings → (N, context_length) token ids with the model's own tokenizer, on its device."""
        return self.tokenizer(list(texts)).to(self.device)

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


def _unknown_architecture(arch: str) -> ValueError:
    close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
    return ValueError(f"unknown open_clip architecture {arch!r}{hint}")


def _cached_hub_file(hf_hub: str) -> str | None:
    """The path of a zoo file in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = hf_hub.rstrip("/")
    for filename in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def _missing_weights(arch: str, tag: str, pretrained_cfg: dict[str, Any]) -> PretrainedWeightsError:
    if pretrained_cfg.get("hf_hub"):
        repo = pretrained_cfg["hf_hub"].rstrip("/")
        where = (f"https://huggingface.co/{repo}/resolve/main/{HF_SAFE_WEIGHTS_NAME} (or `huggingface-cli "
                 f"download {repo} {HF_SAFE_WEIGHTS_NAME}`, which puts it in the Hugging Face cache where "
                 f"clipkit finds it by tag)")
    else:
        where = pretrained_cfg.get("url", "the URL open_clip lists for it")
    return PretrainedWeightsError(
        f"open_clip weights {arch}/{tag} are not on this machine and clipkit does not download them "
        f"unless asked. Fetch {where} on a machine with a network, then pass --pretrained "
        f"/path/to/{HF_SAFE_WEIGHTS_NAME}; or pass --allow-download to let open_clip fetch them."
    )


def _create(arch: str, pretrained: str | None, device: str, allow_download: bool) -> tuple[nn.Module, Callable]:
    """open_clip's model and evaluation transform for ``arch`` with weights from ``pretrained``."""
    if arch.startswith(LOCAL_DIR_PREFIX):
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
        return model, preprocess
    if open_clip.get_model_config(arch) is None:
        raise _unknown_architecture(arch)
    if pretrained is None:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
        return model, preprocess
    if Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused code in the pickle
            raise PretrainedWeightsError(f"--pretrained {path} is not a plain weights file: unpickling it would "
                                         f"run code, and weights load with weights_only=True ({err})") from err
        except RuntimeError as err:  # keys or shapes that do not fit the architecture
            raise PretrainedWeightsError(f"--pretrained {path} does not fit open_clip model {arch}: {err}") from err
        return model, preprocess
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise PretrainedWeightsError(
            f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of {arch}; "
            f"its tags: {', '.join(tags) or 'none'}")
    cached = _cached_hub_file(pretrained_cfg["hf_hub"]) if pretrained_cfg.get("hf_hub") else None
    if cached is None:
        if not allow_download:
            raise _missing_weights(arch, pretrained, pretrained_cfg)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        return model, preprocess
    # Load the cached file directly (no hub round trip), with the settings the tag was trained with.
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=cached, device=device, force_quick_gelu=pretrained_cfg.get("quick_gelu", False),
        image_mean=pretrained_cfg.get("mean"), image_std=pretrained_cfg.get("std"),
        image_interpolation=pretrained_cfg.get("interpolation"),
        image_resize_mode=pretrained_cfg.get("resize_mode"),
    )
    return model, preprocess


def load_open_clip(
    arch: str, pretrained: str | None = None, *, device: str = "cpu", allow_download: bool = False
) -> OpenClipEncoder:
    """An open_clip model by architecture name (``ViT-B-32``) or ``local-dir:FOLDER``.

    ``pretrained`` is a weights file or a zoo tag (``laion2b_s34b_b79k``); None keeps random weights.
    """
    model, preprocess = _create(arch, pretrained, device, allow_download)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except OSError as err:  # a Hugging Face tokenizer that is not in the local cache
        raise PretrainedWeightsError(f"the tokenizer of open_clip model {arch} is not on this machine: {err}") from err
    name = f"{OPEN_CLIP_PREFIX}{arch}" + (f"/{pretrained}" if pretrained else "")
    return OpenClipEncoder(model, preprocess, tokenizer, name)
