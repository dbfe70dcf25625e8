"""MoCo v3 (Chen, Xie and He, 2021): a predictor on the online projector, a momentum target, and InfoNCE
between each view's prediction and the target's keys of another view of every image in the global batch.

clipkit implements v3, not v2's queue: its keys all come from the current target (a queue's are up to
65 536 samples stale), the loss is exact across ranks with the same all-gather as SimCLR's, and the
only state to checkpoint is the target network; v3 matches or beats v2 in its paper's comparisons.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import ModelConfig
from clipkit.distributed import gather_with_grad, rank_and_world
from clipkit.methods.base import MethodLoss, symmetrised, view_names
from clipkit.methods.byol import PredictorTargetHeads, target_key

TEMPERATURE = 0.2
BASE_MOMENTUM = 0.99


class MoCoHeads(PredictorTargetHeads):
    """BYOL's heads with MoCo v3's affine-free BatchNorm on projector and predictor outputs."""

    base_momentum = BASE_MOMENTUM

    def __init__(self, config: ModelConfig, tower: nn.Module) -> None:
        super().__init__(config, tower, output_norm=True)


def key_contrast(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """This rank's queries (B, D) against the keys (B, D) of all ranks; query i's positive is key i of
    its own rank. MoCo v3's 2τ·cross-entropy → scalar."""
    rank = rank_and_world()[0]
    all_keys = gather_with_grad(keys)
    labels = torch.arange(len(queries), device=queries.device) + rank * len(queries)
    return F.cross_entropy(queries @ all_keys.T / temperature, labels) * 2 * temperature


class MoCoLoss(MethodLoss):
    """key_contrast(prediction of a, target of b), :func:`symmetrised` over the views: with two views,
    MoCo v3's symmetrised loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.views = view_names(config)
        self.temperature = config.ssl.temperature or TEMPERATURE

    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        return symmetrised(self.views, lambda a, b: key_contrast(
            outputs[a].float(), outputs[target_key(b)].float(), self.temperature))
