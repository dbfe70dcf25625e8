"""Procedural toy video–caption data: a coloured shape that moves or changes size over a still
textured background, encoded to MP4 in memory with PyAV.

A class is a colour–motion pair ("red shape moving left", "blue shape growing": 4 colours × 6
motions = 24 classes), so telling classes apart needs the order of the frames, not just one of them:
left from right, growing from shrinking. The shape (circle, square, triangle), its size, start
position and speed and the background are nuisances. Captions name the colour and the motion in
varied words, and the shape or a generic word for it. Each sample's random draws come from its own
generator (:func:`~clipkit.data.toy_base.sample_rng`), so the output does not depend on sharding.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from clipkit.data.toy import COLOURS, TEXTURES, _background, _shape_points
from clipkit.data.toy_base import ToyDataset, build_toy_dataset, sample_rng
from clipkit.data.writer import ShardWriter

GENERATOR_VERSION = 2

VIDEO_COLOURS = ("red", "green", "blue", "yellow")
VIDEO_SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
# Unit (dx, dy) of each translation, in image coordinates (y grows downwards).
_DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}

ZEROSHOT_TEMPLATES = (
    "a video of a {}.",
    "a {}.",
    "a clip of a {}.",
    "footage of a {}.",
)

# Each motion as a participle phrase ("moving left") and as a present-tense verb phrase ("moves left").
_MOTION_PARTICIPLES = {
    "moving left": ("moving left", "moving to the left", "sliding left", "going left"),
    "moving right": ("moving right", "moving to the right", "sliding right", "going right"),
    "moving up": ("moving up", "moving upwards", "sliding up", "rising"),
    "moving down": ("moving down", "moving downwards", "sliding down", "falling"),
    "growing": ("growing", "getting bigger", "expanding"),
    "shrinking": ("shrinking", "getting smaller", "contracting"),
}
_MOTION_VERBS = {
    "moving left": ("moves left", "slides to the left", "travels left"),
    "moving right": ("moves right", "slides to the right", "travels right"),
    "moving up": ("moves up", "slides upwards", "rises"),
    "moving down": ("moves down", "slides downwards", "falls"),
    "growing": ("grows", "gets bigger", "expands"),
    "shrinking": ("shrinks", "gets smaller", "contracts"),
}
# The generic nouns let class names say "shape" whatever shape a clip shows.
_GENERIC_NOUNS = ("shape", "object")
_CAPTION_TEMPLATES = (
    "a {colour} {noun} {participle}",
    "a {colour} {noun} {verb}",
    "the {colour} {noun} {verb}",
    "something {colour} {verb}",
    "a video of a {colour} {noun} {participle}",
    "a clip of a {colour} {noun} {participle}",
    "a {colour} {noun} {participle} {background}",
    "{background_capitalised}, a {colour} {noun} {verb}",
    "a {noun} coloured {colour}, {participle}",
)
# Size motions also read as adjectives: "a growing red circle".
_SIZE_TEMPLATES = (
    "a {participle_adjective} {colour} {noun}",
    "a video of a {participle_adjective} {colour} {noun}",
)
_BACKGROUND_PHRASES = {
    "plain": "on a plain background", "stripes": "on a striped background",
    "checkerboard": "on a checkered background", "noise": "on a noisy background",
    "gradient": "on a gradient background",
}


@dataclass(frozen=True)
class ToyClip:
    colour: str
    shape: str
    motion: str
    texture: str

    @property
    def class_name(self) -> str:
        return f"{self.colour} shape {self.motion}"

    @property
    def label(self) -> int:
        return VIDEO_COLOURS.index(self.colour) * len(MOTIONS) + MOTIONS.index(self.motion)

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def class_names() -> list[str]:
    """The 24 colour–motion class names, in label order (colour-major)."""
    return [f"{colour} shape {motion}" for colour in VIDEO_COLOURS for motion in MOTIONS]


def _pick(options: tuple[str, ...] | list[str], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def sample_clip(rng: np.random.Generator) -> ToyClip:
    return ToyClip(_pick(VIDEO_COLOURS, rng), _pick(VIDEO_SHAPES, rng), _pick(MOTIONS, rng), _pick(TEXTURES, rng))


def caption(clip: ToyClip, rng: np.random.Generator) -> str:
    """A caption naming the colour and the motion, and the shape or a generic noun for it."""
    noun = clip.shape if rng.random() < 0.6 else _pick(_GENERIC_NOUNS, rng)
    templates = _CAPTION_TEMPLATES
    if clip.motion in ("growing", "shrinking"):
        templates = templates + _SIZE_TEMPLATES
    background = _BACKGROUND_PHRASES[clip.texture]
    return _pick(templates, rng).format(
        colour=clip.colour,
        noun=noun,
        participle=_pick(_MOTION_PARTICIPLES[clip.motion], rng),
        verb=_pick(_MOTION_VERBS[clip.motion], rng),
        participle_adjective=clip.motion,
        background=background,
        background_capitalised=background[0].upper() + background[1:],
    )


def trajectory(motion: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """(num_frames, 3) rows of (centre x, centre y, half side), as fractions of the image side.

    Translations cover 35–55% of the side at a constant speed and never leave the frame; size
    changes go between a half side of 7–12% and one of 24–30%, about a fixed centre.
    """
    time = np.linspace(0.0, 1.0, num_frames)
    margin = 0.02
    if motion in _DIRECTIONS:
        half = rng.uniform(0.12, 0.2)
        low, high = half + margin, 1 - half - margin
        distance = rng.uniform(0.35, 0.55)
        start = rng.uniform(low, high - distance)
        along = start + distance * time
        across = np.full(num_frames, rng.uniform(low, high))
        dx, dy = _DIRECTIONS[motion]
        if dx < 0 or dy < 0:
            along = along[::-1]  # the same path, run backwards
        x, y = (along, across) if dx else (across, along)
        return np.stack([x, y, np.full(num_frames, half)], axis=1)
    small, large = rng.uniform(0.07, 0.12), rng.uniform(0.24, 0.3)
    low, high = large + margin, 1 - large - margin
    centre = rng.uniform(low, high, size=2)
    half = small + (large - small) * time
    if motion == "shrinking":
        half = half[::-1]
    return np.stack([np.full(num_frames, centre[0]), np.full(num_frames, centre[1]), half], axis=1)


def shape_alpha(shape: str, cx: float, cy: float, half: float, image_size: int) -> np.ndarray:
    """(image_size, image_size, 1) float coverage in [0, 1] of the shape centred at (cx, cy) with
    half side ``half`` (all in pixels), with antialiased edges."""
    scale = 4  # draw the mask large and box-downsample it, as the image toy does
    cx, cy, half = cx * scale, cy * scale, half * scale
    mask = Image.new("L", (image_size * scale, image_size * scale), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=255)
    elif shape == "square":
        inset = half * 0.12  # a square's area reads larger than a circle's of the same box
        draw.rectangle((cx - half + inset, cy - half + inset, cx + half - inset, cy + half - inset), fill=255)
    else:
        draw.polygon(_shape_points(shape, cx, cy, half), fill=255)
    return np.asarray(mask.reduce(scale), np.float32)[..., None] / 255.0


def render_clip(clip: ToyClip, rng: np.random.Generator, image_size: int, num_frames: int) -> np.ndarray:
    """The clip as (num_frames, image_size, image_size, 3) uint8 RGB frames."""
    path = trajectory(clip.motion, num_frames, rng) * image_size
    colour = np.clip(np.array(COLOURS[clip.colour]) + rng.uniform(-15, 15, size=3), 0, 255)
    background = _background(clip.texture, image_size, rng)
    frames = []
    for cx, cy, half in path:
        alpha = shape_alpha(clip.shape, cx, cy, half, image_size)
        frames.append(background * (1 - alpha) + colour * alpha)
    return np.clip(np.stack(frames) + 0.5, 0, 255).astype(np.uint8)


def video_codec() -> str:
    """H.264 where the av wheel has libx264 (PyPI's do), else MPEG-4 part 2, which FFmpeg always has."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(T, H, W, 3) uint8 RGB frames (H and W even: yuv420p halves them) → MP4 file bytes."""
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p video needs an even width and height, got {width} × {height}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = video_codec()
        # crf 18 keeps a 32-px clip's colours and edges; mpeg4 takes a bit rate instead. x264's
        # macroblock-tree rate control makes a few clips in a hundred differ from run to run, so it is
        # off: the toy data must be byte-identical whenever it is generated.
        options = ({"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"} if codec == "libx264"
                   else {"b": "1000000"})
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # x264's lookahead threads make its output vary from run to run; one thread makes it repeatable.
        stream.codec_context.thread_count = 1
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            # Timestamps at the stream's rate, so players and decoders see ``fps``.
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_split(
    out_dir: Path, split: str, num_samples: int, with_labels: bool, *, image_size: int, num_frames: int,
    fps: int, seed: int, samples_per_shard: int,
) -> list[Path]:
    """Write ``num_samples`` clips of ``split`` as ``{split}-NNNNNN.tar`` shards; returns their paths."""
    with ShardWriter(out_dir, split, samples_per_shard) as writer:
        for index in range(num_samples):
            rng = sample_rng(seed, split, index)
            clip = sample_clip(rng)
            text = caption(clip, rng)
            video = encode_mp4(render_clip(clip, rng, image_size, num_frames), fps)
            key = f"{split}{index:08d}"
            meta = {"key": key, "caption": text, **clip.to_json()}
            files = {"mp4": video, "txt": text.encode()}
            if with_labels:
                meta.update(label=clip.label, class_name=clip.class_name)
                files["cls"] = str(clip.label).encode()
            files["json"] = json.dumps(meta).encode()
            writer.write(key, files)
    return writer.shard_paths


def make_toy_video_text(
    out_dir: Path,
    *,
    num_train: int,
    num_eval: int,
    image_size: int = 32,
    num_frames: int = 8,
    fps: int = 8,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> ToyDataset:
    """Write (or reuse, when the same parameters were written before) the toy video–text dataset.

    Clips hold 2 × ``num_frames`` frames of ``image_size`` pixels square at ``fps`` frames per
    second: a video tower sampling ``num_frames`` of them takes one of each pair, a different one
    from epoch to epoch in training.
    """
    params = {"generator": "video-text", "version": GENERATOR_VERSION, "num_train": num_train,
              "num_eval": num_eval, "image_size": image_size, "num_frames": num_frames, "fps": fps,
              "seed": seed, "samples_per_shard": samples_per_shard}
    write = functools.partial(write_split, image_size=image_size, num_frames=2 * num_frames, fps=fps, seed=seed,
                              samples_per_shard=samples_per_shard)
    return build_toy_dataset(out_dir, params, num_train=num_train, num_eval=num_eval,
                             samples_per_shard=samples_per_shard, classnames=class_names(),
                             templates=ZEROSHOT_TEMPLATES, write_split=write)
