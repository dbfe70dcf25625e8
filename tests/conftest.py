"""Shared fixtures: a tiny model config and tiny toy shards, built on the spot, no network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.config import ExperimentConfig, ModelConfig
from clipkit.modalities.image import ImageTowerConfig
from clipkit.modalities.text import TextTowerConfig

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def tiny_model_config(image_size: int = 32) -> ModelConfig:
    return ModelConfig(
        embed_dim=32,
        image=ImageTowerConfig(timm_name="test_byobnet", image_size=image_size),
        text=TextTowerConfig(context_length=16, width=32, heads=2, layers=1),
    )


@pytest.fixture
def tiny_config(tmp_path: Path) -> ExperimentConfig:
    config = ExperimentConfig(model=tiny_model_config())
    config.data.batch_size = 16
    config.data.num_workers = 0
    config.data.shuffle_buffer = 50
    config.train.output_dir = str(tmp_path / "run")
    config.train.warmup_steps = 5
    config.train.lr = 3e-3
    config.train.log_every = 5
    return config


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory: pytest.TempPathFactory):
    """320 training + 96 held-out 32-px toy samples in shards of 64."""
    from clipkit.data.toy import make_toy_image_text

    root = tmp_path_factory.mktemp("toy")
    return make_toy_image_text(root, num_train=320, num_eval=96, image_size=32, seed=0, samples_per_shard=64)


@pytest.fixture
def one_faiss_thread():
    """FAISS on one OpenMP thread: busy-waiting threads crawl on a shared machine with few cores,
    and one thread is plenty for test-sized indexes."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def train_until_sigterm(config: ExperimentConfig, config_path: Path, *, whole_group: bool = False):
    """Start `python -m clipkit.train` on ``config`` (written to ``config_path``), send SIGTERM once two
    steps are logged (to the main process, or with ``whole_group`` to it and its data workers, as
    Slurm does on preemption), and return (returncode, stdout, stderr, checkpointed step)."""
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    process = subprocess.Popen([sys.executable, "-m", "clipkit.train", "--config", str(config_path)],
                               cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=whole_group)
    metrics = Path(config.train.output_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    if whole_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    latest = Path(config.train.output_dir) / "checkpoints" / "latest.json"
    step = json.loads(latest.read_text())["step"] if latest.is_file() else None
    return process.returncode, stdout, stderr, step
