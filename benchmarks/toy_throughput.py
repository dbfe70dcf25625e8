"""Print the throughput of the quickstart's parts on this machine: data loading and the training step.

    python benchmarks/toy_throughput.py [--config configs/toy-image-text.yaml] [--steps 30]

Figures are printed, never asserted: compare ratios within one run on a noisy machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from clipkit.cli import resolve_config_path
from clipkit.config import load_config
from clipkit.data.pipeline import ShardStream, build_loader
from clipkit.data.shards import expand_shards
from clipkit.data.toy import make_toy_image_text
from clipkit.modalities import get_modality
from clipkit.train.trainer import Trainer


def loader_samples_per_s(stream: ShardStream, num_workers: int, max_batches: int) -> float:
    loader = build_loader(stream, num_workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, samples = time.perf_counter(), 0
    for _, batch in zip(range(max_batches), iterator):
        samples += len(batch["text"])
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/toy-image-text.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = load_config(resolve_config_path(args.config))
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy_image_text(Path(tmp), num_train=4000, num_eval=0, image_size=config.model.image.image_size,
                                  samples_per_shard=1000)
        config.data.train_shards = toy.shard_pattern("train")
        config.train.output_dir = str(Path(tmp) / "run")
        config.train.max_steps = args.steps
        config.data.eval_shards, config.train.eval_every = "", None  # the training step alone
        fields = [get_modality(m, config.model, config.data.augment).field(train=True) for m in config.model.modalities]
        stream = ShardStream(expand_shards(config.data.train_shards), fields, config.data.batch_size,
                             train=True, shuffle_size=config.data.shuffle_buffer)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {config.data.batch_size}, "
              f"{config.model.image.image_size} px")
        loader_rates = {}
        for workers in (0, 1, 2):
            loader_rates[workers] = loader_samples_per_s(stream, workers, max_batches=20)
            print(f"data loader, {workers} worker(s): {loader_rates[workers]:8.0f} samples/s")
        trainer = Trainer(config, progress=False)
        result = trainer.fit()
        train_rate = result.samples / result.seconds
        print(f"training ({config.model.image.timm_name}, {args.steps} steps incl. data): {train_rate:8.0f} samples/s")
        workers = config.data.num_workers
        if workers in loader_rates:
            print(f"headroom: the {workers}-worker loader delivers {loader_rates[workers] / train_rate:.1f}x "
                  f"what training consumes (above 1: data loading is not the bottleneck)")


if __name__ == "__main__":
    main()
