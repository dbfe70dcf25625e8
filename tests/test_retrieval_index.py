"""RetrievalIndex with real FAISS indexes on small synthetic data: results, recall, auto's escalation, files,
changes, errors."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from clipkit.modalities import FieldDecoder
from retrieval import IndexFormatError, MemoryBudgetError, MetadataError, RetrievalIndex, parse_memory
from retrieval.kinds import REFINED, escalation_plans, mmap_flags, plan_index
from retrieval.search import SearchKnob
from retrieval.stored_vectors import VectorsNotStored
from retrieval.synthetic import ClipLikeVectors, ClusteredVectors
from retrieval.tuning import TUNING_MARGIN, exact_neighbours, recall_at_k, tune_knob
from retrieval.vectors import ArrayVectors

DIM = 32
DATA = ClusteredVectors(dim=DIM, num_clusters=40)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def base() -> tuple[np.ndarray, list[dict]]:
    vectors, clusters = DATA.sample(5_000, seed=0)
    metadata = [{"cluster": int(c), "caption": f"vector {i}", "even": i % 2 == 0} for i, c in enumerate(clusters)]
    return vectors, metadata


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return DATA.sample(50, seed=1)[0]


def rare(metadata: list[dict]) -> list[dict]:
    """``metadata`` with 13 of its 5000 records tagged ``"rare"``."""
    return [dict(record, tag="rare") if i % 400 == 3 else record for i, record in enumerate(metadata)]


# 8-bit RaBitQ codes of ``base`` reach recall@10 0.995 at most, fp16 re-ranking 0.9996, and exact search
# (680 KB) does not fit this budget: auto ends at ``ivfrabitq+refine``.
REFINED_BUDGET, REFINED_TARGET = "600KB", 0.999


@pytest.fixture(scope="module")
def refined_dir(tmp_path_factory, base) -> Path:
    """A saved ``ivfrabitq+refine`` index of ``base`` (with rare tags), built by auto; load a copy to change it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it reaches its target
        index = RetrievalIndex.build(base[0], rare(base[1]), memory_budget=REFINED_BUDGET,
                                     target_recall=REFINED_TARGET, model_name="tiny-clip")
    assert index.kind == REFINED
    path = tmp_path_factory.mktemp("refined") / "index"
    index.save(path)
    return path


def recall_against_exact(index: RetrievalIndex, vectors: np.ndarray, queries: np.ndarray) -> float:
    truth = exact_neighbours(queries, ArrayVectors(vectors), 10)
    found = np.array([[hit.id for hit in hits] for hits in index.search_vectors(queries, k=10)])
    return recall_at_k(found, truth)


# ------------------------------------------------------------------------------------ results and recall


def test_exact_search_matches_numpy_brute_force(base, queries):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors, metadata, kind="exact")
    scores = queries @ vectors.T
    expected_ids = np.argsort(-scores, axis=1)[:, :7]
    results = index.search_vectors(queries, k=7)
    assert [[hit.id for hit in hits] for hits in results] == expected_ids.tolist()
    found_scores = np.array([[hit.score for hit in hits] for hits in results])
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, expected_ids, axis=1), rtol=1e-5)
    assert results[0][0].metadata == metadata[expected_ids[0, 0]]


def test_batch_search_equals_one_query_at_a_time(base, queries):
    index = RetrievalIndex.build(base[0], base[1], kind="exact")
    batch = index.search_vectors(queries[:5], k=4)
    assert len(batch) == 5
    assert batch == [index.search_vectors(query, k=4)[0] for query in queries[:5]]  # (D,) is one query
    assert index.search_vectors(torch.from_numpy(queries[:5]), k=4) == batch


@pytest.mark.parametrize("kind, opq, floor", [("ivfpq", False, 0.4), ("ivfpq", True, 0.4), ("ivfrabitq", False, 0.5),
                                              ("hnsw", False, 0.9)])
def test_approximate_kinds_reach_a_recall_floor(base, queries, kind, opq, floor, recwarn):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors, metadata, kind=kind, opq=opq, target_recall=0.95)
    assert index.manifest.factory.startswith("OPQ") == opq
    recall = recall_against_exact(index, vectors, queries)
    assert recall >= floor  # random ids would score ~10/5000
    # The build measured its recall on other (indexed) queries; both estimate the same thing.
    assert abs(recall - index.manifest.tuning["recall_at_10"]) < 0.15


def test_an_unreachable_target_warns_and_keeps_the_best_setting(base):
    # 32-d vectors in 2-bit PQ codes cannot reach recall 0.95 however many lists are probed.
    with pytest.warns(UserWarning, match="below the target 0.95"):
        index = RetrievalIndex.build(base[0], kind="ivfpq", target_recall=0.95)
    assert index.manifest.tuning["recall_at_10"] < 0.95
    assert index.manifest.search["nprobe"] >= 1


def test_tuning_picks_the_smallest_nprobe_reaching_the_target():
    # Well-separated clusters that 2-bit RaBitQ codes resolve: recall is limited by nprobe alone.
    data = ClusteredVectors(dim=128, num_clusters=20, noise=0.6, decay=1.5)
    vectors, _ = data.sample(8_000, seed=0)
    low = RetrievalIndex.build(vectors, kind="ivfrabitq", target_recall=0.5)
    high = RetrievalIndex.build(vectors, kind="ivfrabitq", target_recall=0.9)
    assert high.manifest.factory.endswith("RaBitQ2")
    assert low.manifest.tuning["recall_at_10"] >= 0.5
    assert high.manifest.tuning["recall_at_10"] >= 0.9
    assert low.manifest.search["nprobe"] < high.manifest.search["nprobe"]
    assert recall_against_exact(high, vectors, data.sample(50, seed=1)[0]) >= 0.85


def test_tuning_aims_a_margin_above_the_target_and_stops_on_a_plateau():
    truth = np.arange(100 * 10).reshape(100, 10)

    def scripted(recalls: dict[int, float]):
        # Knob value → ids whose recall@10 against ``truth`` is exactly recalls[value].
        def search(value: int) -> np.ndarray:
            found = truth.copy()
            misses = round((1 - recalls[value]) * truth.size)
            found.reshape(-1)[:misses] = -1
            return found
        return search

    # 0.95 exactly is inside the sampling margin: tuning goes on to the next knob value.
    result = tune_knob(scripted({1: 0.9, 2: 0.95, 3: 0.96, 4: 0.99}), truth, 0.95, 1, 4)
    assert (result.value, result.recall, result.reached) == (3, 0.96, True)
    assert 0.95 + TUNING_MARGIN <= 0.96
    # A plateau short of the target ends the tuning at the best value, reported as not reached.
    flat = {1: 0.8, 2: 0.9, 3: 0.901, 4: 0.902, 6: 0.903, 8: 0.99}
    result = tune_knob(scripted(flat), truth, 0.95, 1, 8)
    assert (result.value, result.reached) == (6, False)


# ------------------------------------------------------------------------------------ kinds and budgets


def test_auto_picks_by_count_dimension_and_budget():
    budget = parse_memory("4GB")
    assert plan_index("auto", 10_000, 512, budget).kind == "exact"
    assert plan_index("auto", 100_000, 512, budget).kind == "hnsw"
    large = plan_index("auto", 1_000_000, 512, budget)
    assert large.kind == "ivfrabitq" and large.knob == "nprobe"
    assert large.estimated_bytes(1_000_000) <= 1_000_000 * 512 * 4 / 8  # ≤ 1/8 of raw float32
    assert plan_index("auto", 100_000, 512, parse_memory("100MB")).kind == "ivfrabitq"  # HNSW would not fit
    tight = plan_index("auto", 1_000_000, 512, parse_memory("120MB"))  # 3 bits do not fit, fewer do
    assert tight.estimated_bytes(1_000_000) <= 120e6 < large.estimated_bytes(1_000_000)
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        plan_index("auto", 1_000_000, 512, parse_memory("10MB"))
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index("ivf", 1_000, 512, budget)
    with pytest.raises(ValueError, match="at least"):
        plan_index("ivfpq", 100, 512, budget)


@pytest.mark.parametrize("text, expected", [("4GB", 4 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                            ("1.5g", 1_500_000_000), (" 64 kb ", 64_000), ("1024", 1024), (77, 77)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "4XB", "", "GB", "-1GB", "0", 0, 1.5, "4 G B"])
def test_parse_memory_rejects_bad_sizes(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


def test_build_respects_the_memory_budget(base):
    with pytest.raises(MemoryBudgetError):
        RetrievalIndex.build(base[0], kind="exact", memory_budget="100KB")


def test_escalation_plans_grow_and_count_what_they_store():
    budget = parse_memory("1GB")
    plain = plan_index("auto", 1_000_000, 512, budget)
    plans = escalation_plans(plain, 1_000_000, 512)
    assert [plan.factory for plan in plans] == [
        "RR512,IVF8192,RaBitQ4", "RR512,IVF8192,RaBitQ6", "RR512,IVF8192,RaBitQ8",
        "RR512,IVF8192,RaBitQ3,Refine(SQfp16)", "RR512,IVF8192,RaBitQ3,Refine(Flat)", "IDMap,Flat"]
    sizes = [plan.estimated_bytes(1_000_000) for plan in [plain, *plans[:-1]]]
    assert sizes == sorted(sizes)  # each larger than the one before; exact search comes last anyway
    # Re-ranking adds its fp16 or float32 vectors to the base's codes, ids and centroids (no id map).
    assert [plan.bytes_per_vector - plain.bytes_per_vector for plan in plans[3:5]] == [512 * 2, 512 * 4]
    assert {plan.fixed_bytes for plan in plans[:5]} == {plain.fixed_bytes}
    affordable = [plan.factory for plan in plans if plan.estimated_bytes(1_000_000) <= budget]
    assert affordable[-1] == "RR512,IVF8192,RaBitQ8"
    hnsw = plan_index("auto", 100_000, 512, budget)
    assert [plan.kind for plan in escalation_plans(hnsw, 100_000, 512)] == ["exact"]


def test_search_settings_hold_one_knob_or_a_knob_and_a_k_factor():
    assert SearchKnob.from_settings({}) is None
    assert SearchKnob.from_settings({"nprobe": 48}) == SearchKnob("nprobe", 48)  # what older manifests hold
    assert SearchKnob.from_settings({"k_factor": 4, "nprobe": 48}) == SearchKnob("nprobe", 48, 4)
    for settings in ({"efSearch": 64}, {"nprobe": 48, "k_factor": 4}):
        assert SearchKnob.from_settings(settings).settings() == settings


# ------------------------------------------------------------------------------------ auto on CLIP-like vectors


def test_clip_like_vectors_have_the_statistics_of_clip_embeddings():
    data = ClipLikeVectors(dim=64, num_clusters=1_000)
    vectors, clusters = data.sample(20_000, seed=0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    sample = vectors[:2_000]
    cosines = (sample @ sample.T)[np.triu_indices(len(sample), 1)]
    assert 0.5 <= cosines.mean() <= 0.6  # a strong shared direction
    sizes = np.bincount(clusters, minlength=1_000)
    assert sizes.max() >= 100 * np.median(sizes[sizes > 0])  # Zipf-like: sizes differ by orders of magnitude
    # The variance around the mean falls like a power law (≈ 1/i) along its principal axes.
    variances = np.linalg.eigvalsh(np.cov(vectors.T))[::-1][:32]
    slope = np.polyfit(np.log(np.arange(1, 33)), np.log(variances), 1)[0]
    assert -1.5 < slope < -0.7
    again, again_clusters = ClipLikeVectors(dim=64, num_clusters=1_000).sample(20_000, seed=0)
    assert np.array_equal(again, vectors) and np.array_equal(again_clusters, clusters)
    assert not np.array_equal(data.sample(10, seed=1)[0], vectors[:10])


def test_auto_escalates_to_larger_codes_to_reach_the_target_within_the_budget(tmp_path):
    data = ClipLikeVectors(dim=128, num_clusters=200)
    vectors, _ = data.sample(20_000, seed=0)
    budget = parse_memory("3MB")  # exact search (10.4 MB) and HNSW do not fit
    plain = plan_index("auto", 20_000, 128, budget)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = RetrievalIndex.build(vectors, kind="auto", memory_budget=budget, target_recall=0.95)
    tried = index.manifest.tuning["tried"]
    assert tried[0]["factory"] == plain.factory and tried[0]["recall_at_10"] < 0.95  # the smallest code missed
    assert all(attempt["recall_at_10"] < 0.95 for attempt in tried)
    assert index.kind == "ivfrabitq" and index.manifest.factory != plain.factory
    assert index.manifest.tuning["recall_at_10"] >= 0.95
    assert recall_against_exact(index, vectors, data.sample(200, seed=1)[0]) >= 0.95  # on fresh queries
    index.save(tmp_path / "index")
    assert index.manifest.index_bytes <= budget


def test_auto_keeps_the_small_rabitq_index_when_it_reaches_the_target():
    data = ClusteredVectors(dim=128, num_clusters=20, noise=0.6, decay=1.5)
    vectors, _ = data.sample(8_000, seed=0)
    index = RetrievalIndex.build(vectors, kind="auto", memory_budget="2MB", target_recall=0.9)
    assert index.manifest.factory == plan_index("auto", 8_000, 128, parse_memory("2MB")).factory
    assert index.manifest.factory.endswith("RaBitQ2") and list(index.manifest.search) == ["nprobe"]
    assert "tried" not in index.manifest.tuning


def test_auto_re_ranks_when_larger_codes_miss_the_target(refined_dir, base, queries):
    index = RetrievalIndex.load(refined_dir)
    assert index.manifest.factory.endswith(",Refine(SQfp16)")
    assert set(index.manifest.search) == {"nprobe", "k_factor"}
    assert index.manifest.tuning["tried"][-1]["factory"].endswith("RaBitQ8")
    assert index.manifest.tuning["recall_at_10"] >= REFINED_TARGET
    assert recall_against_exact(index, base[0], queries) >= REFINED_TARGET - TUNING_MARGIN  # 50 fresh queries
    plain = plan_index("auto", 5_000, DIM, parse_memory(REFINED_BUDGET))
    plan = next(plan for plan in escalation_plans(plain, 5_000, DIM) if plan.factory == index.manifest.factory)
    assert plan.estimated_bytes(5_000) == pytest.approx(index.manifest.index_bytes, rel=0.01)  # FAISS's headers
    assert index.manifest.index_bytes <= parse_memory(REFINED_BUDGET)


def test_auto_warns_with_the_budget_that_would_reach_the_target(base):
    # 300 KB fits 6-bit codes (recall@10 ≈ 0.986 here) but neither 8-bit ones nor re-ranking.
    with pytest.warns(UserWarning, match=r"RaBitQ6: .* below the target 0.999.* 312\.3 KB for RR32,IVF64,RaBitQ8, "
                                         r".*680\.0 KB for IDMap,Flat \(exact search, which reaches any target\)"):
        index = RetrievalIndex.build(base[0], memory_budget="300KB", target_recall=0.999)
    assert index.manifest.factory.endswith("RaBitQ6")
    assert [attempt["factory"][-7:] for attempt in index.manifest.tuning["tried"]] == [
        "RaBitQ1", "RaBitQ2", "RaBitQ3", "RaBitQ4"]


# ------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq", "ivfrabitq"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_gives_the_same_hits(tmp_path, base, queries, kind, mmap, recwarn):
    index = RetrievalIndex.build(base[0], base[1], kind=kind, model_name="tiny-clip")
    index.save(tmp_path / "index")
    loaded = RetrievalIndex.load(tmp_path / "index", mmap=mmap, expect_model="tiny-clip", expect_dim=DIM)
    assert loaded.search_vectors(queries, k=5) == index.search_vectors(queries, k=5)
    assert (loaded.kind, len(loaded), loaded.model_name) == (kind, len(index), "tiny-clip")
    assert loaded.manifest.search == index.manifest.search


def _mapped_bytes(path) -> tuple[int, int]:
    """(bytes of ``path`` mapped into this process, of which resident), from /proc/self/smaps."""
    mapped = resident = 0
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping header: address perms offset dev inode [path]
                current = fields[5] if len(fields) > 5 else None
            elif current == str(path) and fields[0] in ("Size:", "Rss:"):
                value = int(fields[1]) * 1024
                mapped, resident = (mapped + value, resident) if fields[0] == "Size:" else (mapped, resident + value)
    return mapped, resident


@pytest.mark.parametrize("kind", ["exact", "ivfrabitq"])
def test_mmap_loading_maps_the_index_file_instead_of_reading_it(tmp_path, kind, recwarn):
    vectors, _ = ClusteredVectors(dim=128, num_clusters=20).sample(8_000, seed=0)
    RetrievalIndex.build(vectors, kind=kind).save(tmp_path / "index")
    index_file = (tmp_path / "index" / "index.faiss").resolve()
    read = RetrievalIndex.load(tmp_path / "index")
    assert _mapped_bytes(index_file) == (0, 0)
    mapped = RetrievalIndex.load(tmp_path / "index", mmap=True)
    size, resident = _mapped_bytes(index_file)
    assert size > index_file.stat().st_size / 2  # the vectors or codes are mapped from the file ...
    assert resident < size / 4  # ... and not read when loading
    assert mapped.search_vectors(vectors[:3], k=5) == read.search_vectors(vectors[:3], k=5)


@pytest.mark.parametrize("mmap", [False, True])
def test_refined_index_saves_and_loads_with_its_knobs(refined_dir, queries, mmap):
    read = RetrievalIndex.load(refined_dir)
    loaded = RetrievalIndex.load(refined_dir, mmap=mmap, expect_model="tiny-clip", expect_dim=DIM)
    assert loaded.search_vectors(queries, k=5) == read.search_vectors(queries, k=5)
    assert loaded.manifest.search == read.manifest.search and loaded._knob.k_factor >= 2
    assert (loaded.kind, len(loaded), loaded.read_only) == (REFINED, 5_000, mmap)


def test_mmap_flags_of_a_re_ranked_index_map_its_lists_and_vectors(tmp_path):
    vectors, _ = ClipLikeVectors(dim=64, num_clusters=100).sample(20_000, seed=0)
    index = faiss.index_factory(64, "RR64,IVF64,RaBitQ1,Refine(SQfp16)", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:2_560])
    index.add(vectors)
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    mapped = faiss.read_index(str(path), mmap_flags(REFINED))
    size, resident = _mapped_bytes(path.resolve())
    assert size > path.stat().st_size / 2  # the IVF lists and the re-ranking vectors are mapped ...
    assert resident < size / 4  # ... and not read when loading
    np.testing.assert_array_equal(mapped.search(vectors[:3], 5)[1], index.search(vectors[:3], 5)[1])


def test_save_replaces_an_older_index_but_not_other_folders(tmp_path, base):
    index = RetrievalIndex.build(base[0][:100], base[1][:100], kind="exact")
    index.save(tmp_path / "index")
    index.add(base[0][100:110], base[1][100:110])
    index.save(tmp_path / "index")
    assert len(RetrievalIndex.load(tmp_path / "index")) == 110
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folders left
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(FileExistsError, match="refusing"):
        index.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_load_errors(tmp_path, base):
    index = RetrievalIndex.build(base[0][:200], base[1][:200], kind="exact", model_name="tiny-clip")
    index.save(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="model 'tiny-clip', expected 'other'"):
        RetrievalIndex.load(tmp_path / "index", expect_model="other")
    with pytest.raises(IndexFormatError, match="32-d vectors, expected 512-d"):
        RetrievalIndex.load(tmp_path / "index", expect_dim=512)
    with pytest.raises(FileNotFoundError):
        RetrievalIndex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        RetrievalIndex.load(tmp_path / "empty")

    index_file = tmp_path / "index" / "index.faiss"
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="truncated"):
        RetrievalIndex.load(tmp_path / "index")


def test_damaged_index_file_of_the_right_size_fails_clearly(tmp_path, base):
    RetrievalIndex.build(base[0][:200], kind="exact").save(tmp_path / "index")
    index_file = tmp_path / "index" / "index.faiss"
    index_file.write_bytes(b"\0" * index_file.stat().st_size)
    with pytest.raises(IndexFormatError, match="its checksum differs"):
        RetrievalIndex.load(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="cannot be read by FAISS"):
        RetrievalIndex.load(tmp_path / "index", verify=False)


# ------------------------------------------------------------------------------------ changes


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfrabitq"])
def test_add_then_search_finds_the_new_vectors(base, kind, recwarn):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors[:4_000], metadata[:4_000], kind=kind)
    new = DATA.sample(20, seed=7)[0]
    ids = index.add(new, [{"caption": f"new {i}"} for i in range(20)])
    assert ids.tolist() == list(range(4_000, 4_020))
    assert len(index) == 4_020
    for new_id, hits in zip(ids, index.search_vectors(new, k=10)):
        # Compressed codes (1 bit per dimension here) may rank a near neighbour above the vector itself.
        found = {hit.id: hit.metadata for hit in (hits if kind == "ivfrabitq" else hits[:1])}
        assert found[new_id] == {"caption": f"new {new_id - 4_000}"}


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_remove_by_id(tmp_path, base, queries, kind, recwarn):
    vectors, metadata = base
    check_remove_by_id(RetrievalIndex.build(vectors, metadata, kind=kind), tmp_path, queries, vectors)


def test_refined_index_adds_and_removes(tmp_path, refined_dir, base, queries):
    vectors = base[0]
    index = RetrievalIndex.load(refined_dir)
    check_remove_by_id(index, tmp_path, queries, vectors)  # IndexRefine cannot remove: kept as deleted ids
    # New vectors go on at the next id, which is also their position in the re-ranking store.
    new = DATA.sample(20, seed=7)[0]
    ids = index.add(new, [{"caption": f"new {i}"} for i in range(20)])
    assert ids.tolist() == list(range(5_002, 5_022))
    for new_id, hits in zip(ids, index.search_vectors(new, k=1)):
        assert (hits[0].id, hits[0].metadata) == (new_id, {"caption": f"new {new_id - 5_002}"})
    index.save(tmp_path / "again")
    assert RetrievalIndex.load(tmp_path / "again", mmap=True).search_vectors(new, k=1)[0][0].id == 5_002


def check_remove_by_id(index: RetrievalIndex, tmp_path: Path, queries: np.ndarray, vectors: np.ndarray) -> None:
    """Remove the top hits of ``queries`` from ``index`` (of the 5000 ``vectors``): gone from every search,
    also after saving, and their ids are never given again."""
    before = index.search_vectors(queries[:10], k=5)
    gone = sorted({hits[0].id for hits in before})
    assert index.remove(gone) == len(gone)
    assert len(index) == 5_000 - len(gone)
    after = index.search_vectors(queries[:10], k=5)
    assert all(len(hits) == 5 and not {hit.id for hit in hits} & set(gone) for hits in after)
    with pytest.raises(KeyError, match=str(gone[0])):
        index.remove([gone[0]])
    index.save(tmp_path / "index")  # removals persist (HNSW and re-ranked indexes keep them as deleted ids)
    assert RetrievalIndex.load(tmp_path / "index").search_vectors(queries[:10], k=5) == after
    new_ids = index.add(vectors[:2])
    assert new_ids.tolist() == [5_000, 5_001]  # ids are never reused


def test_mmap_loaded_index_is_read_only(tmp_path, base):
    RetrievalIndex.build(base[0][:100], kind="exact").save(tmp_path / "index")
    index = RetrievalIndex.load(tmp_path / "index", mmap=True)
    with pytest.raises(PermissionError, match="read-only"):
        index.add(base[0][:1])
    with pytest.raises(PermissionError, match="read-only"):
        index.remove([0])


def test_changing_a_loaded_index_leaves_its_directory_alone_until_saved(tmp_path, base):
    RetrievalIndex.build(base[0][:100], base[1][:100], kind="exact").save(tmp_path / "index")
    index = RetrievalIndex.load(tmp_path / "index")
    index.remove([0, 1])
    index.add(base[0][:3], [{}, {}, {}])
    assert len(RetrievalIndex.load(tmp_path / "index")) == 100
    index.save(tmp_path / "index")
    assert len(RetrievalIndex.load(tmp_path / "index")) == 101


# ------------------------------------------------------------------------------------ search by an item


def _cosines(found: np.ndarray, original: np.ndarray) -> np.ndarray:
    return (found * original).sum(1) / np.linalg.norm(found, axis=1) / np.linalg.norm(original, axis=1)


@pytest.mark.parametrize("kind, least_cosine", [("exact", 0.99999), ("hnsw", 0.99999), ("ivfrabitq", 0.85),
                                                (REFINED, 0.9999)])
def test_an_item_s_vector_comes_back_from_a_memory_mapped_index(tmp_path, base, refined_dir, kind, least_cosine,
                                                                recwarn):
    vectors, metadata = base
    if kind == REFINED:
        directory = refined_dir
    else:
        directory = tmp_path / "index"
        RetrievalIndex.build(vectors, metadata, kind=kind).save(directory)
    index = RetrievalIndex.load(directory, mmap=True)
    ids = [4_321, 0, 17]
    found = index.stored_vectors(ids)
    assert found.shape == (3, DIM) and found.dtype == np.float32
    # Full vectors come back as they went in; RaBitQ's 1-bit codes decode to an approximation.
    assert _cosines(found, vectors[ids]).min() >= least_cosine
    if kind != "ivfrabitq":
        np.testing.assert_allclose(found, vectors[ids], atol=2e-3)
    hits = index.search_item(4_321, k=5)
    assert hits[0].id == 4_321 and hits[0].metadata == index.store.get([4_321])[4_321]
    assert hits == index.search_vectors(found[0], k=5)[0]
    with pytest.raises(KeyError, match="no item with id 5000"):
        index.stored_vectors([5_000])


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfrabitq"])
def test_a_removed_item_has_no_vector_and_the_others_keep_theirs(base, kind, recwarn):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors, metadata, kind=kind)
    before = index.stored_vectors([9, 10])
    index.remove([9])  # exact and IVF lists drop it, HNSW keeps it as a deleted id
    with pytest.raises(KeyError, match="no item with id 9"):
        index.stored_vectors([9])
    np.testing.assert_array_equal(index.stored_vectors([10])[0], before[1])
    new_id = index.add(vectors[9:10])[0]
    if kind != "ivfrabitq":
        np.testing.assert_array_equal(index.stored_vectors([new_id])[0], vectors[9])


def test_an_ivfpq_index_refuses_to_give_back_vectors(base, recwarn):
    index = RetrievalIndex.build(base[0], kind="ivfpq")
    with pytest.raises(VectorsNotStored, match="rebuild it with another kind"):
        index.search_item(0)


# ------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq", "ivfrabitq"])
def test_filtered_search_returns_k_matching_hits(base, queries, kind, recwarn):
    vectors, metadata = base
    check_filtered_search(RetrievalIndex.build(vectors, rare(metadata), kind=kind), metadata, queries)


@pytest.mark.parametrize("mmap", [False, True])
def test_refined_index_filters_its_candidates(refined_dir, base, queries, mmap):
    check_filtered_search(RetrievalIndex.load(refined_dir, mmap=mmap), base[1], queries)


def check_filtered_search(index: RetrievalIndex, metadata: list[dict], queries: np.ndarray) -> None:
    """Searches of ``index`` (of ``rare(metadata)``) for rare tags and for one cluster's even ids get k
    matching hits, or all there are."""
    for hits in index.search_vectors(queries[:5], k=10, where={"tag": "rare"}):
        assert len(hits) == 10 and all(hit.metadata["tag"] == "rare" for hit in hits)
    for hits in index.search_vectors(queries[:5], k=20, where={"tag": "rare"}):
        assert len(hits) == 13  # all there are
    cluster = metadata[0]["cluster"]
    for hits in index.search_vectors(queries[:5], k=10, where={"cluster": cluster, "even": True}):
        assert len(hits) == 10
        assert all(hit.metadata["cluster"] == cluster and hit.metadata["even"] for hit in hits)
    assert index.search_vectors(queries[:2], k=10, where={"tag": "absent"}) == [[], []]


def test_filtered_exact_search_is_brute_force_over_the_matches(base, queries):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors, metadata, kind="exact")
    allowed = np.array([i for i, record in enumerate(metadata) if record["cluster"] == 5])
    expected = allowed[np.argsort(-(queries[:3] @ vectors[allowed].T), axis=1)[:, :10]]
    found = [[hit.id for hit in hits] for hits in index.search_vectors(queries[:3], k=10, where={"cluster": 5})]
    assert found == expected.tolist()


def test_filter_errors(base):
    index = RetrievalIndex.build(base[0][:100], base[1][:100], kind="exact")
    for where in ({}, {"": 1}, {'a"b': 1}, {"cluster": [1, 2]}, {"cluster": float("nan")}):
        with pytest.raises(ValueError):
            index.search_vectors(base[0][:1], where=where)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs(base):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors[:100], metadata[:100], kind="exact")
    with pytest.raises(ValueError, match="dimension 16, the index holds 32-d"):
        index.search_vectors(np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match="dimension 16"):
        index.add(np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search_vectors(vectors[:1], k=0)
    with pytest.raises(ValueError, match="2-D"):
        RetrievalIndex.build(vectors[None, :10])
    with pytest.raises(ValueError, match="NaN"):
        RetrievalIndex.build(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(MetadataError, match="100 vectors but 99"):
        RetrievalIndex.build(vectors[:100], metadata[:99])
    with pytest.raises(MetadataError, match="more metadata"):
        RetrievalIndex.build(vectors[:100], iter(metadata[:101]))
    with pytest.raises(MetadataError, match=r"metadata\[1\] must be a dict"):
        RetrievalIndex.build(vectors[:2], [{}, "caption"])
    with pytest.raises(MetadataError, match=r"metadata\[0\] cannot be stored"):
        RetrievalIndex.build(vectors[:1], [{"path": object()}])
    with pytest.raises(ValueError, match="target_recall"):
        RetrievalIndex.build(vectors[:100], target_recall=1.5)
    with pytest.raises(MetadataError):
        index.add(vectors[:2], [{}])
    assert len(index) == 100  # a failed add changes nothing


# ------------------------------------------------------------------------------------ model queries


class FakeModel:
    """The encoder interface: text → a vector chosen by the text, file bytes → a vector chosen by the bytes."""

    name = "fake"

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.keys = list(table)

    def parameters(self):
        return iter([torch.zeros(1)])

    def tokenize(self, texts):
        return torch.tensor([[self.keys.index(text)] for text in texts])

    def eval_decoder(self, modality):
        return FieldDecoder(modality, ("bin",), lambda data, rng: torch.tensor([self.keys.index(data.decode())]))

    def encode(self, modality, inputs):
        assert inputs.shape[0] >= 1
        return torch.from_numpy(np.stack([self.table[self.keys[int(row[0])]] for row in inputs]))


def test_search_text_image_and_audio_with_a_model(tmp_path, base):
    vectors, metadata = base
    index = RetrievalIndex.build(vectors[:500], metadata[:500], kind="exact")
    model = FakeModel({"a red circle": vectors[42], "a blue square": vectors[7], "meow": vectors[99]})
    assert index.search_text("a red circle", model, k=3)[0].id == 42
    assert [hits[0].id for hits in index.search_text(["a blue square", "a red circle"], model, k=1)] == [7, 42]
    (tmp_path / "query.bin").write_bytes(b"meow")
    assert index.search_file(tmp_path / "query.bin", model, "image", k=1)[0].id == 99
    assert index.search_file(str(tmp_path / "query.bin"), model, "image", k=1)[0].id == 99
    assert index.search_file(b"a blue square", model, "audio", k=1)[0].id == 7
    cluster = metadata[7]["cluster"]
    hits = index.search_text("a red circle", model, k=3, where={"cluster": cluster})
    assert len(hits) == 3 and all(hit.metadata["cluster"] == cluster for hit in hits)
    with pytest.raises(FileNotFoundError):
        index.search_file(tmp_path / "missing.jpg", model, "image")


def test_search_text_with_a_real_tiny_model(tiny_config):
    from clipkit.model import create_model

    torch.manual_seed(0)
    model = create_model(tiny_config.model).eval()
    captions = ["a red circle", "a blue square", "a green triangle", "a small yellow star"]
    with torch.no_grad():
        embeddings = model.encode("text", model.tokenize(captions))
    index = RetrievalIndex.build(embeddings, [{"caption": c} for c in captions], kind="exact")
    hits = index.search_text("a green triangle", model, k=2)
    assert hits[0].metadata == {"caption": "a green triangle"}
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_decoder_gets_bytes_and_a_seeded_rng(base):
    seen = []
    model = FakeModel({"x": base[0][3]})
    decode = model.eval_decoder("image").decode
    model.eval_decoder = lambda modality: FieldDecoder(
        modality, ("bin",), lambda data, rng: seen.append((data, isinstance(rng, random.Random))) or decode(data, rng))
    index = RetrievalIndex.build(base[0][:10], kind="exact")
    assert index.search_file(b"x", model, "image", k=1)[0].id == 3
    assert seen == [(b"x", True)]
