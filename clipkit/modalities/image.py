"""Images: JPEG/PNG/WebP bytes → uint8 tensors in workers → normalised on the device → timm tower."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from clipkit.config import AugmentConfig, ImageTowerConfig, ModelConfig
from clipkit.modalities.base import FieldDecoder, Modality
from clipkit.pretrained import create_timm_trunk

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ImageDecoder:
    """Decodes image bytes to a (3, S, S) uint8 tensor; normalisation happens on the device."""

    image_size: int
    train: bool
    crop_scale: tuple[float, float]
    horizontal_flip: bool

    def __post_init__(self) -> None:
        size = self.image_size
        if self.train:
            steps: list = [transforms.RandomResizedCrop(size, scale=self.crop_scale, antialias=True)]
            if self.horizontal_flip:
                steps.append(transforms.RandomHorizontalFlip())
        else:
            steps = [transforms.Resize(size, antialias=True), transforms.CenterCrop(size)]
        self._transform = transforms.Compose(steps)

    def __call__(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG draft mode decodes at a reduced DCT scale that still covers the output size.
            if not self.train:
                img.draft("RGB", (self.image_size, self.image_size))
            rgb = img.convert("RGB")
        out = self._transform(rgb)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageTower(nn.Module):
    """timm trunk + linear projection. Input (B, 3, H, W), uint8 in [0, 255] or float in [0, 1]."""

    def __init__(self, config: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.trunk = create_timm_trunk(
            config.timm_name,
            pretrained=config.pretrained,
            pretrained_file=config.pretrained_file,
            **config.timm_kwargs,
        )
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, embed_dim) unnormalised features."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        images = (images - self.mean) / self.std
        return self.proj(self.trunk(images))


class ImageModality(Modality):
    name = "image"

    def __init__(self, config: ImageTowerConfig, augment: AugmentConfig) -> None:
        self.config = config
        self.augment = augment

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "ImageModality":
        return cls(model_config.image, augment)

    def field(self, train: bool) -> FieldDecoder:
        decoder = ImageDecoder(
            self.config.image_size,
            train=train,
            crop_scale=self.augment.crop_scale,
            horizontal_flip=self.augment.horizontal_flip,
        )
        return FieldDecoder(self.name, IMAGE_EXTENSIONS, decoder)

    def build_tower(self, embed_dim: int) -> nn.Module:
        return ImageTower(self.config, embed_dim)
