"""Images: JPEG/PNG/WebP bytes → uint8 tensors in workers → normalised on the device → timm tower."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from clipkit.config import AugmentConfig, ModelConfig, ViewsConfig
from clipkit.modalities.base import FieldDecoder, Modality, register_modality
from clipkit.modalities.image_views import ViewDecoder
from clipkit.pretrained import create_timm_trunk


@dataclass
class ImageTowerConfig:
    """A timm trunk whose pooled features are projected to the shared embedding width."""

    timm_name: str = "resnet18"
    pretrained: bool = False
    # A local timm checkpoint (.safetensors / .pth); the hub is used only when this is unset and
    # `pretrained` is true.
    pretrained_file: str | None = None
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Extra keyword arguments for `timm.create_model` (drop_path_rate, widths of test models, ...).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # LiT ("lock image tower"): freeze the whole tower, weights and normalisation statistics.
    lock: bool = False


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


def resize_centre_crop(img: Image.Image, size: int) -> torch.Tensor:
    """open_clip's evaluation transform without its normalisation: the RGB image with its shorter side
    resized to ``size`` (bicubic, antialiased), then the centred ``size`` × ``size`` crop, as a
    (3, size, size) uint8 tensor.

    These are the torchvision calls that ``open_clip.image_transform(size, is_train=False)`` makes,
    on the fully decoded image, so the pixels are open_clip's (and CLIP_benchmark's) exactly. JPEG
    draft decoding is not used here: decoding at a reduced DCT scale and resampling from there moved
    pixels by up to 5 grey levels, enough to change accuracy against open_clip's numbers.
    """
    resized = TF.resize(img.convert("RGB"), size, interpolation=InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(resized, [size, size]))


def draft_request(width: int, height: int, box: tuple[int, int, int, int], size: int) -> tuple[int, int]:
    """The image size to ask JPEG draft mode for so that ``box`` still spans at least ``size`` pixels
    each way: draft decodes at the coarsest DCT scale (1/8, 1/4, 1/2) that leaves the image at least
    this large, or at full size."""
    _, _, crop_height, crop_width = box
    return math.ceil(width * size / crop_width), math.ceil(height * size / crop_height)


def decode_region(img: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Decode the part of ``img`` that ``box`` (top, left, height, width) covers, at the smallest JPEG
    scale at which it still spans ``size`` pixels each way.

    Returns an (h, w, 3) uint8 view with ``size`` <= h, w (to within a pixel of rounding) unless the box
    itself is smaller; other formats than JPEG decode at full size.
    """
    width, height = img.size
    drafted = img.draft("RGB", draft_request(width, height, box, size))
    scale = width / drafted[1][2] if drafted else 1.0  # draft reports the full image's box in scaled pixels
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb))  # np.array, not asarray: torch needs a writable buffer
    top, left, crop_height, crop_width = box
    rows = slice(round(top / scale), round((top + crop_height) / scale))
    columns = slice(round(left / scale), round((left + crop_width) / scale))
    return pixels[rows, columns]


def resize_region(pixels: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """(h, w, 3) uint8 → (3, size, size) uint8, antialiased ``mode`` (bicubic or bilinear, as PIL's and
    open_clip's resize).

    The permuted view is a channels-last (1, 3, h, w) batch: the layout torch's vectorised uint8
    resampling reads directly, about twice as fast as PIL's resize of the same crop.
    """
    batch = pixels.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(batch, size=(size, size), mode=mode, antialias=True)[0]


@dataclass
class ImageDecoder:
    """Decodes image bytes to a (3, S, S) uint8 tensor; normalisation happens on the device.

    Training draws a random resized crop (area fraction ``crop_scale``) and, when enabled, a
    horizontal flip from the per-sample ``rng``. Its crop box is chosen from the JPEG header alone,
    so the image is decoded at the smallest DCT scale that still covers the box at S pixels and only
    the box is resampled. Evaluation is open_clip's transform exactly (:func:`resize_centre_crop`).
    Nothing is converted to float in the worker.
    """

    image_size: int
    train: bool
    crop_scale: tuple[float, float]
    horizontal_flip: bool
    # The training crop's resampling: "bicubic" or "bilinear" (an open_clip model's own setting).
    interpolation: str = "bicubic"

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            if not self.train:
                return resize_centre_crop(img, self.image_size)
            box = random_resized_crop_box(*img.size, self.crop_scale, rng)
            out = resize_region(decode_region(img, box, self.image_size), self.image_size, self.interpolation)
        if self.horizontal_flip and rng.random() < 0.5:
            out = out.flip(-1)
        return out


def image_view_field(name: str, image_size: int, views: ViewsConfig, interpolation: str = "bicubic") -> FieldDecoder:
    """The decoder of the view batched as ``name``. Each view has its own name, so the pipeline seeds
    it apart from the sample's other views (``{seed}/{key}/{name}``)."""
    crop = ImageDecoder(image_size, train=True, crop_scale=views.crop_scale, horizontal_flip=views.horizontal_flip,
                        interpolation=interpolation)
    return FieldDecoder(name, IMAGE_EXTENSIONS, ViewDecoder(crop, views))


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


@register_modality
class ImageModality(Modality):
    name = "image"
    config_section = ImageTowerConfig
    template_sets = {
        # Photographs of objects, with the variations web alt-text usually has.
        "photo": (
            "a photo of a {}.",
            "a photo of the {}.",
            "a close-up photo of a {}.",
            "a cropped photo of a {}.",
            "a bright photo of a {}.",
            "a dark photo of a {}.",
            "a blurry photo of a {}.",
            "a low resolution photo of a {}.",
            "a good photo of a {}.",
            "a photo of a small {}.",
            "a photo of a large {}.",
            "an image of a {}.",
            "a picture of a {}.",
            "a drawing of a {}.",
            "a rendering of a {}.",
            "art of a {}.",
        ),
    }

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

    def view_field(self, name: str, views: ViewsConfig) -> FieldDecoder:
        return image_view_field(name, self.config.image_size, views)

    def build_tower(self, embed_dim: int) -> nn.Module:
        return ImageTower(self.config, embed_dim)
