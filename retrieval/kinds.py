"""The index kinds: which FAISS index each one is, what it costs, and how ``auto`` chooses.

| kind | FAISS index | search knob | bytes per vector (512-d) |
| --- | --- | --- | --- |
| exact | ``IDMap,Flat`` (brute-force inner product) | none | 2056 |
| hnsw | ``IDMap,HNSW32`` graph over full vectors | efSearch | ~2328 |
| ivfpq | ``IVF{nlist},PQ{d/2}x4fs`` (``OPQ`` rotation first with ``opq=True``) | nprobe | 136 |
| ivfrabitq | ``RR{d},IVF{nlist},RaBitQ{bits}`` (random rotation, 1–3 bits per dimension) | nprobe | 220 |
| ivfrabitq+refine | ``RR{d},IVF{nlist},RaBitQ{bits},Refine(SQfp16)`` (or ``Refine(Flat)``) | nprobe, k_factor | 1244 |

(Plus the IVF centroids, nlist·d·4 bytes: 16 bytes per vector at 1M × 512.) ``auto`` also builds
IVF-RaBitQ with 4, 6 or 8 bits (284, 412 or 540 bytes) and is the only way to an ``ivfrabitq+refine``
index: IVF-RaBitQ candidates re-ranked by fp16 (or float32, 2268 bytes) copies of the vectors.

All use the inner product, the cosine similarity of unit vectors. When the plan ``auto`` picks misses
its target recall, ``escalation_plans`` are what it tries next.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import faiss
import numpy as np

KINDS = ("exact", "hnsw", "ivfpq", "ivfrabitq")
AUTO = "auto"
# IVF-RaBitQ codes re-ranked by a second, more precise copy of the vectors: only ever the result of
# ``auto`` escalating, because it pays for itself only where smaller codes miss the target.
REFINED = "ivfrabitq+refine"
# Kinds whose FAISS index cannot drop vectors: removed ids are recorded and filtered out of searches.
# HNSW graphs cannot unlink nodes; IndexRefine has no remove_ids, and its ids must stay positions in
# the re-ranking store (see ``retrieval.index._refined``).
KEEPS_REMOVED = ("hnsw", REFINED)

# Below this count brute force answers a query in a few milliseconds and is exact.
EXACT_MAX_VECTORS = 50_000
# Up to this count a graph over full vectors is small in absolute terms and near-exact; above it
# compressed IVF codes keep the index in a fraction of the raw size.
HNSW_MAX_VECTORS = 200_000
# Fewer vectors than this cannot train IVF centroids and quantisers usefully: use exact search.
IVF_MIN_VECTORS = 1_000

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 40
# k-means wants 39+ points per centroid (fewer makes FAISS warn and centroids poor); more costs
# training time without helping much.
TRAIN_POINTS_PER_LIST = 40
# IVF-RaBitQ keeps each vector's code and id within this fraction of its raw float32 size.
MAX_COMPRESSED_FRACTION = 1 / 8
ID_BYTES = 8  # IVF lists store an int64 id next to every code
# RaBitQ bits per dimension: ``auto`` starts at the most within the cap above (at most 3) and escalates
# through the larger ones. Every step re-encodes every vector, so steps are two bits apart from 4 on:
# on 100k CLIP-like 512-d vectors each extra bit left about 0.6 of the recall@10 misses (the recall
# reached with ample nprobe was 0.905, 0.942, 0.982 and 0.994 at 3, 4, 6 and 8 bits).
RABITQ_BITS = (1, 2, 3, 4, 6, 8)
INITIAL_MAX_BITS = 3
# The re-ranking vectors of ``REFINED`` plans, least memory first. SQ8 (d bytes per vector on top of
# the 3-bit codes' 0.43·d) is not among them: on the same vectors its re-ranking saturated at recall@10
# 0.959, below 6-bit RaBitQ codes alone (0.982 in 0.8·d bytes), because RaBitQ codes the residual from
# the IVF centroid and SQ8 the whole vector, shared direction included.
REFINE_STORES = ("SQfp16", "Flat")


class MemoryBudgetError(ValueError):
    """No index of the requested kind fits the memory budget."""


@dataclass(frozen=True)
class IndexPlan:
    """One concrete index: its kind, FAISS factory string, search knob and training-set size.

    ``knob`` is the search-time parameter traded against recall (``"nprobe"`` for IVF kinds,
    ``"efSearch"`` for HNSW, ``None`` for exact search; ``REFINED`` plans also tune ``k_factor``);
    ``train_size`` is how many sampled vectors train it (0: no training).
    """

    kind: str
    factory: str
    knob: str | None
    train_size: int
    bytes_per_vector: int
    fixed_bytes: int
    bits: int = 0  # RaBitQ bits per dimension (0 for other codes)
    refine: str | None = None  # the FAISS factory string of a REFINED plan's re-ranking vectors

    def estimated_bytes(self, num_vectors: int) -> int:
        """The in-memory (and on-disk) size of the index holding ``num_vectors`` vectors."""
        return self.fixed_bytes + self.bytes_per_vector * num_vectors


def ivf_lists(num_vectors: int) -> int:
    """The IVF list count: the power of two nearest 8·√N, lowered until each centroid gets
    ``TRAIN_POINTS_PER_LIST`` training points.

    FAISS's guideline is 4·√N to 16·√N. Finer lists leave smaller residuals for the codes to encode:
    on 1M clustered 512-d vectors, 8192 lists instead of 4096 raised the recall@10 that 3-bit RaBitQ
    codes saturate at from 0.942 to 0.949, for 8 more bytes of centroids per vector.
    """
    lists = 2 ** round(math.log2(max(8 * math.sqrt(num_vectors), 1)))
    while lists > 1 and lists * TRAIN_POINTS_PER_LIST > num_vectors:
        lists //= 2
    return lists


def with_lists(plan: IndexPlan, lists: int, num_vectors: int, dim: int) -> IndexPlan:
    """``plan`` (an IVF one) with ``lists`` inverted lists instead of :func:`ivf_lists`'s choice. Fewer
    lists cost less to train and to assign vectors to (both scale with the list count), for more
    vectors scanned per probed list: the trade that makes 10M vectors buildable on a few CPU cores."""
    if plan.knob != "nprobe":
        raise ValueError(f"a list count applies to the IVF kinds, not {plan.kind!r}")
    if not 1 <= lists <= num_vectors:
        raise ValueError(f"the list count must be between 1 and the {num_vectors:,} vectors, got {lists}")
    transform_bytes = dim * dim * 4 if plan.factory.startswith(("OPQ", "RR")) else 0
    return replace(plan, factory=re.sub(r"IVF\d+", f"IVF{lists}", plan.factory),
                   train_size=min(num_vectors, lists * TRAIN_POINTS_PER_LIST),
                   fixed_bytes=lists * dim * 4 + transform_bytes)


def _code_size(factory: str, dim: int) -> int:
    """Bytes per vector of the codes of a FAISS factory string (an empty, untrained index is cheap)."""
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).code_size


def _ivf_plan(kind: str, codes: str, num_vectors: int, dim: int, transform: str = "",
              bits: int = 0) -> IndexPlan:
    """An IVF plan with ``codes`` (e.g. ``"RaBitQ3"``) in its lists, after an optional d × d
    ``transform`` (``"OPQ..."`` or ``"RR..."``, whose matrix counts toward the fixed size)."""
    lists = ivf_lists(num_vectors)
    return IndexPlan(
        kind=kind,
        factory=f"{transform},IVF{lists},{codes}" if transform else f"IVF{lists},{codes}",
        knob="nprobe",
        train_size=min(num_vectors, lists * TRAIN_POINTS_PER_LIST),
        bytes_per_vector=_code_size(f"IVF1,{codes}", dim) + ID_BYTES,
        fixed_bytes=lists * dim * 4 + (dim * dim * 4 if transform else 0),
        bits=bits,
    )


def rabitq_plan(bits: int, num_vectors: int, dim: int) -> IndexPlan:
    return _ivf_plan("ivfrabitq", f"RaBitQ{bits}", num_vectors, dim, f"RR{dim}", bits)


def _refined_plan(base: IndexPlan, store: str, dim: int) -> IndexPlan:
    """``base`` (an ``ivfrabitq`` plan) with its candidates re-ranked by ``store`` vectors, e.g. ``"SQfp16"``.

    No id map: IndexRefine finds a candidate's vector by position, and the base's ids are kept equal
    to those positions (see ``retrieval.index._refined``): only the store's codes add to ``base``'s size.
    """
    return replace(base, kind=REFINED, factory=f"{base.factory},Refine({store})", refine=store,
                   bytes_per_vector=base.bytes_per_vector + _code_size(store, dim))


def _pq_subquantizers(dim: int) -> int:
    """Sub-quantizers for 4-bit PQ at 2 bits per dimension: the largest divisor of ``dim`` ≤ dim/2."""
    return max(m for m in range(1, max(dim // 2, 1) + 1) if dim % m == 0)


def _rabitq_plans(num_vectors: int, dim: int) -> list[IndexPlan]:
    """IVF-RaBitQ plans from 3 bits per dimension down to 1, keeping those within the compression cap.

    RaBitQ quantises every coordinate alike, which suits vectors whose energy is spread evenly over
    the coordinates; a random rotation first makes any vectors so (learned embeddings often have a
    few dominant coordinates).
    """
    plans = [rabitq_plan(bits, num_vectors, dim) for bits in reversed(RABITQ_BITS) if bits <= INITIAL_MAX_BITS]
    # The cap is per vector: centroids and rotation are a fixed cost that large indexes amortise.
    cap = dim * 4 * MAX_COMPRESSED_FRACTION
    within = [plan for plan in plans if plan.bytes_per_vector <= cap]
    return within or plans[-1:]  # tiny dimensions cannot reach the cap; 1 bit is the least there is


def candidate_plans(kind: str, num_vectors: int, dim: int, opq: bool = False) -> list[IndexPlan]:
    """The plans of ``kind`` for N × D vectors, most accurate first (only RaBitQ offers several)."""
    if kind == "exact":
        return [IndexPlan("exact", "IDMap,Flat", None, 0, dim * 4 + ID_BYTES, 0)]
    if kind == "hnsw":
        # The vector, 2·M int32 neighbours on level 0, ~4 bytes of upper levels, 12 of bookkeeping.
        per_vector = dim * 4 + HNSW_NEIGHBOURS * 2 * 4 + 16
        return [IndexPlan("hnsw", f"IDMap,HNSW{HNSW_NEIGHBOURS}", "efSearch", 0, per_vector + ID_BYTES, 0)]
    if num_vectors < IVF_MIN_VECTORS:
        raise ValueError(f"{kind} needs at least {IVF_MIN_VECTORS} vectors to train on, got {num_vectors}; "
                         "use kind='exact'")
    if kind == "ivfpq":
        m = _pq_subquantizers(dim)
        return [_ivf_plan("ivfpq", f"PQ{m}x4fs", num_vectors, dim, f"OPQ{m}_{dim}" if opq else "")]
    if kind == "ivfrabitq":
        return _rabitq_plans(num_vectors, dim)
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join((AUTO, *KINDS))}")


def plan_index(kind: str, num_vectors: int, dim: int, memory_budget: int, opq: bool = False) -> IndexPlan:
    """The index to build for N × D vectors within ``memory_budget`` bytes.

    ``auto`` takes exact search for up to ``EXACT_MAX_VECTORS`` vectors, HNSW up to
    ``HNSW_MAX_VECTORS``, and IVF-RaBitQ codes (at most 1/8 of the raw size) above that, moving on
    whenever an index does not fit the budget. Raises ``MemoryBudgetError`` if nothing fits.
    """
    if num_vectors < 1 or dim < 1:
        raise ValueError(f"cannot index {num_vectors} vectors of dimension {dim}")
    if opq and kind != "ivfpq":
        raise ValueError(f"opq=True applies to kind='ivfpq', not {kind!r}")
    if kind == AUTO:
        candidates = []
        if num_vectors <= EXACT_MAX_VECTORS:
            candidates += candidate_plans("exact", num_vectors, dim)
        if num_vectors <= HNSW_MAX_VECTORS:
            candidates += candidate_plans("hnsw", num_vectors, dim)
        if num_vectors >= IVF_MIN_VECTORS:
            candidates += candidate_plans("ivfrabitq", num_vectors, dim)
    else:
        candidates = candidate_plans(kind, num_vectors, dim, opq)
    for plan in candidates:
        if plan.estimated_bytes(num_vectors) <= memory_budget:
            return plan
    smallest = min(plan.estimated_bytes(num_vectors) for plan in candidates)
    raise MemoryBudgetError(
        f"no {kind} index of {num_vectors:,} × {dim} vectors fits a memory budget of {memory_budget:,} bytes; "
        f"the smallest ({min(candidates, key=lambda p: p.estimated_bytes(num_vectors)).factory}) needs "
        f"{smallest:,} bytes"
    )


def escalation_plans(plan: IndexPlan, num_vectors: int, dim: int) -> list[IndexPlan]:
    """The plans ``auto`` tries, in this order, after ``plan`` (one ``plan_index`` picked for it) missed
    its target recall, whatever their size (the caller skips those over its memory budget).

    For IVF-RaBitQ: codes with more bits, then ``plan``'s codes re-ranked by fp16 and then float32
    vectors, each larger than the one before; for HNSW nothing but exact search. Exact search comes
    last although a float32 re-ranking store is larger: it reaches any target, but reads every vector
    for every query (at 1M vectors about 100× slower than the others).
    """
    exact = candidate_plans("exact", num_vectors, dim)
    if plan.kind == "ivfrabitq":
        more_bits = [rabitq_plan(bits, num_vectors, dim) for bits in RABITQ_BITS if bits > plan.bits]
        return more_bits + [_refined_plan(plan, store, dim) for store in REFINE_STORES] + exact
    return exact if plan.kind == "hnsw" else []


def mmap_flags(kind: str) -> int:
    """FAISS read flags that map an index file of ``kind`` into memory instead of reading it.

    IVF lists are mapped by ``IO_FLAG_MMAP`` (but the fast-scan PQ lists of ``ivfpq`` are always
    read into RAM); flat vector storage, also that of HNSW, by ``IO_FLAG_MMAP_IFC`` (HNSW's graph
    links are still read). The two cannot be combined on one IVF file. FAISS 1.15 maps IVF lists under
    ``IO_FLAG_MMAP_IFC`` too, which is what maps both the lists and the re-ranking vectors of
    ``ivfrabitq+refine``: only the rotation matrix and FAISS's bookkeeping are read into RAM.
    """
    mapping = faiss.IO_FLAG_MMAP_IFC if kind in ("exact", "hnsw", REFINED) else faiss.IO_FLAG_MMAP
    return mapping | faiss.IO_FLAG_READ_ONLY


def recoded_index(trained: faiss.IndexPreTransform, plan: IndexPlan,
                  sample: np.ndarray) -> faiss.IndexPreTransform:
    """An empty index for the IVF-RaBitQ ``plan``, with copies of the rotation and coarse centroids of
    ``trained`` (a trained IVF-RaBitQ index with other bits), trained on (n, d) ``sample``.

    k-means is nearly all of an IVF index's training (minutes at 1M vectors) and its centroids do not
    depend on the codes: FAISS skips it for a quantizer that already holds nlist centroids. RaBitQ
    codes learn nothing from training, so a small ``sample`` (e.g. the tuning queries) suffices.
    """
    ivf = faiss.extract_index_ivf(trained)
    codes = faiss.IndexIVFRaBitQ(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT,
                                 True, plan.bits)
    index = faiss.IndexPreTransform(faiss.Cloner().clone_VectorTransform(trained.chain.at(0)), codes)
    index.train(sample)
    return index


def refine_store(plan: IndexPlan, dim: int) -> faiss.Index:
    """The empty store of a ``REFINED`` plan's re-ranking vectors (fp16 or float32: no training)."""
    return faiss.index_factory(dim, plan.refine, faiss.METRIC_INNER_PRODUCT)


def create_index(plan: IndexPlan, dim: int) -> faiss.Index:
    """An empty (untrained) FAISS index for ``plan`` (not ``REFINED``: see ``retrieval.index._refined``)."""
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if plan.factory.startswith("OPQ"):
        # OPQ learns its rotation with an 8-bit PQ unless given one; ours is 4-bit, which is also
        # ~16x cheaper to train. The PQ is only used while training; the index keeps a reference.
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        pq = faiss.downcast_index(index.index).pq
        opq.pq = faiss.ProductQuantizer(pq.d, pq.M, pq.nbits)
        index.referenced_objects = [opq.pq]
    return index
