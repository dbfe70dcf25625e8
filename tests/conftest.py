"""Shared fixtures: a tiny model config and tiny toy shards, built on the spot, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clipkit.config import ExperimentConfig, ImageTowerConfig, ModelConfig, TextTowerConfig

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
