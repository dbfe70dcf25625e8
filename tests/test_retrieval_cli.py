"""`index build` and `search` through an argparse parser that registers them with add_index_commands."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from clipkit.modalities import FieldDecoder
from retrieval import IndexFormatError, write_embedding_shard, write_manifest
from retrieval.cli import add_index_commands, parse_filters
from retrieval.synthetic import ClusteredVectors

MODEL = "open_clip:Tiny-Test"


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def run(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="clipkit")
    add_index_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


@pytest.fixture
def built(tmp_path, capsys):
    vectors, clusters = ClusteredVectors(dim=16, num_clusters=8).sample(1_500, seed=0)
    for number in range(3):
        rows = slice(500 * number, 500 * (number + 1))
        metadata = [{"caption": f"item {i}", "cluster": int(clusters[i]), "source": f"shard-{number}.tar"}
                    for i in range(rows.start, rows.stop)]
        write_embedding_shard(tmp_path / "emb", f"shard-{number}", vectors[rows], metadata)
    write_manifest(tmp_path / "emb", MODEL, "image", 16, [f"shard-{n}" for n in range(3)],
                   model_fingerprint=FakeEncoder.FINGERPRINT, model_spec={"model": MODEL, "pretrained": None})
    run("index", "build", str(tmp_path / "emb"), str(tmp_path / "index"), "--kind", "hnsw", "--target-recall", "0.9")
    return tmp_path, vectors, capsys.readouterr().out


def test_index_build_prints_what_it_built(built):
    tmp_path, _, out = built
    assert "indexed 1,500 × 16 vectors of model 'open_clip:Tiny-Test' as hnsw (IDMap,HNSW32); efSearch=" in out
    assert "(target 0.9)" in out and f"saved to {tmp_path / 'index'}" in out
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert (manifest["count"], manifest["dim"], manifest["model"], manifest["kind"]) == (1500, 16, MODEL, "hnsw")


def test_search_by_vector_file_with_filter_as_json(built, capsys):
    tmp_path, vectors, _ = built
    np.save(tmp_path / "q.npy", vectors[[7, 1203]])
    run("search", str(tmp_path / "index"), "--vector-file", str(tmp_path / "q.npy"), "--k", "3", "--json")
    results = json.loads(capsys.readouterr().out)
    assert [r["hits"][0]["id"] for r in results] == [7, 1203]
    first = results[0]["hits"][0]["metadata"]
    assert (first["caption"], first["source"]) == ("item 7", "shard-0.tar")
    np.save(tmp_path / "one.npy", vectors[7])
    run("search", str(tmp_path / "index"), "--vector-file", str(tmp_path / "one.npy"), "--k", "4",
        "--filter", "source=shard-2.tar", "--json")
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 4 and all(h["metadata"]["source"] == "shard-2.tar" for h in result["hits"])


def test_search_prints_ranked_hits(built, capsys):
    tmp_path, vectors, _ = built
    np.save(tmp_path / "q.npy", vectors[42])
    run("search", str(tmp_path / "index"), "--vector-file", str(tmp_path / "q.npy"), "--k", "2")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"vector 0 of {tmp_path / 'q.npy'}: 2 hits"
    assert lines[1].startswith("    1. 1.0000  id 42  {\"caption\": \"item 42\"")


class FakeEncoder:
    """Text and file queries map to stored vectors, so the expected hit is known."""

    FINGERPRINT = "fake-weights"

    def __init__(self, vectors: np.ndarray, fingerprint: str = FINGERPRINT) -> None:
        self.vectors = vectors
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def parameters(self):
        return iter([torch.zeros(1)])

    def tokenize(self, texts):
        return torch.tensor([[int(text.split()[-1])] for text in texts])

    def eval_decoder(self, modality):
        return FieldDecoder(modality, ("bin",), lambda data, rng: torch.tensor([int(data)]))

    def encode(self, modality, inputs):
        return torch.from_numpy(self.vectors[inputs[:, 0].numpy()])


def test_search_text_and_image_load_the_model_the_index_names(built, capsys, monkeypatch):
    tmp_path, vectors, _ = built
    loaded = []

    def load_encoder(model, pretrained=None, device="cpu"):
        loaded.append((model, pretrained, device))
        return FakeEncoder(vectors)

    monkeypatch.setattr("clipkit.eval.encoders.load_encoder", load_encoder)
    run("search", str(tmp_path / "index"), "a photo of item 99", "--k", "1", "--json")
    assert json.loads(capsys.readouterr().out)[0]["hits"][0]["id"] == 99
    (tmp_path / "query.bin").write_bytes(b"1234")
    run("search", str(tmp_path / "index"), "--file", str(tmp_path / "query.bin"), "--modality", "image", "--model", MODEL,
        "--pretrained", "weights.pt", "--k", "1", "--json")
    assert json.loads(capsys.readouterr().out)[0]["hits"][0]["id"] == 1234
    assert loaded == [(MODEL, None, "cpu"), (MODEL, "weights.pt", "cpu")]


def test_search_more_like_an_item_needs_no_model(built, capsys):
    tmp_path, vectors, _ = built
    run("search", str(tmp_path / "index"), "--item", "42", "--k", "3", "--filter", "source=shard-0.tar", "--json")
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == "item 42" and result["hits"][0]["id"] == 42 and len(result["hits"]) == 3
    assert all(hit["metadata"]["source"] == "shard-0.tar" for hit in result["hits"])
    with pytest.raises(ValueError, match="has no item 1500"):
        run("search", str(tmp_path / "index"), "--item", "1500")


def test_search_errors(built, monkeypatch):
    tmp_path, vectors, _ = built
    index = str(tmp_path / "index")
    with pytest.raises(ValueError, match="exactly one query"):
        run("search", index)
    np.save(tmp_path / "q.npy", vectors[0])
    with pytest.raises(ValueError, match="exactly one query"):
        run("search", index, "text", "--vector-file", str(tmp_path / "q.npy"))
    monkeypatch.setattr("clipkit.eval.encoders.load_encoder",
                        lambda model, pretrained=None, device="cpu": FakeEncoder(vectors, "other-weights"))
    with pytest.raises(IndexFormatError, match="fingerprint fake-weights.*fingerprint other-weights.*not comparable"):
        run("search", index, "text 3", "--model", "open_clip:Other")
    with pytest.raises(ValueError, match="dimension 8"):
        np.save(tmp_path / "q8.npy", np.ones(8, np.float32))
        run("search", index, "--vector-file", str(tmp_path / "q8.npy"))
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        run("search", index, "--vector-file", str(tmp_path / "q.npy"), "--filter", "source")
    with pytest.raises(ValueError, match="--k must be positive"):
        run("search", index, "--vector-file", str(tmp_path / "q.npy"), "--k", "0")


def test_build_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        run("index", "build", str(tmp_path / "absent"), str(tmp_path / "index"))
    with pytest.raises(SystemExit):  # argparse rejects an unknown kind
        run("index", "build", str(tmp_path), str(tmp_path / "index"), "--kind", "ivf")
    write_embedding_shard(tmp_path / "emb", "s", np.eye(4, dtype=np.float32), [{}] * 4)
    write_manifest(tmp_path / "emb", MODEL, "image", 4, ["s"])
    with pytest.raises(ValueError, match="memory size"):
        run("index", "build", str(tmp_path / "emb"), str(tmp_path / "index"), "--memory-budget", "lots")


def test_parse_filters():
    assert parse_filters([]) is None
    assert parse_filters(["source=a.tar", "label=3", "ok=true", "name=[x]", "eq=a=b"]) == \
        {"source": "a.tar", "label": 3, "ok": True, "name": "[x]", "eq": "a=b"}
