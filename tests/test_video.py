"""The video modality: PyAV decoding and frame sampling, the video tower, toy video data, training and
zero-shot evaluation on it."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clipkit.config import ExperimentConfig, ModelConfig
from clipkit.modalities.text import TextTowerConfig
from clipkit.modalities.video import VideoTowerConfig
from clipkit.data.pipeline import ShardStream
from clipkit.data.toy_video import MOTIONS, VIDEO_COLOURS, class_names, encode_mp4, make_toy_video_text
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.modalities import get_modality
from clipkit.modalities.image import ImageTower
from clipkit.modalities.video import (
    VideoDecoder,
    VideoTower,
    decode_frames,
    sample_frame_indices,
)
from clipkit.model import create_model
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config

BLUE = (40, 80, 220)


def moving_square(num_frames: int = 16, size: int = 32) -> np.ndarray:
    """(T, size, size, 3) frames of a blue 8-px square sliding right by 1 px a frame on grey."""
    frames = np.full((num_frames, size, size, 3), 128, np.uint8)
    for t in range(num_frames):
        frames[t, 12:20, 4 + t : 12 + t] = BLUE
    return frames


def blue_centroid_x(frame: torch.Tensor) -> float:
    """Mean column of a (3, H, W) uint8 frame weighted by blueness (0 on the grey background)."""
    red, _, blue = frame.float()
    weight = (blue - red).clamp(min=0)
    assert weight.sum() > 1000, "the blue square is missing"
    columns = torch.arange(frame.shape[-1], dtype=torch.float32)
    return float((weight * columns).sum() / weight.sum())


def encode(frames: np.ndarray, container_format: str, codec: str, bit_rate: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8, options={"b": bit_rate})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decoder(train: bool, num_frames: int = 8, size: int = 32, **kwargs) -> VideoDecoder:
    options = {"crop_scale": (1.0, 1.0), "horizontal_flip": False, **kwargs}
    return VideoDecoder(num_frames, size, train=train, **options)


@pytest.fixture(scope="module")
def square_mp4() -> bytes:
    return encode_mp4(moving_square(), fps=8)


def test_mp4_decodes_to_frames_that_show_the_motion(square_mp4):
    clip = decoder(train=False)(square_mp4, random.Random(0))
    assert clip.shape == (8, 3, 32, 32) and clip.dtype == torch.uint8
    # Evaluation takes the centre of each 2-frame segment: frames 1, 3, ..., 15, whose square starts
    # at column 5, 7, ..., 19 (centroid 3.5 px to the right of that).
    centroids = [blue_centroid_x(frame) for frame in clip]
    assert centroids == pytest.approx([8.5 + 2 * i for i in range(8)], abs=0.5)
    square = clip[:, :, 12:20]
    assert (square[0, :, :, 6:12].float().mean(dim=(1, 2)) - torch.tensor(BLUE)).abs().max() < 12


def test_decoding_resizes_crops_and_repeats(square_mp4):
    small = decoder(train=False, size=16)(square_mp4, random.Random(0))
    assert small.shape == (8, 3, 16, 16)
    assert [blue_centroid_x(f) for f in small] == pytest.approx([4 + i for i in range(8)], abs=0.5)
    # A 3-frame clip for 8 sampled frames: each frame repeats, in order.
    short = decoder(train=False)(encode_mp4(moving_square(3), fps=8), random.Random(0))
    assert short.shape == (8, 3, 32, 32)
    assert [blue_centroid_x(f) - 7.5 for f in short] == pytest.approx([0, 0, 0, 1, 1, 2, 2, 2], abs=0.5)


def test_frame_indices_sample_each_segment():
    assert sample_frame_indices(16, 8, None) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_frame_indices(3, 8, None) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sample_frame_indices(1, 4, random.Random(0)) == [0, 0, 0, 0]
    seen: set[tuple[int, ...]] = set()
    for seed in range(50):
        indices = sample_frame_indices(100, 8, random.Random(seed))
        assert indices == sample_frame_indices(100, 8, random.Random(seed))
        for i, index in enumerate(indices):
            assert math.floor(i * 12.5) <= index < math.ceil((i + 1) * 12.5)
        seen.add(tuple(indices))
    assert len(seen) == 50  # training jitters within the segments
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 8, None)


def test_training_transforms_are_one_draw_per_clip_and_deterministic(square_mp4):
    train = decoder(train=True, horizontal_flip=True, crop_scale=(0.5, 1.0))
    assert torch.equal(train(square_mp4, random.Random(3)), train(square_mp4, random.Random(3)))
    # Full-frame crops of an 8-frame clip (one frame per segment): training differs from evaluation
    # only by the flip, drawn once for the whole clip.
    frames = encode_mp4(moving_square(8), fps=8)
    reference = decoder(train=False)(frames, random.Random(0))
    flipper = decoder(train=True, horizontal_flip=True)
    flipped = 0
    for seed in range(12):
        clip = flipper(frames, random.Random(seed))
        assert torch.equal(clip, reference) or torch.equal(clip, reference.flip(-1))
        flipped += torch.equal(clip, reference.flip(-1))
    assert 0 < flipped < 12


def test_a_clip_shorter_than_its_header_is_sampled_again():
    frames = encode_mp4(moving_square(16), fps=8)
    asked: list[int] = []

    def choose(count: int) -> list[int]:
        asked.append(count)
        return [0, count + 4] if len(asked) == 1 else [0, count - 1]

    decoded = decode_frames(frames, choose)
    assert asked == [16, 16] and len(decoded) == 2
    with pytest.raises(ValueError, match="second pass"):
        decode_frames(frames, lambda count: [count + 4])


@pytest.mark.skipif("libvpx" not in av.codecs_available, reason="this av wheel has no VP8 encoder")
def test_webm_without_a_frame_count_decodes(tmp_path):
    webm = encode(moving_square(), "webm", "libvpx", bit_rate="2M")  # the default blurs a 32-px clip
    with av.open(io.BytesIO(webm)) as container:
        assert container.streams.video[0].frames == 0  # the packet count stands in for it
    clip = decoder(train=False)(webm, random.Random(0))
    assert clip.shape == (8, 3, 32, 32)
    assert [blue_centroid_x(f) for f in clip] == pytest.approx([8.5 + 2 * i for i in range(8)], abs=0.5)


def test_corrupt_and_truncated_clips_are_skipped_and_counted(tmp_path, square_mp4):
    bad = {
        "truncated": square_mp4[: len(square_mp4) // 2],  # the MP4 index (moov) comes last: it is gone
        "junk": bytes(random.Random(0).randbytes(2000)),
        "empty": b"",
    }
    with tarfile.open(tmp_path / "clips.tar", "w") as tar:
        for key, data in [("good0", square_mp4), *bad.items(), ("good1", square_mp4)]:
            info = tarfile.TarInfo(f"{key}.mp4")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    field = get_modality("video", tiny_model_config()).field(train=False)
    batches = list(ShardStream([str(tmp_path / "clips.tar")], [field], batch_size=8, train=False))
    assert sum(int(b["num_skipped"]) for b in batches) == 3
    assert sum(len(b["video"]) for b in batches) == 2
    assert batches[0]["video"].shape == (2, 8, 3, 32, 32)


def frame_encoder(embed_dim: int = 32) -> ImageTower:
    return ImageTower(tiny_model_config().image, embed_dim)


@pytest.mark.parametrize("pooling", ["mean", "transformer"])
def test_tower_shapes_and_frame_order(pooling):
    torch.manual_seed(0)
    tower = VideoTower(frame_encoder(), VideoTowerConfig(num_frames=6, pooling=pooling, temporal_heads=4), 32).eval()
    clips = torch.randint(0, 256, (3, 6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = tower(clips)
        reversed_features = tower(clips.flip(1))
        assert features.shape == (3, 32)
        assert tower(clips[:, :4]).shape == (3, 32)  # fewer frames than configured are fine
    if pooling == "mean":
        torch.testing.assert_close(features, reversed_features, atol=1e-5, rtol=1e-5)
    else:
        assert (features - reversed_features).abs().max() > 1e-3


def test_tower_rejects_bad_shapes_and_settings():
    tower = VideoTower(frame_encoder(), VideoTowerConfig(num_frames=4, pooling="transformer"), 32)
    with pytest.raises(ValueError, match=r"position embeddings for 4"):
        tower(torch.zeros(1, 5, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, T, 3, S, S\)"):
        tower(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="temporal_heads"):
        VideoTower(frame_encoder(), VideoTowerConfig(pooling="transformer", temporal_heads=5), 32)


def video_model_config(modalities: tuple[str, ...] = ("video", "text")) -> ModelConfig:
    model = tiny_model_config()
    return dataclasses.replace(model, modalities=modalities,
                               video=VideoTowerConfig(num_frames=4, pooling="transformer", temporal_heads=2))


def test_modality_plugin_and_shared_image_tower():
    modality = get_modality("video", video_model_config())
    field = modality.field(train=True)
    assert field.name == "video" and field.extensions[:2] == ("mp4", "webm")
    tower = modality.build_tower(32)
    assert isinstance(tower.frames, ImageTower)
    tower.set_grad_checkpointing(True)
    assert tower.frames.trunk.grad_checkpointing

    model = create_model(video_model_config(("image", "video", "text")))
    assert model.towers["video"].frames is model.towers["image"]
    clips = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    model.encode("video", clips).sum().backward()
    assert model.towers["image"].proj.weight.grad is not None


@pytest.fixture(scope="module")
def toy_video(tmp_path_factory: pytest.TempPathFactory):
    """64 training + 48 held-out toy clips (8 frames of 32 px), in shards of 32."""
    return make_toy_video_text(tmp_path_factory.mktemp("toy-video"), num_train=64, num_eval=48, image_size=32,
                               num_frames=4, seed=0, samples_per_shard=32)


def test_toy_video_data(toy_video):
    assert len(toy_video.classnames) == len(VIDEO_COLOURS) * len(MOTIONS) == 24
    assert toy_video.classnames == class_names() and "blue shape moving left" in toy_video.classnames
    assert all("{}" in template for template in toy_video.templates)
    with tarfile.open(toy_video.eval_shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {"eval00000000.mp4", "eval00000000.txt", "eval00000000.json", "eval00000000.cls"} <= set(members)
    meta = json.loads(members["eval00000000.json"])
    assert meta["class_name"] == toy_video.classnames[meta["label"]]
    assert int(members["eval00000000.cls"]) == meta["label"]
    assert meta["colour"] in members["eval00000000.txt"].decode()
    clip = decoder(train=False, num_frames=4)(members["eval00000000.mp4"], random.Random(0))
    assert clip.shape == (4, 3, 32, 32)
    with tarfile.open(toy_video.train_shards[0]) as tar:
        names = tar.getnames()
    assert not any(name.endswith(".cls") for name in names) and "train00000000.mp4" in names
    again = make_toy_video_text(toy_video.root / "again", num_train=64, num_eval=48, image_size=32, num_frames=4,
                                seed=0, samples_per_shard=32)
    assert Path(again.train_shards[1]).read_bytes() == Path(toy_video.train_shards[1]).read_bytes()


def test_short_training_run_and_zeroshot_eval(toy_video, tmp_path):
    config = ExperimentConfig(model=dataclasses.replace(
        video_model_config(), text=TextTowerConfig(context_length=32, width=32, heads=2, layers=1)))
    config.data.train_shards = toy_video.shard_pattern("train")
    config.data.batch_size = 16
    config.data.num_workers = 1
    config.train.output_dir = str(tmp_path / "run")
    config.train.max_steps = 4  # one epoch of 64 clips
    config.train.warmup_steps = 2
    config.train.log_every = 2
    result = Trainer(config, progress=False).fit()
    assert result.steps == 4 and result.skipped == 0 and math.isfinite(result.final_loss)
    assert result.checkpoint.is_file()

    report = evaluate_zeroshot(load_encoder(str(result.checkpoint)), toy_video.shard_pattern("eval"),
                               modality="video", batch_size=16)
    assert report.num_samples == 48 and report.num_skipped == 0
    assert report.details["classes"] == 24 and 0 <= report.metrics["acc1"] <= 1
