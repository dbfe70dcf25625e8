"""Audio: real FLAC/WAV/OGG bytes, resampling, crop/pad, log-mel features, the tower, toy data,
training and zero-shot evaluation of an audio–text model."""

from __future__ import annotations

import dataclasses
import io
import random
import tarfile

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from clipkit.cli import resolve_config_path
from clipkit.config import ConfigError, ExperimentConfig, ModelConfig, load_config
from clipkit.modalities.audio import AudioTowerConfig
from clipkit.modalities.text import TextTowerConfig
from clipkit.data.toy_audio import class_names, make_toy_audio_text
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.datasets import shard_batches
from clipkit.eval.encoders import load_encoder
from clipkit.modalities import get_modality
from clipkit.modalities.audio import AudioDecoder, AudioTower, LogMelFeatures, crop_or_pad
from clipkit.train.trainer import Trainer

RATE = 16_000


def tiny_audio_config(**audio: object) -> ModelConfig:
    settings = dict(timm_name="test_byobnet", sample_rate=RATE, clip_seconds=0.5, n_fft=512, hop_length=160,
                    n_mels=32, f_min=50.0, f_max=8000.0)
    return ModelConfig(embed_dim=32, modalities=("audio", "text"), audio=AudioTowerConfig(**{**settings, **audio}),
                       text=TextTowerConfig(context_length=16, width=32, heads=2, layers=1))


def tone(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    wave = 0.5 * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def encoded(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["FLAC", "WAV", "OGG"])
def test_decoder_resamples_mixes_down_and_fixes_the_length(fmt):
    stereo = tone(440.0, 1.0, 44_100, channels=2)
    decoder = AudioDecoder(RATE, num_samples=8000, train=False)
    wave = decoder(encoded(stereo, 44_100, fmt), random.Random(0))
    assert wave.shape == (8000,) and wave.dtype == torch.float32
    expected = AF.resample(torch.from_numpy(stereo.mean(axis=1)), 44_100, RATE)[4000:12000]  # the centred window
    tolerance = 0.05 if fmt == "OGG" else 1e-3  # Vorbis is lossy
    assert (wave - expected).abs().max() < tolerance


def test_crop_or_pad():
    wave = np.arange(10, dtype=np.float32)
    assert crop_or_pad(wave, 4, None).tolist() == [3, 4, 5, 6]  # centred in evaluation
    assert crop_or_pad(wave, 25, None).tolist() == [*range(10), *range(10), *range(5)]  # repeat-padded
    crops = {tuple(crop_or_pad(wave, 4, random.Random(seed)).tolist()) for seed in range(50)}
    assert len(crops) == 7  # every window of 4 in 10 samples
    assert crop_or_pad(wave, 4, random.Random(3)).tolist() == crop_or_pad(wave, 4, random.Random(3)).tolist()
    with pytest.raises(ValueError, match="empty"):
        crop_or_pad(np.zeros(0, np.float32), 4, None)


def mel_bin_of(freq: float, config: AudioTowerConfig) -> int:
    """The mel bin whose triangular filter peaks nearest ``freq``."""
    banks = AF.melscale_fbanks(config.n_fft // 2 + 1, config.f_min, config.f_max, config.n_mels, config.sample_rate)
    freqs = torch.linspace(0, config.sample_rate / 2, config.n_fft // 2 + 1)
    centres = freqs[banks.argmax(dim=0)]
    return int((centres - freq).abs().argmin())


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_a_tone_lands_in_its_mel_bin(freq):
    config = tiny_audio_config(n_mels=64).audio
    features = LogMelFeatures(config).eval()(torch.from_numpy(tone(freq, 0.5, RATE))[None])
    frames = 1 + round(0.5 * RATE) // config.hop_length
    assert features.shape == (1, 1, 64, frames)
    assert abs(int(features[0, 0].mean(dim=1).argmax()) - mel_bin_of(freq, config)) <= 1


def test_imagebind_preset_uses_kaldi_filterbanks():
    config = AudioTowerConfig(preset="imagebind", clip_seconds=1.0, timm_name="test_byobnet")
    assert (config.sample_rate, config.n_mels, config.features) == (16_000, 128, "kaldi_fbank")
    features = LogMelFeatures(config).eval()(torch.from_numpy(tone(1000.0, 1.0, 16_000))[None])
    assert features.shape == (1, 1, 128, 98)  # 25 ms frames every 10 ms over 1 s
    # Kaldi's bins are equally spaced in (HTK) mel between low_freq and Nyquist.
    mel = lambda hz: 1127 * np.log(1 + hz / 700)
    centres = np.linspace(mel(20.0), mel(8000.0), 128 + 2)[1:-1]
    assert abs(int(features[0, 0].mean(dim=1).argmax()) - int(np.abs(centres - mel(1000.0)).argmin())) <= 1
    with pytest.raises(ConfigError, match="set by preset 'clap'"):
        AudioTowerConfig(preset="clap", n_mels=128)
    with pytest.raises(ConfigError, match="preset must be one of"):
        AudioTowerConfig(preset="whisper")


def test_spec_augment_masks_only_in_training():
    config = tiny_audio_config(freq_mask=8, time_mask=10).audio
    features = LogMelFeatures(config)
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.3, (2, 8000)).astype(np.float32))
    clean = features.eval()(wave)
    torch.manual_seed(0)
    masked = features.train()(wave)
    assert torch.equal(features.eval()(wave), clean)
    assert (masked == 0).any() and not torch.equal(masked, clean)


def test_tower_shapes_and_bf16_features():
    tower = AudioTower(tiny_audio_config().audio, embed_dim=24).eval()
    waves = torch.randn(3, 8000) * 0.1
    assert tower(waves).shape == (3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tower.features(waves).dtype == torch.float32  # the spectrogram never runs in bf16


def test_toy_audio_is_deterministic_and_labelled(tmp_path):
    first = make_toy_audio_text(tmp_path / "a", num_train=30, num_eval=24, clip_seconds=0.5, samples_per_shard=16)
    second = make_toy_audio_text(tmp_path / "b", num_train=30, num_eval=24, clip_seconds=0.5, samples_per_shard=8)
    assert first.classnames == class_names() and len(first.classnames) == 12
    members = lambda shards: {m.name: tarfile.open(s).extractfile(m).read() for s in shards for m in tarfile.open(s)}
    assert members(first.eval_shards) == members(second.eval_shards)  # byte-identical across shardings
    sample = members(first.eval_shards)
    wave, rate = soundfile.read(io.BytesIO(sample["eval00000000.flac"]))
    assert rate == RATE and wave.shape == (8000,) and np.abs(wave).max() <= 1.0
    assert int(sample["eval00000000.cls"]) in range(12)


def test_corrupt_audio_is_skipped_and_counted(tmp_path):
    toy = make_toy_audio_text(tmp_path / "toy", num_train=8, num_eval=8, clip_seconds=0.5, samples_per_shard=8)
    shard = tmp_path / "mixed.tar"
    with tarfile.open(toy.eval_shards[0]) as source, tarfile.open(shard, "w") as out:
        for member in source:
            data = source.extractfile(member).read()
            if member.name.startswith(("eval00000001.", "eval00000004.")) and member.name.endswith(".flac"):
                data = data[:40] if member.name.startswith("eval00000001") else b"RIFF garbage"
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    config = tiny_audio_config()
    fields = [get_modality("audio", config).field(False), get_modality("text", config).field(False)]
    batches = list(shard_batches([str(shard)], fields, 16, 0))
    assert sum(len(b["audio"]) for b in batches) == 6
    assert sum(int(b["num_skipped"]) for b in batches) == 2


def test_audio_text_training_and_zeroshot(tmp_path):
    toy = make_toy_audio_text(tmp_path / "toy", num_train=96, num_eval=36, clip_seconds=0.5, samples_per_shard=48)
    config = ExperimentConfig(model=tiny_audio_config(freq_mask=4, time_mask=5))
    config.data = dataclasses.replace(config.data, train_shards=toy.shard_pattern("train"), batch_size=16,
                                      num_workers=1, shuffle_buffer=20)
    config.train = dataclasses.replace(config.train, output_dir=str(tmp_path / "run"), max_steps=6, warmup_steps=2,
                                       log_every=3)
    result = Trainer(config, progress=False).fit()
    assert result.steps == 6 and result.skipped == 0 and np.isfinite(result.final_loss)
    report = evaluate_zeroshot(load_encoder(str(result.checkpoint)), toy.shard_pattern("eval"), modality="audio")
    assert report.num_samples == 36 and report.details["classes"] == 12 and report.modality == "audio"
    assert 0.0 <= report.metrics["acc1"] <= 1.0


def test_audio_workers_start_with_forkserver():
    from clipkit.data.pipeline import worker_start_method
    from tests.conftest import tiny_model_config

    image = [get_modality("image", tiny_model_config()).field(False)]
    audio = [get_modality("audio", tiny_audio_config()).field(False)]
    assert worker_start_method("auto", audio) == "forkserver"
    assert worker_start_method("auto", image) is None
    assert worker_start_method("spawn", image) == "spawn"
    # Decided by the decoder, not the batch key: audio batched under another name is still threaded.
    renamed = dataclasses.replace(audio[0], name="clip")
    assert worker_start_method("auto", [renamed]) == "forkserver"


def test_make_toy_follows_the_config(tmp_path, capsys):
    from clipkit.cli import main
    from clipkit.data.toy_worlds import toy_world

    assert main(["make-toy", "--config", "configs/toy-audio-text.yaml", "--out", str(tmp_path / "audio"),
                 "--num-train", "20", "--num-eval", "12", "--samples-per-shard", "10"]) == 0
    assert "12 classes" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.joinpath("audio").glob("*.tar")) == [
        "eval-000000.tar", "eval-000001.tar", "train-000000.tar", "train-000001.tar"]
    assert toy_world(tiny_audio_config()).name == "audio-text"
    binding = load_config(resolve_config_path("configs/toy-image-audio.yaml")).model
    assert toy_world(binding).name == "image-audio"
    with pytest.raises(ValueError, match="toy data pairs text with one of"):
        toy_world(dataclasses.replace(tiny_audio_config(), modalities=("audio", "image")))
