"""Evaluation during training: zero-shot on data.eval_shards, retrieval and loss on data.val_shards,
logged beside the training metrics, the best checkpoint kept, and figures equal to `clipkit eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.config import ConfigError
from clipkit.eval.benchmark import evaluate_retrieval, evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.errors import DataError
from clipkit.train.checkpoint import load_checkpoint
from clipkit.train.trainer import Trainer
from tests.test_distributed import exact_config, torchrun

RETRIEVAL_KEYS = [f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10)]


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == "train"], [r for r in lines if r["split"] == "eval"]


def equal_to_clipkit_eval(record: dict, checkpoint: Path, toy) -> None:
    """The in-training figures are `clipkit eval zeroshot` / `retrieval`'s figures of that checkpoint."""
    encoder = load_encoder(str(checkpoint))
    zeroshot = evaluate_zeroshot(encoder, toy.shard_pattern("eval"), batch_size=16)
    retrieval = evaluate_retrieval(encoder, toy.shard_pattern("eval"), batch_size=16)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert record[key] == pytest.approx(zeroshot.metrics[key], abs=1e-9), key
    for key in RETRIEVAL_KEYS:
        assert record[key] == pytest.approx(retrieval.metrics[key], abs=1e-9), key


def test_evaluation_during_training_is_logged_and_equals_clipkit_eval(tiny_config, toy_shards, capsys):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.data.eval_shards = toy_shards.shard_pattern("eval")
    tiny_config.data.val_shards = toy_shards.shard_pattern("eval")
    tiny_config.train.max_steps = 12
    tiny_config.train.eval_every = 5
    tiny_config.train.select_metric = "val_loss"
    result = Trainer(tiny_config, progress=False).fit()

    run = Path(tiny_config.train.output_dir)
    train_lines, eval_lines = read_metrics(run)
    assert [r["step"] for r in eval_lines] == [5, 10, 12]  # every 5 steps and at the end
    assert train_lines and all("loss" in r for r in train_lines)
    for record in eval_lines:
        assert set(record) >= {"acc1", "acc5", "mean_per_class_recall", "val_loss", "eval_seconds", *RETRIEVAL_KEYS}
        assert 0 <= record["acc1"] <= record["acc5"] <= 1 and record["val_loss"] > 0
    assert result.evaluation is not None and result.evaluation["acc1"] == eval_lines[-1]["acc1"]
    assert 0 < result.eval_seconds < result.seconds

    equal_to_clipkit_eval(eval_lines[-1], run / "checkpoints" / "final.pt", toy_shards)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    lowest = min(eval_lines, key=lambda r: r["val_loss"])
    assert best["step"] == lowest["step"] and best["select_metric"] == "val_loss"
    assert best["select_value"] == pytest.approx(lowest["val_loss"])

    printed = capsys.readouterr().out
    assert "eval after step 5: top-1" in printed and "val loss" in printed
    assert "evaluation took" in printed and "of the run's" in printed
    tensorboard = list((run / "tensorboard").glob("events.*"))
    assert tensorboard and tensorboard[0].stat().st_size > 0


def test_evaluation_keeps_the_best_across_a_resume(tiny_config, toy_shards):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.data.eval_shards = toy_shards.shard_pattern("eval")
    tiny_config.train.max_steps = 6
    tiny_config.train.eval_every = 3
    tiny_config.train.save_every = 3
    Trainer(tiny_config, progress=False).fit()
    run = Path(tiny_config.train.output_dir)
    first = load_checkpoint(run / "checkpoints" / "best.pt")

    tiny_config.train.max_steps = 9
    tiny_config.train.resume = "latest"
    trainer = Trainer(tiny_config, progress=False)
    assert trainer.best_value == first["select_value"]
    trainer.fit()
    _, eval_lines = read_metrics(run)
    assert [r["step"] for r in eval_lines] == [3, 6, 9]  # the resumed run appends
    best = max(eval_lines, key=lambda r: (r["acc1"], -r["step"]))
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == best["step"]


def test_bad_evaluation_settings_stop_before_training(tiny_config, toy_shards, tmp_path):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.train.max_steps = 2
    tiny_config.data.eval_shards = str(tmp_path / "nowhere-{0..3}.tar")
    with pytest.raises(DataError, match="data.eval_shards: 4 of the 4 shards"):
        Trainer(tiny_config, progress=False)

    tiny_config.data.eval_shards = toy_shards.shard_pattern("train")  # no KEY.cls in the training split
    with pytest.raises(DataError, match="class index per sample"):
        Trainer(tiny_config, progress=False)

    tiny_config.data.eval_shards = ""
    tiny_config.data.val_shards = toy_shards.shard_pattern("eval")
    tiny_config.train.select_metric = "acc1"
    with pytest.raises(ConfigError, match="'acc1' is not evaluated with this config"):
        Trainer(tiny_config, progress=False)

    tiny_config.data.val_shards = ""
    with pytest.raises(ConfigError, match="needs evaluation data"):
        Trainer(tiny_config, progress=False)


def test_two_ranks_evaluate_as_one_process(toy_shards, tmp_path):
    """A torchrun job's ranks each embed a share; the gathered figures equal `clipkit eval`'s."""
    config = exact_config(toy_shards, tmp_path, max_steps=3, eval_every=2)
    config.data.eval_shards = toy_shards.shard_pattern("eval")
    config.data.val_shards = toy_shards.shard_pattern("eval")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = torchrun(2, "-m", "clipkit.train", "--config", str(path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(config.train.output_dir)
    _, eval_lines = read_metrics(run)
    assert [r["step"] for r in eval_lines] == [2, 3]
    equal_to_clipkit_eval(eval_lines[-1], run / "checkpoints" / "final.pt", toy_shards)
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["step"] in (2, 3)


def test_labels_beyond_the_class_names_stop_the_evaluation(tiny_config, toy_shards, tmp_path):
    """A classnames.txt shorter than the labels is an error, not a silently wrong accuracy."""
    folder = tmp_path / "eval"
    folder.mkdir()
    for shard in toy_shards.eval_shards:
        shutil.copy(shard, folder / shard.name)
    (folder / "classnames.txt").write_text("\n".join(toy_shards.classnames[:10]) + "\n")
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.data.eval_shards = str(folder)
    tiny_config.train.max_steps = 1
    with pytest.raises(DataError, match="labels run from 0 to 23 but .* has 10 class names"):
        Trainer(tiny_config, progress=False).fit()


def test_acc5_is_no_select_metric_below_five_classes(tiny_config, toy_shards, tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    shutil.copy(toy_shards.eval_shards[0], folder / "0.tar")
    (folder / "classnames.txt").write_text("a\nb\nc\n")
    from clipkit.train.evaluator import TrainingEvaluator
    from tests.test_train_parts import ONE_PROCESS

    tiny_config.data.eval_shards = str(folder)
    evaluator = TrainingEvaluator(tiny_config.data, tiny_config.model, "image", ONE_PROCESS)
    assert evaluator.metric_names == ["acc1", "mean_per_class_recall"]


def test_a_resume_on_other_evaluation_data_starts_a_new_best(tiny_config, toy_shards, tmp_path):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.data.eval_shards = toy_shards.shard_pattern("eval")
    tiny_config.train.max_steps = 2
    tiny_config.train.eval_every = 2
    tiny_config.train.save_every = 2
    Trainer(tiny_config, progress=False).fit()

    tiny_config.train.resume = "latest"
    tiny_config.train.max_steps = 3
    assert Trainer(tiny_config, progress=False).best_value is not None  # same metric, same data
    tiny_config.data.eval_shards = str(toy_shards.eval_shards[0])
    assert Trainer(tiny_config, progress=False).best_value is None  # another set: its figures are new


def test_a_table_handed_to_the_trainer_is_refused(tiny_config, tmp_path):
    tiny_config.data.train_shards = str(tmp_path / "captions.csv")
    with pytest.raises(ConfigError, match="is a table, not shards"):
        Trainer(tiny_config, progress=False)
