"""Evaluation preprocessing on real photographs at odd sizes and aspect ratios (scikit-image's sample
photos, cropped and re-encoded): clipkit's pixels and embeddings against open_clip's own transform
and model."""

from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from clipkit.config import ExperimentConfig
from clipkit.eval.encoders import load_encoder
from clipkit.interop.openclip_export import export_to_open_clip
from clipkit.model import create_model
from clipkit.modalities.image import ImageDecoder
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

# (photo, (left, top, width, height)): wide, tall, tiny, upscaled, square, odd, whole photos.
CROPS = [
    ("astronaut", (100, 60, 97, 80)),
    ("chelsea", (0, 0, 451, 300)),
    ("coffee", (150, 20, 80, 97)),
    ("rocket", (10, 100, 300, 41)),
    ("hubble_deep_field", (0, 0, 1000, 872)),
    ("camera", (200, 50, 13, 200)),  # greyscale
    ("coins", (5, 5, 65, 63)),  # greyscale
    ("colorwheel", (100, 100, 33, 33)),  # smaller than the model's size: upscaled
    ("immunohistochemistry", (0, 0, 64, 64)),  # exactly the model's size at 64
    ("retina", (300, 200, 501, 777)),
]


def photo(name: str, box: tuple[int, int, int, int]) -> Image.Image:
    left, top, width, height = box
    return Image.fromarray(getattr(skimage_data, name)()).crop((left, top, left + width, top + height))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_files() -> list[tuple[str, bytes]]:
    files = []
    for name, box in CROPS:
        image = photo(name, box)
        for image_format in ("JPEG", "PNG"):
            files.append((f"{name}-{box[2]}x{box[3]}.{image_format.lower()}", encoded(image, image_format)))
    return files


@pytest.mark.parametrize("size", [64, 224])
def test_evaluation_pixels_are_open_clips_on_real_photos(photo_files, size):
    # open_clip's evaluation transform with mean 0 and std 1: its pixels in [0, 1] before normalising.
    reference = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    decoder = ImageDecoder(size, train=False, crop_scale=(0.9, 1.0), horizontal_flip=False)
    for name, data in photo_files:
        ours = decoder(data, random.Random(0))
        theirs = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        assert ours.shape == (3, size, size) and ours.dtype == torch.uint8, name
        difference = (ours.float() - theirs * 255).abs().max().item()
        assert difference <= 1.0, f"{name}: {difference} grey levels from open_clip's pixels"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-weight clipkit model at 64 px and its open_clip export."""
    root = tmp_path_factory.mktemp("export")
    config = ExperimentConfig(model=tiny_model_config(image_size=64))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "model.pt", create_model(config.model).eval(), config)
    return checkpoint, export_to_open_clip(checkpoint, root / "open_clip")


def test_embeddings_equal_open_clips_own_on_real_photos(photo_files, exported):
    checkpoint, folder = exported
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    clipkit_model = load_encoder(str(checkpoint))
    decoder = clipkit_model.eval_decoder("image")
    ours = torch.stack([decoder.decode(data, random.Random(0)) for _, data in photo_files])
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in photo_files])
    with torch.no_grad():
        ours_embedded = clipkit_model.encode("image", ours).numpy()
        theirs_embedded = model.encode_image(theirs, normalize=True).numpy()
    gaps = np.abs(ours_embedded - theirs_embedded).max(axis=1)
    assert gaps.max() <= 1e-4, dict(zip([name for name, _ in photo_files], gaps.round(6)))
