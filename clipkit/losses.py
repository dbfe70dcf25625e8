"""Contrastive losses over unit-norm features of two modalities, exact under data parallelism.

Every loss takes this rank's features (B, D) of both modalities. In a multi-process job the loss is
computed over the global batch (all ranks' samples), and its gradients reach the rank that produced
each feature, so that N ranks with DDP's gradient averaging step exactly like one process on the
whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.distributed import gather_with_grad, rank_and_world, ring_shift


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP): the mean of the cross-entropies over rows and over columns.

    Row i of ``features_a`` and row i of ``features_b`` are a matching pair; every other sample of the
    global batch is a negative. Features of all ranks are all-gathered with autograd. With
    ``local_loss`` each rank scores only its own rows against all columns (B × world·B logits instead
    of world·B × world·B): the same loss and gradients after averaging, with far less memory.
    """

    def __init__(self, local_loss: bool = False, across_ranks: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.across_ranks = across_ranks

    def forward(
        self,
        features_a: torch.Tensor,
        features_b: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features (B, D) each, logit_scale the multiplier (not its log) → scalar loss."""
        if logit_bias is not None:
            raise ValueError("InfoNCE has no logit bias; it belongs to the SigLIP loss")
        if not self.across_ranks:
            return self._loss(logit_scale * features_a @ features_b.T)
        rank, world = rank_and_world()
        all_a, all_b = gather_with_grad(features_a), gather_with_grad(features_b)
        if self.local_loss and world > 1:
            labels = torch.arange(len(features_a), device=features_a.device) + rank * len(features_a)
            logits_a = logit_scale * features_a @ all_b.T
            logits_b = logit_scale * features_b @ all_a.T
            return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
        return self._loss(logit_scale * all_a @ all_b.T)

    @staticmethod
    def _loss(logits: torch.Tensor) -> torch.Tensor:
        """(N, N) logits with the matching pairs on the diagonal → scalar loss."""
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class SigLIPLoss(nn.Module):
    """Sigmoid loss (SigLIP): every image–text pair is a binary "match or not" decision.

    loss = −Σ_ij log σ(z_ij · (scale · a_i·b_j + bias)) / B, with z_ij = 1 on matching pairs and −1
    elsewhere. Across ranks the text side travels around a ring (world − 1 hops, one neighbour at a
    time), so no rank ever holds every rank's features of both modalities.
    """

    def __init__(self, across_ranks: bool = True) -> None:
        super().__init__()
        self.across_ranks = across_ranks

    def forward(
        self,
        features_a: torch.Tensor,
        features_b: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features (B, D) each, logit_scale the multiplier, logit_bias a scalar → scalar loss."""
        if logit_bias is None:
            raise ValueError("the SigLIP loss needs a logit bias (model.loss: siglip creates one)")
        world = rank_and_world()[1] if self.across_ranks else 1
        loss = self._pair_loss(features_a, features_b, logit_scale, logit_bias, matching=True)
        others = features_b
        for _ in range(world - 1):
            others = ring_shift(others)
            loss = loss + self._pair_loss(features_a, others, logit_scale, logit_bias, matching=False)
        return loss / len(features_a)

    @staticmethod
    def _pair_loss(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, matching: bool
    ) -> torch.Tensor:
        logits = scale * a @ b.T + bias
        signs = -torch.ones_like(logits)
        if matching:
            signs += 2 * torch.eye(len(a), device=a.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum()


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross-entropy over the 2N views of the global batch.

    Row i of ``views_a`` and of ``views_b`` are two views of image i. Each of the 2N views is scored
    against the other 2N − 1 views of the global batch (cosine / temperature); its positive is the
    other view of its image, every other view a negative. Each rank scores its own 2B views against
    all 2N, gathered with autograd, and averages over them: after DDP's averaging, the mean over all
    2N, as one process computes it.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, views_a: torch.Tensor, views_b: torch.Tensor) -> torch.Tensor:
        """Unit-norm views (B, D) each → scalar loss."""
        rank = rank_and_world()[0]
        size = len(views_a)
        candidates = torch.cat([gather_with_grad(views_a), gather_with_grad(views_b)])  # (2N, D)
        logits = torch.cat([views_a, views_b]) @ candidates.T / self.temperature  # (2B, 2N)
        total = len(candidates) // 2
        own = torch.arange(size, device=views_a.device) + rank * size
        rows = torch.arange(2 * size, device=views_a.device)
        itself = torch.zeros_like(logits, dtype=torch.bool)
        itself[rows, torch.cat([own, own + total])] = True
        return F.cross_entropy(logits.masked_fill(itself, float("-inf")), torch.cat([own + total, own]))


def build_loss(name: str, *, local_loss: bool = False, across_ranks: bool = True) -> nn.Module:
    """The loss named by ``model.loss``; ``local_loss`` applies to InfoNCE. With ``across_ranks``
    false the loss sees only the features it is given (one process's evaluation of gathered features)."""
    if name == "infonce":
        return InfoNCELoss(local_loss=local_loss, across_ranks=across_ranks)
    if name == "siglip":
        return SigLIPLoss(across_ranks=across_ranks)
    raise ValueError(f"unknown loss {name!r}; available: infonce, siglip")
