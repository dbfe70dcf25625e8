"""Fully sharded data parallel (``train.parallel: fsdp``) with FSDP2's ``fully_shard``.

Each repeated block of each tower (a ViT's blocks, a ResNet's bottlenecks, the text transformer's
residual blocks, a momentum target's copies of them) is one shard group: its weights, gradients and
optimizer state live 1/N on each rank, its weights are all-gathered just before it runs and freed
after, and its gradients are reduce-scattered as the backward pass leaves it. Each tower, then the
whole model, is a group for what is left (stems, final norms, projections, the methods' heads).

FSDP2 cannot shard 0-d parameters (the temperature, SigLIP's bias). They stay whole on every rank,
outside FSDP, and :func:`average_replicated_grads` averages their gradients as DDP would.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from clipkit.model import ContrastiveModel, model_for_weights

MIB = 2**20


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The innermost blocks under ``module``: the children of an ``nn.ModuleList`` or ``nn.Sequential``
    that are made of modules themselves and hold parameters (a ViT's or text transformer's blocks, a
    ResNet's bottlenecks), leaving out a block that holds such blocks (a stage: its blocks are the
    units). A sequence of plain layers (a convolutional stem, an MLP) is no unit.

    Found by structure rather than by a list of tower classes, so timm's, open_clip's and clipkit's own
    towers all shard without a table that would go stale."""
    candidates = [child for container in module.modules() if isinstance(container, (nn.ModuleList, nn.Sequential))
                  for child in container.children()
                  if any(True for _ in child.children()) and any(True for _ in child.parameters())]
    chosen = {id(unit) for unit in candidates}
    return [unit for unit in candidates
            if not any(id(inner) in chosen for inner in unit.modules() if inner is not unit)]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 0-d parameters, which FSDP2 leaves whole on every rank."""
    return [param for param in model.parameters() if param.dim() == 0]


def mixed_precision(precision: str, *, outermost: bool = False) -> MixedPrecisionPolicy:
    """bf16: weights all-gathered and used in bf16, gradients reduced in fp32; the ``outermost`` group
    (the model) returns fp32 outputs for the loss. Inner groups hand bf16 on, or the next layer of the
    group above (a final norm with bf16 weights) would get fp32 input. Otherwise the parameters' dtype."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32 if outermost else None)
    return MixedPrecisionPolicy()


def shard_model(model: ContrastiveModel, precision: str) -> None:
    """Shard ``model`` in place over the default process group: each unit of :func:`shard_units`, then
    each tower, then the model (bottom-up, as FSDP2 requires)."""
    inner = mixed_precision(precision)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=inner)
    for tower in model.towers.values():
        fully_shard(tower, mp_policy=inner)
    fully_shard(model, mp_policy=mixed_precision(precision, outermost=True),
                ignored_params=set(replicated_parameters(model)))


def average_replicated_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of the parameters outside FSDP over the ranks (DDP's all-reduce)."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(1) for grad in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, value in zip(grads, flat):
        grad.copy_(value)


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's ``clip_grad_norm_`` over sharded (DTensor) and whole gradients together, which torch's
    own refuses to mix: the norm of each kind, combined, scales all. Returns the total norm (0-d)."""
    params = [param for param in params if param.grad is not None]
    sharded = [param.grad for param in params if isinstance(param.grad, DTensor)]
    whole = [param.grad for param in params if not isinstance(param.grad, DTensor)]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if whole:
        norms.append(torch.nn.utils.get_total_norm(whole))
    total = torch.linalg.vector_norm(torch.stack(norms))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def unsharded_copy(model: ContrastiveModel) -> ContrastiveModel:
    """A plain (unsharded) copy of ``model``'s current weights on every rank, on its device, in
    training mode; every rank must call it. Evaluation and the final checkpoints use it: a sharded
    model runs only when every rank runs it alike, and the evaluator embeds a different block of the
    data on each rank."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(weights.values())).device
    copy = model_for_weights(model.config)
    copy.load_state_dict(weights)
    return copy.to(device)


def rank_memory_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this rank holds, in MiB: its parameters (its shards under FSDP), their gradients, and the
    optimizer's state (Adam's two moments, also sharded under FSDP)."""

    def local_bytes(tensors: Iterable[torch.Tensor]) -> float:
        total = 0
        for tensor in tensors:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            total += local.numel() * local.element_size()
        return total / MIB

    params = list(model.parameters())
    state = [value for entry in optimizer.state.values() for value in entry.values()
             if isinstance(value, torch.Tensor) and value.dim() > 0]
    return {"params_mib": local_bytes(params),
            "grads_mib": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_mib": local_bytes(state)}
