"""Queries that arrive together, answered as one batch: one text-encoder call per model and one FAISS
search per index and filter, on the service's worker thread.

While the worker answers one batch, the queries that arrive queue up and become the next batch, so
under load a query waits for at most one batch before its own, and alone it goes straight through.
A FAISS search of 64 queries costs far less than 64 searches of one (about 3× the queries/s here).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.encode import encode_file, encode_texts
from retrieval.index import Hit, RetrievalIndex
from retrieval.stored_vectors import VectorsNotStored

MAX_BATCH = 64


class QueryRefused(ValueError):
    """A query the index cannot answer (a vector of another dimension, an undecodable image, an
    unknown item); ``status`` is the HTTP status that says so (404 for an unknown item, else 400)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    """One search: exactly one of ``text``, ``vector`` (D,), ``image`` (the file's bytes) and ``item``
    (the id of an indexed item, searched by its stored vector)."""

    index: RetrievalIndex
    model: Any | None
    k: int
    where: Mapping[str, Any] | None = None
    text: str | None = None
    vector: np.ndarray | None = None
    image: bytes | None = None
    item: int | None = None


@dataclass
class Answer:
    hits: list[Hit]
    seconds: dict[str, float]  # the batch's time per stage: "encode", "search", "metadata"
    batch: int  # queries answered together


def answer_batch(queries: list[Query], observe: Callable[[str, float], None]) -> list[Answer | QueryRefused]:
    """Each query's hits, or why it was refused; ``observe(stage, seconds)`` records each stage once.

    Queries that share an index and a filter are searched together with the largest ``k`` among them
    and each keeps its own ``k`` best: for exact indexes the same hits as alone.
    """
    refused: dict[int, QueryRefused] = {}
    vectors: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    texts_by_model: dict[int, list[int]] = {}
    for i, query in enumerate(queries):
        if query.text is not None:
            texts_by_model.setdefault(id(query.model), []).append(i)
        elif query.image is not None:
            try:
                vectors[i] = encode_file(query.model, "image", query.image)[0]
            except Exception as err:  # untrusted bytes: whatever the decoder raises is the client's error
                refused[i] = QueryRefused(f"the upload is not a decodable image ({type(err).__name__}: {err})")
        elif query.item is not None:
            try:
                vectors[i] = query.index.stored_vectors([query.item])[0]
            except KeyError:
                refused[i] = QueryRefused(f"the index has no item {query.item}", status=404)
            except VectorsNotStored as err:
                refused[i] = QueryRefused(str(err))
        elif len(query.vector) != query.index.dim:
            refused[i] = QueryRefused(f"the vector has dimension {len(query.vector)}, the index holds "
                                      f"{query.index.dim}-d vectors")
        else:
            vectors[i] = query.vector
    for positions in texts_by_model.values():
        encoded = encode_texts(queries[positions[0]].model, [queries[i].text for i in positions])
        vectors.update(zip(positions, encoded))
    encode_seconds = time.perf_counter() - start
    observe("encode", encode_seconds)

    start = time.perf_counter()
    groups: dict[tuple[int, str], list[int]] = {}
    for i in vectors:
        groups.setdefault((id(queries[i].index), json.dumps(queries[i].where, sort_keys=True)), []).append(i)
    found: list[tuple[list[int], np.ndarray, np.ndarray]] = []
    for positions in groups.values():
        first = queries[positions[0]]
        found.append((positions, *first.index.search_ids(np.stack([vectors[i] for i in positions]),
                                                         max(queries[i].k for i in positions), first.where)))
    search_seconds = time.perf_counter() - start
    observe("search", search_seconds)

    start = time.perf_counter()
    hits: dict[int, list[Hit]] = {}
    for positions, scores, ids in found:
        index = queries[positions[0]].index
        hits.update((i, found_hits[: queries[i].k]) for i, found_hits in zip(positions, index.hits(scores, ids)))
    metadata_seconds = time.perf_counter() - start
    observe("metadata", metadata_seconds)
    seconds = {"encode": encode_seconds, "search": search_seconds, "metadata": metadata_seconds}
    return [refused[i] if i in refused else Answer(hits[i], seconds, len(queries)) for i in range(len(queries))]


class QueryBatcher:
    """Collects the queries of concurrent requests (on the event loop) and hands them to ``worker``
    as batches of up to :data:`MAX_BATCH`; :meth:`run` is the loop that does it."""

    def __init__(self, worker: Executor, observe: Callable[[str, float], None],
                 batch_size: Callable[[int], None]) -> None:
        self._worker = worker
        self._observe = observe
        self._batch_size = batch_size
        self._pending: list[tuple[Query, asyncio.Future]] = []
        self._wakeup = asyncio.Event()

    async def ask(self, query: Query) -> Answer:
        """The answer to ``query``; raises :class:`QueryRefused` for one the index cannot answer."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        self._wakeup.set()
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._batch_size(len(batch))
                try:
                    answers: list[Any] = await loop.run_in_executor(
                        self._worker, answer_batch, [query for query, _ in batch], self._observe)
                except Exception as err:  # a failure must end these requests (a 500), not this loop
                    answers = [err] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
