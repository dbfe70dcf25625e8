"""The training loop over parts built by a :class:`~clipkit.train.parts.TrainSpec` (model, data, loss,
optimizer, schedule, evaluator, checkpointer, metrics): steps, accumulation, precision, DDP, the
data position, checkpoints, evaluation and preemption.

One code path serves one CPU process, one GPU and torchrun jobs over many GPUs and nodes: every
rank reads its own shards, features are gathered across ranks inside the loss, and DDP (or FSDP, with
``train.parallel: fsdp``) averages the gradients, so N ranks step exactly like one process on the
global batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipkit.config import ConfigError, ExperimentConfig, save_config
from clipkit.data.pipeline import ShardStream, SkipRateGuard
from clipkit.data.shards import count_samples
from clipkit.data.table_shards import is_table
from clipkit.distributed import DistributedContext, all_reduce_mean, init_distributed, is_collective_failure
from clipkit.errors import DataError, LostRanksError
from clipkit.methods.base import embedding_spread
from clipkit.model import ContrastiveModel
from clipkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from clipkit.train.evaluator import describe, is_better
from clipkit.train.fsdp import (average_replicated_grads, rank_memory_mib, replicated_parameters, shard_model,
                                unsharded_copy)
from clipkit.train.fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from clipkit.train.metrics import MetricsLogger
from clipkit.train.parts import TrainSpec
from clipkit.train.resume import check_resume
from clipkit.train.sharded_checkpoint import load_sharded, read_trainer_state, save_sharded

log = logging.getLogger(__name__)

# An embedding spread (clipkit.methods.base.embedding_spread) below this has collapsed: every input
# embeds to nearly the same point, which BYOL and SimSiam can do without the loss saying so.
COLLAPSED_SPREAD = 0.05


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    steps: int
    samples: int
    final_loss: float
    seconds: float
    skipped: int
    interrupted: bool = False
    # The last in-training evaluation (rank 0; None without evaluation data) and the time all of them took.
    evaluation: dict[str, Any] | None = None
    eval_seconds: float = 0.0


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → bf16 on CUDA, fp32 on the CPU (where bf16 autocast is many times slower)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in dtypes:
        return torch.autocast(device_type=device.type, dtype=dtypes[precision])
    return contextlib.nullcontext()


def steps_per_epoch(config: ExperimentConfig, shards: list[str], world_size: int) -> int:
    """Optimizer steps in one pass over the data: samples // (batch × accumulation × ranks)."""
    num_samples = config.data.train_num_samples or count_samples(shards)
    if num_samples is None:
        unknown = next(url for url in shards if count_samples([url]) is None)
        raise DataError(
            f"cannot tell how many samples the training shards hold ({unknown} has no entry in a sizes.json "
            "beside it, nor an img2dataset NAME_stats.json): set data.train_num_samples to the samples in "
            "one epoch, or train.max_steps to train that many steps whatever the epochs"
        )
    global_batch = config.data.batch_size * config.train.accum_freq * world_size
    steps = num_samples // global_batch
    if steps == 0:
        raise DataError(f"{num_samples} training samples make no full global batch of {global_batch}")
    return steps


def total_training_steps(config: ExperimentConfig, stream: ShardStream, world_size: int) -> int:
    """``train.max_steps`` if set (the data then needs no known size), else epochs × steps per epoch."""
    if config.train.max_steps:
        return config.train.max_steps
    if config.data.resampled:
        return config.train.epochs * max(1, stream.batches_per_rank() // config.train.accum_freq)
    return config.train.epochs * steps_per_epoch(config, stream.shards, world_size)


@dataclass
class DataAccount:
    """What this rank's training data lost so far: samples skipped (undecodable, incomplete, or held by
    a broken or missing shard), per shard, the broken shards, and keys seen twice."""

    skipped: int = 0
    by_shard: collections.Counter[str] = field(default_factory=collections.Counter)
    broken_shards: set[str] = field(default_factory=set)
    duplicate_keys: int = 0

    def add(self, batch: dict[str, Any]) -> None:
        self.skipped += int(batch["num_skipped"])
        self.by_shard.update(batch["skipped_shards"])
        self.broken_shards.update(batch["broken_shards"])
        self.duplicate_keys += batch["duplicate_keys"]


class StopSignal:
    """Turns SIGTERM / SIGINT (a preempted or cancelled job) into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C means "now", not "after this step"
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, dist_context: DistributedContext) -> bool:
        """True on every rank as soon as any rank got a signal, so all ranks stop at the same step.

        Only a multi-rank job needs the (per-step) all-reduce; one process just reads its flag.
        """
        if not dist_context.is_distributed:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=dist_context.device)
        return bool(all_reduce_mean(flag).item() > 0)


class Trainer:
    """Trains a :class:`ContrastiveModel` on webdataset shards as the config says."""

    def __init__(self, config: ExperimentConfig, *, progress: bool = True, spec: TrainSpec = TrainSpec()) -> None:
        if not config.data.train_shards:
            raise ValueError("data.train_shards is empty: point it at webdataset shards")
        tables = [part for spec in (config.data.train_shards, config.data.val_shards)
                  for part in spec.split("::") if is_table(part)]
        if tables:
            raise ConfigError(f"{tables[0]} is a table, not shards: `clipkit train` converts it, or convert it "
                              "first with clipkit.data.table_shards.shards_for_tables(config.data)")
        output = Path(config.train.output_dir)
        if output.exists() and not output.is_dir():
            raise ConfigError(f"train.output_dir {output} is a file, not a folder: choose another train.output_dir")
        self.config = config
        self.spec = spec
        self.dist: DistributedContext = init_distributed(
            config.train.device, timeout=timedelta(seconds=config.train.collective_timeout_s))
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.precision = resolve_precision(self.device, config.train.precision)
        self.model: ContrastiveModel = spec.model(config, self.device)
        self.ddp_model: nn.Module = self.model
        # Sharded: FSDP's parameters are the model's own, sharded in place; the 0-d ones stay whole.
        self.sharded = self.dist.is_distributed and config.train.parallel == "fsdp"
        self.replicated = replicated_parameters(self.model) if self.sharded else []
        if self.sharded:
            shard_model(self.model, self.precision)
        elif self.dist.is_distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.train.compile:
            # Compiled after the DDP wrap, so dynamo splits graphs at DDP's gradient buckets. Checkpoints
            # keep saving self.model: its parameters are the compiled module's, without a prefix.
            self.ddp_model = torch.compile(self.ddp_model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        data = spec.data(config, self.dist)
        self.stream, self.loader, self.inputs, self.missing = data.stream, data.loader, data.inputs, data.missing
        self.total_steps = total_training_steps(config, self.stream, self.dist.world_size)
        # The missing shards' samples are counted once, by rank 0, so the sum over ranks holds them once.
        self.account = DataAccount(skipped=(self.missing.samples or 0) if self.dist.is_main else 0)
        self.skip_guard = SkipRateGuard(config.data.max_skip_fraction)
        # Each rank would have read a share of the missing shards' samples.
        self.skip_guard.update(0, (self.missing.samples or 0) // self.dist.world_size)
        self.optimizer = spec.optimizer(self.model, config.train)
        self.scheduler = spec.scheduler(self.optimizer, config.train, self.total_steps)
        self.loss_fn = spec.loss(config)
        self.evaluator = spec.evaluator(config.data, config.model, self.dist)
        self.eval_every = self._eval_interval()
        self.select_metric = self._select_metric()
        self.best_value: float | None = None
        self.eval_seconds = self.last_eval_seconds = 0.0
        self.output_dir = Path(config.train.output_dir)
        self.checkpointer = spec.checkpointer(config.train)
        # Training position: optimizer steps done, samples consumed, and where in the data we are.
        self.step = 0
        self.samples_seen = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self._saved_step: int | None = None
        self.warned_collapse = False
        if config.train.resume:
            self.resume(self.checkpointer.resolve(config.train.resume))

    # --- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything but the model, config and optimizer needed to continue exactly (``weights_only``-safe)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "samples_seen": self.samples_seen,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "rng": rng_state(),
            "world_size": self.dist.world_size,
            "best": {"value": self.best_value, "of": self._best_of()},
        }

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: a file of a DDP run, a folder of an FSDP one (on any number of ranks)."""
        folder = path.is_dir()
        payload = read_trainer_state(path) if folder else load_checkpoint(path, map_location=self.device)
        if not folder and "optimizer" not in payload:
            raise ValueError(f"{path} holds weights only (no optimizer state): it cannot resume a run")
        saved_world = payload.get("world_size")
        changes = check_resume(path, payload["config"], self.config, saved_world, self.dist.world_size)
        if changes and self.dist.is_main:
            log.info("resuming with changed settings: %s",
                     "; ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items()))
        if "data.num_workers" in changes and self.dist.is_main:
            log.warning("data.num_workers changed on resume: the data position is exact only with the number "
                        "of workers it was saved with; each worker may resume a few samples early or late")
        if folder:
            load_sharded(path, self.model, self.optimizer)
        else:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.step = payload["step"]
        self.samples_seen = payload["samples_seen"]
        self.epoch = payload["epoch"]
        # The position counts micro-batches: the same optimizer steps in this run's accumulation.
        steps_in_epoch = payload["batches_in_epoch"] // payload["config"]["train"]["accum_freq"]
        self.batches_in_epoch = steps_in_epoch * self.config.train.accum_freq
        if saved_world != self.dist.world_size and self.batches_in_epoch and self.dist.is_main:
            log.warning("resumed on %d ranks from a checkpoint of %s: epoch %d goes on after the same %d global "
                        "batches, but which samples they held depends on how the shards were split over the "
                        "ranks, so until the epoch ends some of its samples may come twice and others not at all",
                        self.dist.world_size, saved_world, self.epoch, steps_in_epoch)
        # The best so far counts only if it measured the same metric on the same data as this run does.
        best = payload.get("best") or {}
        self.best_value = best.get("value") if best.get("of") == self._best_of() else None
        set_rng_state(payload["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                     self.batches_in_epoch)

    def save(self) -> Path:
        """A resumable checkpoint of the current step: a file rank 0 writes while the others wait, or
        under FSDP a folder of every rank's shards."""
        if self._saved_step == self.step:  # save_every already saved this step
            return self.checkpointer.path(self.step)
        if self.checkpointer.sharded:  # every rank writes its shards
            save_sharded(self.checkpointer.path(self.step), self.model, self.optimizer, self.config, step=self.step,
                         **self.state())
            self._write_on_main(lambda: self.checkpointer.commit(self.step))
        else:
            self._write_on_main(lambda: self.checkpointer.save(self.model, self.config, step=self.step,
                                                               optimizer=self.optimizer.state_dict(), **self.state()))
        self._saved_step = self.step
        return self.checkpointer.path(self.step)

    # --- evaluation --------------------------------------------------------------------------

    def _eval_interval(self) -> int | None:
        """Steps between evaluations (``train.eval_every``; "epoch" → the steps of one epoch)."""
        every = self.config.train.eval_every
        if every is None or self.evaluator is None:
            if every is not None and self.dist.is_main:
                log.warning("train.eval_every is set but data.eval_shards and data.val_shards are not: "
                            "nothing to evaluate")
            return None
        if every != "epoch":
            return every
        if not self.config.train.max_steps:
            return max(1, self.total_steps // self.config.train.epochs)
        try:
            return steps_per_epoch(self.config, self.stream.shards, self.dist.world_size)
        except DataError as err:
            raise ConfigError(f"train.eval_every: epoch needs the length of an epoch ({err}); "
                              "or give train.eval_every in steps") from None

    def _best_of(self) -> list[str | None]:
        """What ``best_value`` measures: the metric and the evaluation data."""
        return [self.select_metric, self.config.data.eval_shards, self.config.data.val_shards]

    def _select_metric(self) -> str | None:
        name = self.config.train.select_metric
        if self.evaluator is None:
            if name is not None:
                raise ConfigError(f"train.select_metric {name!r} needs evaluation data: set data.eval_shards "
                                  "(zero-shot classification) or data.val_shards (retrieval, validation loss)")
            return None
        if name is None:
            return self.evaluator.default_metric()
        if name not in self.evaluator.metric_names:
            raise ConfigError(f"train.select_metric {name!r} is not evaluated with this config; it evaluates "
                              f"{', '.join(self.evaluator.metric_names)}")
        return name

    def evaluate(self, metrics: MetricsLogger | None) -> dict[str, Any] | None:
        """Evaluate now (every rank takes part), log and print the metrics on rank 0, and keep the
        model as ``checkpoints/best.pt`` when ``select_metric`` improved."""
        start = time.perf_counter()
        try:
            return self._evaluate(metrics)
        finally:
            self.last_eval_seconds = time.perf_counter() - start
            self.eval_seconds += self.last_eval_seconds

    def _evaluate(self, metrics: MetricsLogger | None) -> dict[str, Any] | None:
        if self.evaluator is None or self.select_metric is None:
            raise RuntimeError("evaluate() needs data.eval_shards or data.val_shards")
        model = self._whole_model()
        model.eval()
        try:
            with torch.no_grad():
                record = self.evaluator.evaluate(model)
        finally:
            model.train()
        if record is None:  # not rank 0
            self._write_on_main(lambda: None)
            return None
        record["epoch"] = self.epoch
        value = record.get(self.select_metric)
        improved = value is not None and is_better(self.select_metric, value, self.best_value)
        if improved:
            self.best_value = value
        if metrics is not None:
            metrics.log(self.step, record, prefix="eval")
        when = (f"epoch {round(self.step / self.eval_every)}" if self.config.train.eval_every == "epoch"
                else f"step {self.step}")
        tqdm.write(f"eval after {when}: {describe(record, self.evaluator.modality)}  "
                   f"[{record['eval_seconds']:.1f} s]" + (" (best so far)" if improved else ""))
        # Every rank passes the same barrier once; rank 0 writes when the metric improved.
        self._write_on_main((lambda: self._save_best(model)) if improved else lambda: None)
        return record

    def _save_best(self, model: ContrastiveModel) -> None:
        save_checkpoint(self.checkpointer.directory / "best.pt", model, self.config, step=self.step,
                        samples_seen=self.samples_seen, select_metric=self.select_metric,
                        select_value=self.best_value)

    def _whole_model(self) -> ContrastiveModel:
        """The model with all its weights on this rank: itself, or under FSDP an unsharded copy (every
        rank must call this then)."""
        return unsharded_copy(self.model) if self.sharded else self.model

    def _write_on_main(self, write: Callable[[], object]) -> None:
        """Rank 0 writes; every rank waits until it has, so no rank reads or exits ahead of the file."""
        if self.dist.is_main:
            write()
        if self.dist.is_distributed:
            torch.distributed.barrier()

    # --- data --------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever, epoch after epoch, starting at the saved data position."""
        while True:
            resumed_mid_epoch = self.batches_in_epoch > 0
            self.stream.set_epoch(self.epoch, skip_batches=self.batches_in_epoch)
            empty = True
            for batch in self.loader:
                self.account.add(batch)
                delivered = len(batch[self.inputs[0]]) if self.inputs[0] in batch else 0
                self.skip_guard.update(delivered, int(batch["num_skipped"]))
                if not delivered:  # a worker's last report of what it lost: no samples, no position
                    continue
                empty = False
                self.batches_in_epoch += 1
                yield batch
            if empty and not resumed_mid_epoch:  # a run resumed at an epoch's very end finds it empty
                raise DataError(f"the training shards yielded no full batch of {self.config.data.batch_size} "
                                f"({self.skip_guard.skipped} samples skipped; the warnings above say why): "
                                f"{self.config.data.train_shards}")
            self.epoch += 1
            self.batches_in_epoch = 0

    # --- the step ----------------------------------------------------------------------------

    def _loss(self, outputs: dict[str, torch.Tensor], with_temperature_grad: bool = True) -> torch.Tensor:
        scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
        if not with_temperature_grad:
            scale = scale.detach()
            bias = bias.detach() if bias is not None else None
        return self.loss_fn(outputs, scale, bias)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if self.config.train.uses_channels_last and tensor.dim() == 4:
            # Channels-last weights want channels-last images, else every convolution converts its input.
            # Converted after the copy: on a GPU the (pinned, asynchronous) copy stays a plain one.
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {name: self._to_device(batch[name]) for name in self.inputs}
        with autocast(self.device, self.precision):
            return self.ddp_model(inputs)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """One optimizer step over ``accum_freq`` micro-batches; returns this rank's loss (detached).

        With several micro-batches, features of all of them are computed first without gradients;
        then each micro-batch is re-encoded with gradients and the loss is taken against the whole
        accumulated batch (cached features for the others). The gradients summed over micro-batches
        are exactly those of one batch of accum_freq × batch_size. The temperature enters with
        gradient only once, or it would be counted accum_freq times: in the last pass, the one in
        which DDP synchronises gradients. After the optimizer step the method's heads update (a
        momentum target follows the online network) and the collapse signal is taken.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro_batches) == 1:
            outputs = self._forward(micro_batches[0])
            loss = self._loss(outputs)
            self.scaler.scale(loss).backward()
        else:
            with torch.no_grad():
                cached = [self._forward(batch) for batch in micro_batches]
            for index, batch in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else self._without_gradient_sync():
                    fresh = self._forward(batch)
                    outputs = {
                        name: torch.cat([fresh[name] if i == index else c[name] for i, c in enumerate(cached)])
                        for name in fresh
                    }
                    loss = self._loss(outputs, with_temperature_grad=last)
                    self.scaler.scale(loss).backward()
        average_replicated_grads(self.replicated)
        if self.config.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            clip = fsdp_clip_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_
            clip(trainable, self.config.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.clamp_logit_scale_()
        self.model.heads.after_step(self.model.towers, self.step, self.total_steps)
        self.last_spread = embedding_spread(outputs[self.model.heads.monitored].detach())
        return loss.detach()

    @contextlib.contextmanager
    def _without_gradient_sync(self) -> Iterator[None]:
        """Backward passes whose gradients accumulate on each rank, to be averaged with a later one's."""
        if not self.dist.is_distributed:
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.ddp_model.no_sync():
                yield

    def close(self) -> None:
        """Release the DDP wrapper; call it before ``shutdown_distributed``.

        DDP's reducer holds the process group. Freed after ``destroy_process_group``, it is the last
        owner and tears the gloo group down while holding the GIL, which deadlocks against a gloo
        thread that is freeing a Python-owned tensor (seen as a torchrun rank that never exits).
        Freed first, it only drops a reference; the group then goes down in ``destroy_process_group``
        once the final barrier has drained every thread's work.
        """
        self.ddp_model = self.model

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``train.max_steps`` (or the epochs), or until SIGTERM / SIGINT; a collective that
        fails (a rank died or stalled) raises :class:`LostRanksError`."""
        try:
            return self._fit()
        except Exception as err:
            if not (self.dist.is_distributed and is_collective_failure(err)):
                raise
            reason = str(err).strip().splitlines()[-1]
            raise LostRanksError(
                f"rank {self.dist.rank} of {self.dist.world_size} lost the others at step {self.step}: a process "
                f"or node of the job died, or did not answer within train.collective_timeout_s="
                f"{self.config.train.collective_timeout_s:g} ({reason}). Start the job again on every node with "
                "--resume latest to continue from the last checkpoint") from err

    def _fit(self) -> TrainResult:
        config = self.config
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        self.model.train()
        start = time.perf_counter()
        start_step, start_samples = self.step, self.samples_seen
        window = _Window(start)
        loss = torch.tensor(float("nan"))
        micro_batches = self._micro_batches()
        interrupted = False
        evaluation: dict[str, Any] | None = None
        metrics = self.spec.metrics(config.train) if self.dist.is_main else None
        with contextlib.ExitStack() as stack, StopSignal() as stop:
            if metrics is not None:
                stack.enter_context(metrics)
            bar = stack.enter_context(tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                                           desc="train", unit="step", dynamic_ncols=True))
            while self.step < self.total_steps:
                wait_start = time.perf_counter()
                batches = [next(micro_batches) for _ in range(config.train.accum_freq)]
                window.data_wait += time.perf_counter() - wait_start
                loss = self.train_step(batches)
                batch_samples = sum(len(b[self.inputs[0]]) for b in batches)
                self.step += 1
                self.samples_seen += batch_samples * self.dist.world_size
                window.add(loss, self.last_spread, batch_samples)
                bar.update(1)
                if self.step % config.train.log_every == 0 or self.step == self.total_steps:
                    record = self._training_record(window)
                    if metrics is not None:
                        metrics.log(self.step, record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                    window = _Window(time.perf_counter())
                # Evaluated before the step's checkpoint, which then holds the best value so far.
                due = self.step == self.total_steps or (self.eval_every and self.step % self.eval_every == 0)
                if self.evaluator is not None and due:
                    evaluation = self.evaluate(metrics)
                    window.start += self.last_eval_seconds  # the window's throughput counts training only
                if config.train.save_every and self.step % config.train.save_every == 0:
                    self.save()
                if stop.should_stop(self.dist):
                    interrupted = True
                    break
        account = self.account
        if account.skipped:
            per_shard = ", ".join(f"{url}: {count}" for url, count in account.by_shard.most_common())
            broken = f"; {len(account.broken_shards)} broken shard(s)" if account.broken_shards else ""
            log.warning("rank %d skipped %d undecodable or incomplete samples (%s)%s; see the warnings above",
                        self.dist.rank, account.skipped, per_shard, broken)
        checkpoint = self.save()
        if not interrupted:
            checkpoint = self._save_final()
        elif self.dist.is_main:
            log.warning("stopped by signal at step %d of %d; continue with --resume latest", self.step,
                        self.total_steps)
        final_loss = float(all_reduce_mean(loss.to(self.device)).item())
        seconds = time.perf_counter() - start
        if self.eval_seconds and self.dist.is_main:
            tqdm.write(f"evaluation took {self.eval_seconds:.1f} s, {self.eval_seconds / seconds:.1%} of the "
                       f"run's {seconds:.0f} s")
        return TrainResult(checkpoint, self.step - start_step, self.samples_seen - start_samples,
                           final_loss, seconds, account.skipped, interrupted, evaluation, self.eval_seconds)

    def _training_record(self, window: _Window) -> dict[str, Any]:
        """A log line's metrics: the window's loss averaged over ranks, the data account summed over
        ranks (one all-reduce for all of them), and the schedule's and model's state."""
        world = self.dist.world_size
        account = self.account
        totals = all_reduce_mean(torch.tensor(
            [float(window.loss_sum) / window.steps, account.skipped, len(account.broken_shards),
             account.duplicate_keys, float(window.spread_sum) / window.steps], device=self.device,
            dtype=torch.float64))
        record = {
            "epoch": self.epoch,
            "loss": totals[0].item(),
            "lr": self.scheduler.get_last_lr()[0],
            "temperature": 1.0 / self.model.logit_scale.exp().item(),
            "logit_scale": self.model.logit_scale.exp().item(),
            **window.rates(world),
            "samples_seen": self.samples_seen,
            "skipped_samples": round(totals[1].item() * world),
            "broken_shards": round(totals[2].item() * world),
            "duplicate_keys": round(totals[3].item() * world),
            "missing_shards": len(self.missing.shards),
            "embedding_spread": totals[4].item(),
            **rank_memory_mib(self.model, self.optimizer),
        }
        if record["embedding_spread"] < COLLAPSED_SPREAD and not self.warned_collapse and self.dist.is_main:
            log.warning("the embeddings have collapsed at step %d (embedding_spread %.3f: every image embeds to "
                        "nearly the same point); lower train.lr or check the method's heads", self.step,
                        record["embedding_spread"])
            self.warned_collapse = True
        if self.model.logit_bias is not None:
            record["logit_bias"] = self.model.logit_bias.item()
        return record

    def _save_final(self) -> Path:
        """The trained model alone (weights + config) as ``checkpoints/final.pt``, for evaluation and serving."""
        path = self.checkpointer.directory / "final.pt"
        model = self._whole_model()
        self._write_on_main(lambda: save_checkpoint(path, model, self.config, step=self.step,
                                                    samples_seen=self.samples_seen))
        return path


class _Window:
    """Sums over the steps between two log lines."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.data_wait = 0.0
        # Summed on the loss's device and read once per window: a per-step .cpu() would stall the GPU.
        self.loss_sum: torch.Tensor | float = 0.0
        self.spread_sum: torch.Tensor | float = 0.0
        self.steps = 0
        self.samples = 0

    def add(self, loss: torch.Tensor, spread: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum + loss.float()
        self.spread_sum = self.spread_sum + spread
        self.steps += 1
        self.samples += samples

    def rates(self, world_size: int) -> dict[str, float]:
        """Throughput and data-wait share of the window (this rank's, scaled to all ranks)."""
        elapsed = time.perf_counter() - self.start
        return {"samples_per_s": self.samples * world_size / elapsed, "samples_per_s_per_device": self.samples / elapsed,
                "data_wait_fraction": self.data_wait / elapsed}
