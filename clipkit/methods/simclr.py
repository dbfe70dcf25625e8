"""SimCLR (Chen et al., 2020): a projector on the image tower, NT-Xent between views of each image with
every other view of the global batch a negative."""

from __future__ import annotations

import itertools
from typing import Mapping

import torch
import torch.nn.functional as F

from clipkit.config import ModelConfig
from clipkit.losses import NTXentLoss
from clipkit.methods.base import Encode, Heads, MethodLoss, view_inputs, view_names
from clipkit.methods.heads import mlp

TEMPERATURE = 0.1


def projector(config: ModelConfig, *, output_norm: bool = False) -> torch.nn.Sequential:
    ssl = config.ssl
    return mlp(config.embed_dim, ssl.hidden_dim, ssl.projection_dim, ssl.projector_layers, output_norm=output_norm)


class SimCLRHeads(Heads):
    """Each view through the image tower and the projector: unit-norm (B, projection_dim) per view."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.views = view_names(config)
        self.inputs = view_inputs(config)
        self.monitored = self.views[0]
        self.projector = projector(config)

    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: F.normalize(self.projector(encode("image", batch[name])), dim=-1) for name in self.views}


class ViewsNTXentLoss(MethodLoss):
    """NT-Xent averaged over every pair of views (with two views, SimCLR's loss)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pairs = list(itertools.combinations(view_names(config), 2))
        self.ntxent = NTXentLoss(config.ssl.temperature or TEMPERATURE)

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        losses = [self.ntxent(outputs[a].float(), outputs[b].float()) for a, b in self.pairs]
        return torch.stack(losses).mean()
