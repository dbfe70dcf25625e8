"""``RetrievalIndex``: a FAISS index of embeddings, their metadata in SQLite, one object to build,
save, load and search by vector, text, image or audio."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, overload

import faiss
import numpy as np

from retrieval.embeddings import read_embeddings_dir
from retrieval.encode import encode_file, encode_texts
from retrieval.files import write_directory_atomically
from retrieval.kinds import AUTO, IndexPlan, create_index, mmap_flags, plan_index
from retrieval.manifest import (
    INDEX_FILE, METADATA_FILE, MANIFEST_FILE, IndexFormatError, Manifest, is_index_directory, read_manifest,
    utc_now,
)
from retrieval.memory import parse_memory
from retrieval.search import SearchKnob, search_index
from retrieval.store import FilterValue, MetadataStore
from retrieval.tuning import CHUNK_ROWS, RECALL_K, drop_self, exact_neighbours, tune_knob
from retrieval.vectors import VectorSource, as_float32_matrix, as_vector_source, is_tensor

if TYPE_CHECKING:
    import torch

TUNING_QUERIES = 1_000
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


def _add_to_faiss(index: faiss.Index, kind: str, vectors: np.ndarray, first_id: int) -> None:
    """Add (N, D) vectors under ids ``first_id, first_id + 1, ...``."""
    if kind == "hnsw":
        # HNSW ids are insertion positions, which equal ours because HNSW vectors are never dropped.
        index.add(vectors)
    else:
        index.add_with_ids(vectors, np.arange(first_id, first_id + len(vectors), dtype=np.int64))


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
        knob = next(iter(manifest.search.items()), None)
        self._knob = SearchKnob(*knob) if knob else None
        self._deleted = store.deleted_ids()

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
        seed: int = 0,
    ) -> "RetrievalIndex":
        """Index N × D ``vectors`` (numpy, torch, or a ``VectorSource``); ``metadata`` yields one dict
        per vector (default: empty dicts). The vectors get ids 0..N-1.

        ``kind`` is ``exact``, ``hnsw``, ``ivfpq`` (``opq=True`` adds a learned rotation),
        ``ivfrabitq`` or ``auto`` (see ``retrieval.kinds``); the index must fit ``memory_budget``
        (e.g. ``"4GB"``). Approximate kinds train on a random sample and then set their search knob
        to the lowest value whose recall@10 against exact search, measured on up to 1000 held-out
        vectors used as queries, reaches ``target_recall``. ``model_name`` is recorded in the manifest.
        """
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        source = as_vector_source(vectors)
        num_vectors, dim = source.shape
        plan = plan_index(kind, num_vectors, dim, parse_memory(memory_budget), opq)
        rng = np.random.default_rng(seed)

        store = MetadataStore.temporary()
        store.insert(0, metadata if metadata is not None else ({} for _ in range(num_vectors)), num_vectors)

        index = create_index(plan, dim)
        tuning_rows = _sample_rows(num_vectors, TUNING_QUERIES, rng, np.empty(0, np.int64))
        if plan.train_size:
            index.train(source.take(_sample_rows(num_vectors, plan.train_size, rng, exclude=tuning_rows)))
        start = 0
        for chunk in source.chunks(CHUNK_ROWS):
            _add_to_faiss(index, plan.kind, chunk, start)
            start += len(chunk)

        manifest = Manifest(
            dim=dim, kind=plan.kind, factory=plan.factory, model=model_name, count=num_vectors,
            next_id=num_vectors, search={}, tuning=None, created=utc_now(), index_bytes=0, metadata_bytes=0,
        )
        built = cls(index, store, manifest)
        if plan.knob is not None:
            built._tune(plan, source, tuning_rows, target_recall)
        return built

    def _tune(self, plan: IndexPlan, source: VectorSource, rows: np.ndarray, target: float) -> None:
        """Set the knob to the lowest value reaching ``target`` recall@10 on vectors ``rows`` as queries."""
        queries = source.take(rows)
        k = min(RECALL_K, len(self) - 1)
        if k < 1:
            return
        # The queries are indexed vectors: each finds itself, which must not count as a neighbour.
        truth = drop_self(exact_neighbours(queries, source, k + 1), rows)
        if plan.knob == "nprobe":
            start, limit = 1, faiss.extract_index_ivf(self.index).nlist
        else:
            start, limit = HNSW_TUNING_START, HNSW_TUNING_LIMIT

        def search(value: int) -> np.ndarray:
            _, ids = search_index(self.index, queries, k + 1, SearchKnob(plan.knob, value), None, k + 1)
            return drop_self(ids, rows)

        result = tune_knob(search, truth, target, start, limit)
        if not result.reached:
            warnings.warn(f"{plan.factory}: recall@{k} reached {result.recall:.3f} at {plan.knob}={result.value}, "
                          f"below the target {target}; a less compressed kind (or 'hnsw') would do better",
                          stacklevel=3)
        self._knob = SearchKnob(plan.knob, result.value)
        self.manifest = replace(
            self.manifest, search={plan.knob: result.value},
            tuning={"target_recall_at_10": target, "recall_at_10": round(result.recall, 4),
                    "queries": result.num_queries},
        )

    @classmethod
    def build_from_embeddings(cls, path: str | Path, **options: Any) -> "RetrievalIndex":
        """Index an embeddings directory written by ``clipkit embed`` (see ``retrieval.embeddings``).

        Vectors stay memory-mapped and metadata is streamed into SQLite, so the vectors are never in
        memory twice. ``options`` are those of :meth:`build`; the model name comes from the directory.
        """
        embeddings = read_embeddings_dir(path)
        return cls.build(embeddings.vectors, embeddings.metadata, model_name=embeddings.manifest.model, **options)

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
        _add_to_faiss(self.index, self.kind, array, first)
        self.manifest = replace(self.manifest, count=self.manifest.count + len(ids), next_id=first + len(ids))
        return ids

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove vectors by id; returns how many. Raises ``KeyError`` (removing nothing) for unknown ids.

        HNSW graphs cannot drop nodes: their removed ids are recorded and skipped by every search.
        """
        self._check_writable()
        ids = np.unique(np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64))
        unknown = self.store.missing(ids)
        if len(unknown):
            raise KeyError(f"no vectors with ids {unknown[:10].tolist()}{' ...' if len(unknown) > 10 else ''}")
        keep_as_deleted = self.kind == "hnsw"
        self.store.delete(ids, keep_as_deleted)
        if keep_as_deleted:
            self._deleted = np.union1d(self._deleted, ids)
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        self.manifest = replace(self.manifest, count=self.manifest.count - len(ids))
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if (isinstance(queries, np.ndarray) or is_tensor(queries)) and queries.ndim == 1:
            queries = queries[None, :]
        array = as_float32_matrix(queries, "queries")
        self._check_dim(array.shape[1], "queries")
        selector, available = self._selector(where)
        if available == 0 or len(array) == 0:
            return [[] for _ in array]
        k_search = min(k, available)
        scores, ids = search_index(self.index, array, k_search, self._knob, selector, k_search)
        metadata = self.store.get(np.unique(ids[ids >= 0]))
        return [
            [Hit(int(i), float(s), metadata[int(i)]) for s, i in zip(row_scores, row_ids) if i >= 0]
            for row_scores, row_ids in zip(scores, ids)
        ]

    def _selector(self, where: Mapping[str, FilterValue] | None) -> tuple[faiss.IDSelector | None, int]:
        """The FAISS id selector for a filter (and deleted HNSW vectors), and how many ids it allows."""
        if where is not None:
            allowed = self.store.matching(where)
            return faiss.IDSelectorBatch(allowed), len(allowed)
        if len(self._deleted):
            return faiss.IDSelectorNot(faiss.IDSelectorBatch(self._deleted)), len(self)
        return None, len(self)

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

    def search_image(self, image: bytes | str | Path, model: Any, k: int = 10,
                     where: Mapping[str, FilterValue] | None = None) -> list[Hit]:
        """Search with one image file (path or encoded bytes), decoded the way ``model`` evaluates images."""
        return self.search_vectors(encode_file(model, "image", image), k, where)[0]

    def search_audio(self, audio: bytes | str | Path, model: Any, k: int = 10,
                     where: Mapping[str, FilterValue] | None = None) -> list[Hit]:
        """Search with one audio file (path or encoded bytes), decoded the way ``model`` evaluates audio."""
        return self.search_vectors(encode_file(model, "audio", audio), k, where)[0]

    # ----------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the index to directory ``path``: ``index.faiss``, ``metadata.sqlite`` and ``manifest.json``.

        The directory is written beside ``path`` and renamed into place, so ``path`` is never half
        written; an existing ``path`` is replaced only if it is a saved index (or empty).
        """
        path = Path(path)

        def fill(directory: Path) -> None:
            faiss.write_index(self.index, str(directory / INDEX_FILE))
            self.store.save(directory / METADATA_FILE)
            manifest = replace(self.manifest, index_bytes=(directory / INDEX_FILE).stat().st_size,
                               metadata_bytes=(directory / METADATA_FILE).stat().st_size)
            (directory / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")

        write_directory_atomically(path, fill, is_index_directory)
        self.manifest = read_manifest(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        mmap: bool = False,
        expect_model: str | None = None,
        expect_dim: int | None = None,
    ) -> "RetrievalIndex":
        """Open a directory written by :meth:`save`.

        ``mmap=True`` maps the index file instead of reading it (vectors and IVF lists are paged in
        as searches touch them, so an index larger than RAM can be searched; see
        ``retrieval.kinds.mmap_flags`` for what stays in RAM) and makes the index read-only.
        Raises ``IndexFormatError`` for a missing manifest, a truncated or damaged file, or an index
        built for another model (``expect_model``) or dimension (``expect_dim``).
        """
        directory = Path(path)
        manifest = read_manifest(directory)
        manifest.check(expect_model, expect_dim, directory)
        for name, size in ((INDEX_FILE, manifest.index_bytes), (METADATA_FILE, manifest.metadata_bytes)):
            file = directory / name
            if not file.is_file():
                raise IndexFormatError(f"{directory} has no {name}")
            if file.stat().st_size != size:
                raise IndexFormatError(f"{file} is {file.stat().st_size} bytes but was saved with {size}: "
                                       "truncated or replaced")
        flags = mmap_flags(manifest.kind) if mmap else 0
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
        return cls(index, store, manifest, read_only=mmap)
