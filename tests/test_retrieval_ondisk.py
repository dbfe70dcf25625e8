"""IVF lists on disk: built in chunks and merged by FAISS, saved, mapped back, equal to the same
index built in memory; real FAISS indexes, real files."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from clipkit.cli import main
from retrieval import IndexFormatError, RetrievalIndex, write_embedding_shard, write_manifest
from retrieval.kinds import MemoryBudgetError
from retrieval.ondisk import LISTS_FILE, lists_file
from retrieval.synthetic import ClusteredVectors

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def data():
    vectors, _ = ClusteredVectors(dim=32, num_clusters=40).sample(12_000, seed=0)
    queries, _ = ClusteredVectors(dim=32, num_clusters=40).sample(50, seed=1)
    return vectors, queries


def ids(index: RetrievalIndex, queries: np.ndarray) -> np.ndarray:
    return index.search_ids(queries, k=10)[1]


def test_lists_on_disk_equal_the_same_index_in_memory(data, tmp_path, monkeypatch):
    vectors, queries = data
    monkeypatch.setattr("retrieval.ondisk.CHUNK_VECTORS", 5_000)  # three chunks merged
    in_memory = RetrievalIndex.build(vectors, kind="ivfrabitq", bits=6)
    on_disk = RetrievalIndex.build(vectors, kind="ivfrabitq", bits=6, lists_dir=tmp_path / "lists")
    assert lists_file(in_memory.index) is None and lists_file(on_disk.index) == tmp_path / "lists" / LISTS_FILE
    assert on_disk.manifest.factory == in_memory.manifest.factory
    assert on_disk.manifest.search == in_memory.manifest.search  # tuned alike, queries kept out by a selector
    np.testing.assert_array_equal(ids(on_disk, queries), ids(in_memory, queries))
    with pytest.raises(PermissionError, match="IVF lists on disk"):
        on_disk.add(vectors[:1])

    on_disk.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "index.faiss", LISTS_FILE, "manifest.json", "metadata.sqlite"]
    assert not (tmp_path / "lists" / LISTS_FILE).exists()  # moved, not copied
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["lists_bytes"] == (tmp_path / "index" / LISTS_FILE).stat().st_size
    assert LISTS_FILE in manifest["checksums"]
    np.testing.assert_array_equal(ids(on_disk, queries), ids(in_memory, queries))  # mapped from the saved file

    # The folder moved elsewhere still finds its lists; loading maps them, read-only.
    shutil.move(tmp_path / "index", tmp_path / "moved")
    loaded = RetrievalIndex.load(tmp_path / "moved")
    assert loaded.read_only and lists_file(loaded.index) == tmp_path / "moved" / LISTS_FILE
    np.testing.assert_array_equal(ids(loaded, queries), ids(in_memory, queries))
    assert len(loaded) == len(vectors)
    loaded.save(tmp_path / "copy")  # a loaded index saves a copy of its lists
    np.testing.assert_array_equal(ids(RetrievalIndex.load(tmp_path / "copy", mmap=True), queries),
                                  ids(in_memory, queries))


def test_a_damaged_lists_file_is_caught(data, tmp_path):
    vectors, _ = data
    RetrievalIndex.build(vectors, kind="ivfrabitq", bits=6, lists_dir=tmp_path / "lists").save(tmp_path / "index")
    lists = tmp_path / "index" / LISTS_FILE
    content = bytearray(lists.read_bytes())
    content[len(content) // 2] ^= 0xFF
    lists.write_bytes(content)
    with pytest.raises(IndexFormatError, match="index.ivfdata is not the file"):
        RetrievalIndex.load(tmp_path / "index")
    lists.write_bytes(content[:-10])
    with pytest.raises(IndexFormatError, match="truncated or replaced"):
        RetrievalIndex.load(tmp_path / "index")


def test_lists_on_disk_need_an_ivf_kind(data, tmp_path):
    with pytest.raises(ValueError, match="need an IVF kind"):
        RetrievalIndex.build(data[0][:2000], kind="hnsw", lists_dir=tmp_path)


def test_index_build_on_disk_from_the_command_line(data, tmp_path, capsys):
    vectors, queries = data
    emb = tmp_path / "emb"
    emb.mkdir()
    write_embedding_shard(emb, "part", vectors, [{"n": i} for i in range(len(vectors))])
    write_manifest(emb, "synthetic", "image", vectors.shape[1], ["part"], counts=[len(vectors)])
    assert main(["index", "build", str(emb), str(tmp_path / "idx"), "--on-disk", "--bits", "6"]) == 0
    out = capsys.readouterr().out
    assert "as ivfrabitq" in out and "lists on disk" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "idx"]  # no scratch folder left
    np.save(tmp_path / "q.npy", queries[0])
    assert main(["search", str(tmp_path / "idx"), "--vector-file", str(tmp_path / "q.npy"), "--k", "3",
                 "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and "n" in result["hits"][0]["metadata"]


def test_the_list_count_can_be_set_for_ivf_kinds(data, tmp_path):
    vectors, queries = data
    # 32-d vectors get 1-bit codes (an eighth of their raw size), which miss the target at any nprobe.
    with pytest.warns(UserWarning, match="below the target"):
        index = RetrievalIndex.build(vectors, kind="ivfrabitq", nlist=16, lists_dir=tmp_path / "lists")
    assert ",IVF16," in index.manifest.factory and faiss.extract_index_ivf(index.index).nlist == 16
    assert 1 <= index.manifest.search["nprobe"] <= 16 and ids(index, queries).shape == (50, 10)
    with pytest.raises(ValueError, match="not auto"):
        RetrievalIndex.build(vectors, nlist=16)
    with pytest.raises(ValueError, match="IVF kinds, not 'exact'"):
        RetrievalIndex.build(vectors[:5000], kind="exact", nlist=16)


def test_bits_pin_an_ivfrabitq_index_and_are_checked(data, tmp_path):
    vectors, _ = data
    index = RetrievalIndex.build(vectors, kind="ivfrabitq", bits=6, nlist=32)
    assert index.manifest.factory == "RR32,IVF32,RaBitQ6"
    for kind, bits in (("ivfrabitq", 5), ("ivfpq", 4)):
        with pytest.raises(ValueError, match="bits applies to kind='ivfrabitq'"):
            RetrievalIndex.build(vectors, kind=kind, bits=bits)
    with pytest.raises(MemoryBudgetError, match="over the memory budget"):
        RetrievalIndex.build(vectors, kind="ivfrabitq", bits=8, memory_budget="100KB")


def test_the_service_answers_from_lists_on_disk(data, tmp_path):
    from retrieval import Client
    from retrieval.served import IndexSource, ServedIndex
    from retrieval.service import create_app
    from tests.test_serve import running

    vectors, queries = data
    metadata = [{"n": i} for i in range(len(vectors))]
    RetrievalIndex.build(vectors, metadata, kind="ivfrabitq", bits=6, lists_dir=tmp_path / "lists").save(
        tmp_path / "index")
    library = RetrievalIndex.load(tmp_path / "index")
    sources = {"big": IndexSource(lambda _: ServedIndex(RetrievalIndex.load(tmp_path / "index", mmap=True), None),
                                  tmp_path / "index")}
    with running(create_app(sources)) as url, Client(url) as client:
        for query in queries[:5]:
            served = client.search(vector=query.tolist(), k=5)
            expected = library.search_vectors(query[None], k=5)[0]
            assert [(h.id, h.metadata) for h in served] == [(h.id, h.metadata) for h in expected]
