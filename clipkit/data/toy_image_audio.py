"""Toy image–audio pairs for ImageBind-style binding: each sound kind has a shape, each pitch a colour.

A pair is a toy sound (``clipkit.data.toy_audio``) and a toy image of its partner: beep ↔ circle,
chirp ↔ triangle, noise ↔ square, pulses ↔ star; low ↔ blue, mid ↔ green, high ↔ red (size,
position and background stay random). An audio tower trained against a frozen image tower of an
image–text model then classifies sounds with that model's text tower and image class names
("a photo of a red circle") without ever seeing audio with text: ImageBind's emergent zero-shot.
Samples hold ``KEY.jpg``, ``KEY.flac``, ``KEY.txt`` (the image's caption) and ``KEY.json``; the
held-out split adds ``KEY.cls`` over the 12 pair classes, named by their image class.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import soundfile

from clipkit.data import toy, toy_audio
from clipkit.data.toy_base import ToyDataset, build_toy_dataset, sample_rng
from clipkit.data.writer import ShardWriter

GENERATOR_VERSION = 1
SHAPE_OF_KIND = {"beep": "circle", "chirp": "triangle", "noise": "square", "pulses": "star"}
COLOUR_OF_PITCH = {"low": "blue", "mid": "green", "high": "red"}


def class_names() -> list[str]:
    """The image class of each of the 12 sound classes, in the sound classes' label order."""
    return [f"{COLOUR_OF_PITCH[pitch]} {SHAPE_OF_KIND[kind]}" for kind in toy_audio.KINDS for pitch in toy_audio.PITCHES]


def write_split(out_dir: Path, split: str, num_samples: int, with_labels: bool, *, image_size: int,
                sample_rate: int, clip_seconds: float, seed: int, samples_per_shard: int) -> list[Path]:
    with ShardWriter(out_dir, split, samples_per_shard) as writer:
        for index in range(num_samples):
            rng = sample_rng(seed, split, index)
            sound = toy_audio.sample_sound(rng, clip_seconds)
            drawn = toy.sample_attributes(rng)
            attrs = toy.ToyAttributes(COLOUR_OF_PITCH[sound.pitch], SHAPE_OF_KIND[sound.kind], drawn.size,
                                      drawn.position, drawn.texture)
            text = toy.caption(attrs, rng)
            image, audio = io.BytesIO(), io.BytesIO()
            toy.render(attrs, rng, image_size).save(image, format="JPEG", quality=90)
            soundfile.write(audio, toy_audio.synthesize(sound, rng, sample_rate, clip_seconds), sample_rate,
                            format="FLAC")
            key = f"{split}{index:08d}"
            meta = {"key": key, "caption": text, "sound": sound.class_name, **attrs.to_json()}
            files = {"jpg": image.getvalue(), "flac": audio.getvalue(), "txt": text.encode()}
            if with_labels:
                meta.update(label=sound.label, class_name=attrs.class_name)
                files["cls"] = str(sound.label).encode()
            files["json"] = json.dumps(meta).encode()
            writer.write(key, files)
    return writer.shard_paths


def make_toy_image_audio(
    out_dir: Path,
    *,
    num_train: int,
    num_eval: int,
    image_size: int = 64,
    sample_rate: int = 16_000,
    clip_seconds: float = 1.0,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> ToyDataset:
    """Write (or reuse, when written before with the same parameters) the toy image–audio pairs."""
    params = {"version": GENERATOR_VERSION, "kind": "image-audio", "num_train": num_train, "num_eval": num_eval,
              "image_size": image_size, "sample_rate": sample_rate, "clip_seconds": clip_seconds, "seed": seed,
              "samples_per_shard": samples_per_shard}

    def write(folder: Path, split: str, count: int, with_labels: bool) -> list[Path]:
        return write_split(folder, split, count, with_labels, image_size=image_size, sample_rate=sample_rate,
                           clip_seconds=clip_seconds, seed=seed, samples_per_shard=samples_per_shard)

    return build_toy_dataset(out_dir, params, num_train=num_train, num_eval=num_eval,
                             samples_per_shard=samples_per_shard, classnames=class_names(),
                             templates=toy.ZEROSHOT_TEMPLATES, write_split=write)
