"""`clipkit embed` → `clipkit index build` → `clipkit search` on real toy shards and a real checkpoint."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from clipkit.cli import main
from clipkit.config import ExperimentConfig
from clipkit.eval.embed import embed_shards
from clipkit.data.writer import ShardWriter
from clipkit.eval.embed_dir import embed_to_dir
from clipkit.eval.embed_parts import part_stem
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from retrieval import IndexFormatError, RetrievalIndex, write_manifest
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = ExperimentConfig(model=tiny_model_config())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", create_model(config.model).eval(), config)


def test_embed_writes_resumable_parts_matching_the_library(toy_shards, checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    out = tmp_path / "emb"
    first = embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), out, batch_size=32, progress=False)
    assert (first.shards_written, first.vectors, first.failed_samples) == (2, 96, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    sources = [str(p.resolve()) for p in toy_shards.eval_shards]
    assert manifest["model"] == str(checkpoint) and (manifest["modality"], manifest["dim"]) == ("image", 32)
    assert manifest["shards"] == [part_stem(f"eval-00000{i}", source) for i, source in enumerate(sources)]
    assert (manifest["counts"], manifest["sources"]) == ([64, 32], sources)
    assert manifest["model_fingerprint"] == encoder.fingerprint()
    assert manifest["model_spec"] == {"model": str(checkpoint.resolve()), "pretrained": None}
    vectors = np.concatenate([np.load(out / f"{stem}.npy") for stem in manifest["shards"]])
    expected, _ = embed_shards(encoder, "image", [str(p) for p in toy_shards.eval_shards])
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-6)
    record = json.loads((out / f"{manifest['shards'][0]}.jsonl").read_text().splitlines()[0])
    assert record["key"] == "eval00000000" and record["caption"] and record["class_name"]

    # As if killed while writing the second part: its vectors never landed, the manifest lists one part.
    (out / f"{manifest['shards'][1]}.npy").unlink()
    write_manifest(out, manifest["model"], "image", 32, manifest["shards"][:1], counts=[64], sources=sources[:1],
                   model_fingerprint=manifest["model_fingerprint"], model_spec=manifest["model_spec"])
    again = embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), out, progress=False)
    assert (again.shards_written, again.shards_skipped, again.vectors) == (1, 1, 32)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    with pytest.raises(ValueError, match="holds image embeddings of .* not text"):
        embed_to_dir(encoder, "text", toy_shards.shard_pattern("eval"), out, progress=False)


def test_embed_a_folder_with_a_corrupt_file(toy_shards, checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    with tarfile.open(toy_shards.eval_shards[0]) as tar:
        for member in tar.getmembers()[:40]:
            if member.name.endswith((".jpg", ".txt")):
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    summary = embed_to_dir(load_encoder(str(checkpoint)), "image", str(folder), tmp_path / "emb", progress=False)
    jpgs = len(list(folder.glob("*.jpg")))
    assert (summary.vectors, summary.failed_samples) == (jpgs - 1, 1)
    (stem,) = json.loads((tmp_path / "emb" / "manifest.json").read_text())["shards"]
    records = [json.loads(line) for line in (tmp_path / "emb" / f"{stem}.jsonl").read_text().splitlines()]
    assert all(r["caption"] for r in records)  # from the sidecar .txt files


def index_size(embeddings) -> int:
    return len(RetrievalIndex.build_from_embeddings(embeddings, kind="exact"))


def test_embedding_twice_into_one_folder_accumulates_and_same_names_stay_apart(toy_shards, checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    out = tmp_path / "emb"
    # Two folders whose shards have the same file names, eval-000000.tar and eval-000001.tar.
    copy = tmp_path / "copy"
    shutil.copytree(toy_shards.root, copy)
    embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), out, progress=False)
    second = embed_to_dir(encoder, "image", str(copy / "eval-{000000..000001}.tar"), out, progress=False)
    assert (second.shards_written, second.shards_skipped, second.vectors) == (2, 0, 96)
    assert index_size(out) == 192
    # The same shards again: nothing new, nothing lost.
    third = embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), out, progress=False)
    assert (third.shards_written, third.shards_skipped) == (0, 2)
    assert index_size(out) == 192
    assert main(["index", "build", str(out), str(tmp_path / "idx"), "--kind", "exact"]) == 0
    assert len(RetrievalIndex.load(tmp_path / "idx")) == 192


def test_embedding_with_other_weights_into_a_folder_is_refused(toy_shards, tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    save_checkpoint(path, create_model(config.model).eval(), config)
    out = tmp_path / "emb"
    embed_to_dir(load_encoder(str(path)), "image", str(toy_shards.eval_shards[0]), out, progress=False)
    torch.manual_seed(1)  # the checkpoint replaced in place by another model's
    save_checkpoint(path, create_model(config.model).eval(), config)
    with pytest.raises(ValueError, match="holds embeddings of another model .*not comparable"):
        embed_to_dir(load_encoder(str(path)), "image", str(toy_shards.eval_shards[1]), out, progress=False)
    assert index_size(out) == 64


def test_text_is_embedded_one_vector_per_caption(checkpoint, tmp_path):
    with ShardWriter(tmp_path, "captions", 10) as writer:
        writer.write("a", {"txt": b"a red circle\na circle that is red\n"})
        writer.write("b", {"txt": json.dumps(["a blue square", "a square"]).encode()})
        writer.write("c", {"txt": b"a green star"})
    shard = next(tmp_path.glob("captions-*.tar"))
    encoder = load_encoder(str(checkpoint))
    out = tmp_path / "emb"
    summary = embed_to_dir(encoder, "text", str(shard), out, progress=False)
    assert summary.vectors == 5
    (stem,) = json.loads((out / "manifest.json").read_text())["shards"]
    records = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()]
    assert [(r["key"], r["caption"], r.get("caption_index")) for r in records] == [
        ("a", "a red circle", 0), ("a", "a circle that is red", 1), ("b", "a blue square", 0), ("b", "a square", 1),
        ("c", "a green star", None)]
    vectors = np.load(out / f"{stem}.npy")
    with torch.no_grad():
        expected = encoder.encode("text", encoder.tokenize([r["caption"] for r in records])).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_embed_index_search_commands(toy_shards, checkpoint, tmp_path, capsys):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", "--model", str(checkpoint), "--dataset", toy_shards.shard_pattern("eval"),
                 "--out", str(emb), "--no-progress"]) == 0
    assert main(["index", "build", str(emb), str(idx), "--kind", "exact"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "a red circle", "--k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == "'a red circle'" and len(result["hits"]) == 3
    assert result["hits"][0]["metadata"]["key"].startswith("eval")


def test_search_knows_its_model_by_its_weights_not_its_path(toy_shards, tmp_path, capsys, monkeypatch):
    config = ExperimentConfig(model=tiny_model_config())
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    torch.manual_seed(0)
    save_checkpoint("model.pt", create_model(config.model).eval(), config)  # a relative path, as typed
    assert main(["embed", "--model", "model.pt", "--dataset", str(toy_shards.eval_shards[0]), "--out", "emb",
                 "--no-progress"]) == 0
    assert main(["index", "build", "emb", str(tmp_path / "idx"), "--kind", "exact"]) == 0
    monkeypatch.chdir(tmp_path)  # another folder: the recorded path still finds the model
    for model in ([], ["--model", "a/model.pt"], ["--model", "./a/model.pt"]):
        capsys.readouterr()
        assert main(["search", "idx", "a red circle", "--k", "2", *model]) == 0
        assert "2 hits" in capsys.readouterr().out
    torch.manual_seed(1)  # the checkpoint overwritten by another model's weights
    save_checkpoint("a/model.pt", create_model(config.model).eval(), config)
    capsys.readouterr()
    assert main(["search", "idx", "a red circle"]) == 2
    assert "not comparable" in capsys.readouterr().err
    (tmp_path / "a" / "model.pt").unlink()
    assert main(["search", "idx", "a red circle"]) == 1
    err = capsys.readouterr().err
    assert "which is not at" in err and "pass --model with where it is now" in err


def test_a_swapped_index_file_is_caught(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        vectors = rng.normal(size=(100, 8)).astype(np.float32)
        RetrievalIndex.build(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), kind="exact").save(tmp_path / name)
    (tmp_path / "one" / "index.faiss").write_bytes((tmp_path / "two" / "index.faiss").read_bytes())  # same size
    with pytest.raises(IndexFormatError, match="checksum differs"):
        RetrievalIndex.load(tmp_path / "one")
    assert len(RetrievalIndex.load(tmp_path / "one", verify=False)) == 100
