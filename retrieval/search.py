"""Querying a FAISS index with a search-time knob and an optional id filter.

The knob (``nprobe`` for IVF, ``efSearch`` for HNSW) is passed per call in ``SearchParameters``
rather than set on the index, so one loaded index can be searched with different settings. With a
filter or deleted vectors, a low knob can leave a query with fewer than ``k`` allowed hits (the lists
or graph nodes it visits hold too few of them); such queries are repeated with the knob doubled
until they are full or the knob covers the whole index.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class SearchKnob:
    """The search-time parameter of an index: ``name`` is ``"nprobe"`` or ``"efSearch"``."""

    name: str
    value: int

    def limit(self, index: faiss.Index) -> int:
        """The value past which raising the knob changes nothing: every list, or every node."""
        if self.name == "nprobe":
            return faiss.extract_index_ivf(index).nlist
        return max(index.ntotal, self.value)


def _parameters(index: faiss.Index, knob: SearchKnob | None, value: int | None,
                selector: faiss.IDSelector | None) -> tuple[faiss.SearchParameters | None, list]:
    """SearchParameters for one call, plus the objects they point to (SWIG does not keep them alive)."""
    if knob is None:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        return params, [selector]
    if knob.name == "nprobe":
        inner = faiss.SearchParametersIVF(nprobe=value)
    else:
        inner = faiss.SearchParametersHNSW(efSearch=value)
    if selector is not None:
        inner.sel = selector
    if isinstance(index, faiss.IndexPreTransform):  # OPQ or a rotation first: the parameters are for the IVF
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = inner
        return outer, [inner, selector]
    return inner, [selector]


def search_index(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    knob: SearchKnob | None,
    selector: faiss.IDSelector | None,
    wanted: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) float32 queries → ((Q, k) scores, (Q, k) int64 ids), best first, id -1 past the last hit.

    Queries that found fewer than ``wanted`` hits are searched again with the knob doubled, up to
    its limit, so that every query gets ``wanted`` hits when the index and selector allow them.
    """
    value = knob.value if knob else None
    params, _alive = _parameters(index, knob, value, selector)
    scores, ids = index.search(queries, k, params=params)
    if knob is None:
        return scores, ids
    limit = knob.limit(index)
    short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
    while len(short) and value < limit:
        value = min(value * 2, limit)
        params, _alive = _parameters(index, knob, value, selector)
        scores[short], ids[short] = index.search(queries[short], k, params=params)
        short = short[(ids[short] >= 0).sum(axis=1) < wanted]
    return scores, ids
