"""The SQLite metadata store and the embeddings directory reader/writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import (
    EmbeddingsFormatError, MetadataError, RetrievalIndex, read_embeddings_dir, write_embedding_shard, write_manifest,
)
from retrieval.store import MetadataStore
from retrieval.synthetic import ClusteredVectors


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ------------------------------------------------------------------------------------ store


def test_store_round_trip_and_filters(tmp_path):
    store = MetadataStore.temporary()
    records = [{"caption": "ein Hund 🐕", "label": 3, "nested": {"a": [1, 2]}, "flag": True},
               {"caption": "a cat", "label": np.int64(4), "flag": False},
               {"caption": "a cat", "label": 3.5}]
    store.insert(10, records, expected=3)
    assert len(store) == 3
    assert store.get([11, 10, 99]) == {10: records[0], 11: {"caption": "a cat", "label": 4, "flag": False}}
    assert store.matching({"caption": "a cat"}).tolist() == [11, 12]
    assert store.matching({"label": 3}).tolist() == [10]
    assert store.matching({"label": 3.5}).tolist() == [12]
    assert store.matching({"flag": True}).tolist() == [10]
    assert store.matching({"flag": False, "caption": "a cat"}).tolist() == [11]
    assert store.matching({"missing": "x"}).tolist() == []
    assert store.missing(np.array([10, 13])).tolist() == [13]

    store.save(tmp_path / "meta.sqlite")
    reopened = MetadataStore.open(tmp_path / "meta.sqlite")
    assert reopened.get([10, 11, 12]) == store.get([10, 11, 12])


def test_store_insert_is_all_or_nothing():
    store = MetadataStore.temporary()
    with pytest.raises(MetadataError, match="2 vectors but 1"):
        store.insert(0, [{}], expected=2)
    with pytest.raises(MetadataError, match="more metadata"):
        store.insert(0, [{}, {}, {}], expected=2)
    with pytest.raises(MetadataError, match=r"metadata\[1\] cannot be stored as JSON"):
        store.insert(0, [{"a": 1}, {"a": float("nan")}], expected=2)
    assert len(store) == 0
    store.insert(0, [{}], expected=1)
    with pytest.raises(MetadataError, match="already taken"):
        store.insert(0, [{}], expected=1)


def test_opened_store_copies_itself_before_the_first_change(tmp_path):
    store = MetadataStore.temporary()
    store.insert(0, [{"i": i} for i in range(5)], expected=5)
    store.save(tmp_path / "meta.sqlite")
    before = (tmp_path / "meta.sqlite").read_bytes()
    opened = MetadataStore.open(tmp_path / "meta.sqlite")
    opened.delete(np.array([1, 2]), keep_as_deleted=True)
    opened.insert(5, [{"i": 5}], expected=1)
    assert (tmp_path / "meta.sqlite").read_bytes() == before
    assert sorted(opened.get(range(6))) == [0, 3, 4, 5]
    assert opened.deleted_ids().tolist() == [1, 2]


def test_open_rejects_other_files(tmp_path):
    (tmp_path / "notes.sqlite").write_text("not a database at all, just some text " * 20)
    with pytest.raises(MetadataError, match="not a retrieval metadata store"):
        MetadataStore.open(tmp_path / "notes.sqlite")
    with pytest.raises(FileNotFoundError):
        MetadataStore.open(tmp_path / "absent.sqlite")


# ------------------------------------------------------------------------------------ embeddings directory


def write_embeddings(directory, sizes=(300, 200, 250), dim=16):
    vectors, clusters = ClusteredVectors(dim=dim, num_clusters=10).sample(sum(sizes), seed=0)
    stems, start = [], 0
    for number, size in enumerate(sizes):
        stem = f"shard-{number:05d}"
        rows = slice(start, start + size)
        metadata = [{"key": f"{i:06d}", "cluster": int(clusters[i]), "source": f"{stem}.tar"}
                    for i in range(rows.start, rows.stop)]
        write_embedding_shard(directory, stem, vectors[rows], metadata)
        stems.append(stem)
        start += size
    write_manifest(directory, "open_clip:ViT-B-32", "image", dim, stems)
    return vectors, clusters


def test_embeddings_directory_round_trip(tmp_path):
    vectors, clusters = write_embeddings(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["manifest.json", "shard-00000.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    source, metadata, manifest = read_embeddings_dir(tmp_path)
    assert (manifest.model, manifest.modality, manifest.dim) == ("open_clip:ViT-B-32", "image", 16)
    assert source.shape == (750, 16)
    np.testing.assert_array_equal(np.concatenate(list(source.chunks(128))), vectors)
    rows = np.array([0, 299, 300, 499, 500, 749])
    np.testing.assert_array_equal(source.take(rows), vectors[rows])
    records = list(metadata)
    assert [r["key"] for r in records] == [f"{i:06d}" for i in range(750)]


def test_index_built_from_an_embeddings_directory(tmp_path):
    vectors, clusters = write_embeddings(tmp_path / "emb")
    index = RetrievalIndex.build_from_embeddings(tmp_path / "emb", kind="exact")
    assert index.model_name == "open_clip:ViT-B-32"
    direct = RetrievalIndex.build(vectors, kind="exact")
    assert [[h.id for h in hits] for hits in index.search_vectors(vectors[:5], k=5)] == \
        [[h.id for h in hits] for hits in direct.search_vectors(vectors[:5], k=5)]
    hit = index.search_vectors(vectors[420], k=1)[0][0]
    assert hit.id == 420 and hit.metadata == {"key": "000420", "cluster": int(clusters[420]),
                                              "source": "shard-00001.tar"}


def test_embeddings_directory_errors(tmp_path):
    write_embeddings(tmp_path)
    (tmp_path / "shard-00001.jsonl").write_text("{}\n" * 199)
    with pytest.raises(EmbeddingsFormatError, match="shard 'shard-00001': 200 vectors but 199 metadata lines"):
        read_embeddings_dir(tmp_path)
    (tmp_path / "shard-00001.jsonl").unlink()
    with pytest.raises(EmbeddingsFormatError, match="no shard-00001.jsonl"):
        read_embeddings_dir(tmp_path)
    (tmp_path / "shard-00001.npy").unlink()
    (tmp_path / "shard-00002.npy").unlink()
    write_manifest(tmp_path, "m", "image", 16, ["shard-00000", "shard-00002"])
    with pytest.raises(EmbeddingsFormatError, match="no shard-00002.npy"):
        read_embeddings_dir(tmp_path)
    write_manifest(tmp_path, "m", "image", 32, ["shard-00000"])
    with pytest.raises(EmbeddingsFormatError, match=r"the manifest says float \(N, 32\)"):
        read_embeddings_dir(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "m", "modality": "image", "dim": "16", "shards": []}))
    with pytest.raises(EmbeddingsFormatError, match="'dim' must be a int"):
        read_embeddings_dir(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(EmbeddingsFormatError, match="no manifest.json"):
        read_embeddings_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_embeddings_dir(tmp_path / "absent")


def test_vectors_not_in_the_manifest_or_not_as_counted_are_refused(tmp_path):
    write_embeddings(tmp_path, sizes=(300, 200))
    write_manifest(tmp_path, "m", "image", 16, ["shard-00000"], counts=[300])
    with pytest.raises(EmbeddingsFormatError, match=r"vectors that its manifest does not list \(shard-00001\)"):
        read_embeddings_dir(tmp_path)
    write_manifest(tmp_path, "m", "image", 16, ["shard-00000", "shard-00001"], counts=[300, 250])
    with pytest.raises(EmbeddingsFormatError, match="holds 200 vectors, but the manifest recorded 250"):
        read_embeddings_dir(tmp_path)
    with pytest.raises(EmbeddingsFormatError, match="lists a shard twice"):
        write_manifest(tmp_path, "m", "image", 16, ["shard-00000", "shard-00000"])
        read_embeddings_dir(tmp_path)


def test_bad_metadata_line_is_reported_with_its_place(tmp_path):
    write_embeddings(tmp_path, sizes=(3,))
    (tmp_path / "shard-00000.jsonl").write_text('{"a": 1}\n[1, 2]\n{"a": 3}\n')
    _, metadata, _ = read_embeddings_dir(tmp_path)
    with pytest.raises(EmbeddingsFormatError, match=r"shard-00000.jsonl:2: metadata must be a JSON object"):
        list(metadata)


def test_non_finite_vectors_in_a_shard_are_rejected(tmp_path):
    write_embeddings(tmp_path, sizes=(40,))
    broken = np.load(tmp_path / "shard-00000.npy")
    broken[17, 3] = np.nan
    np.save(tmp_path / "shard-00000.npy", broken)
    with pytest.raises(ValueError, match="shard-00000: row 17 holds a NaN"):
        RetrievalIndex.build_from_embeddings(tmp_path, kind="exact")


def test_shard_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 vectors but 1"):
        write_embedding_shard(tmp_path, "s", np.zeros((2, 4), np.float32), [{}])
    with pytest.raises(ValueError, match="plain file name"):
        write_embedding_shard(tmp_path, "../s", np.zeros((1, 4), np.float32), [{}])
    with pytest.raises(MetadataError):
        write_embedding_shard(tmp_path, "s", np.zeros((1, 4), np.float32), ["caption"])
    assert not list(tmp_path.iterdir())
