"""The quickstart's training compute in FLOPs, against the config it replaced.

    python benchmarks/quickstart_compute.py [--config toy-image-text] [--against test_byobnet:1496]

FLOPs of one training step (both towers forward and backward and the loss, at the config's batch and
image size) are counted by torch's FlopCounterMode on the CPU, then multiplied by the steps trained.
``--against TIMM_NAME:STEPS`` is the same config with another image tower and step count: by default
the quickstart before this config, 1496 steps (8 epochs) of test_byobnet.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipkit.cli import resolve_config_path
from clipkit.config import ExperimentConfig, load_config
from clipkit.losses import build_loss
from clipkit.model import create_model


def step_flops(config: ExperimentConfig) -> int:
    """FLOPs of one forward + backward pass of ``config``'s model and loss on a batch of its size."""
    model = create_model(config.model)
    size, batch = config.model.image.image_size, config.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    tokens = model.tokenize([f"a photo of a small red circle number {i}" for i in range(batch)])
    loss_fn = build_loss(config.model.loss, across_ranks=False)
    with FlopCounterMode(display=False) as counter:
        features = model({"image": images, "text": tokens})
        loss = loss_fn(features["image"], features["text"], model.logit_scale.exp())
        loss.backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="toy-image-text")
    parser.add_argument("--against", default="test_byobnet:1496", help="TIMM_NAME:STEPS to compare with")
    args = parser.parse_args()
    config = load_config(resolve_config_path(args.config))
    steps = config.train.max_steps
    if steps is None:
        parser.error(f"{args.config} sets no train.max_steps: its step count depends on its data")
    other_name, other_steps = args.against.rsplit(":", 1)
    other = dataclasses.replace(config, model=dataclasses.replace(
        config.model, image=dataclasses.replace(config.model.image, timm_name=other_name)))
    rows = [(config.model.image.timm_name, steps, step_flops(config)),
            (other_name, int(other_steps), step_flops(other))]
    print(f"batch {config.data.batch_size}, {config.model.image.image_size} px")
    print(f"{'image tower':14s} {'steps':>6s} {'GFLOP/step':>11s} {'total TFLOP':>12s}")
    for name, count, flops in rows:
        print(f"{name:14s} {count:6d} {flops / 1e9:11.2f} {count * flops / 1e12:12.1f}")
    ratio = rows[0][1] * rows[0][2] / (rows[1][1] * rows[1][2])
    print(f"{args.config}: {ratio:.0%} of the compute of {other_steps} steps of {other_name}")


if __name__ == "__main__":
    main()
