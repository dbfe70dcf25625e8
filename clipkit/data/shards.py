"""Shard lists: brace patterns (several joined with ``::``), sample counts from the index files beside
them, and which of them are missing. Plain Python, no torch: the command line and the evaluation
layout use it too."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import braceexpand

from clipkit.data.remote import fetch_text, parent_url

SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class ShardSource:
    """One source of training data: its shard URLs and, for resampled streams, its sampling weight."""

    shards: tuple[str, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("a shard source needs at least one shard")
        if not self.weight > 0:
            raise ValueError(f"a shard source's weight must be positive, got {self.weight}")


def shard_sources(pattern: str, weights: Sequence[float] | None = None) -> list[ShardSource]:
    """One :class:`ShardSource` per ``::``-separated brace pattern, weighted by ``weights`` (default 1)."""
    parts = [part for part in pattern.split("::") if part]
    if not parts:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    weights = [1.0] * len(parts) if weights is None else list(weights)
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weight(s) for {len(parts)} '::'-separated shard pattern(s) in {pattern!r}")
    return [ShardSource(tuple(braceexpand.braceexpand(part)), weight) for part, weight in zip(parts, weights)]


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; several patterns may be joined with ``::``."""
    return [url for source in shard_sources(pattern) for url in source.shards]


def is_local(url: str) -> bool:
    """Whether a shard URL is a file path (not ``pipe:...``, ``http://...``, ``s3://...``)."""
    return not url.startswith("pipe:") and "://" not in url


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The local shard paths that cannot be read as a stream: missing, or a folder named ``.tar`` (a
    named pipe that another process writes a shard into is readable)."""
    return [url for url in urls if is_local(url) and (not Path(url).exists() or Path(url).is_dir())]


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``2.tar`` before ``10.tar`` (CLIP_benchmark names shards ``0.tar, 1.tar, ...``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shard_count(shard: str, sizes_cache: dict[str, dict[str, int]] | None = None) -> int | None:
    """The sample count of one shard from the ``sizes.json`` beside it (clipkit's writers; fetched
    for a remote shard), else the ``NAME_stats.json`` that img2dataset writes beside a local
    ``NAME.tar`` (its ``successes``); None if neither tells, and always for a ``pipe:`` command."""
    cache = {} if sizes_cache is None else sizes_cache
    if shard.startswith("pipe:"):
        return None
    if is_local(shard):
        path = Path(shard)
        folder, name = str(path.parent), path.name
    else:
        folder, name = parent_url(shard), shard.rsplit("/", 1)[1]
    if folder not in cache:
        cache[folder] = _sizes_index(folder)
    count = cache[folder].get(name)
    if count is None and is_local(shard):
        stats = Path(shard).with_name(f"{Path(shard).stem}_stats.json")
        if stats.is_file():
            count = json.loads(stats.read_text()).get("successes")
    return None if count is None else int(count)


def _sizes_index(folder: str) -> dict[str, int]:
    """{shard name: samples} from ``folder``'s ``sizes.json`` (a path or a URL), or {}."""
    if is_local(folder):
        index = Path(folder) / SIZES_FILE
        return json.loads(index.read_text()) if index.is_file() else {}
    text = fetch_text(f"{folder}/{SIZES_FILE}")
    return json.loads(text) if text else {}


def count_samples(shards: Sequence[str]) -> int | None:
    """Total sample count of shards, or None if any shard's count is unknown (see :func:`shard_count`)."""
    cache: dict[str, dict[str, int]] = {}
    total = 0
    for shard in shards:
        count = shard_count(shard, cache)
        if count is None:
            return None
        total += count
    return total


@dataclass(frozen=True)
class MissingShards:
    """Training shards that are not there: their paths, and the samples they should have held
    (from ``sizes.json``; None where a count is unknown)."""

    shards: tuple[str, ...]
    samples: int | None

    def describe(self, total: int) -> str:
        shown = ", ".join(self.shards[:5]) + (f" and {len(self.shards) - 5} more" if len(self.shards) > 5 else "")
        lost = f"{self.samples} samples" if self.samples is not None else "samples of unknown count"
        return f"{len(self.shards)} of the {total} training shards do not exist ({lost}): {shown}"


def drop_missing_shards(sources: Sequence[ShardSource]) -> tuple[list[ShardSource], MissingShards]:
    """The sources without their missing local shards (a source with none left is dropped), and what
    was missing. Raises ``DataError`` when no shard is left: there is nothing to train on."""
    from clipkit.errors import DataError

    missing = [url for source in sources for url in missing_local_shards(source.shards)]
    gone = set(missing)
    kept = [ShardSource(tuple(u for u in s.shards if u not in gone), s.weight)
            for s in sources if any(u not in gone for u in s.shards)]
    total = sum(len(source.shards) for source in sources)
    counts = [shard_count(url) for url in missing]
    lost = MissingShards(tuple(missing), None if None in counts else sum(c for c in counts if c is not None))
    if not kept:
        raise DataError(f"none of the training shards exist: {lost.describe(total)}")
    return kept, lost
