"""Evaluation metrics on hand-built score matrices whose answers are known, and against
CLIP_benchmark's own metric functions where scores tie."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from sklearn.metrics import balanced_accuracy_score

from clipkit.eval.metrics import classification_metrics, image_text_retrieval, ranked_indices, recall_at_k
from clipkit.eval.zeroshot import zeroshot_accuracy


def clip_benchmark_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy()``: it converts a 1-element array with ``float()``, which
    numpy 2 refuses, so its top-k ranking is called here and the counting repeated as it does."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_retrieval(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor,
                             ks: tuple[int, ...]) -> dict[str, float]:
    """CLIP_benchmark's retrieval recall@k (its ``evaluate``'s counting, on given features)."""
    scores = texts @ images.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(scores)), text_to_image] = True
    metrics = {}
    for k in ks:
        by_text = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores, positives, 16, "cpu", k=k)
        by_image = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores.T, positives.T, 16, "cpu", k=k)
        metrics[f"image_retrieval_recall@{k}"] = (by_text > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (by_image > 0).float().mean().item()
    return metrics


def test_ranking_keeps_k_and_column_count():
    scores = torch.tensor([[0.5, 0.9, 0.8, 0.1], [0.2, 0.4, 0.3, 0.1]])
    assert ranked_indices(scores, 3).tolist() == [[1, 2, 0], [1, 2, 0]]
    assert ranked_indices(scores, 10).shape == (2, 4)  # k above the column count: every column


def test_retrieval_with_repeated_captions_ranks_ties_as_clip_benchmark():
    # 30 images, 3 captions each, drawn from only 8 distinct caption embeddings: many exact ties.
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    images = F.normalize(base[torch.randint(0, 8, (30,), generator=generator)]
                         + 0.3 * torch.randn(30, 16, generator=generator), dim=-1)
    texts = base[torch.randint(0, 8, (90,), generator=generator)]
    text_to_image = torch.arange(30).repeat_interleave(3)
    ours = image_text_retrieval(images, texts, text_to_image, ks=(1, 5, 10))
    assert ours == clip_benchmark_retrieval(images, texts, text_to_image, ks=(1, 5, 10))
    # The ties matter: the first of a top-10 is not the top-1 here, which a single ranking would use.
    scores = (texts @ images.T).T
    assert not torch.equal(torch.topk(scores, 10, dim=1).indices[:, :1], torch.topk(scores, 1, dim=1).indices)


def test_duplicate_class_names_tie_as_clip_benchmark():
    # 6 classes whose columns 1 and 4 are the same class name (ImageNet has two "crane"s): exact ties.
    generator = torch.Generator().manual_seed(1)
    classifier = F.normalize(torch.randn(16, 6, generator=generator), dim=0)
    classifier[:, 4] = classifier[:, 1]
    labels = torch.randint(0, 6, (200,), generator=generator)
    features = F.normalize(classifier.T[labels] + 0.6 * torch.randn(200, 16, generator=generator), dim=-1)
    logits = 100.0 * features @ classifier
    ours = classification_metrics(logits, labels, ks=(1, 5))
    acc1, acc5 = clip_benchmark_accuracy(logits, labels, topk=(1, 5))
    assert (ours.topk[1], ours.topk[5]) == (pytest.approx(acc1, abs=1e-6), pytest.approx(acc5, abs=1e-6))
    assert ours.mean_per_class_recall == pytest.approx(balanced_accuracy_score(labels, logits.argmax(dim=1)), abs=1e-6)


def test_classification_metrics_known_answers():
    # 3 classes; rows: true 0 predicted 0; true 0 predicted 1 (0 second); true 1 predicted 1;
    # true 2 predicted 0 (2 last).
    scores = torch.tensor([
        [0.9, 0.1, 0.0],
        [0.5, 0.6, 0.1],
        [0.1, 0.8, 0.2],
        [0.7, 0.3, 0.1],
    ])
    labels = torch.tensor([0, 0, 1, 2])
    metrics = classification_metrics(scores, labels, ks=(1, 2, 5))
    assert metrics.topk[1] == pytest.approx(2 / 4)
    assert metrics.topk[2] == pytest.approx(3 / 4)
    assert metrics.topk[5] == 1.0  # k larger than the classes: every class is in the top k
    assert metrics.per_class_recall == [pytest.approx(0.5), 1.0, 0.0]
    assert metrics.mean_per_class_recall == pytest.approx(0.5)
    assert (metrics.num_samples, metrics.num_classes) == (4, 3)


def test_absent_classes_are_left_out_of_the_mean():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.7, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0]])
    metrics = classification_metrics(scores, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert metrics.topk[1] == pytest.approx(2 / 3) and metrics.topk[2] == 1.0
    # Classes 2 and 3 have no sample: no recall, and left out of the mean (as balanced_accuracy_score).
    assert metrics.per_class_recall == [1.0, 0.5, None, None]
    assert metrics.mean_per_class_recall == pytest.approx(0.75)


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected scores"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0]))


def test_zeroshot_accuracy_uses_the_classifier():
    classifier = torch.eye(3)  # (D, C): class c is direction c
    features = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 0.3]]), dim=-1)
    result = zeroshot_accuracy(features, torch.tensor([0, 1, 2]), classifier)
    assert result.top1 == pytest.approx(2 / 3) and result.top5 == 1.0
    assert result.mean_per_class_recall == pytest.approx(2 / 3) and result.chance == pytest.approx(1 / 3)


def test_recall_at_k_with_several_positives():
    scores = torch.tensor([
        [0.9, 0.8, 0.1, 0.0],  # positives 1 and 3: rank 2 and 4
        [0.1, 0.2, 0.3, 0.4],  # positive 0: rank 4
    ])
    positives = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert recall_at_k(scores, positives, ks=(1, 2, 4, 10)) == {1: 0.0, 2: 0.5, 4: 1.0, 10: 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(scores, torch.zeros_like(positives), ks=(1,))


def test_image_text_retrieval_counts_like_clip_benchmark():
    # 2 images; image 0 has captions 0 and 1, image 1 has caption 2.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = F.normalize(torch.tensor([[1.0, 0.0], [0.2, 1.0], [0.0, 1.0]]), dim=-1)
    metrics = image_text_retrieval(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # Text queries: 0 → image 0 (hit), 1 → image 1 first (miss at 1), 2 → image 1 (hit).
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_retrieval_recall@2"] == 1.0
    # Image queries: image 0's best text is caption 0 (hit); image 1's best text is caption 2, tied
    # with nothing: hit. One of several captions in the top k is enough.
    assert metrics["text_retrieval_recall@1"] == 1.0
    assert metrics["text_retrieval_recall@2"] == 1.0
