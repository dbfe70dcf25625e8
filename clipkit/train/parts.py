"""The parts of a training run, each built from the config by one function: model, data, loss,
optimizer, schedule, evaluator, checkpointer and metrics.

A :class:`TrainSpec` names the builders (torchtitan's "train spec"); ``Trainer(config, spec=...)``
builds its run from them, so another loss, optimizer or evaluator is one function, and each part can
be built and tested without a trainer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from clipkit.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from clipkit.data.pipeline import ShardStream, build_loader, training_stream
from clipkit.data.shards import MissingShards, drop_missing_shards, expand_shards, shard_sources
from clipkit.distributed import DistributedContext
from clipkit.losses import build_loss
from clipkit.methods import MethodLoss, build_method_loss, method_inputs
from clipkit.modalities import FieldDecoder, get_modality
from clipkit.model import ContrastiveModel, create_model
from clipkit.train.checkpoint import Checkpointer
from clipkit.train.evaluator import TrainingEvaluator, build_evaluator
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training_model(config: ExperimentConfig, device: torch.device) -> ContrastiveModel:
    """The model on ``device`` with the run's memory layout and checkpointing; every rank builds the
    same initial weights from ``train.seed`` (DDP also broadcasts rank 0's)."""
    seed_everything(config.train.seed)
    model = create_model(config.model).to(device)
    if config.train.uses_channels_last:
        model.to(memory_format=torch.channels_last)  # converts the 4-D (convolution) weights only
    model.set_grad_checkpointing(config.train.grad_checkpointing)
    return model


@dataclass(frozen=True)
class TrainingData:
    """This rank's training stream, the loader over it, the batch keys it yields (the training
    method's inputs), and the shards that were missing when it was built."""

    stream: ShardStream
    loader: DataLoader
    inputs: tuple[str, ...]
    missing: MissingShards


def training_field(config: ExperimentConfig, key: str, tower: str) -> FieldDecoder:
    """How batch key ``key`` is decoded for training: as its modality (``key`` is the tower's name) or
    as one augmented view of the tower's modality (data.views)."""
    modality = get_modality(tower, config.model, config.data.augment)
    return modality.field(train=True) if key == tower else modality.view_field(key, config.data.views)


def build_training_data(config: ExperimentConfig, dist: DistributedContext) -> TrainingData:
    """The training method's inputs decoded for training from ``data.train_shards``: for CLIP the first
    two modalities of ``model.modalities`` (the pair the loss aligns; further towers ride along for
    evaluation), for the self-supervised methods views of the image.

    Missing local shards are named once, here, and left out (their samples count as skipped); with
    none left this raises instead of warning on every draw.
    """
    inputs = method_inputs(config.model)
    fields = [training_field(config, key, tower) for key, tower in inputs.items()]
    sources, missing = drop_missing_shards(shard_sources(config.data.train_shards, config.data.train_data_weights))
    if missing.shards and dist.is_main:
        log.warning("%s; training on the others, their samples counted as skipped",
                    missing.describe(len(expand_shards(config.data.train_shards))))
    stream = training_stream(config.data, fields, seed=config.train.seed, rank=dist.rank,
                             world_size=dist.world_size, sources=sources)
    loader = build_loader(stream, config.data.num_workers, pin_memory=dist.device.type == "cuda",
                          start_method=config.data.worker_start_method)
    return TrainingData(stream, loader, tuple(inputs), missing)


def build_training_loss(config: ExperimentConfig) -> MethodLoss:
    return build_method_loss(config.model, build_loss(config.model.loss, local_loss=config.train.local_loss))


def build_checkpointer(config: TrainConfig) -> Checkpointer:
    return Checkpointer(Path(config.output_dir) / "checkpoints", config.keep_last, sharded=config.parallel == "fsdp")


def build_metrics(config: TrainConfig) -> MetricsLogger:
    """``metrics.jsonl`` and TensorBoard in ``train.output_dir``; a resumed run appends to its log."""
    return MetricsLogger(config.output_dir, append=config.resume is not None)


@dataclass(frozen=True)
class TrainSpec:
    """The builders a :class:`~clipkit.train.trainer.Trainer` makes its run from."""

    model: Callable[[ExperimentConfig, torch.device], ContrastiveModel] = build_training_model
    data: Callable[[ExperimentConfig, DistributedContext], TrainingData] = build_training_data
    loss: Callable[[ExperimentConfig], MethodLoss] = build_training_loss
    optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] = build_optimizer
    scheduler: Callable[[torch.optim.Optimizer, TrainConfig, int], torch.optim.lr_scheduler.LRScheduler] = \
        build_scheduler
    evaluator: Callable[[DataConfig, ModelConfig, DistributedContext], TrainingEvaluator | None] = build_evaluator
    checkpointer: Callable[[TrainConfig], Checkpointer] = build_checkpointer
    metrics: Callable[[TrainConfig], MetricsLogger] = build_metrics
