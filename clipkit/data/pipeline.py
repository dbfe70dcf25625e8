"""The webdataset pipeline: shard list → split by rank and worker → shuffle → decode → batch.

Batches are dicts of stacked tensors keyed by field name (``image``, ``text``, ``label``, ...), plus
``num_skipped``: how many samples this worker dropped (missing member, undecodable bytes) since its
previous batch, so the trainer can count bad data across worker processes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.modalities.base import FieldDecoder

log = logging.getLogger(__name__)


def decode_class_label(data: bytes) -> torch.Tensor:
    """A CLIP_benchmark-style ``.cls`` member (ASCII integer) → scalar int64 tensor."""
    return torch.tensor(int(data.decode("ascii").strip()), dtype=torch.int64)


def decode_json(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


CLASS_LABEL_FIELD = FieldDecoder("label", ("cls",), decode_class_label)
# Per-sample metadata (img2dataset's KEY.json); batched as a list of dicts, not a tensor.
METADATA_FIELD = FieldDecoder("metadata", ("json",), decode_json)


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; several patterns may be joined with ``::``."""
    shards = [url for part in pattern.split("::") if part for url in braceexpand.braceexpand(part)]
    if not shards:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return shards


def count_samples(shards: Sequence[str]) -> int | None:
    """Total sample count from the ``sizes.json`` files beside local shards, or None if any is unknown."""
    sizes: dict[Path, dict[str, int]] = {}
    total = 0
    for shard in shards:
        path = Path(shard)
        if path.parent not in sizes:
            index = path.parent / "sizes.json"
            sizes[path.parent] = json.loads(index.read_text()) if index.is_file() else {}
        count = sizes[path.parent].get(path.name)
        if count is None:
            return None
        total += int(count)
    return total


@dataclass
class SampleDecoder:
    """Decodes one raw webdataset sample into a dict of tensors, or None when it must be skipped."""

    fields: Sequence[FieldDecoder]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        out = {}
        for spec in self.fields:
            ext = next((e for e in spec.extensions if e in sample), None)
            if ext is None:
                log.warning("skipping %s in %s: no %s member (%s)", sample.get("__key__"),
                            sample.get("__url__"), spec.name, "/".join(spec.extensions))
                return None
            try:
                out[spec.name] = spec.decode(sample[ext])
            except Exception as err:  # undecodable bytes of any kind must not stop training
                log.warning("skipping %s in %s: cannot decode %s.%s (%s: %s)", sample.get("__key__"),
                            sample.get("__url__"), sample.get("__key__"), ext, type(err).__name__, err)
                return None
        return out


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle: yield a random element of a buffer of ``size`` items as each new one arrives."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _log_tar_error(err: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s: %s", type(err).__name__, err)
    return True


class ShardStream(IterableDataset):
    """An iterable over batches of decoded samples from webdataset tar shards.

    Shards are shuffled per epoch (seeded, identical on every rank), then dealt to ranks and to the
    data-loader workers of each rank so no sample is read twice in an epoch.
    """

    def __init__(
        self,
        shards: Sequence[str],
        fields: Sequence[FieldDecoder],
        batch_size: int,
        *,
        train: bool,
        shuffle_size: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards = list(shards)
        self.decoder = SampleDecoder(list(fields))
        self.batch_size = batch_size
        self.train = train
        self.shuffle_size = shuffle_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard and sample shuffling; call before iterating (workers copy the dataset then)."""
        self.epoch = epoch

    def _my_shards(self, worker_id: int, num_workers: int) -> list[str]:
        shards = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards[self.rank :: self.world_size][worker_id::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self._my_shards(worker_id, num_workers)
        read_tars = wds.tarfile_to_samples(handler=_log_tar_error)
        samples: Iterable[dict[str, Any]] = read_tars({"url": url} for url in shards)
        if self.train and self.shuffle_size > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker_id}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        yield from self._decode_and_batch(samples)

    def _decode_and_batch(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        skipped = 0
        for sample in samples:
            decoded = self.decoder(sample)
            if decoded is None:
                skipped += 1
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield _collate(batch, skipped)
                batch, skipped = [], 0
        # Training drops the ragged last batch (a contrastive batch of 3 is a different task);
        # evaluation keeps every sample.
        if batch and not self.train:
            yield _collate(batch, skipped)


def _collate(items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Stack tensor fields to (B, ...); other fields (metadata dicts) become lists of length B."""
    batch = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    batch["num_skipped"] = torch.tensor(skipped)
    return batch


def build_loader(
    stream: ShardStream, num_workers: int, *, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over a :class:`ShardStream`; never more workers than this rank has shards."""
    shards_per_rank = max(1, len(stream.shards) // stream.world_size)
    if num_workers > shards_per_rank:
        log.warning("only %d shard(s) per rank: using %d data workers instead of %d",
                    shards_per_rank, shards_per_rank, num_workers)
        num_workers = shards_per_rank
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
