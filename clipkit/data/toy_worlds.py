"""The toy world of each modality paired with text (and of audio bound to images): which generator,
where it is cached, its size and the example queries the quickstart searches with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipkit.config import ModelConfig
from clipkit.data.toy_base import ToyDataset


@dataclass(frozen=True)
class ToyWorld:
    name: str  # e.g. "audio-text"; the toy configs read their shards from toy-data/NAME
    modality: str  # the modality evaluated against text
    num_train: int
    num_eval: int
    queries: tuple[str, ...]
    # (model config, output folder, num_train, num_eval, seed, samples_per_shard) → the dataset
    make: Callable[[ModelConfig, Path, int, int, int, int], ToyDataset]
    # model config → the dataset's folder name in a cache (it names the settings it depends on)
    folder: Callable[[ModelConfig], str]


def _image(model: ModelConfig, out: Path, num_train: int, num_eval: int, seed: int, per_shard: int) -> ToyDataset:
    from clipkit.data.toy import make_toy_image_text

    size = model.image.image_size
    return make_toy_image_text(out, num_train=num_train, num_eval=num_eval,
                               image_size=size, seed=seed, samples_per_shard=per_shard)


def _audio(model: ModelConfig, out: Path, num_train: int, num_eval: int, seed: int, per_shard: int) -> ToyDataset:
    from clipkit.data.toy_audio import make_toy_audio_text

    audio = model.audio
    return make_toy_audio_text(out, num_train=num_train, num_eval=num_eval, sample_rate=audio.sample_rate,
                               clip_seconds=audio.clip_seconds, seed=seed, samples_per_shard=per_shard)


def _video(model: ModelConfig, out: Path, num_train: int, num_eval: int, seed: int, per_shard: int) -> ToyDataset:
    from clipkit.data.toy_video import make_toy_video_text

    size, frames = model.image.image_size, model.video.num_frames
    return make_toy_video_text(out, num_train=num_train,
                               num_eval=num_eval, image_size=size, num_frames=frames, seed=seed,
                               samples_per_shard=per_shard)


def _image_audio(model: ModelConfig, out: Path, num_train: int, num_eval: int, seed: int,
                 per_shard: int) -> ToyDataset:
    from clipkit.data.toy_image_audio import make_toy_image_audio

    return make_toy_image_audio(out, num_train=num_train, num_eval=num_eval, image_size=model.image.image_size,
                                sample_rate=model.audio.sample_rate, clip_seconds=model.audio.clip_seconds,
                                seed=seed, samples_per_shard=per_shard)


TOY_WORLDS = {
    "image": ToyWorld("image-text", "image", 24_000, 2_400, ("a photo of a red circle", "a large blue square in the top left corner"),
                      _image, lambda model: f"toy-image-text-{model.image.image_size}px"),
    "audio": ToyWorld("audio-text", "audio", 12_000, 1_200, ("a short high beep", "low rumbling noise"), _audio,
                      lambda model: f"toy-audio-text-{model.audio.sample_rate}hz-{model.audio.clip_seconds:g}s"),
    "video": ToyWorld("video-text", "video", 12_000, 1_200, ("a blue square moving left", "a growing red circle"), _video,
                      lambda model: f"toy-video-text-{model.image.image_size}px-{model.video.num_frames}f"),
    # ImageBind-style binding: sounds paired with images, evaluated (zero-shot, search) against text.
    "image-audio": ToyWorld("image-audio", "audio", 12_000, 1_200, ("a photo of a red circle", "a blue star"), _image_audio,
                            lambda model: f"toy-image-audio-{model.image.image_size}px-{model.audio.sample_rate}hz"),
}


def toy_world(model: ModelConfig) -> ToyWorld:
    """The toy world of a model: text with one of image, audio, video; or image, audio and text."""
    if "text" in model.modalities:
        others = set(model.modalities) - {"text"}
        for key, world in TOY_WORLDS.items():
            if set(key.split("-")) == others:
                return world
    raise ValueError(f"toy data pairs text with one of image, audio, video, or binds audio to image "
                     f"(image, audio, text); model.modalities is {list(model.modalities)}")
