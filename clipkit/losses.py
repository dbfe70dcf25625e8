"""Contrastive losses over unit-norm features of two modalities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP): mean of the cross-entropies over rows and over columns.

    Row i of ``features_a`` and row i of ``features_b`` are a matching pair; every other row of the
    batch is a negative.
    """

    def forward(
        self, features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """features (B, D) each, logit_scale a scalar multiplier (not its log) → scalar loss."""
        logits = logit_scale * features_a @ features_b.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
