"""`clipkit eval zeroshot` on real toy shards with a real checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.config import ExperimentConfig
from clipkit.data.pipeline import CLASS_LABEL_FIELD
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.embed import embed_shards
from clipkit.eval.zeroshot import build_zeroshot_classifier, zeroshot_accuracy
from clipkit.modalities import get_modality
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    config = ExperimentConfig(model=tiny_model_config())
    return save_checkpoint(tmp_path / "model.pt", create_model(config.model).eval(), config)


def test_report_matches_the_library_calls(toy_shards, checkpoint):
    report = evaluate_zeroshot(checkpoint, toy_shards.shard_pattern("eval"))
    assert (report.num_samples, report.num_classes, report.num_templates) == (96, 24, 5)
    from clipkit.train.checkpoint import load_model

    model, config = load_model(checkpoint)
    features, fields = embed_shards(model, get_modality("image", config.model),
                                    [str(p) for p in toy_shards.eval_shards], extra_fields=[CLASS_LABEL_FIELD])
    expected = zeroshot_accuracy(features, fields["label"],
                                 build_zeroshot_classifier(model, toy_shards.classnames, toy_shards.templates))
    assert report.metrics["acc1"] == pytest.approx(expected.top1)
    assert report.metrics["acc5"] == pytest.approx(expected.top5)
    assert report.metrics["mean_per_class_recall"] == pytest.approx(expected.mean_per_class_recall)
    assert list(report.metrics["per_class_recall"]) == toy_shards.classnames


def test_cli_prints_a_table_and_writes_json(toy_shards, checkpoint, tmp_path):
    out = tmp_path / "results" / "zeroshot.json"
    command = [sys.executable, "-m", "clipkit", "eval", "zeroshot", "--checkpoint", str(checkpoint),
               "--shards", toy_shards.shard_pattern("eval"), "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "zero-shot classification of 96 image samples, 24 classes x 5 templates" in done.stdout
    assert "acc1" in done.stdout and "chance" in done.stdout
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification" and result["num_samples"] == 96
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "per_class_recall"}

    too_few = tmp_path / "three.txt"
    too_few.write_text("red circle\nred square\nred star\n")
    bad = subprocess.run([*command[:-2], "--classnames", str(too_few)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "labels must lie in [0, 3)" in bad.stderr
    missing = subprocess.run([*command[:-2], "--templates", str(tmp_path / "none.txt")], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
    assert missing.returncode == 1 and "prompt templates file not found" in missing.stderr
