"""Zero-shot classification: class names × prompt templates → text classifier → argmax over classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from clipkit.eval.classifier_cache import ClassifierCache, classifier_key
from clipkit.eval.embed import embed_texts
from clipkit.eval.encoders import Encoder
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.templates import fill_template


@torch.no_grad()
def build_zeroshot_classifier(
    model: Encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256,
    cache: ClassifierCache | None = None,
) -> torch.Tensor:
    """Class weights (embed_dim, num_classes): per class, the normalised mean of its normalised
    template embeddings (CLIP's prompt ensembling). Templates hold ``{}`` or ``{c}`` for the class name.

    With a ``cache``, a classifier already built for these weights, class names and templates is
    read back instead of encoding ``len(classnames) * len(templates)`` prompts again.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    key = classifier_key(model, classnames, templates) if cache is not None else ""
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    embeddings = embed_texts(model, prompts, batch_size)
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    classifier = F.normalize(per_class, dim=-1).T.contiguous()
    if cache is not None:
        cache.put(key, classifier)
    return classifier


@dataclass(frozen=True)
class ZeroShotResult:
    top1: float
    top5: float | None  # None below 5 classes, as CLIP_benchmark reports it
    mean_per_class_recall: float
    num_samples: int
    num_classes: int

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


def zeroshot_accuracy(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> ZeroShotResult:
    """Top-1/top-5 accuracy and mean per-class recall of unit-norm features (N, D) with true labels
    (N,) under classifier (D, C); with fewer than 5 classes top-5 counts every class."""
    metrics = classification_metrics(features.to(classifier) @ classifier, labels, ks=(1, 5))
    return ZeroShotResult(
        top1=metrics.topk[1],
        top5=metrics.topk[5],
        mean_per_class_recall=metrics.mean_per_class_recall,
        num_samples=metrics.num_samples,
        num_classes=metrics.num_classes,
    )
