"""Evaluation metrics on hand-built score matrices whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.eval.metrics import classification_metrics, image_text_retrieval, ranked_indices, recall_at_k
from clipkit.eval.zeroshot import zeroshot_accuracy


def test_ties_rank_in_index_order():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2]])
    assert ranked_indices(scores, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert ranked_indices(scores, 10).shape == (2, 4)  # k above the column count: every column


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


def test_tied_scores_and_absent_classes():
    # Every score tied: the lowest class index wins, so only class-0 samples are right.
    scores = torch.zeros(3, 4)
    metrics = classification_metrics(scores, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert metrics.topk[1] == pytest.approx(1 / 3) and metrics.topk[2] == 1.0
    # Classes 2 and 3 have no sample: no recall, and left out of the mean.
    assert metrics.per_class_recall == [1.0, 0.0, None, None]
    assert metrics.mean_per_class_recall == pytest.approx(0.5)


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
