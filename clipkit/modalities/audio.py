"""Audio: FLAC/WAV/OGG bytes → mono waveform at a fixed rate and length in workers → log-mel features
on the device → a timm model over the spectrogram as a one-channel image.

Workers ship raw waveforms (float32, one clip length) so that the spectrogram runs batched on the
accelerator, inside the model's forward, and SpecAugment is part of the (training-mode) model.
Decoding uses soundfile (libsndfile), not torchaudio's I/O, which now needs FFmpeg via torchcodec.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from clipkit.config import AudioTowerConfig, AugmentConfig, ModelConfig
from clipkit.modalities.base import FieldDecoder, Modality
from clipkit.pretrained import create_timm_trunk

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


class AudioModality(Modality):
    name = "audio"

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
