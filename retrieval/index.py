"""A FAISS index of unit-norm embeddings with per-vector metadata, searched by inner product."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import faiss
import numpy as np
import torch

INDEX_KINDS = ("exact",)


@dataclass(frozen=True)
class Hit:
    """One search result: the vector's position in the index, its score and its metadata."""

    id: int
    score: float
    metadata: dict[str, Any]


def as_float32_matrix(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, D) numpy or torch vectors → C-contiguous float32 numpy array."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"vectors must be a 2-D (N, D) array, got shape {array.shape}")
    return array


class RetrievalIndex:
    """Vectors in a FAISS index plus one metadata dict per vector, returned with every hit."""

    def __init__(self, index: faiss.Index, metadata: list[dict[str, Any]], kind: str) -> None:
        self.index = index
        self.metadata = metadata
        self.kind = kind

    @classmethod
    def build(
        cls,
        vectors: np.ndarray | torch.Tensor,
        metadata: Sequence[dict[str, Any]] | None = None,
        kind: str = "exact",
    ) -> "RetrievalIndex":
        """Index (N, D) vectors; ``metadata[i]`` describes vector i. ``exact`` is brute-force inner product."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; available: {', '.join(INDEX_KINDS)}")
        array = as_float32_matrix(vectors)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(len(array))]
        if len(metadata) != len(array):
            raise ValueError(f"{len(array)} vectors but {len(metadata)} metadata entries")
        index = faiss.IndexFlatIP(array.shape[1])
        index.add(array)
        return cls(index, metadata, kind)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search_vectors(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """(Q, D) query vectors → for each query, up to ``k`` hits, best first."""
        array = as_float32_matrix(queries)
        if array.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {array.shape[1]}, the index has {self.dim}")
        scores, ids = self.index.search(array, min(k, len(self)))
        return [
            [Hit(int(i), float(s), self.metadata[i]) for s, i in zip(row_scores, row_ids) if i >= 0]
            for row_scores, row_ids in zip(scores, ids)
        ]

    def search_text(self, text: str, model: Any, k: int = 10) -> list[Hit]:
        """Embed ``text`` with a clipkit model (``tokenize`` + ``encode_text``) and search for it."""
        with torch.no_grad():
            query = model.encode_text(model.tokenize([text]))
        return self.search_vectors(query, k)[0]
