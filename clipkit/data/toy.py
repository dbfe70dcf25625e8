"""Procedural toy data: coloured shapes on textured backgrounds, with varied captions.

Every image has a colour, a shape, a size, a position and a background texture; its caption always
names the colour and the shape and sometimes the rest. A class is a colour–shape pair (24 classes),
so the held-out split serves zero-shot classification. Each sample's random draws come from its own
generator seeded by (seed, split, index), so the output does not depend on sharding.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipkit.data.toy_base import ToyDataset, build_toy_dataset, sample_rng
from clipkit.data.writer import ShardWriter

GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
# Side of the shape's bounding box as a fraction of the image side.
SIZES = {"small": 0.28, "medium": 0.42, "large": 0.58}
# (column, row) on a 3 × 3 grid: 0 = left / top, 1 = middle, 2 = right / bottom.
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
TEXTURES = ("plain", "stripes", "checkerboard", "noise", "gradient")

ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a picture showing a {}.",
)

_SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium-sized", "mid-sized", ""),
               "large": ("large", "big", "huge")}
_POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
_TEXTURE_PHRASES = {
    "plain": "on a plain background", "stripes": "on a striped background",
    "checkerboard": "on a checkered background", "noise": "on a noisy background",
    "gradient": "on a gradient background",
}
_CAPTION_TEMPLATES = (
    "a photo of {a_size_colour_shape}",
    "{a_size_colour_shape} {position}",
    "{a_colour_shape} {texture}",
    "there is {a_size_colour_shape} {position}",
    "an image showing {a_colour_shape}",
    "{colour} {shape}, {size} size, {position_short}",
    "{a_colour_shape}",
    "a picture of {a_colour_shape} {position} {texture}",
    "a drawing of {a_size_colour_shape}",
    "{a_size_shape} coloured {colour} {texture}",
    "{position_capitalised}, {a_size_colour_shape}",
    "one {colour} {shape} {texture}",
)


@dataclass(frozen=True)
class ToyAttributes:
    colour: str
    shape: str
    size: str
    position: str
    texture: str

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def label(self) -> int:
        return list(COLOURS).index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def class_names() -> list[str]:
    """The 24 colour–shape class names, in label order (colour-major)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def sample_attributes(rng: np.random.Generator) -> ToyAttributes:
    def pick(options) -> str:
        options = list(options)
        return options[rng.integers(len(options))]

    return ToyAttributes(pick(COLOURS), pick(SHAPES), pick(SIZES), pick(POSITIONS), pick(TEXTURES))


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(attrs: ToyAttributes, rng: np.random.Generator) -> str:
    """A natural caption naming the colour and shape, and sometimes size, position and texture."""
    size_word = _SIZE_WORDS[attrs.size][rng.integers(3)]
    size_colour_shape = " ".join(w for w in (size_word, attrs.colour, attrs.shape) if w)
    size_shape = " ".join(w for w in (size_word, attrs.shape) if w)
    position = _POSITION_PHRASES[attrs.position]
    slots = {
        "colour": attrs.colour,
        "shape": attrs.shape,
        "size": attrs.size,
        "a_size_colour_shape": _with_article(size_colour_shape),
        "a_colour_shape": _with_article(f"{attrs.colour} {attrs.shape}"),
        "a_size_shape": _with_article(size_shape),
        "position": position,
        "position_short": attrs.position,
        "position_capitalised": position[0].upper() + position[1:],
        "texture": _TEXTURE_PHRASES[attrs.texture],
    }
    return _CAPTION_TEMPLATES[rng.integers(len(_CAPTION_TEMPLATES))].format(**slots)


def _background(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float array of a grey, low-chroma texture: never one of the shape colours."""
    grey = rng.uniform(80, 180)
    tint = rng.uniform(-8, 8, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "plain":
        field = np.zeros((size, size), np.float32)
    elif texture == "stripes":
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        period = rng.uniform(0.08, 0.2) * size
        field = 30.0 * np.sign(np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period))
    elif texture == "checkerboard":
        cell = max(2, int(rng.uniform(0.07, 0.16) * size))
        field = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 25.0, -25.0)
    elif texture == "noise":
        field = rng.normal(0.0, 25.0, size=(size, size))
    elif texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / size
        field = 80.0 * (ramp - ramp.mean())
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.clip(grey + field[..., None] + tint, 0, 255).astype(np.float32)


def _shape_points(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = half if i % 2 == 0 else half * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None


def render(
    attrs: ToyAttributes, rng: np.random.Generator, image_size: int, pixel_noise: float = 0.0
) -> Image.Image:
    """Draw the sample as an RGB image of image_size × image_size pixels.

    ``pixel_noise`` > 0 adds Gaussian grain of that standard deviation to every pixel and channel,
    drawn after everything else so the sample's content stays the same.
    """
    scale = 4  # draw the mask large and box-downsample it: antialiased edges at any output size
    big = image_size * scale
    half = SIZES[attrs.size] * big / 2
    column, row = POSITIONS[attrs.position]
    margin = 0.03 * big
    span = big - 2 * (half + margin)
    cx = half + margin + span * min(1.0, max(0.0, column / 2 + rng.uniform(-0.06, 0.06)))
    cy = half + margin + span * min(1.0, max(0.0, row / 2 + rng.uniform(-0.06, 0.06)))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - half, cy - half, cx + half, cy + half)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=255)
    elif attrs.shape == "square":
        inset = half * 0.12  # a square's area reads larger than a circle's of the same box
        draw.rectangle((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), fill=255)
    else:
        draw.polygon(_shape_points(attrs.shape, cx, cy, half), fill=255)
    alpha = np.asarray(mask.reduce(scale), np.float32)[..., None] / 255.0
    colour = np.clip(np.array(COLOURS[attrs.colour]) + rng.uniform(-15, 15, size=3), 0, 255)
    background = _background(attrs.texture, image_size, rng)
    pixels = background * (1 - alpha) + colour * alpha
    if pixel_noise > 0:
        pixels = pixels + rng.normal(0.0, pixel_noise, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_split(
    out_dir: Path,
    split: str,
    num_samples: int,
    *,
    image_size: int,
    seed: int,
    samples_per_shard: int,
    with_labels: bool,
    jpeg_quality: int = 90,
    pixel_noise: float = 0.0,
) -> list[Path]:
    """Write ``num_samples`` samples of ``split`` as ``{split}-NNNNNN.tar`` shards; returns their paths."""
    with ShardWriter(out_dir, split, samples_per_shard) as writer:
        for index in range(num_samples):
            rng = sample_rng(seed, split, index)
            attrs = sample_attributes(rng)
            text = caption(attrs, rng)
            buffer = io.BytesIO()
            render(attrs, rng, image_size, pixel_noise).save(buffer, format="JPEG", quality=jpeg_quality)
            key = f"{split}{index:08d}"
            meta = {"key": key, "caption": text, **attrs.to_json()}
            files = {"jpg": buffer.getvalue(), "txt": text.encode()}
            if with_labels:
                meta.update(label=attrs.label, class_name=attrs.class_name)
                files["cls"] = str(attrs.label).encode()
            files["json"] = json.dumps(meta).encode()
            writer.write(key, files)
    return writer.shard_paths


def make_toy_image_text(
    out_dir: Path,
    *,
    num_train: int,
    num_eval: int,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    pixel_noise: float = 0.0,
) -> ToyDataset:
    """Write (or reuse, when the same parameters were written before) the toy image–text dataset.

    ``pixel_noise`` (grain std in 0–255 units) makes JPEGs as costly to decode as web photos: at
    512 px, 8 gives files of about 95 KB. The default, 0, writes the clean images.
    """
    params = {"version": GENERATOR_VERSION, "num_train": num_train, "num_eval": num_eval,
              "image_size": image_size, "seed": seed, "samples_per_shard": samples_per_shard}
    if pixel_noise:  # recorded only when set, so datasets written before the option stay cached
        params["pixel_noise"] = pixel_noise

    def write(folder: Path, split: str, count: int, with_labels: bool) -> list[Path]:
        return write_split(folder, split, count, image_size=image_size, seed=seed,
                           samples_per_shard=samples_per_shard, with_labels=with_labels, pixel_noise=pixel_noise)

    return build_toy_dataset(out_dir, params, num_train=num_train, num_eval=num_eval,
                             samples_per_shard=samples_per_shard, classnames=class_names(),
                             templates=ZEROSHOT_TEMPLATES, write_split=write)
