"""The webdataset pipeline: shards → split by rank and worker (or drawn with replacement) → shuffle
→ decode → batch.

Batches are dicts of stacked tensors keyed by field name (``image``, ``text``, ``label``, ...), plus
what this worker lost since its previous batch (``num_skipped``, ``skipped_shards``,
``broken_shards``, ``duplicate_keys``: see :func:`_accounting`), so the trainer can count bad data
across worker processes and name the shards it comes from. A worker that lost samples after its
last batch ends with a batch of only those keys.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from clipkit.config import DataConfig
from clipkit.data.remote import REMOTE_RETRY_PAUSE_S, REMOTE_SHARD_RETRIES, open_shard
from clipkit.data.shards import ShardSource, count_samples, is_local, shard_count, shard_sources
from clipkit.errors import DataError
from clipkit.modalities.base import FieldDecoder

log = logging.getLogger(__name__)


def decode_class_label(data: bytes, rng: random.Random) -> torch.Tensor:
    """A CLIP_benchmark-style ``.cls`` member (ASCII integer) → scalar int64 tensor."""
    return torch.tensor(int(data.decode("ascii").strip()), dtype=torch.int64)


def decode_json(data: bytes, rng: random.Random) -> dict[str, Any]:
    """A ``.json`` member → the dict it holds (img2dataset's per-sample metadata)."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


CLASS_LABEL_FIELD = FieldDecoder("label", ("cls",), decode_class_label)
# Per-sample metadata (img2dataset's KEY.json); batched as a list of dicts, not a tensor.
METADATA_FIELD = FieldDecoder("metadata", ("json",), decode_json)


@dataclass
class SampleDecoder:
    """Decodes one raw webdataset sample into a dict of tensors, or None when it must be skipped."""

    fields: Sequence[FieldDecoder]

    def __call__(self, sample: dict[str, Any], seed: str) -> dict[str, Any] | None:
        """Each field draws its randomness from ``random.Random("{seed}/{key}/{field}")``: the same
        sample gets the same augmentation in every worker layout, and fields do not perturb each other."""
        out = {}
        key = sample.get("__key__")
        for spec in self.fields:
            ext = next((e for e in spec.extensions if e in sample), None)
            if ext is None:
                log.warning("skipping %s in %s: no %s member (%s)", key,
                            sample.get("__url__"), spec.name, "/".join(spec.extensions))
                return None
            try:
                out[spec.name] = spec.decode(sample[ext], random.Random(f"{seed}/{key}/{spec.name}"))
            except Exception as err:  # undecodable bytes of any kind must not stop training
                log.warning("skipping %s in %s: cannot decode %s.%s (%s: %s)", key,
                            sample.get("__url__"), key, ext, type(err).__name__, err)
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


def member_extension(name: str) -> str:
    """The extension by which webdataset groups a tar member into a sample: all after the first dot of
    the file name, lower-cased (``a/b/k.seg.PNG`` → ``seg.png``)."""
    _, _, extension = name.rpartition("/")[2].partition(".")
    return extension.lower()


@dataclass(frozen=True)
class _KeepExtensions:
    """A picklable tar-member filter: only members with these extensions are read into memory."""

    extensions: frozenset[str]

    def __call__(self, name: str) -> bool:
        return member_extension(name) in self.extensions


@dataclass
class ReadCounts:
    """What a :class:`ShardReader` could not deliver since the counts were last taken."""

    lost: Counter[str] = field(default_factory=Counter)  # shard → samples it should have held but did not yield
    broken: list[str] = field(default_factory=list)  # shards whose reading failed
    duplicates: int = 0  # samples whose key this reader had seen before (kept)


class ShardReader:
    """Raw samples of tar shards, one shard at a time: member bytes by extension, plus ``__key__``
    and ``__url__``; with ``extensions``, other members are passed over unread.

    Nothing it cannot read is lost silently. A broken shard (truncated mid-member, random bytes or
    gzip garbage, zero bytes, a folder named ``.tar``, missing) yields the samples before the damage
    and is recorded in ``broken``; a shard that yields fewer samples than its ``sizes.json`` entry
    (broken, or samples with none of the wanted members) has the difference counted in ``lost``. A
    key seen before, in the same shard or an earlier one this reader read, is counted in
    ``duplicates`` and kept (webdataset would merge members of one key that follow each other;
    reading shard by shard keeps two shards' samples apart); ``count_duplicates=False`` for shards
    drawn with replacement, which repeat by design. :meth:`take_counts` hands the counts over and
    starts new ones.
    """

    def __init__(self, extensions: Iterable[str] | None = None, count_duplicates: bool = True) -> None:
        self.select = None if extensions is None else _KeepExtensions(frozenset(extensions))
        self.count_duplicates = count_duplicates
        self.counts = ReadCounts()
        self._keys: set[int] = set()
        self._sizes: dict[str, dict[str, int]] = {}
        self._reported: set[str] = set()

    def take_counts(self) -> ReadCounts:
        counts, self.counts = self.counts, ReadCounts()
        return counts

    def read(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            yield from self.read_shard(url)

    def read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """The samples of one shard. A remote one whose read fails (a dropped connection, a timeout)
        is read again, up to ``REMOTE_SHARD_RETRIES`` times, from the first sample not yet delivered."""
        delivered = duplicates = 0
        attempts = 1 if is_local(url) else 1 + REMOTE_SHARD_RETRIES  # a local file reads the same again
        for attempt in range(attempts):
            errors: list[Exception] = []
            for index, sample in enumerate(self._attempt(url, errors)):
                if index < delivered:  # delivered by an earlier attempt
                    continue
                if self.count_duplicates:
                    key = hash(sample.get("__key__"))
                    duplicates += key in self._keys
                    self._keys.add(key)
                delivered += 1
                yield sample
            if not errors or attempt == attempts - 1:
                break
            log.warning("reading shard %s failed after %d samples (%s: %s); reading it again (%d of %d)", url,
                        delivered, type(errors[0]).__name__, errors[0], attempt + 1, REMOTE_SHARD_RETRIES)
            time.sleep(REMOTE_RETRY_PAUSE_S * 2**attempt)  # a server that refused may be restarting
        self._account(url, delivered, errors, duplicates)

    def _attempt(self, url: str, errors: list[Exception]) -> Iterator[dict[str, Any]]:
        """One read of a shard; a failure is appended to ``errors`` and ends it. A sample is held back
        until the next one (or the shard's clean end) shows it complete: the one being read when the
        stream broke may lack members."""
        def keep_going(err: Exception) -> bool:
            errors.append(err)
            return True

        if is_local(url):
            sources: Iterable[dict[str, Any]] = wds.tariterators.url_opener([{"url": url}], handler=keep_going)
        else:
            try:
                sources = [{"url": url, "stream": open_shard(url)}]
            except (OSError, DataError) as err:  # unreachable, refused, not found: counted like a broken shard
                errors.append(err)
                return
        files = wds.tariterators.tar_file_expander(sources, handler=keep_going, select_files=self.select)
        held = None
        try:
            for sample in wds.tariterators.group_by_keys(files, handler=keep_going):
                if held is not None:
                    yield held
                held = sample
        finally:
            for source in sources:
                if "stream" in source:
                    source["stream"].close()
        if held is not None and not errors:
            yield held

    def _account(self, url: str, yielded: int, errors: list[Exception], duplicates: int) -> None:
        """Record what shard ``url`` could not deliver, warning once per shard (a resampled stream may
        draw a broken shard again and again)."""
        try:
            expected = shard_count(url, self._sizes)
        except DataError as err:  # the server that lost the shard may not answer for its sizes.json either
            log.warning("%s", err)
            expected = None
        lost = max(0, expected - yielded) if expected is not None else 0
        if errors:
            self.counts.broken.append(url)
        if lost:
            self.counts.lost[url] += lost
        self.counts.duplicates += duplicates
        if url in self._reported or not (errors or lost or duplicates):
            return
        self._reported.add(url)
        if errors:
            how_many = lost if expected is not None else "an unknown number (no sizes.json entry)"
            log.warning("broken shard %s (%s: %s): %d samples read, %s lost", url, type(errors[0]).__name__,
                        errors[0], yielded, how_many)
        elif lost:
            wanted = "/".join(sorted(self.select.extensions)) if self.select else "any"
            log.warning("shard %s yielded %d of the %d samples its sizes.json lists (%d without a %s member)",
                        url, yielded, expected, lost, wanted)
        if duplicates:
            log.warning("%d samples of shard %s have keys seen before (kept; keys name samples, so a duplicate "
                        "is usually a copied shard or two shard sets with overlapping keys)", duplicates, url)


def read_shards(urls: Iterable[str], extensions: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of each tar in turn (see :class:`ShardReader`)."""
    return ShardReader(extensions).read(urls)


def read_resampled_shards(urls: Iterable[str], patience: int, reader: ShardReader) -> Iterator[dict[str, Any]]:
    """``reader``'s samples over an endless draw of ``urls``, failing after ``patience`` empty shards
    in a row: with every shard unreadable, an endless stream would otherwise only ever log warnings."""
    empty_in_a_row = 0
    for url in urls:
        empty_in_a_row += 1
        for sample in reader.read_shard(url):
            empty_in_a_row = 0
            yield sample
        if empty_in_a_row >= patience:
            raise DataError(f"{patience} shards drawn in a row held no readable sample (the last: {url}); "
                            "check the shard paths and the warnings above")


def loader_position(batch_counts: Sequence[float], position: int) -> tuple[list[int], int]:
    """Where a DataLoader over an iterable dataset stands after yielding ``position`` batches.

    With W workers the loader takes one batch from each worker in turn (0, 1, ..., W-1, 0, ...) and
    passes over workers that have run out; ``batch_counts[w]`` is worker w's total (``math.inf``:
    endless). Returns the batches taken from each worker, and the worker whose batch comes next
    (once all have run out, the one whose turn it would be).
    """
    num_workers = len(batch_counts)
    taken = [0] * num_workers
    turn, remaining = 0, position
    while True:
        active = [w for w, count in enumerate(batch_counts) if taken[w] < count]
        if not active:
            return taken, turn
        turn = min(active, key=lambda w: (w - turn) % num_workers)  # the first active one from turn on
        if remaining == 0:
            return taken, turn
        # Whole rounds leave the turn where it was: take them in one step until a worker runs out.
        rounds = int(min(remaining // len(active), *(batch_counts[w] - taken[w] for w in active)))
        if rounds:
            for w in active:
                taken[w] += rounds
            remaining -= rounds * len(active)
        else:
            taken[turn] += 1
            remaining -= 1
            turn = (turn + 1) % num_workers


def _as_sources(shards: Sequence[str] | Sequence[ShardSource]) -> list[ShardSource]:
    """ShardSource items as they are; plain URLs as one source of weight 1."""
    if shards and all(isinstance(item, ShardSource) for item in shards):
        return list(shards)  # type: ignore[arg-type]
    if any(isinstance(item, ShardSource) for item in shards):
        raise TypeError("pass either shard URLs or ShardSource objects, not both")
    return [ShardSource(tuple(str(url) for url in shards))]


class ShardStream(IterableDataset):
    """An iterable over batches of decoded samples from webdataset tar shards.

    By default an epoch reads every shard once: shards are shuffled per epoch (seeded, identical on
    every rank), then dealt to ranks and to the data-loader workers of each rank, so no sample is
    read twice. With ``resampled=True`` every worker of every rank instead draws shards with
    replacement, endlessly (seeded by seed, epoch, rank and worker), a shard with probability
    proportional to its source's weight divided by its source's shard count; an epoch is then
    ``epoch_samples`` samples over all ranks, ``epoch_samples // (batch_size × world_size)`` batches
    per rank.

    ``shards`` is a list of URLs (one source) or of :class:`ShardSource`. Each sample's augmentation
    is seeded by (seed, epoch, sample key), so it does not depend on the worker layout.
    """

    def __init__(
        self,
        shards: Sequence[str] | Sequence[ShardSource],
        fields: Sequence[FieldDecoder],
        batch_size: int,
        *,
        train: bool,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_size: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sources = _as_sources(shards)
        self.shards = [url for source in self.sources for url in source.shards]
        self.decoder = SampleDecoder(list(fields))
        self.batch_size = batch_size
        self.train = train
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.shuffle_size = shuffle_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0
        self._check_sampling()

    def _check_sampling(self) -> None:
        if self.resampled:
            if self.epoch_samples is None:
                raise ValueError("a resampled stream never runs out: epoch_samples sets the length of an epoch")
            if self.batches_per_rank() == 0:
                raise ValueError(f"an epoch of {self.epoch_samples} samples makes no batch of {self.batch_size} "
                                 f"on each of {self.world_size} rank(s)")
            return
        if self.epoch_samples is not None:
            raise ValueError("epoch_samples applies to resampled streams only: otherwise an epoch is one pass")
        if any(source.weight != 1 for source in self.sources):
            raise ValueError("source weights apply to resampled streams only (data.resampled: true)")
        if len(self.shards) < self.world_size:
            raise ValueError(
                f"{len(self.shards)} shard(s) for {self.world_size} ranks: ranks {len(self.shards)} to "
                f"{self.world_size - 1} would get no data. Write at least one shard per rank (better, one per "
                f"data worker of every rank), or set data.resampled: true to draw shards with replacement.")

    def batches_per_rank(self) -> int:
        """The length of a resampled epoch in batches on each rank."""
        if self.epoch_samples is None:
            raise ValueError("only a resampled stream has a set epoch length; otherwise an epoch is one pass")
        return self.epoch_samples // (self.batch_size * self.world_size)

    def max_workers(self) -> int | None:
        """The most data workers that all get data: this rank's shard count; None when resampled."""
        return None if self.resampled else len(self.shards[self.rank :: self.world_size])

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch of the next iteration (it seeds shard order, shuffles and augmentation), and
        make that iteration start at its batch ``skip_batches``: it then yields exactly the batches an
        unskipped iteration yields from that index on, in the same order, through a DataLoader with
        any number of workers (the same number in both). Call before iterating: workers copy the
        dataset then.

        Skipping is cheap: each worker reads the raw samples its skipped batches held and drops them
        undecoded, ``batch_size`` per batch. So the position is exact only if no sample in the
        skipped part was skipped as undecodable or incomplete; otherwise each worker resumes one
        sample early for each such sample of its own. Without resampling, which worker each skipped
        batch came from depends on when workers run out of shards, read from the ``sizes.json``
        beside the shards (:func:`count_samples`); where a count is unknown the workers are assumed
        not to run out before the position.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches must not be negative, got {skip_batches}")
        if skip_batches and not self.resampled and count_samples(self.shards) is None:
            log.warning("resuming at batch %d with unknown shard sizes: exact only if no data worker ran out "
                        "of shards before it", skip_batches)
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _worker_shards(self, worker: int, num_workers: int) -> list[str]:
        shards = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards[self.rank :: self.world_size][worker::num_workers]

    def _resampled_urls(self, worker: int) -> Iterator[str]:
        """Shards drawn with replacement, endlessly: P(shard) ∝ its source's weight / its source's size."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/resample")
        weights = [source.weight / len(source.shards) for source in self.sources for _ in source.shards]
        cumulative = list(itertools.accumulate(weights))
        while True:
            yield rng.choices(self.shards, cum_weights=cumulative)[0]

    def _resampled_worker_batches(self, worker: int, num_workers: int) -> int:
        """A resampled worker's share of this rank's batches in an epoch."""
        per_rank = self.batches_per_rank()
        return per_rank // num_workers + (worker < per_rank % num_workers)

    def _worker_batch_counts(self, num_workers: int) -> list[float]:
        """Each worker's batches in a whole epoch, if every sample decodes (``math.inf``: unknown)."""
        if self.resampled:
            return [self._resampled_worker_batches(w, num_workers) for w in range(num_workers)]
        counts: list[float] = []
        for worker in range(num_workers):
            samples = count_samples(self._worker_shards(worker, num_workers))
            if samples is None:
                counts.append(math.inf)
            else:
                counts.append(samples // self.batch_size if self.train else -(-samples // self.batch_size))
        return counts

    def _resume_position(self, num_workers: int) -> tuple[list[int], int]:
        """The batches each worker skips, and the worker whose batch comes first (see set_epoch)."""
        if not self.skip_batches:
            return [0] * num_workers, 0
        return loader_position(self._worker_batch_counts(num_workers), self.skip_batches)

    def _raw_samples(self, worker: int, num_workers: int, reader: ShardReader) -> Iterator[dict[str, Any]]:
        """This worker's undecoded samples in the order it batches them (after the shuffle buffer)."""
        if self.resampled:
            samples = read_resampled_shards(self._resampled_urls(worker), 100 + 10 * len(self.shards), reader)
        else:
            samples = reader.read(self._worker_shards(worker, num_workers))
        if self.train and self.shuffle_size > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        return samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info else (0, 1)
        skip, first = self._resume_position(num_workers)
        # The DataLoader always starts its round-robin at slot 0: rotate the workers' roles so the
        # worker whose batch comes next at the resume position sits there.
        worker = (first + slot) % num_workers
        # Only the members some field decodes are read: the shuffle buffer holds no unused bytes.
        reader = ShardReader({ext for spec in self.decoder.fields for ext in spec.extensions},
                             count_duplicates=not self.resampled)
        raw = self._raw_samples(worker, num_workers, reader)
        samples = itertools.islice(raw, skip[worker] * self.batch_size, None)
        batches = self._decode_and_batch(samples, reader)
        if self.resampled:  # an endless worker stops at its share of the epoch
            batches = itertools.islice(batches, self._resampled_worker_batches(worker, num_workers) - skip[worker])
        yield from batches

    def _decode_and_batch(self, samples: Iterable[dict[str, Any]], reader: ShardReader) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        for sample in samples:
            decoded = self.decoder(sample, f"{self.seed}/{self.epoch}")
            if decoded is None:
                skipped[str(sample.get("__url__"))] += 1
                continue
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield _collate(batch, skipped, reader.take_counts())
                batch, skipped = [], Counter()
        # Training drops the ragged last batch (a contrastive batch of 3 is a different task);
        # evaluation keeps every sample. What was skipped or lost after the last batch is reported
        # too, in a batch that holds only the counts when no sample is left.
        counts = reader.take_counts()
        if not self.train and batch:
            yield _collate(batch, skipped, counts)
        elif skipped or counts.lost or counts.broken or counts.duplicates:
            yield _accounting(skipped, counts)


def _accounting(skipped: Counter[str], counts: ReadCounts) -> dict[str, Any]:
    """The batch keys that report lost data: ``num_skipped`` (scalar int64: undecodable samples and
    samples broken shards lost), ``skipped_shards`` (shard URL → how many of those it had),
    ``broken_shards`` (URLs of shards that failed to read) and ``duplicate_keys`` (int)."""
    per_shard = skipped + counts.lost
    return {"num_skipped": torch.tensor(sum(per_shard.values())), "skipped_shards": dict(per_shard),
            "broken_shards": list(counts.broken), "duplicate_keys": counts.duplicates}


def _collate(items: list[dict[str, Any]], skipped: Counter[str], counts: ReadCounts) -> dict[str, Any]:
    """Stack tensor fields to (B, ...); other fields (metadata dicts) become lists of length B; plus
    what this worker skipped and lost since its previous batch (:func:`_accounting`)."""
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        # default_collate stacks straight into shared memory in a worker process, so sending the
        # batch to the main process copies nothing.
        batch[key] = default_collate(values) if isinstance(first, torch.Tensor) else values
    batch.update(_accounting(skipped, counts))
    return batch


def worker_start_method(setting: str, fields: Sequence[FieldDecoder]) -> str | None:
    """``data.worker_start_method`` resolved for workers that run ``fields``: "auto" picks forkserver
    when a decoder is threaded (audio, video: threads that a fork would copy in a locked state)."""
    if setting != "auto":
        return setting
    return "forkserver" if any(field.threaded for field in fields) else None


def ignore_stop_signal(worker_id: int) -> None:
    """Data-loader workers ignore SIGTERM. Schedulers (Slurm, most launchers) send it to every process
    of a preempted job; a worker that died of it would crash the main process's next fetch before
    the main process, which got the same signal, can finish its step, save and exit cleanly. The
    workers end when the main process shuts the loader down (or dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(
    stream: ShardStream, num_workers: int, *, pin_memory: bool = False, start_method: str = "auto"
) -> DataLoader:
    """A DataLoader over a :class:`ShardStream`; never more workers than this rank has shards, each
    ignoring SIGTERM (:func:`ignore_stop_signal`)."""
    limit = stream.max_workers()
    if limit is not None and num_workers > limit:
        log.warning("only %d shard(s) for this rank: using %d data workers instead of %d",
                    limit, limit, num_workers)
        num_workers = limit
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        multiprocessing_context=worker_start_method(start_method, stream.decoder.fields) if num_workers else None,
        worker_init_fn=ignore_stop_signal if num_workers else None,
    )


def training_stream(
    data: DataConfig, fields: Sequence[FieldDecoder], *, seed: int, rank: int = 0, world_size: int = 1,
    sources: Sequence[ShardSource] | None = None,
) -> ShardStream:
    """The training :class:`ShardStream` that ``data`` describes (sources, weights, resampling);
    ``sources`` replaces the shards of ``data.train_shards`` (e.g. without the missing ones)."""
    return ShardStream(
        list(sources) if sources is not None else shard_sources(data.train_shards, data.train_data_weights),
        fields,
        data.batch_size,
        train=True,
        resampled=data.resampled,
        epoch_samples=data.train_num_samples if data.resampled else None,
        shuffle_size=data.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


class DataQualityError(DataError):
    """So much of the training data is undecodable or incomplete that training must stop."""


class SkipRateGuard:
    """Stops a run whose data is broken rather than noisy: feed it every batch's sample counts."""

    def __init__(self, max_fraction: float, min_samples: int = 1000) -> None:
        if not 0 < max_fraction <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.delivered = 0
        self.skipped = 0

    def update(self, delivered: int, skipped: int) -> None:
        """Add a batch's delivered and skipped sample counts; raise :class:`DataQualityError` once at
        least ``min_samples`` were read and more than ``max_fraction`` of them were skipped."""
        self.delivered += delivered
        self.skipped += skipped
        seen = self.delivered + self.skipped
        # Too few samples say nothing: one bad sample among the first ten is not a broken dataset.
        if seen < self.min_samples or self.skipped / seen <= self.max_fraction:
            return
        raise DataQualityError(
            f"{self.skipped / seen:.1%} of the training samples read so far were skipped as undecodable or "
            f"incomplete ({self.skipped} of {seen}), above the limit of {self.max_fraction:.1%} "
            f"(data.max_skip_fraction). The warnings above name each sample and shard; fix or drop those "
            f"shards, or raise data.max_skip_fraction to train on anyway."
        )
