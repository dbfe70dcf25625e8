"""clipkit's evaluation equals CLIP_benchmark's own on folders CLIP_benchmark's builder wrote: toy
images and real photographs at odd sizes, zero-shot classification and multi-caption retrieval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from clipkit.config import ExperimentConfig
from clipkit.data.toy import make_toy_image_text
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_script_shows_equal_metrics_and_embeddings(tmp_path):
    config = ExperimentConfig(model=tiny_model_config(image_size=64))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pt", create_model(config.model).eval(), config)
    toy = make_toy_image_text(tmp_path / "toy", num_train=8, num_eval=96, image_size=64, samples_per_shard=64)
    out = tmp_path / "parity.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_benchmark_parity.py"), "--checkpoint",
                          str(checkpoint), "--toy", str(toy.root), "--num-toy", "96", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CLIP_benchmark" in run.stdout
    results = json.loads(out.read_text())
    for name, captions_per_item in (("toy", 3), ("photos", 2)):
        assert results[name]["embedding_max_abs_diff"] <= 1e-4
        counts = results[name]["retrieval"]["counts"]
        # Every caption of a line-per-caption txt is read (one caption each was read before).
        assert counts["texts"] == captions_per_item * counts["samples"]
        for task in ("classification", "retrieval"):
            for metric, (ours, theirs) in results[name][task]["metrics"].items():
                assert abs(ours - theirs) <= 1e-6, (name, task, metric, ours, theirs)
