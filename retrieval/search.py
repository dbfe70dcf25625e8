"""Querying a FAISS index with its search-time knobs and an optional id filter.

The knob (``nprobe`` for IVF, ``efSearch`` for HNSW, plus ``k_factor`` for a re-ranking stage) is
passed per call in ``SearchParameters`` rather than set on the index, so one loaded index can be
searched with different settings. With a filter or deleted vectors, a low knob can leave a query with
fewer than ``k`` allowed hits (the lists or graph nodes it visits hold too few of them); such queries
are repeated with the knob doubled until they are full or the knob covers the whole index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import faiss
import numpy as np

K_FACTOR = "k_factor"


@dataclass(frozen=True)
class SearchKnob:
    """The search-time parameters of an index: ``name`` (``"nprobe"`` or ``"efSearch"``) is the knob
    traded against recall, ``value`` its setting; ``k_factor``, for an IndexRefine only, is how many
    times ``k`` candidates its base index passes on to be re-ranked."""

    name: str
    value: int
    k_factor: int | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, int]) -> SearchKnob | None:
        """The knob of a manifest's ``search`` dict: ``{}`` (exact search) → None, ``{"nprobe": 48}``,
        ``{"efSearch": 64}`` or ``{"nprobe": 48, "k_factor": 4}``."""
        knobs = {name: value for name, value in settings.items() if name != K_FACTOR}
        if not knobs:
            return None
        (name, value), = knobs.items()
        return cls(name, value, settings.get(K_FACTOR))

    def settings(self) -> dict[str, int]:
        """The inverse of ``from_settings``."""
        return {self.name: self.value} | ({K_FACTOR: self.k_factor} if self.k_factor is not None else {})

    def limit(self, index: faiss.Index) -> int:
        """The value past which raising the knob changes nothing: every list, or every node."""
        if self.name == "nprobe":
            return faiss.extract_index_ivf(index).nlist
        return max(index.ntotal, self.value)


def _wrapped(index: faiss.Index, inner: faiss.SearchParameters,
             k_factor: int | None) -> tuple[faiss.SearchParameters, list]:
    """``inner``, the parameters of the IVF or HNSW part of ``index``, inside those of the layers above
    it (a rotation first, a re-ranking stage after), plus the objects they point to (SWIG does not keep
    them alive). Each layer reads only its own parameters, which point to the next layer's."""
    if isinstance(index, faiss.IndexRefine):
        base, alive = _wrapped(faiss.downcast_index(index.base_index), inner, None)
        outer = faiss.IndexRefineSearchParameters(k_factor=k_factor)
        outer.base_index_params = base
        return outer, [base, *alive]
    if isinstance(index, faiss.IndexPreTransform):  # OPQ or a rotation first: the parameters are for the IVF
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = inner
        return outer, [inner]
    return inner, []


def _parameters(index: faiss.Index, knob: SearchKnob | None, value: int | None,
                selector: faiss.IDSelector | None) -> tuple[faiss.SearchParameters | None, list]:
    """SearchParameters for one call, plus the objects they point to (SWIG does not keep them alive).

    The selector goes to the IVF or HNSW part: an IndexRefine ignores one on its own parameters,
    and re-ranks only what its base index returns.
    """
    if knob is None:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        return params, [selector]
    if knob.name == "nprobe":
        inner = faiss.SearchParametersIVF(nprobe=value)
    else:
        inner = faiss.SearchParametersHNSW(efSearch=value)
    if selector is not None:
        inner.sel = selector
    params, alive = _wrapped(index, inner, knob.k_factor)
    return params, [*alive, selector]


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
