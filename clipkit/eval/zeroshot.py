"""Zero-shot classification: class names × prompt templates → text classifier → argmax over classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from clipkit.model import ContrastiveModel


@torch.no_grad()
def build_zeroshot_classifier(
    model: ContrastiveModel, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Class weights (embed_dim, num_classes): per class, the normalised mean of its normalised
    template embeddings (CLIP's prompt ensembling). Templates hold ``{}`` for the class name."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = torch.cat(
        [model.encode_text(model.tokenize(prompts[i : i + batch_size])) for i in range(0, len(prompts), batch_size)]
    )
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


@dataclass(frozen=True)
class ZeroShotResult:
    top1: float
    top5: float
    num_samples: int
    num_classes: int

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


def zeroshot_accuracy(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> ZeroShotResult:
    """Top-1/top-5 accuracy of unit-norm features (N, D) with true labels (N,) under classifier (D, C)."""
    if len(features) == 0:
        raise ValueError("zero-shot evaluation got no samples")
    k = min(5, classifier.shape[1])
    topk = (features.to(classifier) @ classifier).topk(k, dim=-1).indices
    hits = topk == labels.to(topk.device)[:, None]
    return ZeroShotResult(
        top1=hits[:, 0].float().mean().item(),
        top5=hits.any(dim=-1).float().mean().item(),
        num_samples=len(labels),
        num_classes=classifier.shape[1],
    )
