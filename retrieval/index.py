"""``RetrievalIndex``: a FAISS index of embeddings, their metadata in SQLite, one object to build,
save, load and search by vector, text, image or audio."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, overload

import faiss
import numpy as np

from retrieval.embeddings import read_embeddings_dir
from retrieval.encode import encode_file, encode_texts, file_modality
from retrieval.files import write_directory_atomically
from retrieval.kinds import (
    AUTO, KEEPS_REMOVED, REFINED, IndexPlan, create_index, escalation_plans, mmap_flags, plan_index, recoded_index,
    RABITQ_BITS, MemoryBudgetError, rabitq_plan, refine_store, with_lists,
)
from retrieval.manifest import (
    INDEX_FILE, METADATA_FILE, MANIFEST_FILE, IndexFormatError, Manifest, file_checksum, is_index_directory,
    read_manifest, utc_now,
)
from retrieval.memory import format_bytes, parse_memory
from retrieval.ondisk import LISTS_FILE, READ_FLAGS, fill_on_disk, lists_file, place_lists
from retrieval.search import SearchKnob, search_index
from retrieval.store import FilterValue, MetadataStore
from retrieval.stored_vectors import StoredVectors
from retrieval.tuning import CHUNK_ROWS, RECALL_K, TuningResult, exact_neighbours, tune_knob, tune_refined
from retrieval.vectors import VectorSource, as_float32_matrix, as_vector_source, is_tensor

if TYPE_CHECKING:
    import torch

TUNING_QUERIES = 1_000  # or a tenth of the vectors, if fewer
MIN_TUNING_QUERIES = 10
HNSW_TUNING_START = 16  # efSearch below k is raised to k by FAISS anyway
# Tuning stops here even if the target is not reached: past it, HNSW costs near brute force.
HNSW_TUNING_LIMIT = 4_096


@dataclass(frozen=True)
class Hit:
    """One search result: the vector's id, its inner product with the query, and its metadata."""

    id: int
    score: float
    metadata: dict[str, Any]


def _sample_rows(num_rows: int, count: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    """``count`` distinct ascending row numbers below ``num_rows``, none in ``exclude`` when possible."""
    pool = np.setdiff1d(np.arange(num_rows), exclude) if len(exclude) < num_rows - count else np.arange(num_rows)
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


def _add_rows(index: faiss.Index, source: VectorSource, skip: np.ndarray) -> None:
    """Add every vector of ``source`` to ``index``, its row number as id, except the ascending rows ``skip``."""
    start = 0
    for chunk in source.chunks(CHUNK_ROWS):
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        keep = ~np.isin(ids, skip)
        index.add_with_ids(chunk[keep], ids[keep])
        start += len(chunk)


def _refined(base: faiss.Index, plan: IndexPlan, source: VectorSource) -> faiss.IndexRefine:
    """``base``, IVF lists holding every row of ``source`` with its row number as id, with its
    candidates re-ranked by a new store of the vectors as ``plan.refine`` says (fp16 or float32).

    The base's codes are reused as they are. IndexRefine looks a candidate's vector up at the position
    its id gives, so the store holds row i at position i; ``RetrievalIndex`` keeps ids and positions
    equal afterwards by adding with ``add`` (ids ntotal, ntotal + 1, ...) and never removing
    (``KEEPS_REMOVED``). So there is no IDMap, which would cost 8 bytes per vector and hide filters:
    it puts its translated selector on the IndexRefine's own parameters, which IndexRefine ignores.
    """
    store = refine_store(plan, base.d)
    for chunk in source.chunks(CHUNK_ROWS):
        store.add(chunk)
    return faiss.IndexRefine(base, store)


def _tuned_knob(index: faiss.Index, plan: IndexPlan, queries: np.ndarray, truth: np.ndarray, target: float,
                selector: faiss.IDSelector | None) -> tuple[SearchKnob | None, TuningResult]:
    """The knob setting of ``index``, built as ``plan`` says, with the least search effort that reaches
    ``target`` recall of the (Q, k) true neighbours ``truth`` of (Q, D) ``queries`` (see ``tune_knob``),
    and what it reached; ``selector`` keeps indexed queries out of the results."""
    if plan.knob is None:  # exact search finds the true neighbours by definition
        return None, TuningResult(0, 1.0, target, len(truth))
    k = truth.shape[1]

    def search(knob: SearchKnob) -> np.ndarray:
        return search_index(index, queries, k, knob, selector, k)[1]

    if plan.kind == REFINED:
        nprobe, result = tune_refined(lambda value, k_factor: search(SearchKnob("nprobe", value, k_factor)),
                                      truth, target, faiss.extract_index_ivf(index).nlist)
        return SearchKnob("nprobe", nprobe, result.value), result
    if plan.knob == "nprobe":
        start, limit = 1, faiss.extract_index_ivf(index).nlist
    else:
        start, limit = HNSW_TUNING_START, HNSW_TUNING_LIMIT
    result = tune_knob(lambda value: search(SearchKnob(plan.knob, value)), truth, target, start, limit)
    return SearchKnob(plan.knob, result.value), result


def _escalated_index(plan: IndexPlan, plain: faiss.Index, source: VectorSource,
                     queries: np.ndarray) -> faiss.Index:
    """The index of escalation ``plan``, filled with every vector of ``source``, built on ``plain`` (the
    trained and filled IVF-RaBitQ index it escalates from) where it can be; (Q, D) ``queries`` train
    larger codes (see ``recoded_index``)."""
    if plan.kind == REFINED:
        return _refined(plain, plan, source)
    index = recoded_index(plain, plan, queries) if plan.kind == "ivfrabitq" else create_index(plan, source.shape[1])
    _add_rows(index, source, skip=np.empty(0, np.int64))
    return index


@dataclass(frozen=True)
class _Attempt:
    """An index ``auto`` built and tuned: its plan, the FAISS index, its knob setting and the recall it
    reached."""

    plan: IndexPlan
    index: faiss.Index
    knob: SearchKnob | None
    result: TuningResult

    def record(self) -> dict[str, Any]:
        """The attempt in the manifest's ``tuning``."""
        return {"factory": self.plan.factory, "search": self.knob.settings() if self.knob else {},
                "recall_at_10": round(self.result.recall, 4)}


def _tuning_record(result: TuningResult) -> dict[str, Any]:
    return {"target_recall_at_10": result.target, "recall_at_10": round(result.recall, 4),
            "queries": result.num_queries}


def _unreached_warning(best: _Attempt, budget: int, larger: list[IndexPlan], num_vectors: int) -> str:
    """What ``auto`` says when even the most accurate index it could afford (``best``) missed the target,
    with the memory budget each ``larger`` plan would need."""
    message = (f"{best.plan.factory}: recall@{RECALL_K} reached {best.result.recall:.3f} at "
               f"{_settings_text(best.knob)}, below the target {best.result.target}, and no index within the "
               f"memory budget of {format_bytes(budget)} reaches it")
    needs = [f"{format_bytes(candidate.estimated_bytes(num_vectors))} for {candidate.factory}"
             + (" (exact search, which reaches any target)" if candidate.kind == "exact" else "")
             for candidate in larger]
    return f"{message}; a larger budget would allow more: {', '.join(needs)}" if needs else message


def _settings_text(knob: SearchKnob | None) -> str:
    return ", ".join(f"{name}={value}" for name, value in knob.settings().items()) if knob else "exact search"


class RetrievalIndex:
    """Vectors in a FAISS index with one metadata dict each, kept in SQLite and returned with hits.

    Build one with :meth:`build` (arrays or tensors) or :meth:`build_from_embeddings` (a directory
    written by ``clipkit embed``), or open a saved one with :meth:`load`.
    """

    def __init__(self, index: faiss.Index, store: MetadataStore, manifest: Manifest, read_only: bool = False) -> None:
        self.index = index
        self.store = store
        self.manifest = manifest
        self.read_only = read_only
        self._knob = SearchKnob.from_settings(manifest.search)
        self._deleted = store.deleted_ids()
        self._stored: StoredVectors | None = None  # built on the first search by an item
        self._scratch: Path | None = None  # where a build put its on-disk lists until the first save

    # ----------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        vectors: np.ndarray | torch.Tensor | VectorSource,
        metadata: Iterable[Mapping[str, Any]] | None = None,
        *,
        kind: str = AUTO,
        memory_budget: str | int = "4GB",
        target_recall: float = 0.95,
        opq: bool = False,
        model_name: str | None = None,
        model_fingerprint: str | None = None,
        model_spec: dict[str, str | None] | None = None,
        seed: int = 0,
        lists_dir: str | Path | None = None,
        nlist: int | None = None,
        bits: int | None = None,
    ) -> "RetrievalIndex":
        """Index N × D ``vectors`` (numpy, torch, or a ``VectorSource``); ``metadata`` yields one dict
        per vector (default: empty dicts). The vectors get ids 0..N-1.

        ``kind`` is ``exact``, ``hnsw``, ``ivfpq`` (``opq=True`` adds a learned rotation),
        ``ivfrabitq`` or ``auto`` (see ``retrieval.kinds``); the index must fit ``memory_budget``
        (e.g. ``"4GB"``). Approximate kinds train on a random sample and then set their search knob
        to the lowest value whose recall@10 against exact search reaches ``target_recall`` for up to
        1000 of the vectors, held out of training and of the index until then, used as queries.
        If ``auto``'s index cannot reach it, ``auto`` moves on to more accurate ones that still fit
        the budget (``retrieval.kinds.escalation_plans``) until one does.
        ``model_name``, ``model_fingerprint`` and ``model_spec`` (the model's identity and how to load
        it, see ``retrieval.manifest.Manifest``) are recorded in the manifest.

        With ``lists_dir`` an IVF index (``ivfrabitq``, ``ivfpq``; ``auto`` means ``ivfrabitq``) keeps its
        inverted lists on disk there (``retrieval.ondisk``), for vectors whose index does not fit in
        memory: ``memory_budget`` then bounds nothing, the index is read-only, and :meth:`save` moves
        the lists file into the saved folder. ``nlist`` sets an IVF kind's list count (``ivfrabitq``,
        ``ivfpq``; default ``retrieval.kinds.ivf_lists``'s, 8·√N), ``bits`` an ``ivfrabitq`` index's bits per
        dimension (one of ``retrieval.kinds.RABITQ_BITS``; default the most within 1/8 of the raw size).
        Both pin what ``auto`` would choose, so neither goes with ``auto``.
        """
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        source = as_vector_source(vectors)
        num_vectors, dim = source.shape
        budget = parse_memory(memory_budget)
        if lists_dir is not None:
            kind = "ivfrabitq" if kind == AUTO else kind
            budget = sys.maxsize  # the lists are on disk; memory holds the centroids and one chunk
        if kind == AUTO and (nlist is not None or bits is not None):  # auto's escalations re-plan both
            raise ValueError("nlist and bits need an IVF kind (ivfrabitq, or ivfpq for nlist), not auto")
        if bits is not None and (kind != "ivfrabitq" or bits not in RABITQ_BITS):
            raise ValueError(f"bits applies to kind='ivfrabitq', as one of {RABITQ_BITS}; got {bits} for {kind!r}")
        plan = plan_index(kind, num_vectors, dim, budget, opq) if bits is None else rabitq_plan(bits, num_vectors, dim)
        if nlist is not None:
            plan = with_lists(plan, nlist, num_vectors, dim)
        if plan.estimated_bytes(num_vectors) > budget:  # plan_index checked its own choice, not these
            raise MemoryBudgetError(f"{plan.factory} of {num_vectors:,} vectors needs "
                                    f"{plan.estimated_bytes(num_vectors):,} bytes, over the memory budget of "
                                    f"{budget:,}: raise it, or keep the lists on disk")
        if lists_dir is not None and plan.knob != "nprobe":
            raise ValueError(f"inverted lists on disk need an IVF kind (ivfrabitq or ivfpq), not {plan.kind!r}")
        rng = np.random.default_rng(seed)

        store = MetadataStore.temporary()
        store.insert(0, metadata if metadata is not None else ({} for _ in range(num_vectors)), num_vectors)

        index = create_index(plan, dim)
        # Tuning queries are held out of training and, until tuned, of the index: a query that is
        # indexed finds its own neighbourhood more easily than a new one does.
        tuning_rows = _sample_rows(num_vectors, min(TUNING_QUERIES, num_vectors // 10) if plan.knob else 0,
                                   rng, np.empty(0, np.int64))
        if plan.train_size:
            index.train(source.take(_sample_rows(num_vectors, plan.train_size, rng, exclude=tuning_rows)))
        if lists_dir is not None:
            fill_on_disk(index, source, Path(lists_dir))
        else:
            _add_rows(index, source, skip=tuning_rows)

        manifest = Manifest(
            dim=dim, kind=plan.kind, factory=plan.factory, model=model_name, count=num_vectors,
            next_id=num_vectors, search={}, tuning=None, created=utc_now(), index_bytes=0, metadata_bytes=0,
            model_fingerprint=model_fingerprint, model_spec=model_spec,
        )
        built = cls(index, store, manifest, read_only=lists_dir is not None)
        if lists_dir is not None:
            built._scratch = Path(lists_dir).resolve()
        if plan.knob is not None:
            built._tune(plan, source, source.take(tuning_rows), tuning_rows, target_recall,
                        budget if kind == AUTO else None)
        return built

    def _tune(self, plan: IndexPlan, source: VectorSource, queries: np.ndarray, rows: np.ndarray,
              target: float, escalation_budget: int | None) -> None:
        """Set the knob to the lowest value reaching ``target`` recall@10 for (Q, D) ``queries``, the
        vectors of ``rows`` of ``source``, which the index does not hold yet, then add them.

        With an ``escalation_budget`` (``auto``'s, in bytes) a ``plan`` that misses the target gives way
        to more accurate ones within it (``_escalate``); without, it warns.
        """
        # Lists on disk hold every vector already (``retrieval.ondisk``): a selector keeps the queries
        # out of their own results instead, which for IVF lists is the same as not indexing them.
        on_disk = lists_file(self.index) is not None
        k = min(RECALL_K, self.index.ntotal)
        if len(queries) < MIN_TUNING_QUERIES or k < 1:  # too few vectors to measure recall: search widely
            widest = faiss.extract_index_ivf(self.index).nlist if plan.knob == "nprobe" else HNSW_TUNING_START
            self._set_knob(SearchKnob(plan.knob, widest), None)
            if not on_disk:
                self.index.add_with_ids(queries, rows)
            return
        truth = exact_neighbours(queries, source, k, exclude=rows)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(rows)) if on_disk else None
        knob, result = _tuned_knob(self.index, plan, queries, truth, target, selector=selector)
        if not on_disk:
            self.index.add_with_ids(queries, rows)
        self._set_knob(knob, _tuning_record(result))
        if result.reached:
            return
        if escalation_budget is not None:
            first = _Attempt(plan, self.index, knob, result)
            self._escalate(first, source, queries, rows, truth, escalation_budget)
            return
        warnings.warn(f"{plan.factory}: recall@{k} reached {result.recall:.3f} at {_settings_text(knob)}, "
                      f"below the target {target}; a less compressed kind (or 'hnsw') would do better",
                      stacklevel=3)

    def _escalate(self, first: _Attempt, source: VectorSource, queries: np.ndarray, rows: np.ndarray,
                  truth: np.ndarray, budget: int) -> None:
        """Replace ``first``, the index (``self.index``) whose plan missed the target, by the first of its
        ``escalation_plans`` within ``budget`` bytes that reaches it; if none does, keep the most
        accurate of them and warn, naming the budgets that would allow more.

        ``first``'s index stays until the end: larger IVF-RaBitQ codes copy its rotation and centroids
        (no k-means again), and re-ranking stages reuse it whole. The indexes built here hold every
        vector at once (a re-ranking store must hold them in id order), so a selector keeps the
        (Q, D) tuning ``queries``, the ``rows`` whose (Q, k) true neighbours are ``truth``, out of the
        results, which for IVF lists and flat vectors is the same as not indexing them.
        """
        num_vectors, dim = source.shape
        plans = escalation_plans(first.plan, num_vectors, dim)
        affordable = [candidate for candidate in plans if candidate.estimated_bytes(num_vectors) <= budget]
        exclude = faiss.IDSelectorNot(faiss.IDSelectorBatch(rows))
        best, others = first, []
        for candidate in affordable:
            index = _escalated_index(candidate, first.index, source, queries)
            tuned = _tuned_knob(index, candidate, queries, truth, first.result.target, exclude)
            attempt = _Attempt(candidate, index, *tuned)
            if attempt.result.recall > best.result.recall:
                best, attempt = attempt, best
            others.append(attempt.record())
            del index, attempt  # only the best keeps its index: at most it, first's and the next are in memory
            if best.result.reached:
                break
        self.index = best.index
        self.manifest = replace(self.manifest, kind=best.plan.kind, factory=best.plan.factory)
        self._set_knob(best.knob, _tuning_record(best.result) | {"tried": others})
        if not best.result.reached:
            larger = sorted((candidate for candidate in plans if candidate not in affordable),
                            key=lambda candidate: candidate.estimated_bytes(num_vectors))
            warnings.warn(_unreached_warning(best, budget, larger, num_vectors), stacklevel=4)

    def _set_knob(self, knob: SearchKnob | None, tuning: dict[str, Any] | None) -> None:
        self._knob = knob
        self.manifest = replace(self.manifest, search=knob.settings() if knob else {}, tuning=tuning)

    @classmethod
    def build_from_embeddings(cls, path: str | Path, **options: Any) -> "RetrievalIndex":
        """Index an embeddings directory written by ``clipkit embed`` (see ``retrieval.embeddings``).

        Vectors stay memory-mapped and metadata is streamed into SQLite, so the vectors are never in
        memory twice. ``options`` are those of :meth:`build`; the model's name, fingerprint and spec
        come from the directory.
        """
        embeddings = read_embeddings_dir(path)
        manifest = embeddings.manifest
        return cls.build(embeddings.vectors, embeddings.metadata, model_name=manifest.model,
                         model_fingerprint=manifest.model_fingerprint, model_spec=manifest.model_spec, **options)

    # ----------------------------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def model_name(self) -> str | None:
        return self.manifest.model

    def __len__(self) -> int:
        return self.manifest.count

    def __repr__(self) -> str:
        return (f"RetrievalIndex({len(self)} × {self.dim}, kind={self.kind!r} ({self.manifest.factory}), "
                f"search={self.manifest.search}, model={self.model_name!r})")

    # ----------------------------------------------------------------------------------- changing

    def _check_writable(self) -> None:
        if self.read_only and lists_file(self.index) is not None:
            raise PermissionError("this index keeps its IVF lists on disk and is read-only; build it again "
                                  "to add or remove vectors")
        if self.read_only:
            raise PermissionError("this index was loaded with mmap=True and is read-only; load it without mmap "
                                  "to add or remove vectors")

    def add(
        self, vectors: np.ndarray | torch.Tensor, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> np.ndarray:
        """Add (N, D) vectors with one metadata dict each; returns their new ids, (N,) int64."""
        self._check_writable()
        array = as_float32_matrix(vectors)
        self._check_dim(array.shape[1], "vectors")
        first = self.manifest.next_id
        ids = np.arange(first, first + len(array), dtype=np.int64)
        self.store.insert(first, metadata if metadata is not None else ({} for _ in ids), len(array))
        if self.kind == REFINED:
            # IndexRefine has no add_with_ids: it numbers vectors by position, and nothing is ever
            # removed from it (KEEPS_REMOVED), so the next position is the next id.
            self.index.add(array)
        else:
            self.index.add_with_ids(array, ids)
        self.manifest = replace(self.manifest, count=self.manifest.count + len(ids), next_id=first + len(ids))
        self._stored = None
        return ids

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove vectors by id; returns how many. Raises ``KeyError`` (removing nothing) for unknown ids.

        HNSW graphs and re-ranked IVF indexes (``ivfrabitq+refine``) cannot drop vectors: their removed
        ids are recorded and skipped by every search.
        """
        self._check_writable()
        ids = np.unique(np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64))
        unknown = self.store.missing(ids)
        if len(unknown):
            raise KeyError(f"no vectors with ids {unknown[:10].tolist()}{' ...' if len(unknown) > 10 else ''}")
        keep_as_deleted = self.kind in KEEPS_REMOVED
        self.store.delete(ids, keep_as_deleted)
        if keep_as_deleted:
            self._deleted = np.union1d(self._deleted, ids)
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        self.manifest = replace(self.manifest, count=self.manifest.count - len(ids))
        self._stored = None
        return len(ids)

    # ----------------------------------------------------------------------------------- searching

    def _check_dim(self, dim: int, what: str) -> None:
        if dim != self.dim:
            raise ValueError(f"{what} have dimension {dim}, the index holds {self.dim}-d vectors")

    def search_vectors(
        self, queries: np.ndarray | torch.Tensor, k: int = 10, where: Mapping[str, FilterValue] | None = None
    ) -> list[list[Hit]]:
        """(Q, D) query vectors (or one (D,) vector) → for each query, up to ``k`` hits, best first.

        ``where`` keeps only vectors whose metadata has every ``field: value`` given, e.g.
        ``{"source": "shard-0003.tar"}``; a query still gets ``k`` hits when that many match.
        """
        return self.hits(*self.search_ids(queries, k, where))

    def search_ids(
        self, queries: np.ndarray | torch.Tensor, k: int = 10, where: Mapping[str, FilterValue] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS half of :meth:`search_vectors`: (Q, k') scores and (Q, k') ids, k' ≤ ``k``, -1
        where fewer vectors match; :meth:`hits` adds the metadata."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if (isinstance(queries, np.ndarray) or is_tensor(queries)) and queries.ndim == 1:
            queries = queries[None, :]
        array = as_float32_matrix(queries, "queries")
        self._check_dim(array.shape[1], "queries")
        selector, available = self._selector(where)
        if available == 0 or len(array) == 0:
            return np.empty((len(array), 0), np.float32), np.empty((len(array), 0), np.int64)
        k_search = min(k, available)
        return search_index(self.index, array, k_search, self._knob, selector, k_search)

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """(Q, k) scores and ids from :meth:`search_ids` → for each query its hits with their metadata."""
        metadata = self.store.get(np.unique(ids[ids >= 0]))
        return [
            [Hit(int(i), float(s), metadata[int(i)]) for s, i in zip(row_scores, row_ids) if i >= 0]
            for row_scores, row_ids in zip(scores, ids)
        ]

    def _selector(self, where: Mapping[str, FilterValue] | None) -> tuple[faiss.IDSelector | None, int]:
        """The FAISS id selector for a filter (and vectors removed but still indexed), and how many ids
        it allows."""
        if where is not None:
            allowed = self.store.matching(where)
            return faiss.IDSelectorBatch(allowed), len(allowed)
        if len(self._deleted):
            return faiss.IDSelectorNot(faiss.IDSelectorBatch(self._deleted)), len(self)
        return None, len(self)

    def stored_vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(N,) ids → (N, D) float32: the vectors indexed under them as the index keeps them (the
        vectors themselves, or for ``ivfrabitq`` their decoded codes; see ``retrieval.stored_vectors``).

        Raises ``KeyError`` for an id that is not indexed (or was removed) and ``VectorsNotStored``
        for an ``ivfpq`` index, whose codes cannot be decoded.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        unknown = self.store.missing(ids)
        if len(unknown):
            raise KeyError(f"no item with id {int(unknown[0])}")
        if self._stored is None:
            self._stored = StoredVectors(self.index, self.kind)
        return self._stored(ids)

    def search_item(self, item_id: int, k: int = 10, where: Mapping[str, FilterValue] | None = None) -> list[Hit]:
        """"More like this": the hits of the item's own stored vector (the item itself among them,
        first for the kinds that keep full vectors)."""
        return self.search_vectors(self.stored_vectors([item_id]), k, where)[0]

    @overload
    def search_text(self, text: str, model: Any, k: int = 10,
                    where: Mapping[str, FilterValue] | None = None) -> list[Hit]: ...

    @overload
    def search_text(self, text: Sequence[str], model: Any, k: int = 10,
                    where: Mapping[str, FilterValue] | None = None) -> list[list[Hit]]: ...

    def search_text(self, text, model, k=10, where=None):
        """Embed ``text`` with ``model`` (clipkit's encoder interface) and search: a string gives a list
        of hits, a list of strings one list per string (embedded as one batch)."""
        if isinstance(text, str):
            return self.search_vectors(encode_texts(model, [text]), k, where)[0]
        return self.search_vectors(encode_texts(model, text), k, where)

    def search_file(self, file: bytes | str | Path, model: Any, modality: str | None = None, k: int = 10,
                    where: Mapping[str, FilterValue] | None = None) -> list[Hit]:
        """Search with one media file (path or encoded bytes) of ``modality``, decoded the way ``model``
        evaluates it. Unset, the modality is the model's tower whose decoder takes the file's extension."""
        return self.search_vectors(encode_file(model, modality or file_modality(model, file), file), k, where)[0]

    # ----------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the index to directory ``path``: ``index.faiss``, ``metadata.sqlite`` and ``manifest.json``.

        The directory is written beside ``path`` and renamed into place, so ``path`` is never half
        written; an existing ``path`` is replaced only if it is a saved index (or empty).
        """
        path = Path(path)
        on_disk = lists_file(self.index) is not None

        def fill(directory: Path) -> None:
            faiss.write_index(self.index, str(directory / INDEX_FILE))
            place_lists(self.index, directory, self._scratch)
            self.store.save(directory / METADATA_FILE)
            files = (INDEX_FILE, METADATA_FILE, *((LISTS_FILE,) if on_disk else ()))
            manifest = replace(self.manifest, index_bytes=(directory / INDEX_FILE).stat().st_size,
                               metadata_bytes=(directory / METADATA_FILE).stat().st_size,
                               lists_bytes=(directory / LISTS_FILE).stat().st_size if on_disk else None,
                               checksums={name: file_checksum(directory / name) for name in files})
            (directory / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")

        write_directory_atomically(path, fill, is_index_directory)
        self.manifest = read_manifest(path)
        if on_disk:  # the lists moved into the saved folder: map them there
            self.index = faiss.read_index(str(path / INDEX_FILE), READ_FLAGS)
            self._scratch = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        mmap: bool = False,
        expect_model: str | None = None,
        expect_dim: int | None = None,
        expect_fingerprint: str | None = None,
        verify: bool = True,
    ) -> "RetrievalIndex":
        """Open a directory written by :meth:`save`.

        ``mmap=True`` maps the index file instead of reading it (vectors and IVF lists are paged in
        as searches touch them, so an index larger than RAM can be searched; see
        ``retrieval.kinds.mmap_flags`` for what stays in RAM) and makes the index read-only. An index
        built with its lists on disk (``lists_dir``) is always mapped so, and read-only.
        Raises ``IndexFormatError`` for a missing manifest, a truncated, damaged or swapped file (each
        file's checksum is checked; ``verify=False`` skips that read of the whole index for one larger
        than is worth reading at start-up), or an index built for another model (``expect_model``: its
        recorded name; ``expect_fingerprint``: the fingerprint of its weights) or dimension (``expect_dim``).
        """
        directory = Path(path)
        manifest = read_manifest(directory)
        manifest.check(expect_model, expect_dim, directory, expect_fingerprint)
        files = [(INDEX_FILE, manifest.index_bytes), (METADATA_FILE, manifest.metadata_bytes)]
        if manifest.lists_bytes is not None:
            files.append((LISTS_FILE, manifest.lists_bytes))
        for name, size in files:
            file = directory / name
            if not file.is_file():
                raise IndexFormatError(f"{directory} has no {name}")
            if file.stat().st_size != size:
                raise IndexFormatError(f"{file} is {file.stat().st_size} bytes but was saved with {size}: "
                                       "truncated or replaced")
            expected = (manifest.checksums or {}).get(name)
            if verify and expected is not None and file_checksum(file) != expected:
                raise IndexFormatError(f"{file} is not the file this index was saved with (its checksum "
                                       "differs): replaced or damaged")
        # Lists on disk are always mapped, and read-only (``retrieval.ondisk``).
        flags = READ_FLAGS if manifest.lists_bytes is not None else mmap_flags(manifest.kind) if mmap else 0
        try:
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
        except RuntimeError as err:
            raise IndexFormatError(f"{directory / INDEX_FILE} cannot be read by FAISS: {err}") from err
        if index.d != manifest.dim:
            raise IndexFormatError(
                f"{directory / INDEX_FILE} holds {index.d}-d vectors; the manifest says {manifest.dim}")
        store = MetadataStore.open(directory / METADATA_FILE)
        indexed = manifest.count + len(store.deleted_ids())
        if len(store) != manifest.count or index.ntotal != indexed:
            raise IndexFormatError(f"{directory}: {index.ntotal} indexed vectors and {len(store)} metadata rows, "
                                   f"but the manifest counts {manifest.count} vectors")
        return cls(index, store, manifest, read_only=mmap or manifest.lists_bytes is not None)
