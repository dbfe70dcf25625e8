"""`clipkit embed` across ranks: real torchrun processes (gloo), real toy shards, data-loader workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipkit.config import ExperimentConfig
from clipkit.eval.embed_dir import embed_to_dir
from clipkit.eval.embed_ledger import FolderIdentity, PartLedger, rank_file
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from retrieval import RetrievalIndex
from tests.conftest import tiny_model_config
from tests.test_distributed import REPO, torchrun, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = ExperimentConfig(model=tiny_model_config())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", create_model(config.model).eval(), config)


def embed_args(checkpoint: Path, dataset: str, out: Path, workers: int = 1) -> list[str]:
    return ["-m", "clipkit.embed", "--model", str(checkpoint), "--dataset", dataset, "--out", str(out),
            "--batch-size", "24", "--workers", str(workers), "--device", "cpu", "--no-progress"]


def assert_same_folder(got: Path, expected: Path) -> None:
    """The same manifest, the same records and vectors equal to float rounding."""
    manifest = json.loads((got / "manifest.json").read_text())
    assert manifest == json.loads((expected / "manifest.json").read_text())
    for stem in manifest["shards"]:
        assert (got / f"{stem}.jsonl").read_text() == (expected / f"{stem}.jsonl").read_text()
        np.testing.assert_allclose(np.load(got / f"{stem}.npy"), np.load(expected / f"{stem}.npy"), atol=1e-6)
    assert not list(got.glob("manifest.rank-*"))


def test_two_ranks_write_the_folder_one_process_writes(toy_shards, checkpoint, tmp_path):
    dataset = toy_shards.shard_pattern("train")  # 5 shards: rank 0 takes 3, rank 1 takes 2
    one = embed_to_dir(load_encoder(str(checkpoint)), "image", dataset, tmp_path / "one", batch_size=24,
                       num_workers=2, progress=False)
    assert (one.shards_written, one.vectors, one.failed_samples) == (5, 320, 0)
    done = torchrun(2, *embed_args(checkpoint, dataset, tmp_path / "two", workers=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("320 image vectors in 5 new part(s) (0 already done, 0 samples failed)") == 1
    assert_same_folder(tmp_path / "two", tmp_path / "one")
    records = (tmp_path / "two" / f"{json.loads((tmp_path / 'two' / 'manifest.json').read_text())['shards'][0]}"
               ".jsonl").read_text().splitlines()
    assert json.loads(records[0])["media"]["type"] == "jpg"  # offsets recorded in the workers
    # Run again: every part is done, on either rank.
    again = torchrun(2, *embed_args(checkpoint, dataset, tmp_path / "two"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 image vectors in 0 new part(s) (5 already done" in again.stdout


def listed(path: Path) -> list[str]:
    try:
        return json.loads(path.read_text())["shards"]
    except (OSError, ValueError):
        return []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_killed_job_resumes_at_each_ranks_first_unfinished_part(toy_shards, checkpoint, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    sources = toy_shards.train_shards[:4]
    for source in sources[:2]:
        shutil.copy(source, shards / source.name)
    # Parts 2 and 3 (one per rank) are named pipes that nobody writes: each rank finishes its first
    # part, then blocks reading its second, and the job is killed there.
    for source in sources[2:]:
        os.mkfifo(shards / source.name)
    dataset = str(shards / "train-{000000..000003}.tar")
    out = tmp_path / "emb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *embed_args(checkpoint, dataset, out)], cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: all(len(listed(out / rank_file(r))) == 1 for r in (0, 1)), 120, "each rank's first part")
    finally:
        job.send_signal(signal.SIGTERM)  # torchrun passes it on to the ranks
        job.wait(timeout=60)
        for source in sources[2:]:  # let the orphaned readers see the end of their pipe
            try:
                os.close(os.open(shards / source.name, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="no manifest.json"):
        RetrievalIndex.build_from_embeddings(out, kind="exact")
    for source in sources[2:]:
        (shards / source.name).unlink()
        shutil.copy(source, shards / source.name)

    resumed = torchrun(2, *embed_args(checkpoint, dataset, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "128 image vectors in 2 new part(s) (2 already done, 0 samples failed)" in resumed.stdout
    embed_to_dir(load_encoder(str(checkpoint)), "image", dataset, tmp_path / "reference", batch_size=24,
                 progress=False)
    assert_same_folder(out, tmp_path / "reference")


def test_one_process_takes_over_a_killed_jobs_rank_files(toy_shards, checkpoint, tmp_path):
    """Rank files left by a job of two ranks, resumed by one process: their parts count as done and
    are merged into manifest.json in the job's order."""
    encoder = load_encoder(str(checkpoint))
    dataset = toy_shards.shard_pattern("train")
    reference = tmp_path / "reference"
    embed_to_dir(encoder, "image", dataset, reference, batch_size=24, progress=False)
    manifest = json.loads((reference / "manifest.json").read_text())
    out = tmp_path / "emb"
    out.mkdir()
    identity = FolderIdentity(manifest["model"], "image", manifest["model_fingerprint"], manifest["model_spec"])
    for rank, index in ((0, 2), (1, 1)):  # rank 0 had finished part 2 only, rank 1 part 1 only
        stem = manifest["shards"][index]
        for suffix in (".npy", ".jsonl"):
            shutil.copy(reference / f"{stem}{suffix}", out / f"{stem}{suffix}")
        PartLedger(out, identity, rank, 2).add(stem, manifest["counts"][index], manifest["sources"][index],
                                               manifest["dim"])
    summary = embed_to_dir(encoder, "image", dataset, out, batch_size=24, progress=False)
    assert (summary.shards_written, summary.shards_skipped) == (3, 2)
    assert_same_folder(out, reference)



def test_the_benchmark_reads_the_line_clipkit_embed_prints():
    from benchmarks.embed import SUMMARY
    from clipkit.eval.embed_dir import EmbedSummary

    line = EmbedSummary(3, 1, 2048, 0, seconds=4.0).describe("image", "out")
    assert line.endswith("in out (4.0 s, 512 vectors/s)")
    found = SUMMARY.search(line)
    assert found is not None and (found[1], found[3]) == ("2048", "512")
    # Two ranks' summaries: counts add up, the job takes the slower rank's time.
    total = EmbedSummary(2, 0, 100, 1, seconds=3.0) + EmbedSummary(1, 1, 50, 2, 1, seconds=5.0)
    assert total == EmbedSummary(3, 1, 150, 3, 1, seconds=5.0)
