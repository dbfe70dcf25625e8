"""Run by the distributed tests under torchrun: one real trainer step on this rank's slice of a batch.

    torchrun --nproc_per_node=N tests/distributed_step.py CONFIG.yaml BATCH.pt OUT.pt

Each rank takes its contiguous slice of the saved global batch, splits it into ``train.accum_freq``
micro-batches and runs ``Trainer.train_step``. Rank 0 saves the rank-averaged loss, the parameter
gradients (after DDP's averaging, or FSDP's, gathered whole) and the parameters after the step to
OUT.pt, for comparison with a single process or another parallel style.
"""

from __future__ import annotations

import faulthandler
import sys

import torch
from torch.distributed.tensor import DTensor

from clipkit.config import load_config
from clipkit.distributed import all_reduce_mean, shutdown_distributed
from clipkit.train.trainer import Trainer


def slice_batch(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    size = len(next(iter(batch.values()))) // parts
    return {name: value[index * size : (index + 1) * size] for name, value in batch.items()}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one process holds it: an FSDP shard (a DTensor) gathered from every rank."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """One train_step on ``batch`` split into accum_freq micro-batches → (loss averaged over ranks, grads)."""
    accum = trainer.config.train.accum_freq
    loss = trainer.train_step([slice_batch(batch, accum, i) for i in range(accum)])
    grads = {name: whole(p.grad).detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return all_reduce_mean(loss).item(), grads


def main(config_path: str, batch_path: str, out_path: str) -> None:
    # A collective that never completes would hang the test: dump every thread's stack and exit instead.
    faulthandler.dump_traceback_later(120, exit=True)
    trainer = Trainer(load_config(config_path), progress=False)
    batch = torch.load(batch_path, weights_only=True)
    local = slice_batch(batch, trainer.dist.world_size, trainer.dist.rank)
    loss, grads = run_step(trainer, local)
    params = {name: whole(p.detach()).clone() for name, p in trainer.model.named_parameters()}
    if trainer.dist.is_main:
        torch.save({"loss": loss, "grads": grads, "params": params}, out_path)
    trainer.close()
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
