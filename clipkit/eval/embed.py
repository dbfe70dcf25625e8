"""Embedding every sample of a dataset with one tower of a model (clipkit or open_clip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

from clipkit.eval.datasets import shard_batches
from clipkit.eval.encoders import Encoder, encoder_device
from clipkit.modalities import FieldDecoder


@dataclass
class Embedded:
    """Unit-norm embeddings (N, D) in dataset order, the other fields of the same N samples (tensors
    concatenated to (N, ...), other values as lists of length N) and how many samples were skipped."""

    features: torch.Tensor
    fields: dict[str, Any]
    num_skipped: int


@torch.no_grad()
def embed_batches(
    encoder: Encoder, modality: str, batches: Iterable[dict[str, Any]], keep: Sequence[str] = (),
    *, progress: bool = False, allow_empty: bool = False,
) -> Embedded:
    """Encode ``batch[modality]`` of every batch; collect the ``keep`` fields alongside. Without any
    decodable sample this raises, unless ``allow_empty`` (then features are (0, 0) and fields empty)."""
    device = encoder_device(encoder)
    features: list[torch.Tensor] = []
    kept: dict[str, list[Any]] = {name: [] for name in keep}
    skipped = 0
    for batch in tqdm(batches, desc=f"embedding {modality}", unit="batch", disable=not progress):
        skipped += int(batch["num_skipped"])
        if modality not in batch:  # every sample of this batch was undecodable
            continue
        features.append(encoder.encode(modality, batch[modality].to(device)).float().cpu())
        for name, values in kept.items():
            value = batch[name]
            values.append(value) if isinstance(value, torch.Tensor) else values.extend(value)
    if not features and allow_empty:
        return Embedded(torch.empty(0, 0), {name: [] for name in keep}, skipped)
    if not features:
        raise ValueError(f"no decodable {modality} samples in the dataset ({skipped} skipped)")
    fields = {name: torch.cat(v) if v and isinstance(v[0], torch.Tensor) else v for name, v in kept.items()}
    return Embedded(torch.cat(features), fields, skipped)


def embed_shards(
    encoder: Encoder, modality: str, shards: Sequence[str], *, batch_size: int = 256,
    extra_fields: Sequence[FieldDecoder] = (), num_workers: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Unit-norm embeddings (N, D) of ``modality`` in shard order, and the ``extra_fields`` of the same
    samples, decoded with the encoder's own evaluation transform."""
    fields = [encoder.eval_decoder(modality), *extra_fields]
    embedded = embed_batches(encoder, modality, shard_batches(shards, fields, batch_size, num_workers),
                             keep=[field.name for field in extra_fields])
    return embedded.features, embedded.fields


@torch.no_grad()
def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Strings → unit-norm text embeddings (N, D), in batches."""
    chunks = [encoder.encode("text", encoder.tokenize(texts[i : i + batch_size])).float().cpu()
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)
