"""CLIP: the first two modalities of ``model.modalities`` aligned by InfoNCE or SigLIP."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import ModelConfig
from clipkit.methods.base import Encode, Heads, MethodLoss


class PairHeads(Heads):
    """No parameters: the unit-norm features of each modality of the aligned pair (further towers ride
    along for evaluation)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inputs = {name: name for name in config.modalities[:2]}
        self.monitored = config.modalities[0]

    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: F.normalize(encode(tower, batch[name]), dim=-1) for name, tower in self.inputs.items()}


class PairLoss(MethodLoss):
    """The image–text (or any pair's) loss of ``model.loss`` between the pair's features."""

    def __init__(self, pair: tuple[str, str], loss: nn.Module) -> None:
        super().__init__()
        self.pair = pair
        self.loss = loss

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        first, second = self.pair
        return self.loss(outputs[first].float(), outputs[second].float(), logit_scale, logit_bias)
