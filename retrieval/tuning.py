"""Exact neighbours, recall@k, and the search knob setting that reaches a target recall."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

from retrieval.vectors import VectorSource

CHUNK_ROWS = 65_536
RECALL_K = 10
PLATEAU_GAIN = 0.002  # recall gains smaller than this over PLATEAU_STEPS knob steps end the tuning
PLATEAU_STEPS = 3
# The tuning queries are a sample of 1000: the recall they measure is off by about ±0.005 from the
# recall on new queries (a 1M-vector HNSW tuned to exactly 0.950 gave 0.940 on fresh ones), so the
# tuning aims this far above the target.
TUNING_MARGIN = 0.005


def exact_neighbours(queries: np.ndarray, source: VectorSource, k: int,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """(Q, D) queries → (Q, k) row numbers of their exact top-k inner products over the vectors of
    ``source`` (except the ascending row numbers ``exclude``), best first, read chunk by chunk so the
    vectors never need to be in memory at once."""
    exclude = np.empty(0, np.int64) if exclude is None else exclude
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    offset = 0
    for chunk in source.chunks(CHUNK_ROWS):
        excluded = exclude[(exclude >= offset) & (exclude < offset + len(chunk))]
        # Excluded rows may take places in the chunk's top k: ask for that many more, then drop them.
        wanted = min(k + len(excluded), len(chunk))
        scores, ids = faiss.knn(queries, chunk, wanted, metric=faiss.METRIC_INNER_PRODUCT)
        ids += offset
        scores[np.isin(ids, excluded)] = -np.inf
        best_scores = np.hstack([best_scores, scores])
        best_ids = np.hstack([best_ids, ids])
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
        offset += len(chunk)
    return best_ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k for (Q, ≥k) found ids and (Q, k) true ids."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(row_found[:k], row_truth)) for row_found, row_truth in zip(found, truth))
    return hits / truth.size


def knob_ladder(start: int, limit: int) -> list[int]:
    """Knob values to try, from ``start`` up to ``limit``, about √2 apart (1, 2, 3, 4, 6, 8, 11, 16, ...)."""
    values, value = [], start
    while value < limit:
        values.append(value)
        value = max(value + 1, round(value * math.sqrt(2)))
    return [*values, limit]


@dataclass(frozen=True)
class TuningResult:
    """The chosen knob value, the recall@10 it reached and the target it was asked for."""

    value: int
    recall: float
    target: float
    num_queries: int

    @property
    def reached(self) -> bool:
        return self.recall >= self.target


def tune_knob(
    search: Callable[[int], np.ndarray],
    truth: np.ndarray,
    target: float,
    start: int,
    limit: int,
) -> TuningResult:
    """The smallest knob value on ``knob_ladder(start, limit)`` whose recall@k against ``truth``
    reaches ``target + TUNING_MARGIN``; if none does, the best value seen before recall stopped
    improving (``reached`` then says whether that still meets ``target``).

    ``search(value)`` returns (Q, k) ids for the tuning queries searched with that knob value.
    """
    best = TuningResult(start, -1.0, target, len(truth))
    steps_without_gain = 0
    for value in knob_ladder(start, limit):
        recall = recall_at_k(search(value), truth)
        # Past a point the codes, not the knob, limit recall; searching more only costs time.
        steps_without_gain = steps_without_gain + 1 if recall < best.recall + PLATEAU_GAIN else 0
        if recall > best.recall:
            best = TuningResult(value, recall, target, len(truth))
        if recall >= target + TUNING_MARGIN or steps_without_gain == PLATEAU_STEPS:
            break
    return best


# An IndexRefine's base index passes k_factor·k candidates to re-ranking. More of them cost search
# time (at nprobe 64 on 100k 512-d vectors, 16·k candidates halved the queries/s of 2·k) and past a
# few recall no longer rises: 2 to 4 sufficed for fp16 re-ranking of 3-bit RaBitQ candidates there,
# 8 for float32 re-ranking to reach recall 1.0 on 20k 64-d vectors.
K_FACTOR_START = 2  # 1 re-ranks only the base's own top k: the same ids
K_FACTOR_LIMIT = 16


def tune_refined(
    search: Callable[[int, int], np.ndarray],
    truth: np.ndarray,
    target: float,
    nprobe_limit: int,
) -> tuple[int, TuningResult]:
    """(nprobe, result for k_factor) of an IndexRefine, both as ``tune_knob`` chooses one knob.

    ``search(nprobe, k_factor)`` returns (Q, k) ids for the tuning queries. nprobe comes first, with
    ``K_FACTOR_LIMIT``, so that too few candidates do not stop it short; then the least k_factor that
    reaches the target at that nprobe (at ``K_FACTOR_LIMIT`` it is the same search again).
    """
    probes = tune_knob(lambda nprobe: search(nprobe, K_FACTOR_LIMIT), truth, target, 1, nprobe_limit)
    factor = tune_knob(lambda k_factor: search(probes.value, k_factor), truth, target, K_FACTOR_START,
                       K_FACTOR_LIMIT)
    return probes.value, factor
