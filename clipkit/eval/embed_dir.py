"""``clipkit embed``: one modality of webdataset shards (or a folder of files) → an embeddings folder.

The folder holds, per input shard (or per chunk of files), ``STEM.npy`` (N, D) float32 unit-norm
vectors and ``STEM.jsonl`` (one metadata object per vector: key, source, caption and the sample's
own JSON fields), plus ``manifest.json``; ``clipkit index build`` reads it. A shard whose ``.npy``
exists is complete (written last, by rename), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from clipkit.data.pipeline import read_shards
from clipkit.eval.datasets import dataset_kind, shard_urls
from clipkit.eval.encoders import Encoder, encoder_device
from clipkit.modalities import FieldDecoder
from retrieval.embeddings import write_embedding_shard, write_manifest

log = logging.getLogger(__name__)

FILES_PER_CHUNK = 10_000


@dataclass(frozen=True)
class EmbedSummary:
    shards_written: int
    shards_skipped: int  # already complete from an earlier run
    vectors: int  # in the shards written by this run
    failed_samples: int


@dataclass(frozen=True)
class _Part:
    """One unit of output: a shard, or a chunk of files."""

    stem: str
    samples: Iterable[dict[str, Any]]  # raw samples: {"__key__", "__url__", ext: bytes, ...}


def _shard_parts(urls: Sequence[str], extensions: Sequence[str]) -> Iterator[_Part]:
    for url in urls:
        yield _Part(Path(url).name.removesuffix(".tar"), read_shards([url], [*extensions, "txt", "json"]))


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
        yield _Part(f"files-{start // FILES_PER_CHUNK:06d}", (_file_sample(p, root) for p in chunk))


def _metadata(sample: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"key": sample["__key__"], "source": sample["__url__"]}
    if "json" in sample:
        try:
            extra = json.loads(sample["json"])
            if isinstance(extra, dict):
                record.update({k: v for k, v in extra.items() if k not in record})
        except ValueError:
            pass  # metadata is a bonus: a broken KEY.json does not cost the vector
    if "txt" in sample and "caption" not in record:
        record["caption"] = sample["txt"].decode("utf-8", errors="replace").strip()
    return record


@torch.no_grad()
def _embed_part(encoder: Encoder, decoder: FieldDecoder, part: _Part, batch_size: int
                ) -> tuple[torch.Tensor, list[dict[str, Any]], int]:
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
        ext = next((e for e in decoder.extensions if e in sample), None)
        try:
            if ext is None:
                raise ValueError(f"no {decoder.name} member")
            inputs.append(decoder.decode(sample[ext], random.Random(0)))
        except Exception as err:  # one bad sample is counted and logged, never fatal
            failed += 1
            log.warning("skipping %s in %s: %s: %s", sample["__key__"], sample["__url__"], type(err).__name__, err)
            continue
        records.append(_metadata(sample))
        if len(inputs) == batch_size:
            flush()
    flush()
    return (torch.cat(vectors) if vectors else torch.zeros(0, 0)), records, failed


def embed_to_dir(encoder: Encoder, modality: str, dataset: str, out_dir: str | Path, *, batch_size: int = 256,
                 progress: bool = True) -> EmbedSummary:
    """Embed ``modality`` of every sample of ``dataset`` (shards, or a folder of files with optional
    sidecar ``.txt`` captions) into ``out_dir``, skipping parts an earlier run completed."""
    out = Path(out_dir)
    decoder = encoder.eval_decoder(modality)
    kind = dataset_kind(dataset)
    parts = (_shard_parts(shard_urls(dataset), decoder.extensions) if kind == "shards"
             else _file_parts(Path(dataset), decoder.extensions))
    manifest = out / "manifest.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if (existing.get("model"), existing.get("modality")) != (encoder.name, modality):
            raise ValueError(f"{out} holds {existing.get('modality')} embeddings of {existing.get('model')}, "
                             f"not {modality} of {encoder.name}: use another folder")
    stems: list[str] = []
    written = skipped = vectors = failed = 0
    for part in tqdm(parts, desc=f"embedding {modality}", unit="shard", disable=not progress):
        stems.append(part.stem)
        if (out / f"{part.stem}.npy").is_file():
            skipped += 1
            continue
        features, records, bad = _embed_part(encoder, decoder, part, batch_size)
        failed += bad
        if not records:
            log.warning("%s: no decodable %s samples; writing an empty part", part.stem, modality)
        write_embedding_shard(out, part.stem, features, records)
        written += 1
        vectors += len(records)
    widths = [np.load(out / f"{stem}.npy", mmap_mode="r").shape[1] for stem in stems]
    if not any(widths):
        raise ValueError(f"no decodable {modality} samples in {dataset} ({failed} failed)")
    write_manifest(out, encoder.name, modality, max(widths), stems)
    return EmbedSummary(written, skipped, vectors, failed)
