"""Data-parallel plumbing: process-group setup from torchrun's environment and autograd-aware collectives.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here degrades to a single process,
so the same training code runs on a laptop and on many nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from clipkit.config import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: its global rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU when CUDA is present, else the CPU; other names as given."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}, but this machine has no CUDA device that torch can use; "
                          "set train.device=cpu (or auto, which picks a GPU when there is one)")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init_distributed(device_name: str = "auto", backend: str | None = None,
                     timeout: timedelta | None = None) -> DistributedContext:
    """Join torchrun's process group (``backend``, by default NCCL on CUDA and gloo on the CPU, with
    torch's default collective ``timeout`` unless given), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed(wait_for_others: bool = True) -> None:
    """Leave the process group, once every rank is done with it unless ``wait_for_others`` is False
    (after a failure: the others may be gone)."""
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed: a peer gone or a timeout. NCCL's surface as
    ``DistError``; gloo's as plain ``RuntimeError`` whose message names gloo's source file."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks) in the current job; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank → (world_size · B, ...) in rank order, with gradients flowing back to their rank.

    Backward sums the gradient every rank computed for a slice and hands it to the rank that produced
    the slice; with DDP's gradient averaging this makes N ranks equal one process on the whole batch.
    """
    if rank_and_world()[1] == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


class _RingShift(torch.autograd.Function):
    """Send a tensor to the next rank and receive the previous rank's; gradients travel the other way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, step: int) -> torch.Tensor:  # type: ignore[override]
        ctx.step = step
        return _exchange(tensor, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _exchange(grad.contiguous(), -ctx.step), None


def _exchange(tensor: torch.Tensor, step: int) -> torch.Tensor:
    rank, world = rank_and_world()
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), (rank + step) % world),
        dist.P2POp(dist.irecv, received, (rank - step) % world),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def ring_shift(tensor: torch.Tensor, step: int = 1) -> torch.Tensor:
    """The tensor of rank ``(rank - step) % world``: one hop of a ring exchange, differentiable."""
    return _RingShift.apply(tensor, step)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (no gradient); the tensor itself in a single process."""
    world = rank_and_world()[1]
    if world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world
