"""Image and text of an open_clip model (``model.open_clip``): its own preprocessing and tokenizer.

Images leave the workers as uint8 tensors like every clipkit image and are normalised on the device
by the tower (:class:`~clipkit.openclip.towers.OpenClipImageTower`). Evaluation runs open_clip's
own evaluation transform up to its ``ToTensor`` (resize mode, interpolation, crop or pad, size), so the
pixels and, after normalisation, the tensors are those of ``open_clip.image_transform``. Training draws
clipkit's random resized crop (``data.augment``) at the model's size with its interpolation, as
open_clip's training transform does.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision import transforms

from clipkit.config import AugmentConfig, ModelConfig, OpenClipConfig, ViewsConfig
from clipkit.openclip.factory import open_clip_tokenizer, preprocess_settings
from clipkit.openclip.towers import open_clip_parts
from clipkit.modalities.base import FieldDecoder, Modality
from clipkit.modalities.image import IMAGE_EXTENSIONS, ImageDecoder, image_view_field
from clipkit.modalities.text import TEXT_EXTENSIONS, CaptionDecoder, bound_text

TRAIN_INTERPOLATIONS = ("bicubic", "bilinear")


def preprocess_config(config: OpenClipConfig) -> PreprocessCfg:
    """The model's final preprocessing settings (size, mean/std, interpolation, resize mode), as open_clip's
    factory gives them to ``arch`` with ``pretrained``."""
    return PreprocessCfg(**preprocess_settings(config.name, config.pretrained))


def square_size(cfg: PreprocessCfg) -> int:
    size = cfg.size
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip image size {tuple(size)} is not square; clipkit's image crops are")
        size = size[0]
    return int(size)


def pixel_transform(cfg: PreprocessCfg) -> transforms.Compose:
    """open_clip's evaluation transform without its final ``ToTensor`` and ``Normalize``: PIL → PIL."""
    steps = image_transform_v2(cfg, is_train=False).transforms
    if not (isinstance(steps[-2], transforms.ToTensor) and isinstance(steps[-1], transforms.Normalize)):
        raise TypeError(f"open_clip's evaluation transform no longer ends in ToTensor, Normalize: {steps}")
    return transforms.Compose(steps[:-2])


@dataclass
class OpenClipEvalDecoder:
    """Image bytes → (3, S, S) uint8 tensor: open_clip's evaluation transform before ``ToTensor``."""

    pixels: Callable[[Image.Image], Image.Image]

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            return TF.pil_to_tensor(self.pixels(img.convert("RGB")))


class OpenClipImageModality(Modality):
    name = "image"

    def __init__(self, config: OpenClipConfig, augment: AugmentConfig) -> None:
        self.config = config
        self.augment = augment
        self.preprocess = preprocess_config(config)

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "OpenClipImageModality":
        return cls(model_config.open_clip, augment)

    def field(self, train: bool) -> FieldDecoder:
        if not train:
            return FieldDecoder(self.name, IMAGE_EXTENSIONS, OpenClipEvalDecoder(pixel_transform(self.preprocess)))
        decoder = ImageDecoder(square_size(self.preprocess), train=True, crop_scale=self.augment.crop_scale,
                               horizontal_flip=self.augment.horizontal_flip, interpolation=self._train_interpolation())
        return FieldDecoder(self.name, IMAGE_EXTENSIONS, decoder)

    def view_field(self, name: str, views: ViewsConfig) -> FieldDecoder:
        return image_view_field(name, square_size(self.preprocess), views, self._train_interpolation())

    def _train_interpolation(self) -> str:
        interpolation = self.preprocess.interpolation
        if interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(f"open_clip model {self.config.name} resamples with {interpolation!r}; clipkit's "
                             f"training crop does {' or '.join(TRAIN_INTERPOLATIONS)}")
        return interpolation

    def build_tower(self, embed_dim: int) -> nn.Module:
        """This tower alone; :class:`~clipkit.model.ContrastiveModel` takes both from one open_clip model."""
        return open_clip_parts(self.config).towers[self.name]


@functools.lru_cache(maxsize=None)
def tokenizer_of(arch: str) -> Callable[[list[str]], torch.Tensor]:
    """The open_clip tokenizer of ``arch``, built once per process (a BPE vocabulary takes a second)."""
    return open_clip_tokenizer(arch)


def open_clip_tokenize(arch: str, texts: Sequence[str]) -> torch.Tensor:
    """Strings → (N, context_length) token ids with ``arch``'s tokenizer, each text bounded first (a
    one-word megabyte would otherwise keep BPE busy for minutes)."""
    tokenizer = tokenizer_of(arch)
    return tokenizer([bound_text(text, tokenizer.context_length) for text in texts])


class OpenClipTextModality(Modality):
    name = "text"

    def __init__(self, config: OpenClipConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer_of(config.name)

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "OpenClipTextModality":
        return cls(model_config.open_clip)

    def field(self, train: bool) -> FieldDecoder:
        decoder = CaptionDecoder(self.tokenizer.context_length, train, tokenizer=self.tokenizer)
        return FieldDecoder(self.name, TEXT_EXTENSIONS, decoder)

    def build_tower(self, embed_dim: int) -> nn.Module:
        """This tower alone; :class:`~clipkit.model.ContrastiveModel` takes both from one open_clip model."""
        return open_clip_parts(self.config).towers[self.name]


OPEN_CLIP_MODALITIES: dict[str, type[Modality]] = {
    OpenClipImageModality.name: OpenClipImageModality,
    OpenClipTextModality.name: OpenClipTextModality,
}
