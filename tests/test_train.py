import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.config import ExperimentConfig
from clipkit.train.checkpoint import load_model
from clipkit.train.optim import build_optimizer, warmup_cosine
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


def with_toy(config: ExperimentConfig, toy) -> ExperimentConfig:
    data = dataclasses.replace(config.data, train_shards=toy.shard_pattern("train"))
    return dataclasses.replace(config, data=data)


def test_short_training_run_loss_falls(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.train.epochs = 3
    trainer = Trainer(config, progress=False)
    assert trainer.steps_per_epoch == 320 // 16
    result = trainer.fit()
    assert result.steps == 60 and result.samples == 60 * 16 and result.skipped == 0
    records = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    for key in ("loss", "lr", "temperature", "samples_per_s", "data_wait_fraction", "skipped_samples", "epoch"):
        assert key in records[0]
    assert records[-1]["epoch"] == 2
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > 2.0  # ~ln(16) for an untrained model
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert list((Path(config.train.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((Path(config.train.output_dir) / "config.yaml").read_text())["train"]["epochs"] == 3

    loaded, loaded_config = load_model(result.checkpoint)
    assert loaded_config == config
    tokens = loaded.tokenize(["a red circle"])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), trainer.model.encode_text(tokens))


def test_training_is_deterministic_on_cpu(tiny_config, toy_shards):
    weights = []
    for run in range(2):
        config = with_toy(tiny_config, toy_shards)
        config.train.max_steps = 4
        config.train.output_dir = f"{tiny_config.train.output_dir}-{run}"
        trainer = Trainer(config, progress=False)
        trainer.fit()
        weights.append(trainer.model.state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_no_weight_decay_on_gains_biases_and_temperature():
    model_config = tiny_model_config()
    from clipkit.model import create_model

    model = create_model(model_config)
    optimizer = build_optimizer(model, ExperimentConfig().train)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.logit_scale) not in decayed
    assert all(p.ndim >= 2 for p in optimizer.param_groups[0]["params"])
    assert any("token_embedding" in names[i] for i in map(id, optimizer.param_groups[1]["params"]))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    schedule = warmup_cosine(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_missing_sizes_needs_an_explicit_length(tiny_config, toy_shards, tmp_path):
    shard = tmp_path / "only.tar"
    shard.write_bytes(Path(toy_shards.train_shards[0]).read_bytes())
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_shards=str(shard)))
    with pytest.raises(ValueError, match="data.train_num_samples or train.max_steps"):
        Trainer(config, progress=False)
    config.data.train_num_samples = 64
    assert Trainer(config, progress=False).total_steps == 64 // 16


def test_python_m_clipkit_train_cli(tiny_config, toy_shards, tmp_path):
    config = with_toy(tiny_config, toy_shards)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "cli-run"
    command = [sys.executable, "-m", "clipkit.train", "--config", str(path),
               "--set", "train.max_steps=3", "--set", f"train.output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps" in done.stdout
    assert (out / "checkpoints" / "final.pt").is_file()

    bad = subprocess.run([*command[:-4], "--set", "train.lrr=1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2
    assert "unknown key 'train.lrr'" in bad.stderr and "did you mean 'train.lr'" in bad.stderr
