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

Text is embedded one vector per caption (a ``txt`` member holds one caption per line, or a JSON list).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from clipkit.data.captions import parse_captions
from clipkit.data.pipeline import ShardReader
from clipkit.data.shards import is_local
from clipkit.eval.encoders import Encoder, encoder_device
from clipkit.eval.layout import resolve_dataset
from clipkit.modalities import FieldDecoder
from retrieval.embeddings import MANIFEST_FILE, EmbeddingsManifest, read_manifest, write_embedding_shard, write_manifest
from retrieval.media import media_members

log = logging.getLogger(__name__)

FILES_PER_CHUNK = 10_000


@dataclass(frozen=True)
class EmbedSummary:
    shards_written: int
    shards_skipped: int  # already in the folder from an earlier run
    vectors: int  # in the parts written by this run
    failed_samples: int
    empty_parts: int = 0  # parts with no decodable sample: nothing written

    def describe(self, modality: str, out: str | Path) -> str:
        """The line ``clipkit embed`` prints."""
        empty = f", {self.empty_parts} part(s) with no decodable sample" if self.empty_parts else ""
        return (f"{self.vectors} {modality} vectors in {self.shards_written} new part(s) ({self.shards_skipped} "
                f"already done, {self.failed_samples} samples failed{empty}) in {out}")


@dataclass(frozen=True)
class _Part:
    """One unit of output: a shard, or a chunk of files."""

    stem: str
    source: str  # the shard's full path (or URL), or the folder and chunk of files
    samples: Iterable[dict[str, Any]]  # raw samples: {"__key__", "__url__", ext: bytes, ...}
    reader: ShardReader | None = None  # for a shard: what it could not deliver

    def lost_samples(self) -> int:
        """Samples a broken shard should have held but did not yield (once the samples are read)."""
        return sum(self.reader.take_counts().lost.values()) if self.reader is not None else 0


def part_stem(name: str, source: str) -> str:
    """A part's file stem: a readable name and a hash of its full source, so that parts of different
    sources never share files."""
    return f"{name}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def _shard_parts(urls: Sequence[str], extensions: Sequence[str]) -> Iterator[_Part]:
    for url in urls:
        source = str(Path(url).resolve()) if is_local(url) else url
        name = Path(url).name.removesuffix(".tar")
        reader = ShardReader([*extensions, "txt", "json"])
        yield _Part(part_stem(name, source), source, reader.read_shard(url), reader)


def _file_sample(path: Path, root: Path) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": str(path.relative_to(root).with_suffix("")), "__url__": str(path),
                              path.suffix[1:].lower(): path.read_bytes()}
    caption = path.with_suffix(".txt")
    if caption.is_file():
        sample["txt"] = caption.read_bytes()
    return sample


def _file_parts(root: Path, extensions: Sequence[str]) -> Iterator[_Part]:
    suffixes = {f".{ext}" for ext in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no {'/'.join(extensions)} files under {root}")
    for start in range(0, len(files), FILES_PER_CHUNK):
        chunk = files[start : start + FILES_PER_CHUNK]
        name = f"files-{start // FILES_PER_CHUNK:06d}"
        source = f"{root.resolve()}#{name}"
        yield _Part(part_stem(name, source), source, (_file_sample(p, root) for p in chunk))


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


def _decoded_items(encoder: Encoder, decoder: FieldDecoder, sample: dict[str, Any]
                   ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(input, metadata) of every vector a sample gives: one per caption for text, else one."""
    if decoder.name == "text":
        captions = _captions(sample)
        if not captions:
            raise ValueError("no caption")
        tokens = encoder.tokenize(captions).cpu()
        several = len(captions) > 1
        return [(row, {**_metadata(sample), "caption": caption, **({"caption_index": i} if several else {})})
                for i, (row, caption) in enumerate(zip(tokens, captions))]
    ext = next((e for e in decoder.extensions if e in sample), None)
    if ext is None:
        raise ValueError(f"no {decoder.name} member")
    return [(decoder.decode(sample[ext], random.Random(0)), _metadata(sample))]


@torch.no_grad()
def _embed_part(encoder: Encoder, decoder: FieldDecoder, part: _Part, batch_size: int
                ) -> tuple[torch.Tensor | None, list[dict[str, Any]], int]:
    device = encoder_device(encoder)
    vectors: list[torch.Tensor] = []
    records: list[dict[str, Any]] = []
    inputs: list[torch.Tensor] = []
    failed = 0

    def flush() -> None:
        if inputs:
            vectors.append(encoder.encode(decoder.name, torch.stack(inputs).to(device)).float().cpu())
            inputs.clear()

    for sample in part.samples:
        try:
            items = _decoded_items(encoder, decoder, sample)
        except Exception as err:  # one bad sample is counted and logged, never fatal
            failed += 1
            log.warning("skipping %s in %s: %s: %s", sample["__key__"], sample["__url__"], type(err).__name__, err)
            continue
        for value, record in items:
            inputs.append(value)
            records.append(record)
            if len(inputs) == batch_size:
                flush()
    flush()
    return (torch.cat(vectors) if vectors else None), records, failed


def _record_media_offsets(shard: Path, records: list[dict[str, Any]]) -> None:
    """Add where each record's media member lies in ``shard`` (``{"media": {"type", "offset",
    "size"}}``), so that ``clipkit serve`` reads it back with one seek; a shard that cannot be listed
    again leaves the records as they are (the service then lists it itself)."""
    try:
        members = media_members(shard)
    except (tarfile.TarError, OSError) as err:
        log.warning("%s: media offsets not recorded (%s)", shard, err)
        return
    for record in records:
        found = members.get(record["key"])
        if found is not None and "media" not in record:
            kind, offset, size = found
            record["media"] = {"type": kind, "offset": offset, "size": size}


def _check_folder(existing: EmbeddingsManifest, out: Path, encoder: Encoder, modality: str, fingerprint: str) -> None:
    """Refuse to add vectors to a folder of another model's or modality's vectors."""
    if existing.modality != modality:
        raise ValueError(f"{out} holds {existing.modality} embeddings of {existing.model}, not {modality}: "
                         "use another folder")
    if existing.model_fingerprint is None:
        raise ValueError(f"{out} holds embeddings without a model fingerprint (an older clipkit): which model "
                         "made them cannot be checked, so none are added; use another folder")
    if existing.model_fingerprint != fingerprint:
        raise ValueError(f"{out} holds embeddings of another model (fingerprint {existing.model_fingerprint}, "
                         f"recorded as {existing.model}) than {encoder.name} (fingerprint {fingerprint}): their "
                         "vectors are not comparable; use another folder")


def embed_to_dir(encoder: Encoder, modality: str, dataset: str, out_dir: str | Path, *, batch_size: int = 256,
                 progress: bool = True) -> EmbedSummary:
    """Embed ``modality`` of every sample of ``dataset`` (shards, or a folder of files with optional
    sidecar ``.txt`` captions) into ``out_dir``, keeping the parts already there (see the module's
    docstring). The manifest is rewritten after each part, so a killed run loses at most one part."""
    out = Path(out_dir)
    decoder = encoder.eval_decoder(modality)
    fingerprint = encoder.fingerprint()
    spec = getattr(encoder, "spec", None)
    existing = read_manifest(out) if (out / MANIFEST_FILE).is_file() else None
    if existing is not None:
        _check_folder(existing, out, encoder, modality, fingerprint)
    layout = resolve_dataset(dataset)
    if layout.kind == "csv":
        raise ValueError(f"clipkit embed reads shards or a folder of files, not a CSV: {dataset}")
    parts = (_shard_parts(layout.shards, decoder.extensions) if layout.kind == "shards"
             else _file_parts(layout.folder, decoder.extensions))
    stems = list(existing.shards) if existing else []
    counts = list(existing.counts or []) if existing else []
    sources = list(existing.sources or []) if existing else []
    dim = existing.dim if existing else None
    written = skipped = vectors = failed = empty = 0
    for part in tqdm(parts, desc=f"embedding {modality}", unit="part", disable=not progress):
        if part.stem in stems:
            skipped += 1
            continue
        features, records, bad = _embed_part(encoder, decoder, part, batch_size)
        failed += bad + part.lost_samples()
        if part.reader is not None and is_local(part.source) and part.source.endswith(".tar"):
            _record_media_offsets(Path(part.source), records)
        if features is None:
            log.warning("%s: no decodable %s sample; nothing written for it", part.source, modality)
            empty += 1
            continue
        dim = dim or features.shape[1]
        write_embedding_shard(out, part.stem, features, records)
        stems.append(part.stem)
        counts.append(len(records))
        sources.append(part.source)
        write_manifest(out, encoder.name, modality, dim, stems, counts=counts, sources=sources,
                       model_fingerprint=fingerprint,
                       model_spec={"model": spec.model, "pretrained": spec.pretrained} if spec else None)
        written += 1
        vectors += len(records)
    if not stems:
        raise ValueError(f"no decodable {modality} samples in {dataset} ({failed} failed)")
    return EmbedSummary(written, skipped, vectors, failed, empty)
