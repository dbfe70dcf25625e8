"""SLIP (Mu et al., 2021): CLIP's image–text loss plus ``ssl.slip_weight`` × SimCLR's loss on views of
the image, through the same image tower."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from clipkit.config import ModelConfig
from clipkit.methods.base import Encode, Heads, MethodLoss
from clipkit.methods.clip import PairHeads, PairLoss
from clipkit.methods.simclr import SimCLRHeads, ViewsNTXentLoss


class SLIPHeads(Heads):
    """The pair's features and the views' projections (SimCLR's projector on the image embedding)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pair = PairHeads(config)
        self.simclr = SimCLRHeads(config)
        self.inputs = {**self.pair.inputs, **self.simclr.inputs}
        self.monitored = self.pair.monitored

    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.pair(encode, batch), **self.simclr(encode, batch)}


class SLIPLoss(MethodLoss):
    def __init__(self, config: ModelConfig, pair_loss: nn.Module) -> None:
        super().__init__()
        self.pair = PairLoss(config.modalities[:2], pair_loss)
        self.simclr = ViewsNTXentLoss(config)
        self.weight = config.ssl.slip_weight

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        return self.pair(outputs, logit_scale, logit_bias) + self.weight * self.simclr(outputs, logit_scale, logit_bias)
