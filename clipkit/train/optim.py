"""AdamW with decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from clipkit.config import TrainConfig
from clipkit.model import ContrastiveModel
from clipkit.train.layer_decay import layer_lr_scales


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm gains, embeddings' 1-D params and the temperature are not regularised (as in CLIP).
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name or "embedding" in name


def build_optimizer(model: ContrastiveModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in groups by learning rate and weight decay.

    The first two groups learn at ``config.lr`` (with decay, then without), so the scheduler's first
    rate is ``train.lr``'s; with ``train.layer_decay`` each lower layer's parameters follow in groups
    of their own, at ``lr × layer_decay ** depth`` (:mod:`clipkit.train.layer_decay`). The scale is put
    into each group's ``lr``: the schedule multiplies every group's initial rate.
    """
    # A fully locked tower trains nothing: it needs no layer order (and may have none known).
    trained = nn.ModuleDict({name: tower for name, tower in model.towers.items()
                             if any(p.requires_grad for p in tower.parameters())})
    scales = layer_lr_scales(trained, config.layer_decay) if config.layer_decay is not None else {}
    # Keyed (scale, decays); the two full-rate groups always exist, as checkpoints expect them.
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (scales.get(id(param), 1.0), not _no_weight_decay(name, param))
            groups.setdefault(key, []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    param_groups = [
        {"params": params, "lr": config.lr * scale, "weight_decay": config.weight_decay if decays else 0.0}
        for (scale, decays), params in ordered
    ]
    # The fused kernel is several times faster than the per-tensor loop (the CPU default) and
    # supports both CPU and CUDA parameters.
    trainable = [p for group in groups.values() for p in group]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def lr_multiplier(
    schedule: str, *, warmup_steps: int, total_steps: int, cooldown_steps: int = 0
) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup from 1/warmup to 1, then the named schedule.

    ``cosine`` decays to 0 at ``total_steps``; ``constant`` stays at 1; ``const-cooldown`` stays at 1
    and then falls linearly to 0 over the last ``cooldown_steps``.
    """
    if schedule not in ("cosine", "constant", "const-cooldown"):
        raise ValueError(f"unknown schedule {schedule!r}")
    cooldown_start = total_steps - cooldown_steps

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "const-cooldown" and step >= cooldown_start:
            return max(0.0, 1.0 - (step - cooldown_start) / max(1, cooldown_steps))
        return 1.0

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = lr_multiplier(
        config.schedule, warmup_steps=config.warmup_steps, total_steps=total_steps,
        cooldown_steps=config.cooldown_steps,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
