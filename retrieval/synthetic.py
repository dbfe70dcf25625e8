"""Synthetic unit vectors, the shared test and benchmark data for retrieval indexes: isotropic clusters
(``ClusteredVectors``) and vectors shaped like CLIP embeddings (``ClipLikeVectors``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

_CHUNK = 65_536  # rows generated at a time, so that a million 512-d vectors need no big temporaries


@dataclass(frozen=True)
class ClusteredVectors:
    """A mixture of Gaussian clusters on the unit sphere.

    A vector is ``normalize(centre + noise * (g * spectrum) @ rotation)`` with ``g ~ N(0, I)``: the
    centres are uniform on the sphere, and the spread inside a cluster has a decaying spectrum: the
    variance along the i-th axis of a random rotation falls as ``i ** (-2 * decay)``, because learned
    embeddings concentrate their variance in a few directions. ``decay=0`` gives isotropic noise, in
    which near neighbours are hardly nearer than the rest of their cluster (the worst case for any
    quantiser). ``noise`` is the norm of the noise relative to the unit-norm centre.
    """

    dim: int
    num_clusters: int
    noise: float = 1.0
    decay: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_clusters < 1 or self.noise < 0:
            raise ValueError(f"need dim ≥ 1, num_clusters ≥ 1 and noise ≥ 0, got {self}")

    @cached_property
    def _centres(self) -> np.ndarray:
        """(num_clusters, dim) unit vectors."""
        rng = np.random.default_rng([self.seed, 0])
        centres = rng.standard_normal((self.num_clusters, self.dim), dtype=np.float32)
        return centres / np.linalg.norm(centres, axis=1, keepdims=True)

    @cached_property
    def _noise_basis(self) -> np.ndarray:
        """(dim, dim): the rows of a random rotation scaled by the noise spectrum (unit total variance)."""
        rng = np.random.default_rng([self.seed, 1])
        rotation, _ = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        spectrum = np.arange(1, self.dim + 1, dtype=np.float64) ** -self.decay
        spectrum /= np.linalg.norm(spectrum)
        return (self.noise * spectrum[:, None] * rotation).astype(np.float32)

    def sample(self, num_vectors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``num_vectors`` draws → ((N, dim) float32 unit vectors, (N,) int64 cluster of each).

        Different ``seed`` values give independent draws from the same clusters (e.g. a base set and
        held-out queries).
        """
        rng = np.random.default_rng([self.seed, 2, seed])
        vectors = np.empty((num_vectors, self.dim), dtype=np.float32)
        clusters = rng.integers(0, self.num_clusters, num_vectors)
        for start in range(0, num_vectors, _CHUNK):
            rows = slice(start, min(start + _CHUNK, num_vectors))
            noise = rng.standard_normal((rows.stop - rows.start, self.dim), dtype=np.float32)
            chunk = self._centres[clusters[rows]] + noise @ self._noise_basis
            vectors[rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        return vectors, clusters


@dataclass(frozen=True)
class ClipLikeVectors:
    """Unit vectors shaped like real CLIP embeddings rather than isotropic clusters.

    A vector of cluster c is ``normalize(shared * mean + spread * (h_c * spectrum) @ rotation + noise *
    (g * spectrum) @ rotation)`` with ``h_c, g ~ N(0, I)``: every vector shares the unit direction
    ``mean`` (CLIP embeddings of anything are closer to each other than random directions: mean
    pairwise cosine about 0.55 with the defaults), the centres' offsets and the spread inside a cluster
    both follow a power-law spectrum (the variance along the i-th axis of a random rotation falls as
    ``i ** (-2 * decay)``), and cluster c (0-based) is drawn with probability ∝ ``(c + 1) ** -zipf``,
    so the largest cluster is ``num_clusters ** zipf`` times as likely as the smallest. ``shared``,
    ``spread`` and ``noise`` are norms relative to the unit-norm ``mean``.
    """

    dim: int
    num_clusters: int
    shared: float = 1.2
    spread: float = 1.0
    noise: float = 0.5
    decay: float = 0.5
    zipf: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_clusters < 1 or min(self.shared, self.spread, self.noise, self.zipf) < 0:
            raise ValueError(f"need dim ≥ 1, num_clusters ≥ 1 and non-negative norms and exponent, got {self}")

    @cached_property
    def _basis(self) -> np.ndarray:
        """(dim, dim): the rows of a random rotation scaled by the power-law spectrum (unit total variance)."""
        rng = np.random.default_rng([self.seed, 1])
        rotation, _ = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        spectrum = np.arange(1, self.dim + 1, dtype=np.float64) ** -self.decay
        spectrum /= np.linalg.norm(spectrum)
        return (spectrum[:, None] * rotation).astype(np.float32)

    @cached_property
    def _centres(self) -> np.ndarray:
        """(num_clusters, dim): the shared direction plus each cluster's offset (not normalised)."""
        rng = np.random.default_rng([self.seed, 0])
        mean = rng.standard_normal(self.dim)
        offsets = rng.standard_normal((self.num_clusters, self.dim), dtype=np.float32) @ self._basis
        return (self.shared * mean / np.linalg.norm(mean) + self.spread * offsets).astype(np.float32)

    @cached_property
    def cluster_probabilities(self) -> np.ndarray:
        """(num_clusters,) float64: how likely a draw is to come from each cluster (Zipf-like, summing to 1)."""
        weights = np.arange(1, self.num_clusters + 1, dtype=np.float64) ** -self.zipf
        return weights / weights.sum()

    def sample(self, num_vectors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``num_vectors`` draws → ((N, dim) float32 unit vectors, (N,) int64 cluster of each).

        Different ``seed`` values give independent draws from the same clusters (e.g. a base set and
        held-out queries).
        """
        rng = np.random.default_rng([self.seed, 2, seed])
        vectors = np.empty((num_vectors, self.dim), dtype=np.float32)
        clusters = rng.choice(self.num_clusters, size=num_vectors, p=self.cluster_probabilities).astype(np.int64)
        for start in range(0, num_vectors, _CHUNK):
            rows = slice(start, min(start + _CHUNK, num_vectors))
            noise = rng.standard_normal((rows.stop - rows.start, self.dim), dtype=np.float32)
            chunk = self._centres[clusters[rows]] + self.noise * (noise @ self._basis)
            vectors[rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        return vectors, clusters
