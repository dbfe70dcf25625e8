"""A trainer made of parts: each built from the config by a function of its own, each replaceable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from clipkit.distributed import DistributedContext
from clipkit.train.checkpoint import load_checkpoint
from clipkit.train.parts import TrainSpec, build_training_data, build_training_loss, build_training_model
from clipkit.train.trainer import Trainer

ONE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_each_part_builds_alone(tiny_config, toy_shards):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    first = build_training_model(tiny_config, torch.device("cpu"))
    again = build_training_model(tiny_config, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    data = build_training_data(tiny_config, ONE_PROCESS)
    assert data.inputs == ("image", "text") and not data.missing.shards
    batch = next(iter(data.loader))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["text"].shape == (16, 16)

    loss = build_training_loss(tiny_config)
    features = first({"image": batch["image"], "text": batch["text"]})
    value = loss(features, first.logit_scale.exp(), None)
    assert value.ndim == 0 and value.item() > 0


class CountingLoss(nn.Module):
    """The method's loss, counting its calls: a replaced part the trainer must use."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args: object) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args)


class FixedEvaluator:
    """An evaluator that scores steps by a fixed table: the trainer keeps the best step."""

    modality = "image"
    metric_names = ["acc1"]

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores
        self.trainer: Trainer | None = None

    def default_metric(self) -> str:
        return "acc1"

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert not model.training  # evaluation sees the model in eval mode ...
        return {"acc1": self.scores[self.trainer.step], "eval_seconds": 0.0}


def test_parts_are_replaced_through_the_spec(tiny_config, toy_shards):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.train.max_steps = 6
    tiny_config.train.eval_every = 2
    counting = CountingLoss(build_training_loss(tiny_config))
    evaluator = FixedEvaluator({2: 0.3, 4: 0.7, 6: 0.5})
    spec = dataclasses.replace(TrainSpec(), loss=lambda config: counting,
                               evaluator=lambda data, model, dist: evaluator)
    trainer = Trainer(tiny_config, progress=False, spec=spec)
    evaluator.trainer = trainer
    trainer.fit()
    assert trainer.model.training  # ... and training continues in train mode
    assert counting.calls == 6
    run = Path(tiny_config.train.output_dir)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["acc1"]) for r in logged if r["split"] == "eval"] == [(2, 0.3), (4, 0.7), (6, 0.5)]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == 4 and best["select_value"] == 0.7
