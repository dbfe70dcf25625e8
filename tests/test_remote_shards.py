"""Shards from anywhere: a real HTTP server on 127.0.0.1 serving the toy shards (one of which drops
the connection in the middle), and ``pipe:`` commands, read by training, evaluation and embedding."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import shlex
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clipkit.config import ExperimentConfig
from clipkit.data.pipeline import ShardReader
from clipkit.data.remote import REMOTE_SHARD_RETRIES
from clipkit.data.shards import count_samples
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.embed_dir import embed_to_dir
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves a folder; ``drops[name] = n`` makes the next n GETs of ``name`` announce the whole file
    but send only its first half, then close the connection."""

    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.drops: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        name = self.path.lstrip("/")
        self.server.requests[name] += 1
        if self.server.drops[name] <= 0:
            return super().do_GET()
        self.server.drops[name] -= 1
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server(toy_shards, tmp_path, monkeypatch):
    monkeypatch.setattr("clipkit.data.remote.CACHE", tmp_path / "remote-cache")  # side files fetched here
    served = ShardServer(toy_shards.root)
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.server_close()


def keys(samples) -> list[str]:
    return [sample["__key__"] for sample in samples]


def test_a_dropped_connection_is_read_again_from_where_it_broke(toy_shards, server):
    local = keys(ShardReader().read_shard(str(toy_shards.train_shards[1])))
    server.drops["train-000001.tar"] = 1
    reader = ShardReader()
    assert keys(reader.read_shard(server.url("train-000001.tar"))) == local  # each sample once, in order
    counts = reader.take_counts()
    assert (counts.broken, sum(counts.lost.values()), counts.duplicates) == ([], 0, 0)
    assert server.requests["train-000001.tar"] == 2


def test_a_shard_that_keeps_dropping_is_retried_a_bounded_number_of_times(toy_shards, server):
    server.drops["train-000002.tar"] = 100
    reader = ShardReader()
    start = time.monotonic()
    delivered = keys(reader.read_shard(server.url("train-000002.tar")))
    assert time.monotonic() - start < 30
    assert server.requests["train-000002.tar"] == 1 + REMOTE_SHARD_RETRIES
    assert 0 < len(delivered) < 64 and len(set(delivered)) == len(delivered)
    counts = reader.take_counts()
    # What it never delivered is counted from the sizes.json fetched beside it.
    assert counts.broken == [server.url("train-000002.tar")]
    assert counts.lost[server.url("train-000002.tar")] == 64 - len(delivered)
    # A server that is not there: broken, with everything lost, at once.
    reader.take_counts()
    assert keys(reader.read_shard("http://127.0.0.1:9/train-000000.tar")) == []
    assert reader.take_counts().broken == ["http://127.0.0.1:9/train-000000.tar"]


def test_training_evaluation_and_embedding_read_http_shards(toy_shards, server, tmp_path):
    pattern = server.url("train-{000000..000004}.tar")
    assert count_samples([server.url(f"train-00000{i}.tar") for i in range(5)]) == 320  # remote sizes.json
    server.drops["train-000003.tar"] = 1  # one connection drop on the way: read again, nothing lost
    config = ExperimentConfig(model=tiny_model_config())
    config.data = dataclasses.replace(config.data, train_shards=pattern, batch_size=32, num_workers=1)
    config.train = dataclasses.replace(config.train, output_dir=str(tmp_path / "run"), max_steps=10, warmup_steps=2,
                                       device="cpu")
    result = Trainer(config, progress=False).fit()
    assert (result.steps, result.skipped) == (10, 0)
    assert server.requests["train-000003.tar"] == 2

    encoder = load_encoder(str(result.checkpoint))
    remote = evaluate_zeroshot(encoder, server.url("eval-{000000..000001}.tar"))  # classnames.txt fetched too
    local = evaluate_zeroshot(encoder, toy_shards.shard_pattern("eval"))
    assert remote.num_samples == 96 and remote.metrics == local.metrics

    server.drops["eval-000001.tar"] = 1
    summary = embed_to_dir(encoder, "image", server.url("eval-{000000..000001}.tar"), tmp_path / "remote",
                           num_workers=2, progress=False)
    assert (summary.vectors, summary.failed_samples) == (96, 0)
    embed_to_dir(encoder, "image", toy_shards.shard_pattern("eval"), tmp_path / "local", progress=False)
    remote_vectors = np.concatenate([np.load(p) for p in sorted((tmp_path / "remote").glob("*.npy"))])
    local_vectors = np.concatenate([np.load(p) for p in sorted((tmp_path / "local").glob("*.npy"))])
    np.testing.assert_allclose(remote_vectors, local_vectors, atol=1e-6)


def test_pipe_commands_are_shards(toy_shards, tmp_path):
    cat = f"{shlex.quote(sys.executable)} -c 'import sys, shutil; shutil.copyfileobj(open(sys.argv[1], \"rb\"), " \
          "sys.stdout.buffer)'"
    shards = [f"pipe:{cat} {shlex.quote(str(path))}" for path in toy_shards.eval_shards]
    reader = ShardReader()
    assert keys(s for url in shards for s in reader.read_shard(url)) == [f"eval{i:08d}" for i in range(96)]
    config = ExperimentConfig(model=tiny_model_config())
    checkpoint = save_checkpoint(tmp_path / "model.pt", create_model(config.model).eval(), config)
    summary = embed_to_dir(load_encoder(str(checkpoint)), "image", "::".join(shards), tmp_path / "emb",
                           progress=False)
    assert (summary.shards_written, summary.vectors) == (2, 96)
