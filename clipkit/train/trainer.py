"""The training loop, composed of small parts: model, data stream, optimizer, schedule, metrics, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from clipkit.config import ExperimentConfig, save_config
from clipkit.data.pipeline import ShardStream, build_loader, count_samples, expand_shards
from clipkit.losses import InfoNCELoss
from clipkit.modalities import get_modality
from clipkit.model import ContrastiveModel, create_model
from clipkit.train.checkpoint import save_checkpoint
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    steps: int
    samples: int
    final_loss: float
    seconds: float
    skipped: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 on the CPU, where bf16 autocast is many times slower."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(config: ExperimentConfig, shards: list[str]) -> int:
    num_samples = config.data.train_num_samples or count_samples(shards)
    if num_samples is None:
        raise ValueError(
            "cannot tell how many samples the training shards hold: no sizes.json beside them. "
            "Set data.train_num_samples or train.max_steps."
        )
    steps = num_samples // config.data.batch_size
    if steps == 0:
        raise ValueError(f"{num_samples} training samples make no full batch of {config.data.batch_size}")
    return steps


class Trainer:
    """Trains a :class:`ContrastiveModel` on webdataset shards as the config says."""

    def __init__(self, config: ExperimentConfig, *, progress: bool = True) -> None:
        if not config.data.train_shards:
            raise ValueError("data.train_shards is empty: point it at webdataset shards")
        seed_everything(config.train.seed)
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.train.device)
        self.model: ContrastiveModel = create_model(config.model).to(self.device)
        shards = expand_shards(config.data.train_shards)
        fields = [get_modality(name, config.model, config.data.augment).field(train=True)
                  for name in self.model.modalities]
        self.stream = ShardStream(
            shards, fields, config.data.batch_size,
            train=True, shuffle_size=config.data.shuffle_buffer, seed=config.train.seed,
        )
        self.loader = build_loader(self.stream, config.data.num_workers, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = steps_per_epoch(config, shards)
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, config.train)
        self.scheduler = build_scheduler(self.optimizer, config.train, self.total_steps)
        self.loss_fn = InfoNCELoss()
        self.output_dir = Path(config.train.output_dir)

    def _batches(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Batches forever, epoch after epoch, reseeding the shuffles each epoch."""
        epoch = 0
        while True:
            self.stream.set_epoch(epoch)
            empty = True
            for batch in self.loader:
                empty = False
                yield epoch, batch
            if empty:
                raise RuntimeError(f"the training shards yielded no full batch: {self.config.data.train_shards}")
            epoch += 1

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on a batch; returns the loss."""
        first, second = self.model.modalities[:2]
        inputs = {name: batch[name].to(self.device, non_blocking=True) for name in (first, second)}
        with autocast(self.device, self.config.train.precision):
            features = self.model(inputs)
            loss = self.loss_fn(features[first].float(), features[second].float(), self.model.logit_scale.exp())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.clamp_logit_scale_()
        return loss.item()

    def fit(self) -> TrainResult:
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.output_dir / "config.yaml")
        self.model.train()
        start = time.perf_counter()
        samples = skipped = 0
        window_loss, window_steps, window_samples, window_wait = 0.0, 0, 0, 0.0
        window_start = start
        loss = float("nan")
        batches = self._batches()
        with MetricsLogger(self.output_dir) as metrics, tqdm(
            total=self.total_steps, disable=not self.progress, desc="train", unit="step", dynamic_ncols=True
        ) as bar:
            for step in range(1, self.total_steps + 1):
                wait_start = time.perf_counter()
                epoch, batch = next(batches)
                window_wait += time.perf_counter() - wait_start
                skipped += int(batch["num_skipped"])
                loss = self.train_step(batch)
                batch_size = len(batch[self.model.modalities[0]])
                samples += batch_size
                window_loss += loss
                window_steps += 1
                window_samples += batch_size
                bar.update(1)
                if step % config.train.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "epoch": epoch,
                        "loss": window_loss / window_steps,
                        "lr": self.scheduler.get_last_lr()[0],
                        "temperature": 1.0 / self.model.logit_scale.exp().item(),
                        "logit_scale": self.model.logit_scale.exp().item(),
                        "samples_per_s": window_samples / elapsed,
                        "data_wait_fraction": window_wait / elapsed,
                        "samples_seen": samples,
                        "skipped_samples": skipped,
                    }
                    metrics.log(step, record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                    window_loss, window_steps, window_samples, window_wait = 0.0, 0, 0, 0.0
                    window_start = time.perf_counter()
        if skipped:
            log.warning("skipped %d undecodable or incomplete samples (see warnings above)", skipped)
        checkpoint = save_checkpoint(
            self.output_dir / "checkpoints" / "final.pt", self.model, config,
            step=self.total_steps, samples_seen=samples,
        )
        return TrainResult(checkpoint, self.total_steps, samples, loss, time.perf_counter() - start, skipped)
