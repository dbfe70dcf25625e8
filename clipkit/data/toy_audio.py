"""A procedural audio–caption world: beeps, chirps, noise and pulse trains at three pitches.

A class is a sound kind × pitch band (12 classes, chance 8.3%). Length, loudness, onset, exact
frequency and background hiss vary freely and sometimes appear in the caption ("a short high beep",
"low rumbling noise", "a quiet series of mid-pitched clicks"). Clips are FLAC (``KEY.flac``) with
``KEY.txt`` and ``KEY.json``; the held-out split adds ``KEY.cls``. Every sample comes from its own
seeded generator, so the shards are byte-identical whatever the sharding.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from clipkit.data.toy_base import ToyDataset, build_toy_dataset, sample_rng
from clipkit.data.writer import ShardWriter

GENERATOR_VERSION = 1
KINDS = ("beep", "chirp", "noise", "pulses")
PITCHES = ("low", "mid", "high")
# Centre frequency range (Hz) of each pitch band; tones sit inside it, noise is band-passed to it.
PITCH_BANDS = {"low": (120.0, 300.0), "mid": (600.0, 1200.0), "high": (2500.0, 5000.0)}
PITCH_WORDS = {"low": ("low", "deep", "low-pitched"), "mid": ("mid-pitched", "medium", "middle"),
               "high": ("high", "shrill", "high-pitched")}
KIND_WORDS = {"beep": ("beep", "tone", "hum"), "chirp": ("chirp", "rising sweep", "whoop"),
              "noise": ("noise", "rumbling noise", "hiss"), "pulses": ("pulses", "clicking", "ticking")}
ZEROSHOT_TEMPLATES = ("a {} sound.", "the sound of a {}.", "a recording of a {}.", "{}.")


@dataclass(frozen=True)
class ToySound:
    kind: str
    pitch: str
    seconds: float
    loudness: float

    @property
    def class_name(self) -> str:
        return f"{self.pitch} {self.kind}"

    @property
    def label(self) -> int:
        return KINDS.index(self.kind) * len(PITCHES) + PITCHES.index(self.pitch)


def class_names() -> list[str]:
    """The 12 kind–pitch class names, in label order (kind-major)."""
    return [f"{pitch} {kind}" for kind in KINDS for pitch in PITCHES]


def _band_noise(rng: np.random.Generator, n: int, rate: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < low) | (freqs > high)] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.abs(noise).max() + 1e-9)


def synthesize(sound: ToySound, rng: np.random.Generator, sample_rate: int, clip_seconds: float) -> np.ndarray:
    """(clip_seconds × sample_rate,) float32 waveform in [-1, 1]: the sound at a random onset over faint hiss."""
    total = round(clip_seconds * sample_rate)
    n = min(total, round(sound.seconds * sample_rate))
    t = np.arange(n) / sample_rate
    low, high = PITCH_BANDS[sound.pitch]
    freq = rng.uniform(low, high)
    if sound.kind == "beep":
        wave = np.sin(2 * np.pi * freq * t)
    elif sound.kind == "chirp":  # a sweep up one octave from inside the band
        sweep = freq / 2 + (freq - freq / 2) * t / max(t[-1], 1e-3)
        wave = np.sin(2 * np.pi * np.cumsum(sweep) / sample_rate)
    elif sound.kind == "noise":
        wave = _band_noise(rng, n, sample_rate, low, high)
    else:  # short tone bursts at 6–12 per second
        gate = (np.sin(2 * np.pi * rng.uniform(6, 12) * t) > 0.6).astype(np.float64)
        wave = np.sin(2 * np.pi * freq * t) * gate
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sample_rate))
    clip = rng.normal(0, 0.003, size=total)
    start = int(rng.integers(0, total - n + 1))
    clip[start : start + n] += sound.loudness * wave * fade
    return np.clip(clip, -1, 1).astype(np.float32)


def sample_sound(rng: np.random.Generator, clip_seconds: float) -> ToySound:
    return ToySound(
        kind=KINDS[int(rng.integers(len(KINDS)))],
        pitch=PITCHES[int(rng.integers(len(PITCHES)))],
        seconds=float(rng.uniform(0.25, 1.0) * clip_seconds),
        loudness=float(rng.choice([0.15, 0.4, 0.8])),
    )


def caption(sound: ToySound, rng: np.random.Generator, clip_seconds: float) -> str:
    """A caption naming the pitch and kind, with length and loudness words some of the time."""
    pitch = str(rng.choice(PITCH_WORDS[sound.pitch]))
    kind = str(rng.choice(KIND_WORDS[sound.kind]))
    extras = []
    if rng.random() < 0.5:
        extras.append("short" if sound.seconds < 0.5 * clip_seconds else "long")
    if rng.random() < 0.5:
        extras.append({0.15: "quiet", 0.4: "soft", 0.8: "loud"}[sound.loudness])
    words = " ".join([*extras, pitch, kind])
    form = int(rng.integers(4))
    if form == 0:
        return f"a {words}"
    if form == 1:
        return f"the sound of a {words}"
    if form == 2:
        return f"{words} in the recording"
    return f"you can hear a {words}"


def write_split(out_dir: Path, split: str, num_samples: int, with_labels: bool, *, sample_rate: int,
                clip_seconds: float, seed: int, samples_per_shard: int) -> list[Path]:
    with ShardWriter(out_dir, split, samples_per_shard) as writer:
        for index in range(num_samples):
            rng = sample_rng(seed, split, index)
            sound = sample_sound(rng, clip_seconds)
            text = caption(sound, rng, clip_seconds)
            buffer = io.BytesIO()
            soundfile.write(buffer, synthesize(sound, rng, sample_rate, clip_seconds), sample_rate, format="FLAC")
            key = f"{split}{index:08d}"
            meta = {"key": key, "caption": text, "kind": sound.kind, "pitch": sound.pitch,
                    "seconds": round(sound.seconds, 3), "loudness": sound.loudness}
            files = {"flac": buffer.getvalue(), "txt": text.encode()}
            if with_labels:
                meta.update(label=sound.label, class_name=sound.class_name)
                files["cls"] = str(sound.label).encode()
            files["json"] = json.dumps(meta).encode()
            writer.write(key, files)
    return writer.shard_paths


def make_toy_audio_text(
    out_dir: Path,
    *,
    num_train: int,
    num_eval: int,
    sample_rate: int = 16_000,
    clip_seconds: float = 1.0,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> ToyDataset:
    """Write (or reuse, when written before with the same parameters) the toy audio–caption dataset."""
    params = {"version": GENERATOR_VERSION, "kind": "audio-text", "num_train": num_train, "num_eval": num_eval,
              "sample_rate": sample_rate, "clip_seconds": clip_seconds, "seed": seed,
              "samples_per_shard": samples_per_shard}

    def write(folder: Path, split: str, count: int, with_labels: bool) -> list[Path]:
        return write_split(folder, split, count, with_labels, sample_rate=sample_rate, clip_seconds=clip_seconds,
                           seed=seed, samples_per_shard=samples_per_shard)

    return build_toy_dataset(out_dir, params, num_train=num_train, num_eval=num_eval,
                             samples_per_shard=samples_per_shard, classnames=class_names(),
                             templates=ZEROSHOT_TEMPLATES, write_split=write)
