"""Video: MP4/WebM bytes → T uniformly sampled frames (PyAV) in workers → the image tower per frame →
mean pooling or a small temporal transformer.

torchvision's video readers (and webdataset's ``torch_video`` handler, which calls them) are gone in
torchvision 0.28; PyAV's wheels carry FFmpeg, so decoding needs nothing from the system.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Literal
from typing import Callable

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from PIL import Image
from torch import nn

from clipkit.config import AugmentConfig, ModelConfig, check_ranges
from clipkit.modalities.base import FieldDecoder, Modality, register_modality
from clipkit.modalities.image import ImageTower, ImageTowerConfig, random_resized_crop_box, resize_centre_crop

@dataclass
class VideoTowerConfig:
    """``num_frames`` frames per clip, each through the image tower (``model.image`` describes it;
    with image in the model too, the two share one tower), then pooled over time."""

    num_frames: int = 8
    # "mean" averages frame features; "transformer" runs a small temporal transformer first.
    pooling: Literal["mean", "transformer"] = "mean"
    temporal_layers: int = 1
    temporal_heads: int = 4
    lock: bool = False

    def __post_init__(self) -> None:
        check_ranges(
            ("num_frames", self.num_frames >= 1, "must be at least 1"),
            ("temporal_layers", self.temporal_layers >= 1, "must be at least 1"),
            ("temporal_heads", self.temporal_heads >= 1, "must be at least 1"),
        )


VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi")


def sample_frame_indices(num_available: int, num_frames: int, rng: random.Random | None) -> list[int]:
    """``num_frames`` frame indices spread uniformly over a clip of ``num_available`` frames.

    The clip is cut into ``num_frames`` equal segments and one index is taken from each: a uniformly
    random one when ``rng`` is given (training: different frames each epoch), the centre otherwise
    (evaluation). The indices never decrease; a clip shorter than ``num_frames`` repeats frames.
    """
    if num_available < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_available}")
    step = num_available / num_frames
    offsets = [rng.random() if rng is not None else 0.5 for _ in range(num_frames)]
    return [min(num_available - 1, math.floor((i + offset) * step)) for i, offset in enumerate(offsets)]


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    # Data-loader workers are the parallelism: FFmpeg's own threads per worker would oversubscribe
    # the cores, and a decoder that starts no threads cannot deadlock in a forked worker.
    stream.thread_type = "NONE"
    stream.thread_count = 1
    return stream


def _count_packets(data: bytes) -> int:
    """Video packets in the file, one per frame: read without decoding anything."""
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for packet in container.demux(_video_stream(container)) if packet.size)


def _read_frames(data: bytes, choose: Callable[[int], list[int]]) -> tuple[list[int], list[np.ndarray], int]:
    """Decode up to the last frame ``choose(frame_count)`` picks; return the indices, the (H, W, 3)
    uint8 RGB frames at them that exist, and how many frames were decoded."""
    with av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container)
        # MP4 headers hold the frame count; WebM/Matroska headers do not.
        indices = choose(stream.frames or _count_packets(data))
        wanted = set(indices)
        picked: dict[int, np.ndarray] = {}
        reformatter = VideoReformatter()  # one scaler for all frames instead of one per frame
        decoded = 0
        for frame in container.decode(stream):
            if decoded in wanted:
                picked[decoded] = reformatter.reformat(frame, format="rgb24").to_ndarray()
            decoded += 1
            if decoded > indices[-1]:
                break
    return indices, [picked[i] for i in indices if i in picked], decoded


def decode_frames(data: bytes, choose: Callable[[int], list[int]]) -> list[np.ndarray]:
    """The (H, W, 3) uint8 RGB frames at the non-decreasing indices ``choose(frame_count)`` returns.

    Only the frames picked are converted to RGB, and decoding stops after the last of them. When the
    clip holds fewer frames than its header says (a damaged tail), ``choose`` is asked again with
    the number that decoded.
    """
    indices, frames, decoded = _read_frames(data, choose)
    if len(frames) == len(indices):
        return frames
    if decoded == 0:
        raise ValueError("no decodable video frame")
    indices, frames, _ = _read_frames(data, lambda _: choose(decoded))
    if len(frames) != len(indices):
        raise ValueError(f"the clip decodes differently on a second pass ({len(frames)} of {len(indices)} frames)")
    return frames


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 → (T, 3, size, size) uint8, antialiased bicubic as the image decoder resizes.

    The permuted view is channels-last, the layout torch's vectorised uint8 resampling reads directly.
    """
    if frames.shape[1:3] == (size, size):  # resampling at scale 1 would copy the pixels unchanged
        return frames.permute(0, 3, 1, 2)
    return F.interpolate(frames.permute(0, 3, 1, 2), size=(size, size), mode="bicubic", antialias=True)


@dataclass
class VideoDecoder:
    """Decodes video bytes (any container and codec FFmpeg reads) to (T, 3, S, S) uint8 frames.

    ``num_frames`` (T) indices are sampled uniformly over the clip (:func:`sample_frame_indices`),
    jittered within their segments in training. Frames get the image decoder's transforms, drawn once
    per clip so that motion stays intact: in training one random resized crop (area fraction
    ``crop_scale``) and, when enabled, one horizontal flip for all frames; in evaluation the image
    decoder's evaluation transform on every frame (resize the shorter side to S, centre-crop).
    Normalisation happens on the device.

    Decoding runs single-threaded in each data-loader worker (see ``_video_stream``).
    """

    num_frames: int
    image_size: int
    train: bool
    crop_scale: tuple[float, float]
    horizontal_flip: bool

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        jitter = rng if self.train else None
        frames = decode_frames(data, lambda count: sample_frame_indices(count, self.num_frames, jitter))
        if not self.train:  # each frame as images are evaluated: open_clip's resize and centre crop
            return torch.stack([resize_centre_crop(Image.fromarray(frame), self.image_size) for frame in frames])
        pixels = torch.from_numpy(np.stack(frames))  # (T, H, W, 3)
        height, width = pixels.shape[1:3]
        top, left, crop_height, crop_width = random_resized_crop_box(width, height, self.crop_scale, rng)
        region = pixels[:, top : top + crop_height, left : left + crop_width]
        out = resize_frames(region, self.image_size)
        if self.horizontal_flip and rng.random() < 0.5:
            out = out.flip(-1)
        return out


class TemporalTransformer(nn.Module):
    """Learned position embeddings + pre-norm transformer layers over a clip's frame features.

    (B, T, D) → (B, T, D); T may not exceed ``num_frames``.
    """

    def __init__(self, width: int, num_frames: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"model.video.temporal_heads ({heads}) must divide model.embed_dim ({width})")
        self.positions = nn.Parameter(torch.randn(num_frames, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )
        # Nested tensors only pay off with padding masks; a clip batch has none.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        num_frames = features.shape[1]
        if num_frames > self.positions.shape[0]:
            raise ValueError(f"clips of {num_frames} frames, but the temporal transformer has position "
                             f"embeddings for {self.positions.shape[0]} (model.video.num_frames)")
        return self.encoder(features + self.positions[:num_frames])


class VideoTower(nn.Module):
    """A frame encoder applied to every frame, then pooled over time.

    Input (B, T, 3, S, S) uint8 or [0, 1] float frames → (B, embed_dim) unnormalised features.
    ``frames`` maps (N, 3, S, S) → (N, embed_dim); it may be the model's image tower itself (shared
    weights). ``pooling`` "mean" averages the frame features, which cannot tell a clip from the same
    frames in another order; "transformer" first runs :class:`TemporalTransformer`, so it can.
    """

    def __init__(self, frame_encoder: nn.Module, config: VideoTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.frames = frame_encoder
        self.temporal = (
            TemporalTransformer(embed_dim, config.num_frames, config.temporal_layers, config.temporal_heads)
            if config.pooling == "transformer" else None
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.frames.set_grad_checkpointing(enable)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) clips → (B, embed_dim) features."""
        if clips.ndim != 5:
            raise ValueError(f"expected clips of shape (B, T, 3, S, S), got {tuple(clips.shape)}")
        batch, num_frames = clips.shape[:2]
        features = self.frames(clips.flatten(0, 1)).unflatten(0, (batch, num_frames))  # (B, T, D)
        if self.temporal is not None:
            features = self.temporal(features)
        return features.mean(dim=1)


@register_modality
class VideoModality(Modality):
    name = "video"
    config_section = VideoTowerConfig
    template_sets = {
        # Short clips of actions or moving things.
        "video": (
            "a video of {}.",
            "a clip of {}.",
            "a video of a person {}.",
            "footage of {}.",
        ),
    }

    def __init__(self, image: ImageTowerConfig, video: VideoTowerConfig, augment: AugmentConfig) -> None:
        self.image = image
        self.video = video
        self.augment = augment

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "VideoModality":
        return cls(model_config.image, model_config.video, augment)

    def field(self, train: bool) -> FieldDecoder:
        decoder = VideoDecoder(
            self.video.num_frames,
            self.image.image_size,
            train=train,
            crop_scale=self.augment.crop_scale,
            horizontal_flip=self.augment.horizontal_flip,
        )
        return FieldDecoder(self.name, VIDEO_EXTENSIONS, decoder, threaded=True)

    def build_tower(self, embed_dim: int) -> nn.Module:
        """A :class:`VideoTower` over a fresh image tower (``model.image``) as its frame encoder."""
        return VideoTower(ImageTower(self.image, embed_dim), self.video, embed_dim)

    def link_towers(self, towers: nn.ModuleDict) -> None:
        """With an image tower in the model too, the video tower embeds its frames with it: one tower."""
        if "image" in towers:
            towers[self.name].frames = towers["image"]

    def tower_sources(self, tower: nn.Module) -> list[tuple[str, nn.Module]]:
        """A checkpoint's video tower, or else its image tower as the frame encoder."""
        return [*super().tower_sources(tower), ("towers.image.", tower.frames)]
