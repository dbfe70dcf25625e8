"""BYOL (Grill et al., 2020): an online projector and predictor predict a momentum target's projection
of another view of the image; no negatives. The target's momentum rises from ``ssl.base_momentum`` to 1
on a cosine over the run."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import ModelConfig
from clipkit.methods.base import Encode, Heads, MethodLoss, symmetrised, view_inputs, view_names
from clipkit.methods.heads import MomentumTarget, cosine_momentum, mlp
from clipkit.methods.simclr import projector

BASE_MOMENTUM = 0.996


def target_key(view: str) -> str:
    return f"{view}.target"


class PredictorTargetHeads(Heads):
    """Online projector + predictor, and a momentum target of tower and projector (BYOL, MoCo v3).

    Outputs per view: its unit-norm online prediction (B, projection_dim) under the view's name, and
    the target's unit-norm projection, without gradient, under ``VIEW.target``.
    """

    base_momentum: float

    def __init__(self, config: ModelConfig, tower: nn.Module, *, output_norm: bool = False) -> None:
        super().__init__()
        self.views = view_names(config)
        self.inputs = view_inputs(config)
        self.monitored = self.views[0]
        ssl = config.ssl
        self.projector = projector(config, output_norm=output_norm)
        self.predictor = mlp(ssl.projection_dim, ssl.predictor_hidden_dim, ssl.projection_dim, 2,
                             output_norm=output_norm)
        self.target = MomentumTarget(tower, self.projector)
        self.momentum = ssl.base_momentum if ssl.base_momentum is not None else self.base_momentum

    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        for name in self.views:
            outputs[name] = F.normalize(self.predictor(self.projector(encode("image", batch[name]))), dim=-1)
            outputs[target_key(name)] = F.normalize(self.target(batch[name]), dim=-1)
        return outputs

    def after_step(self, towers: nn.ModuleDict, step: int, total_steps: int) -> None:
        self.target.update(towers["image"], self.projector, cosine_momentum(self.momentum, step, total_steps))


class BYOLHeads(PredictorTargetHeads):
    base_momentum = BASE_MOMENTUM


class BYOLLoss(MethodLoss):
    """mean(2 − 2·cos(prediction of a, target of b)), :func:`symmetrised` over the views: with two
    views, BYOL's symmetrised loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.views = view_names(config)

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        return symmetrised(self.views, lambda a, b: (
            2 - 2 * (outputs[a].float() * outputs[target_key(b)].float()).sum(-1)).mean())
