"""Embedding every sample of a set of shards with one tower of a model."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from clipkit.data.pipeline import ShardStream, build_loader
from clipkit.model import ContrastiveModel
from clipkit.modalities.base import FieldDecoder, Modality


@torch.no_grad()
def embed_shards(
    model: ContrastiveModel,
    modality: Modality,
    shards: Sequence[str],
    *,
    batch_size: int = 256,
    extra_fields: Sequence[FieldDecoder] = (),
    num_workers: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Unit-norm embeddings (N, D) of ``modality`` in shard order, and the ``extra_fields`` of the same
    samples (tensors concatenated to (N, ...), other values as lists of length N)."""
    stream = ShardStream(shards, [modality.field(train=False), *extra_fields], batch_size, train=False)
    device = model.logit_scale.device
    embeddings: list[torch.Tensor] = []
    extras: dict[str, list[Any]] = {field.name: [] for field in extra_fields}
    for batch in build_loader(stream, num_workers):
        embeddings.append(model.encode(modality.name, batch[modality.name].to(device)).cpu())
        for name, values in extras.items():
            if isinstance(batch[name], torch.Tensor):
                values.append(batch[name])
            else:
                values.extend(batch[name])
    if not embeddings:
        raise ValueError(f"no decodable {modality.name} samples in {len(shards)} shard(s)")
    collected = {
        name: torch.cat(values) if values and isinstance(values[0], torch.Tensor) else values
        for name, values in extras.items()
    }
    return torch.cat(embeddings), collected
