"""The parts of a ``clipkit embed`` job and their decoding, which runs in data-loader workers.

A part is one unit of output: an input shard, or a chunk of files of a folder. Each worker reads
whole parts (worker ``w`` of ``W`` takes every ``W``-th of its rank's list) and yields each one as
:class:`PartChunk` batches in order, the last flagged, so the main process only encodes and writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data.captions import parse_captions
from clipkit.data.pipeline import ShardReader, ignore_stop_signal, worker_start_method
from clipkit.data.shards import is_local
from clipkit.modalities import FieldDecoder
from retrieval.media import media_members

log = logging.getLogger(__name__)

FILES_PER_CHUNK = 10_000


@dataclass(frozen=True)
class Part:
    """One unit of output: a shard (``url``) or a chunk of ``files`` under ``root``."""

    stem: str
    source: str  # the shard's full path (or URL), or the folder and chunk of files
    url: str | None = None
    root: str | None = None
    files: tuple[str, ...] = ()

    def samples(self, extensions: Sequence[str]) -> tuple[Iterator[dict[str, Any]], ShardReader | None]:
        """Raw samples ({"__key__", "__url__", ext: bytes, ...}) and, for a shard, the reader that
        counts what a broken shard could not deliver."""
        if self.url is not None:
            reader = ShardReader([*extensions, "txt", "json"])
            return reader.read_shard(self.url), reader
        root = Path(self.root or ".")
        return (_file_sample(Path(path), root) for path in self.files), None


def part_stem(name: str, source: str) -> str:
    """A part's file stem: a readable name and a hash of its full source, so that parts of different
    sources never share files."""
    return f"{name}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def shard_parts(urls: Sequence[str]) -> list[Part]:
    parts = []
    for url in urls:
        source = str(Path(url).resolve()) if is_local(url) else url
        parts.append(Part(part_stem(Path(url).name.removesuffix(".tar"), source), source, url=url))
    return parts


def file_parts(root: Path, extensions: Sequence[str]) -> list[Part]:
    suffixes = {f".{ext}" for ext in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no {'/'.join(extensions)} files under {root}")
    parts = []
    for start in range(0, len(files), FILES_PER_CHUNK):
        name = f"files-{start // FILES_PER_CHUNK:06d}"
        source = f"{root.resolve()}#{name}"
        chunk = tuple(str(p) for p in files[start : start + FILES_PER_CHUNK])
        parts.append(Part(part_stem(name, source), source, root=str(root), files=chunk))
    return parts


def _file_sample(path: Path, root: Path) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": str(path.relative_to(root).with_suffix("")), "__url__": str(path),
                              path.suffix[1:].lower(): path.read_bytes()}
    caption = path.with_suffix(".txt")
    if caption.is_file():
        sample["txt"] = caption.read_bytes()
    return sample


def _captions(sample: dict[str, Any]) -> list[str]:
    return parse_captions(sample["txt"].decode("utf-8", errors="replace")) if "txt" in sample else []


def _metadata(sample: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"key": sample["__key__"], "source": sample["__url__"]}
    if "json" in sample:
        try:
            extra = json.loads(sample["json"])
            if isinstance(extra, dict):
                record.update({k: v for k, v in extra.items() if k not in record})
        except ValueError:
            pass  # metadata is a bonus: a broken KEY.json does not cost the vector
    captions = _captions(sample)
    if captions and "caption" not in record:
        record["caption"] = captions[0]
    if len(captions) > 1 and "captions" not in record:
        record["captions"] = captions
    return record


def _decoded_items(decoder: FieldDecoder, sample: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(input, metadata) of every vector a sample gives: for text one caption string per caption (the
    main process tokenizes them with the model's tokenizer), else one decoded tensor."""
    if decoder.name == "text":
        captions = _captions(sample)
        if not captions:
            raise ValueError("no caption")
        several = len(captions) > 1
        return [(caption, {**_metadata(sample), "caption": caption, **({"caption_index": i} if several else {})})
                for i, caption in enumerate(captions)]
    ext = next((e for e in decoder.extensions if e in sample), None)
    if ext is None:
        raise ValueError(f"no {decoder.name} member")
    return [(decoder.decode(sample[ext], random.Random(0)), _metadata(sample))]


@dataclass
class PartChunk:
    """Up to one batch of a part's vectors-to-be, in the part's order. ``inputs`` is a (B, ...) tensor,
    or B caption strings for text; the last chunk of a part (``last``) also carries the samples lost
    to a broken shard and where each media member lies in an uncompressed local shard."""

    part: int  # index into the rank's list of parts
    inputs: torch.Tensor | list[str] | None
    records: list[dict[str, Any]]
    failed: int = 0
    last: bool = False
    lost: int = 0
    media: dict[str, tuple[str, int, int]] = field(default_factory=dict)


def _media_offsets(part: Part) -> dict[str, tuple[str, int, int]]:
    """key → (type, offset, size) of each media member of a local uncompressed tar shard, so that
    ``clipkit serve`` reads it back with one seek; {} for anything else (the service then lists the
    shard itself)."""
    if part.url is None or not is_local(part.source) or not part.source.endswith(".tar"):
        return {}
    try:
        return media_members(Path(part.source))
    except (tarfile.TarError, OSError) as err:
        log.warning("%s: media offsets not recorded (%s)", part.source, err)
        return {}


class PartStream(IterableDataset):
    """:class:`PartChunk` batches of ``parts``; each data-loader worker decodes whole parts."""

    def __init__(self, parts: Sequence[Part], decoder: FieldDecoder, batch_size: int) -> None:
        self.parts = list(parts)
        self.decoder = decoder
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[PartChunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.parts), workers):
            yield from self._chunks(index)

    def _chunks(self, index: int) -> Iterator[PartChunk]:
        part = self.parts[index]
        samples, reader = part.samples(self.decoder.extensions)
        inputs: list[Any] = []
        records: list[dict[str, Any]] = []
        failed = 0
        for sample in samples:
            try:
                items = _decoded_items(self.decoder, sample)
            except Exception as err:  # one bad sample is counted and logged, never fatal
                failed += 1
                log.warning("skipping %s in %s: %s: %s", sample["__key__"], sample["__url__"], type(err).__name__, err)
                continue
            for value, record in items:
                inputs.append(value)
                records.append(record)
                if len(inputs) == self.batch_size:
                    yield PartChunk(index, self._stack(inputs), records, failed)
                    inputs, records, failed = [], [], 0
        lost = sum(reader.take_counts().lost.values()) if reader is not None else 0
        yield PartChunk(index, self._stack(inputs), records, failed, last=True, lost=lost, media=_media_offsets(part))

    def _stack(self, inputs: list[Any]) -> torch.Tensor | list[str] | None:
        if not inputs:
            return None
        return inputs if self.decoder.name == "text" else torch.stack(inputs)


def part_loader(parts: Sequence[Part], decoder: FieldDecoder, batch_size: int, num_workers: int) -> DataLoader:
    """Chunks of ``parts`` decoded by ``num_workers`` data-loader workers (never more than parts;
    0 decodes in this process). Chunks of one part arrive in order; parts interleave."""
    workers = min(num_workers, len(parts))
    stream = PartStream(parts, decoder, batch_size)
    return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                      multiprocessing_context=worker_start_method("auto", [decoder]) if workers else None,
                      worker_init_fn=ignore_stop_signal if workers else None)
