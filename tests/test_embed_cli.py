"""`clipkit embed` → `clipkit index build` → `clipkit search` on real toy shards and a real checkpoint."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.config import ExperimentConfig
from clipkit.eval.embed import embed_shards
from clipkit.eval.embed_dir import embed_to_dir
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
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
    assert manifest == {"model": str(checkpoint), "modality": "image", "dim": 32,
                        "shards": ["eval-000000", "eval-000001"]}
    vectors = np.concatenate([np.load(out / f"{stem}.npy") for stem in manifest["shards"]])
    expected, _ = embed_shards(encoder, "image", [str(p) for p in toy_shards.eval_shards])
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-6)
    record = json.loads((out / "eval-000000.jsonl").read_text().splitlines()[0])
    assert record["key"] == "eval00000000" and record["caption"] and record["class_name"]

    (out / "eval-000001.npy").unlink()  # as if killed while writing the second shard
    again = embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), out, progress=False)
    assert (again.shards_written, again.shards_skipped, again.vectors) == (1, 1, 32)
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
    records = [json.loads(line) for line in (tmp_path / "emb" / "files-000000.jsonl").read_text().splitlines()]
    assert all(r["caption"] for r in records)  # from the sidecar .txt files


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
