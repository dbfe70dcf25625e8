"""Audio: FLAC/WAV/OGG bytes → mono waveform at a fixed rate and length in workers → log-mel features
on the device → a timm model over the spectrogram as a one-channel image.

Workers ship raw waveforms (float32, one clip length) so that the spectrogram runs batched on the
accelerator, inside the model's forward, and SpecAugment is part of the (training-mode) model.
Decoding uses soundfile (libsndfile), not torchaudio's I/O, which now needs FFmpeg via torchcodec.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from clipkit.config import AugmentConfig, ConfigError, ModelConfig, check_ranges
from clipkit.modalities.base import FieldDecoder, Modality, register_modality
from clipkit.pretrained import create_timm_trunk

# Audio front-end presets: the settings of the models clipkit is compared against.
AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    # CLAP (LAION): 48 kHz, 1024-point FFT, 10 ms hop, 64 mel bins from 50 Hz to 14 kHz.
    "clap": {"sample_rate": 48_000, "features": "mel", "n_fft": 1024, "hop_length": 480, "n_mels": 64,
             "f_min": 50.0, "f_max": 14_000.0},
    # ImageBind: 16 kHz Kaldi filterbanks, 25 ms frames every 10 ms, 128 mel bins.
    "imagebind": {"sample_rate": 16_000, "features": "kaldi_fbank", "n_fft": 400, "hop_length": 160,
                  "n_mels": 128, "f_min": 20.0, "f_max": None},
}


@dataclass
class AudioTowerConfig:
    """Waveforms → log-mel features (computed on the device) → a timm model over them as a
    one-channel image → linear projection."""

    timm_name: str = "resnet18"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # "clap" or "imagebind" sets sample_rate, features, n_fft, hop_length, n_mels, f_min and f_max.
    preset: str | None = None
    sample_rate: int = 48_000
    # Every clip is cropped (randomly in training, centred in evaluation) or repeat-padded to this.
    clip_seconds: float = 10.0
    features: Literal["mel", "kaldi_fbank"] = "mel"
    n_fft: int = 1024
    hop_length: int = 480
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float | None = 14_000.0
    # SpecAugment in training: up to this many mel bins / frames masked (0 = off), twice each.
    freq_mask: int = 0
    time_mask: int = 0
    lock: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in AUDIO_PRESETS:
                raise ConfigError(f"preset must be one of {', '.join(AUDIO_PRESETS)}, got {self.preset!r}")
            defaults = AudioTowerConfig()
            for key, value in AUDIO_PRESETS[self.preset].items():
                given = getattr(self, key)
                if given != getattr(defaults, key) and given != value:
                    raise ConfigError(f"{key} is set by preset {self.preset!r} ({value}); remove one of them")
                setattr(self, key, value)
            self.preset = None  # applied: a saved config holds the values themselves
        check_ranges(
            ("sample_rate", self.sample_rate >= 1000, "must be at least 1000 Hz"),
            ("clip_seconds", self.clip_seconds > 0, "must be positive"),
            ("n_mels", self.n_mels >= 1, "must be at least 1"),
            ("hop_length", 0 < self.hop_length <= self.n_fft, "must be in (0, n_fft]"),
            ("f_max", self.f_max is None or self.f_min < self.f_max <= self.sample_rate / 2,
             "must lie above f_min and at most sample_rate / 2"),
            ("freq_mask", 0 <= self.freq_mask < self.n_mels, "must be in [0, n_mels)"),
            ("time_mask", self.time_mask >= 0, "must be non-negative"),
        )

    @property
    def num_samples(self) -> int:
        """Samples per clip: (clip_seconds × sample_rate)."""
        return round(self.clip_seconds * self.sample_rate)


AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
# log-mel values are standardised with fixed constants (not per batch or per clip): loudness is
# information, and a batch-dependent statistic would make training depend on the batch split.
LOG_MEL_MEAN, LOG_MEL_STD = -6.0, 5.0
# ImageBind's published filterbank statistics (AudioSet).
FBANK_MEAN, FBANK_STD = -4.268, 9.138


def crop_or_pad(wave: np.ndarray, length: int, rng: random.Random | None) -> np.ndarray:
    """A (length,) window of a mono (N,) waveform: a random window when ``rng`` is given (training),
    the centred one otherwise; a clip shorter than ``length`` is repeated until it fills it."""
    if len(wave) == 0:
        raise ValueError("empty audio clip")
    if len(wave) < length:
        return np.tile(wave, -(-length // len(wave)))[:length]
    excess = len(wave) - length
    start = rng.randint(0, excess) if rng is not None else excess // 2
    return wave[start : start + length]


@dataclass
class AudioDecoder:
    """Audio file bytes → (num_samples,) float32 mono waveform at ``sample_rate``."""

    sample_rate: int
    num_samples: int
    train: bool

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, channels)
        mono = wave.mean(axis=1)
        if rate != self.sample_rate:
            # Resampling first keeps the crop length exact in output samples.
            mono = AF.resample(torch.from_numpy(mono), rate, self.sample_rate).numpy()
        clip = crop_or_pad(mono, self.num_samples, rng if self.train else None)
        return torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))


class LogMelFeatures(nn.Module):
    """(B, num_samples) waveforms → (B, 1, n_mels, frames) standardised log-mel features, always in
    float32 (spectrograms lose too much in bf16/fp16), with SpecAugment masks in training mode."""

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.mel = AT.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
            n_mels=config.n_mels, f_min=config.f_min, f_max=config.f_max, power=2.0,
        ) if config.features == "mel" else None
        self.masks = nn.Sequential(*[
            mask for _ in range(2) for mask in (
                AT.FrequencyMasking(config.freq_mask) if config.freq_mask else nn.Identity(),
                AT.TimeMasking(config.time_mask) if config.time_mask else nn.Identity(),
            )
        ])

    def _kaldi_fbank(self, waves: torch.Tensor) -> torch.Tensor:
        """ImageBind's front end: Kaldi filterbanks per clip (the function takes one waveform)."""
        config = self.config
        banks = [kaldi.fbank(
            wave[None] - wave.mean(), sample_frequency=config.sample_rate, num_mel_bins=config.n_mels,
            frame_length=1000 * config.n_fft / config.sample_rate,
            frame_shift=1000 * config.hop_length / config.sample_rate, low_freq=config.f_min,
            high_freq=config.f_max or 0.0, htk_compat=True, use_energy=False, window_type="hanning", dither=0.0,
        ) for wave in waves]
        return (torch.stack(banks).transpose(1, 2) - FBANK_MEAN) / (2 * FBANK_STD)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        with torch.autocast(waves.device.type, enabled=False):
            waves = waves.float()
            if self.mel is not None:
                features = (torch.log(self.mel(waves) + 1e-6) - LOG_MEL_MEAN) / LOG_MEL_STD
            else:
                features = self._kaldi_fbank(waves)
            features = features.unsqueeze(1)  # (B, 1, n_mels, frames)
            return self.masks(features) if self.training else features


class AudioTower(nn.Module):
    """Log-mel front end + timm trunk (one input channel) + linear projection.

    Input (B, num_samples) float waveforms → (B, embed_dim) unnormalised features.
    """

    def __init__(self, config: AudioTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.features = LogMelFeatures(config)
        self.trunk = create_timm_trunk(config.timm_name, pretrained=False, pretrained_file=None,
                                       in_chans=1, **config.timm_kwargs)
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(self.features(waves)))


@register_modality
class AudioModality(Modality):
    name = "audio"
    config_section = AudioTowerConfig
    template_sets = {
        # Sound events, CLAP-style.
        "audio": (
            "the sound of a {}.",
            "a recording of a {}.",
            "{} can be heard.",
            "an audio clip of {}.",
            "this is the sound of {}.",
        ),
    }

    def __init__(self, config: AudioTowerConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, model_config: ModelConfig, augment: AugmentConfig) -> "AudioModality":
        return cls(model_config.audio)

    def field(self, train: bool) -> FieldDecoder:
        decoder = AudioDecoder(self.config.sample_rate, self.config.num_samples, train=train)
        return FieldDecoder(self.name, AUDIO_EXTENSIONS, decoder, threaded=True)

    def build_tower(self, embed_dim: int) -> nn.Module:
        return AudioTower(self.config, embed_dim)
