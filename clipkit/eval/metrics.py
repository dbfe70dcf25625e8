"""Evaluation metrics over score matrices, counted the way CLIP_benchmark counts them.

Ranking is by score, highest first, with ``torch.topk`` called as CLIP_benchmark calls it (once for
the largest k in classification, once per k in retrieval), so that equal scores (repeated captions,
duplicate class names) break the same way and the numbers are the ones its tables hold; top-1 for
the per-class recall is ``argmax``, as its ``balanced_accuracy_score`` input is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def ranked_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, M) scores → (N, min(k, M)) column indices, best first, ties broken as ``torch.topk`` breaks them."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices


@dataclass(frozen=True)
class ClassificationMetrics:
    """Top-k accuracies, mean per-class recall (balanced accuracy) and each class's recall."""

    topk: dict[int, float]
    mean_per_class_recall: float
    # None for a class with no sample: its recall is undefined and it is left out of the mean.
    per_class_recall: list[float | None]
    num_samples: int
    num_classes: int


def classification_metrics(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> ClassificationMetrics:
    """scores (N, C) and true labels (N,) → metrics. A k above C counts as C (every class)."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    num_samples, num_classes = scores.shape
    if num_samples == 0:
        raise ValueError("no samples to evaluate")
    labels = labels.to(scores.device).long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min().item()}..{labels.max().item()}")
    ranked = ranked_indices(scores, max(ks))  # one top-k for all k, as CLIP_benchmark's accuracy()
    hits = ranked == labels[:, None]
    topk = {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}
    correct = (scores.argmax(dim=1) == labels).float()
    per_class: list[float | None] = []
    for cls in range(num_classes):
        mask = labels == cls
        per_class.append(correct[mask].mean().item() if mask.any() else None)
    present = [r for r in per_class if r is not None]
    return ClassificationMetrics(topk, sum(present) / len(present), per_class, num_samples, num_classes)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """scores (Q, G) of queries against a gallery, positives (Q, G) bool → {k: recall@k}.

    A query hits at k when any of its positives is among its k best gallery items.
    """
    if positives.shape != scores.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must match scores {tuple(scores.shape)}")
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive gallery item")
    positives = positives.to(scores.device)
    # One top-k per k, as CLIP_benchmark ranks: with ties, the first k of a top-10 are not always
    # the top-k (torch.topk breaks ties differently for different k).
    return {k: torch.gather(positives, 1, ranked_indices(scores, k)).any(dim=1).float().mean().item() for k in ks}


def image_text_retrieval(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways for images (I, D) with one or more captions each, texts (T, D), and the
    image index of each text (T,).

    ``image_retrieval_recall@k``: a text query hits if its own image is in the top k images.
    ``text_retrieval_recall@k``: an image query hits if any of its captions is in the top k texts.
    """
    text_scores = text_features @ image_features.T  # (T, I)
    positives = torch.zeros_like(text_scores, dtype=torch.bool)
    positives[torch.arange(len(text_to_image)), text_to_image.long()] = True
    by_text = recall_at_k(text_scores, positives, ks)
    by_image = recall_at_k(text_scores.T, positives.T, ks)
    return {
        **{f"image_retrieval_recall@{k}": value for k, value in by_text.items()},
        **{f"text_retrieval_recall@{k}": value for k, value in by_image.items()},
    }
