"""Where an index's vectors come from: an in-memory array, or something too big to copy at once.

Building reads vectors in two ways: a random sample (training, tuning queries) and every row once,
in order, chunk by chunk (adding, exact ground truth). ``VectorSource`` is that interface; arrays and
tensors are wrapped in ``ArrayVectors`` and an embeddings directory provides its own (memory-mapped
shards, see ``retrieval.embeddings``), so no caller has to hold all vectors in RAM twice.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


@runtime_checkable
class VectorSource(Protocol):
    """N vectors of dimension D, read in row order or by row number."""

    @property
    def shape(self) -> tuple[int, int]:
        """(N, D)."""

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Every vector in order, as C-contiguous float32 arrays of at most ``rows`` rows."""

    def take(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), D) float32 rows, for ascending row numbers ``indices``."""


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (there is none if it is not loaded)."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def as_float32_matrix(vectors: np.ndarray | torch.Tensor, name: str = "vectors", check: bool = True) -> np.ndarray:
    """(N, D) numpy or torch vectors → C-contiguous float32 numpy array, checked to be 2-D and, unless
    ``check`` is false (for arrays checked chunk by chunk later), finite."""
    if is_tensor(vectors):
        vectors = vectors.detach().float().cpu().numpy()
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(vectors).__name__}")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {vectors.dtype}")
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {array.shape}")
    if check:
        check_finite(array, name)
    return array


def check_finite(array: np.ndarray, name: str, offset: int = 0) -> None:
    """Raise ``ValueError`` naming the first row of (N, D) ``array`` with a NaN or infinity."""
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: row {offset + int(np.argmax(bad))} holds a NaN or an infinity")


class ArrayVectors:
    """A ``VectorSource`` over one (N, D) array or tensor (a float32 memory-mapped array is not copied)."""

    def __init__(self, vectors: np.ndarray | torch.Tensor) -> None:
        # Checking a large array for NaNs at once would allocate N × D booleans: check chunk by chunk.
        self.array = as_float32_matrix(vectors, check=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.array), rows):
            chunk = self.array[start:start + rows]
            check_finite(chunk, "vectors", offset=start)
            yield chunk

    def take(self, indices: np.ndarray) -> np.ndarray:
        rows = self.array[indices]
        check_finite(rows, "sampled vectors")
        return rows


def as_vector_source(vectors: np.ndarray | torch.Tensor | VectorSource) -> VectorSource:
    """Wrap arrays and tensors; pass other ``VectorSource`` objects through."""
    if isinstance(vectors, np.ndarray) or is_tensor(vectors):
        return ArrayVectors(vectors)
    if isinstance(vectors, VectorSource):
        return vectors
    raise TypeError(f"vectors must be a numpy array, a torch tensor or a VectorSource, got {type(vectors).__name__}")
