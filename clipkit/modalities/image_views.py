"""Views of one image for the self-supervised methods: a training crop (a random resized crop and flip:
:class:`~clipkit.modalities.image.ImageDecoder`), then SimCLR's and BYOL's photometric augmentations
of the uint8 crop.

Every parameter is drawn from the sample's seeded ``random.Random`` and applied with torchvision's
functional ops, not its transform classes: those draw from torch's global generator, which would make
a view depend on the data worker the sample lands on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF

from clipkit.config import ViewsConfig

# SimCLR's and BYOL's blur: sigma drawn from [0.1, 2.0] pixels, whatever the image size (as lightly's).
BLUR_SIGMA = (0.1, 2.0)


def color_jitter(image: torch.Tensor, strengths: tuple[float, float, float, float],
                 rng: random.Random) -> torch.Tensor:
    """torchvision's ``ColorJitter``: brightness, contrast and saturation factors from [1 − s, 1 + s], a
    hue shift from [−h, h], applied in a random order. (3, H, W) uint8 → (3, H, W) uint8."""
    brightness, contrast, saturation, hue = strengths
    adjustments = [
        lambda x: TF.adjust_brightness(x, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        lambda x: TF.adjust_contrast(x, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
        lambda x: TF.adjust_saturation(x, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
        lambda x: TF.adjust_hue(x, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(adjustments)
    for adjust in adjustments:
        image = adjust(image)
    return image


def gaussian_blur(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A Gaussian blur of sigma drawn from ``BLUR_SIGMA``, its kernel ±3 sigma (at most the image).
    (3, S, S) uint8 → (3, S, S) uint8."""
    sigma = rng.uniform(*BLUR_SIGMA)
    side = image.shape[-1]
    kernel = min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def photometric(image: torch.Tensor, views: ViewsConfig, rng: random.Random) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarisation, each with its probability. (3, S, S) uint8."""
    if rng.random() < views.color_jitter_p:
        image = color_jitter(image, views.color_jitter, rng)
    if rng.random() < views.grayscale_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < views.blur_p:
        image = gaussian_blur(image, rng)
    if rng.random() < views.solarize_p:
        image = TF.solarize(image, 128)
    return image.contiguous()


@dataclass
class ViewDecoder:
    """Image bytes → one strongly augmented (3, S, S) uint8 view; picklable for data workers. ``crop``
    decodes the training crop (drawing from the same ``rng``)."""

    crop: Callable[[bytes, random.Random], torch.Tensor]
    views: ViewsConfig

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return photometric(self.crop(data, rng), self.views, rng)
