"""The fast training decoder (JPEG draft mode, crop before resize, uint8 out) against plain torchvision.
The evaluation transform against open_clip's is in test_eval_preprocessing.py."""

import hashlib
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clipkit.data.toy import make_toy_image_text, render, sample_attributes
from clipkit.modalities.image import (
    ImageDecoder,
    decode_region,
    draft_request,
    random_resized_crop_box,
)

SIZE = 224
SCALE = (0.9, 1.0)  # open_clip's default crop area


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def web_like_jpegs() -> list[bytes]:
    """Eight 512-px toy images with grain: every texture, JPEGs of web-photo size."""
    images = []
    for index in range(8):
        rng = np.random.default_rng([7, index])
        images.append(jpeg(render(sample_attributes(rng), rng, 512, pixel_noise=8.0)))
    return images


def reference_crop(data: bytes, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The plain path: decode everything, then torchvision's resized crop (bicubic, antialiased)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return TF.pil_to_tensor(TF.resized_crop(image, *box, [SIZE, SIZE], InterpolationMode.BICUBIC, antialias=True))


def sharpness(images: torch.Tensor) -> float:
    """Mean absolute difference of horizontally adjacent pixels: falls when an image is blurred."""
    images = images.float()
    return (images[..., 1:] - images[..., :-1]).abs().mean().item()


def test_same_crop_box_gives_nearly_the_same_pixels_as_full_decoding(web_like_jpegs):
    decoder = ImageDecoder(SIZE, train=True, crop_scale=SCALE, horizontal_flip=False)
    errors = []
    for index, data in enumerate(web_like_jpegs):
        ours = decoder(data, random.Random(index))
        box = random_resized_crop_box(512, 512, SCALE, random.Random(index))  # the decoder's own draws
        reference = reference_crop(data, box)
        assert ours.shape == reference.shape == (3, SIZE, SIZE) and ours.dtype == torch.uint8
        errors.append((ours.float() - reference.float()).abs().mean().item())
        # Decoding at half scale must not blur: the crop keeps its fine detail (grain, stripes).
        assert sharpness(ours) == pytest.approx(sharpness(reference), rel=0.15)
    # A few grey levels at most (stripes and checkerboards differ most at their edges).
    assert max(errors) < 6 and np.mean(errors) < 3


def test_training_crops_match_torchvision_random_resized_crop_statistics(web_like_jpegs):
    decoder = ImageDecoder(SIZE, train=True, crop_scale=SCALE, horizontal_flip=False)
    reference = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.PILToTensor(),
    ])
    crops = 4  # independent random boxes per image in each pipeline
    torch.manual_seed(0)
    ours = torch.stack([decoder(data, random.Random(f"{i}/{k}"))
                        for i, data in enumerate(web_like_jpegs) for k in range(crops)])
    theirs = torch.stack([reference(Image.open(io.BytesIO(data)).convert("RGB"))
                          for data in web_like_jpegs for _ in range(crops)])
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    ours, theirs = ours.float(), theirs.float()
    assert abs(ours.min() - theirs.min()) <= 10 and abs(ours.max() - theirs.max()) <= 10
    # Per channel over all crops: the same distribution of values.
    assert torch.allclose(ours.mean(dim=(0, 2, 3)), theirs.mean(dim=(0, 2, 3)), atol=1)
    assert torch.allclose(ours.std(dim=(0, 2, 3)), theirs.std(dim=(0, 2, 3)), rtol=0.02)
    # Per image: different boxes over 90-100% of it, so channel means within a few levels.
    per_image = lambda x: x.view(len(web_like_jpegs), crops, 3, -1).mean(dim=(1, 3))  # noqa: E731
    assert torch.allclose(per_image(ours), per_image(theirs), atol=3)
    assert sharpness(ours) == pytest.approx(sharpness(theirs), rel=0.1)


def test_image_at_its_output_size_passes_through_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = ImageDecoder(48, train=False, crop_scale=SCALE, horizontal_flip=False)(buffer.getvalue(), random.Random(0))
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1))


def test_draft_decodes_at_the_coarsest_scale_that_covers_the_box():
    data = jpeg(Image.new("RGB", (512, 384), (90, 120, 200)))
    whole = (0, 0, 384, 512)
    assert draft_request(512, 384, whole, 100) == (100, 100)
    # 1/2 covers 100 px (256 × 192); 1/4 would not (128 × 96).
    assert decode_region(Image.open(io.BytesIO(data)), whole, 100).shape == (192, 256, 3)
    assert decode_region(Image.open(io.BytesIO(data)), whole, 40).shape == (48, 64, 3)  # 1/8
    assert decode_region(Image.open(io.BytesIO(data)), whole, 300).shape == (384, 512, 3)  # full size
    # A crop of 200 × 300 at 90 px: 1/2 scale, the box mapped onto the half-size image.
    region = decode_region(Image.open(io.BytesIO(data)), (10, 20, 200, 300), 90)
    assert region.shape == (100, 150, 3)
    assert torch.allclose(region.float().mean(dim=(0, 1)), torch.tensor([90.0, 120.0, 200.0]), atol=2)


def test_decoded_region_always_covers_the_output_size():
    data = jpeg(Image.new("RGB", (640, 480), (10, 20, 30)))
    rng = random.Random(0)
    for _ in range(100):
        size = rng.choice([32, 64, 100, 224])
        box = random_resized_crop_box(640, 480, (0.05, 1.0), rng)
        height, width = decode_region(Image.open(io.BytesIO(data)), box, size).shape[:2]
        _, _, box_height, box_width = box
        # At least the output size (to a pixel of rounding), unless the box itself is smaller...
        assert height >= min(size, box_height) - 1 and width >= min(size, box_width) - 1
        # ...and never twice as large as needed when a coarser scale was possible (8 is the coarsest).
        if min(height, width) >= 2 * size + 2:
            assert (box_height / height, box_width / width) == pytest.approx((8, 8), rel=0.05)


def test_augmentation_is_deterministic_per_rng_and_flips_when_asked(web_like_jpegs):
    data = web_like_jpegs[0]
    decoder = ImageDecoder(64, train=True, crop_scale=(0.3, 1.0), horizontal_flip=True)
    assert torch.equal(decoder(data, random.Random(5)), decoder(data, random.Random(5)))
    outputs = [decoder(data, random.Random(seed)) for seed in range(8)]
    assert len({out.numpy().tobytes() for out in outputs}) == 8
    # A flip happens after the crop draws, so a mirrored copy of an unflipped crop must appear.
    plain = ImageDecoder(64, train=True, crop_scale=(0.3, 1.0), horizontal_flip=False)
    flipped = [seed for seed in range(8) if torch.equal(outputs[seed], plain(data, random.Random(seed)).flip(-1))]
    unflipped = [seed for seed in range(8) if torch.equal(outputs[seed], plain(data, random.Random(seed)))]
    assert flipped and unflipped and len(flipped) + len(unflipped) == 8


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA"])
def test_other_colour_modes_become_rgb(mode):
    image = Image.new("RGB", (120, 90), (200, 40, 40)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode == "RGBA" else "JPEG")
    for train in (True, False):
        out = ImageDecoder(32, train=train, crop_scale=SCALE, horizontal_flip=False)(buffer.getvalue(), random.Random(0))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_toy_grain_option_makes_web_sized_jpegs_and_leaves_the_default_unchanged(tmp_path: Path):
    default = make_toy_image_text(tmp_path / "clean", num_train=6, num_eval=3, image_size=48, samples_per_shard=4)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in default.train_shards + default.eval_shards))
    # Recorded before the option existed: the quickstart's data (and its measured figures) stay the same.
    assert digest.hexdigest() == "b0d2de7f05f5f08020819d05ee39fd901df98889c628d5a04a866047d67cb721"
    assert "pixel_noise" not in (tmp_path / "clean" / "toy.json").read_text()
    noisy = make_toy_image_text(tmp_path / "noisy", num_train=6, num_eval=3, image_size=48, samples_per_shard=4,
                                pixel_noise=8.0)

    def members(shard: Path) -> dict[str, bytes]:
        with tarfile.open(shard) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    clean, grainy = members(default.train_shards[0]), members(noisy.train_shards[0])
    assert clean.keys() == grainy.keys()
    images = [name for name in clean if name.endswith(".jpg")]
    assert all(clean[name] == grainy[name] for name in clean if name not in images)  # same captions, attributes
    for name in images:
        pixels = [np.asarray(Image.open(io.BytesIO(files[name])), np.float32) for files in (clean, grainy)]
        grain = pixels[1] - pixels[0]
        assert abs(grain.mean()) < 1 and 4 < grain.std() < 10  # the same picture under grain of std 8
