"""Images: JPEG/PNG/WebP bytes → uint8 tensors in workers → normalised on the device → timm tower."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import functional as TF

from clipkit.config import AugmentConfig, ImageTowerConfig, ModelConfig
from clipkit.modalities.base import FieldDecoder, Modality
from clipkit.pretrained import create_timm_trunk

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# torchvision's RandomResizedCrop defaults: aspect ratios 3/4 to 4/3, 10 tries before the fallback.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with its draws taken from ``rng``.

    Returns (top, left, crop_height, crop_width) of a box covering a ``scale`` fraction of the area
    with a log-uniform aspect ratio in ``ratio``; after ``CROP_ATTEMPTS`` boxes that do not fit, the
    largest centred box whose aspect ratio is within ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    in_ratio = width / height
    crop_w, crop_h = width, height
    if in_ratio < min(ratio):
        crop_h = round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w = round(height * max(ratio))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass
class ImageDecoder:
    """Decodes image bytes to a (3, S, S) uint8 tensor; normalisation happens on the device.

    Training draws a random resized crop (area fraction ``crop_scale``) and, when enabled, a
    horizontal flip from the per-sample ``rng``; evaluation resizes and centre-crops.
    """

    image_size: int
    train: bool
    crop_scale: tuple[float, float]
    horizontal_flip: bool

    def __post_init__(self) -> None:
        size = self.image_size
        self._eval_transform = transforms.Compose(
            [transforms.Resize(size, antialias=True), transforms.CenterCrop(size)]
        )

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG draft mode decodes at a reduced DCT scale that still covers the output size.
            if not self.train:
                img.draft("RGB", (self.image_size, self.image_size))
            rgb = img.convert("RGB")
        out = self._augment(rgb, rng) if self.train else self._eval_transform(rgb)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """A random resized crop to (S, S), then a random horizontal flip when enabled."""
        top, left, height, width = random_resized_crop_box(img.width, img.height, self.crop_scale, rng)
        size = [self.image_size, self.image_size]
        out = TF.resized_crop(img, top, left, height, width, size, antialias=True)
        if self.horizontal_flip and rng.random() < 0.5:
            out = TF.hflip(out)
        return out


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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

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
