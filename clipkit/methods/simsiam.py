"""SimSiam (Chen and He, 2021): a projector and a predictor on one network, the prediction of each view
pulled towards the other view's projection behind a stop-gradient; no negatives, no momentum."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from clipkit.config import ModelConfig
from clipkit.methods.base import Encode, Heads, MethodLoss, symmetrised, view_inputs, view_names
from clipkit.methods.heads import mlp
from clipkit.methods.simclr import projector


def projection_key(view: str) -> str:
    return f"{view}.projection"


class SimSiamHeads(Heads):
    """Outputs per view: the unit-norm prediction under the view's name and the unit-norm projection
    under ``VIEW.projection`` (both with gradient; the loss stops it on the projection)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.views = view_names(config)
        self.inputs = view_inputs(config)
        self.monitored = projection_key(self.views[0])
        ssl = config.ssl
        self.projector = projector(config, output_norm=True)
        self.predictor = mlp(ssl.projection_dim, ssl.predictor_hidden_dim, ssl.projection_dim, 2)

    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        for name in self.views:
            projection = self.projector(encode("image", batch[name]))
            outputs[name] = F.normalize(self.predictor(projection), dim=-1)
            outputs[projection_key(name)] = F.normalize(projection, dim=-1)
        return outputs


class SimSiamLoss(MethodLoss):
    """The mean over ordered pairs of views (a, b) of −cos(prediction of a, stop-grad(projection of b)):
    :func:`symmetrised`, divided by the number of views."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.views = view_names(config)

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        return -symmetrised(self.views, lambda a, b: (
            outputs[a].float() * outputs[projection_key(b)].float().detach()).sum(-1).mean()) / len(self.views)
