"""Indexed items' own vectors, read back from the FAISS index: the queries of "more like this".

What each kind keeps, so what comes back:

- ``exact`` and ``hnsw``: the full float32 vectors (``IDMap`` over flat or HNSW storage), found at
  the position the id map gives: the vector itself.
- ``ivfrabitq+refine``: its re-ranking copies (fp16 or float32) at position = id: the vector to
  fp16 precision at worst.
- ``ivfrabitq``: only RaBitQ codes, decoded and rotated back: an approximation (cosine about 0.94
  to the original at 1 bit per dimension, closer with more bits), the vector the index itself sees.
- ``ivfpq``: fast-scan PQ codes, which FAISS cannot decode (1.15 crashes on it): refused.

Nothing here changes the FAISS index (no direct map is added to it), so a memory-mapped, read-only
index answers too; the position tables are built on first use, 16 bytes per vector for IVF lists.
"""

from __future__ import annotations

import faiss
import numpy as np


class VectorsNotStored(ValueError):
    """The index keeps no vectors it can give back (``ivfpq``)."""


class StoredVectors:
    """``lookup(ids)``: the (N, D) float32 vectors indexed under the (N,) ids ``ids``.

    The caller checks that the ids are indexed (``MetadataStore.missing``); an id the FAISS index
    does not hold raises ``KeyError`` here too. Rebuild it after the index changes.
    """

    def __init__(self, index: faiss.Index, kind: str) -> None:
        if kind == "ivfpq":
            raise VectorsNotStored("an ivfpq index keeps fast-scan PQ codes, which FAISS cannot decode back "
                                   "into vectors: rebuild it with another kind to search by an item")
        self._index = index
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, where each is)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(self._index, faiss.IndexRefine):
            return np.stack([self._index.refine_index.reconstruct(int(i)) for i in ids])
        found = self._find(ids)
        if isinstance(self._index, faiss.IndexIDMap):
            return np.stack([self._index.index.reconstruct(int(position)) for position in found])
        return np.stack([self._decoded(int(position)) for position in found])

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """Where each id is: its position in the id map, or its IVF (list << 32 | offset)."""
        if self._positions is None:
            self._positions = self._position_table()
        sorted_ids, where = self._positions
        at = np.searchsorted(sorted_ids, ids)
        at = np.minimum(at, len(sorted_ids) - 1)
        absent = sorted_ids[at] != ids
        if absent.any():
            raise KeyError(f"the index holds no vector with id {int(ids[absent][0])}")
        return where[at]

    def _position_table(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self._index, faiss.IndexIDMap):
            ids = faiss.vector_to_array(self._index.id_map)
            where = np.arange(len(ids), dtype=np.int64)
        else:
            ivf = faiss.extract_index_ivf(self._index)
            chunks_ids, chunks_where = [], []
            for list_no in range(ivf.nlist):
                size = ivf.invlists.list_size(list_no)
                if size:
                    chunks_ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size).copy())
                    chunks_where.append((np.int64(list_no) << 32) | np.arange(size, dtype=np.int64))
            ids = np.concatenate(chunks_ids) if chunks_ids else np.empty(0, np.int64)
            where = np.concatenate(chunks_where) if chunks_where else np.empty(0, np.int64)
        order = np.argsort(ids, kind="stable")
        return ids[order], where[order]

    def _decoded(self, position: int) -> np.ndarray:
        """(D,) the IVF code at ``position`` decoded, and rotated back when a transform comes first."""
        ivf = faiss.extract_index_ivf(self._index)
        code = np.empty(ivf.d, dtype=np.float32)
        ivf.reconstruct_from_offset(position >> 32, position & 0xFFFFFFFF, faiss.swig_ptr(code))
        if not isinstance(self._index, faiss.IndexPreTransform):
            return code
        vector = np.empty(self._index.d, dtype=np.float32)
        self._index.reverse_chain(1, faiss.swig_ptr(code), faiss.swig_ptr(vector))
        return vector
