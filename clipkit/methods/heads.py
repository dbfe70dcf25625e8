"""Building blocks of the self-supervised heads: MLP projectors and predictors, and momentum targets."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, *, output_norm: bool = False) -> nn.Sequential:
    """``layers`` linear layers in_dim → hidden_dim → … → out_dim, BatchNorm and ReLU after each hidden
    one (SimCLR's, BYOL's and MoCo v3's heads); ``output_norm`` adds an affine-free BatchNorm at the end
    (SimSiam's and MoCo v3's projector). Input (B, in_dim) → (B, out_dim)."""
    dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(dims, dims[1:])):
        last = index == layers - 1
        modules.append(nn.Linear(width_in, width_out, bias=last and not output_norm))
        if not last:
            modules += [nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
    if output_norm:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: 1 − (1 − base)(cos(π·step/total) + 1)/2, from ``base`` at step 0 to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


class MomentumTarget(nn.Module):
    """A copy of the online network (tower, then projector) that never receives a gradient and follows
    the online weights as an exponential moving average: θ_target ← m·θ_target + (1 − m)·θ_online.

    Its weights are registered parameters with ``requires_grad`` false, so they are in the model's
    state (and checkpoints, for exact resumption) but not in the optimizer or DDP's gradient sync.
    Its normalisation layers keep their own running statistics.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.tower = copy.deepcopy(tower)
        self.projector = copy.deepcopy(projector)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, projection_dim) target projections, without gradient."""
        with torch.no_grad():
            return self.projector(self.tower(images))

    @torch.no_grad()
    def update(self, tower: nn.Module, projector: nn.Module, momentum: float) -> None:
        online = [*tower.parameters(), *projector.parameters()]
        target = [*self.tower.parameters(), *self.projector.parameters()]
        torch._foreach_lerp_(target, online, 1 - momentum)
