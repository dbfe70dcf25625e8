"""``clipkit embed``: one modality of webdataset shards (or a folder of files) → an embeddings folder.

The folder holds, per input shard (or per chunk of files), ``STEM.npy`` (N, D) float32 unit-norm
vectors and ``STEM.jsonl`` (one metadata object per vector: key, source, caption(s), the sample's
own JSON fields and, for an uncompressed tar shard, where its media member lies: ``media``), plus
``manifest.json``; ``clipkit index build`` reads it. A part's stem is its shard's name plus a hash
of the shard's full path, so two shards of one name in different folders are two parts. The
manifest lists the parts written so far, with their vector counts, and the model's fingerprint: a
run into a folder that holds parts keeps them and adds its own (the same shard is embedded once), an
interrupted run resumes at the first unfinished part, and a folder of another model's (or
modality's) vectors is refused.

Under torchrun (a process group is up) rank ``r`` of ``W`` takes parts ``r, r + W, ...`` and
records them in its own file (:mod:`clipkit.eval.embed_ledger`); rank 0 merges them when all are
done, so the folder equals a one-process run's. Samples are decoded in data-loader workers
(:mod:`clipkit.eval.embed_parts`); the main process encodes and writes.

Text is embedded one vector per caption (a ``txt`` member holds one caption per line, or a JSON list).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from clipkit.distributed import rank_and_world
from clipkit.eval.embed_ledger import FolderIdentity, PartLedger
from clipkit.eval.embed_parts import Part, PartChunk, file_parts, part_loader, shard_parts
from clipkit.eval.encoders import Encoder, encoder_device
from clipkit.eval.layout import resolve_dataset
from clipkit.modalities import FieldDecoder
from retrieval.embeddings import EmbeddingsManifest, write_embedding_shard

log = logging.getLogger(__name__)

# How long the ranks of a job wait for the slowest to finish its share before the merge: each has
# about the same number of parts, but parts may differ in size and nodes in speed.
RANKS_WAIT = timedelta(hours=2)


@dataclass(frozen=True)
class EmbedSummary:
    shards_written: int
    shards_skipped: int  # already in the folder from an earlier run
    vectors: int  # in the parts written by this run
    failed_samples: int
    empty_parts: int = 0  # parts with no decodable sample: nothing written
    seconds: float = 0.0  # decoding, encoding and writing (the slowest rank's)

    def describe(self, modality: str, out: str | Path) -> str:
        """The line ``clipkit embed`` prints."""
        empty = f", {self.empty_parts} part(s) with no decodable sample" if self.empty_parts else ""
        rate = f", {self.vectors / self.seconds:.0f} vectors/s" if self.vectors and self.seconds else ""
        return (f"{self.vectors} {modality} vectors in {self.shards_written} new part(s) ({self.shards_skipped} "
                f"already done, {self.failed_samples} samples failed{empty}) in {out} ({self.seconds:.1f} s{rate})")

    def __add__(self, other: EmbedSummary) -> EmbedSummary:
        """Two ranks' summaries as the job's: counts add up, the job lasts as long as the slower rank."""
        counts = (getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "seconds")
        return EmbedSummary(*counts, seconds=max(self.seconds, other.seconds))


def _check_folder(existing: EmbeddingsManifest, out: Path, encoder: Encoder, identity: FolderIdentity) -> None:
    """Refuse to add vectors to a folder of another model's or modality's vectors."""
    if existing.modality != identity.modality:
        raise ValueError(f"{out} holds {existing.modality} embeddings of {existing.model}, not {identity.modality}: "
                         "use another folder")
    if existing.model_fingerprint is None:
        raise ValueError(f"{out} holds embeddings without a model fingerprint (an older clipkit): which model "
                         "made them cannot be checked, so none are added; use another folder")
    if existing.model_fingerprint != identity.fingerprint:
        raise ValueError(f"{out} holds embeddings of another model (fingerprint {existing.model_fingerprint}, "
                         f"recorded as {existing.model}) than {encoder.name} (fingerprint {identity.fingerprint}): "
                         "their vectors are not comparable; use another folder")


class _PartInProgress:
    """The vectors and records of one part, gathered chunk by chunk."""

    def __init__(self) -> None:
        self.vectors: list[torch.Tensor] = []
        self.records: list[dict[str, Any]] = []
        self.failed = 0


@torch.no_grad()
def _encode(encoder: Encoder, modality: str, chunk: PartChunk) -> torch.Tensor:
    """(B, D) float32 unit-norm vectors of a chunk's inputs, on the CPU."""
    inputs = encoder.tokenize(chunk.inputs) if modality == "text" else chunk.inputs
    return encoder.encode(modality, inputs.to(encoder_device(encoder))).float().cpu()


def embed_to_dir(encoder: Encoder, modality: str, dataset: str, out_dir: str | Path, *, batch_size: int = 256,
                 num_workers: int = 0, progress: bool = True) -> EmbedSummary:
    """Embed ``modality`` of every sample of ``dataset`` (shards, or a folder of files with optional
    sidecar ``.txt`` captions) into ``out_dir``, keeping the parts already there (see the module's
    docstring), with ``num_workers`` data-loader workers decoding. A part is recorded as soon as it is
    written, so a killed run loses at most the parts in flight. Inside a process group every rank
    calls this and gets the whole job's summary."""
    out = Path(out_dir)
    rank, world_size = rank_and_world()
    decoder = encoder.eval_decoder(modality)
    spec = getattr(encoder, "spec", None)
    identity = FolderIdentity(encoder.name, modality, encoder.fingerprint(),
                              {"model": spec.model, "pretrained": spec.pretrained} if spec else None)
    ledger = PartLedger(out, identity, rank, world_size)
    for manifest in ledger.existing:
        _check_folder(manifest, out, encoder, identity)
    layout = resolve_dataset(dataset)
    if layout.kind == "csv":
        raise ValueError(f"clipkit embed reads shards or a folder of files, not a CSV: {dataset}")
    parts = (shard_parts(layout.shards) if layout.kind == "shards"
             else file_parts(layout.folder, decoder.extensions))
    mine = parts[rank::world_size]
    todo = [part for part in mine if part.stem not in ledger.done]
    summary = _embed_parts(encoder, modality, decoder, todo, ledger, out, batch_size=batch_size,
                           num_workers=num_workers, progress=progress and rank == 0)
    summary = replace(summary, shards_skipped=len(mine) - len(todo))
    if world_size > 1:
        gathered: list[EmbedSummary | None] = [None] * world_size
        dist.all_gather_object(gathered, summary)  # also waits for every rank to finish its parts
        summary = sum(gathered[1:], gathered[0])  # type: ignore[arg-type]
    listed = ledger.merge([part.stem for part in parts]) if rank == 0 else None
    if world_size > 1:
        dist.barrier()  # no rank returns before the merged manifest is there
    if listed == 0:
        raise ValueError(f"no decodable {modality} samples in {dataset} ({summary.failed_samples} failed)")
    return summary


def _embed_parts(encoder: Encoder, modality: str, decoder: FieldDecoder, parts: list[Part], ledger: PartLedger,
                 out: Path, *, batch_size: int, num_workers: int, progress: bool) -> EmbedSummary:
    """Encode and write ``parts``, recording each in ``ledger`` as it completes."""
    written = vectors = failed = empty = 0
    if not parts:
        return EmbedSummary(0, 0, 0, 0)
    start = time.perf_counter()
    in_progress: dict[int, _PartInProgress] = {}
    bar = tqdm(total=len(parts), desc=f"embedding {modality}", unit="part", disable=not progress)
    for chunk in part_loader(parts, decoder, batch_size, num_workers):
        gathered = in_progress.setdefault(chunk.part, _PartInProgress())
        gathered.failed += chunk.failed
        if chunk.records:
            gathered.vectors.append(_encode(encoder, modality, chunk))
            gathered.records.extend(chunk.records)
        if not chunk.last:
            continue
        del in_progress[chunk.part]
        part = parts[chunk.part]
        failed += gathered.failed + chunk.lost
        bar.update()
        if not gathered.records:
            log.warning("%s: no decodable %s sample; nothing written for it", part.source, modality)
            empty += 1
            continue
        for record in gathered.records:
            found = chunk.media.get(record["key"])
            if found is not None and "media" not in record:
                kind, offset, size = found
                record["media"] = {"type": kind, "offset": offset, "size": size}
        features = torch.cat(gathered.vectors)
        write_embedding_shard(out, part.stem, features, gathered.records)
        ledger.add(part.stem, len(gathered.records), part.source, features.shape[1])
        written += 1
        vectors += len(gathered.records)
    bar.close()
    return EmbedSummary(written, 0, vectors, failed, empty, time.perf_counter() - start)
