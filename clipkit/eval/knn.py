"""``clipkit eval knn``: how well frozen features classify by their nearest labelled neighbours, with
all the labels or only a few per class (``--shots``: the semi-supervised setting).

The classifier is DINO's weighted k-NN (Caron et al., 2021, ``eval_knn.py``): each of a test sample's
``k`` most similar training features (cosine) votes for its class with weight ``exp(similarity / T)``;
k = 20 and T = 0.07 are DINO's defaults. With ``shots`` = n, each of ``draws`` random draws keeps n
training samples per class, and the report gives the mean and standard deviation over the draws.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from clipkit.eval.benchmark import EvalReport, classification_report
from clipkit.eval.encoders import Encoder
from clipkit.eval.labelled import embed_train_and_test, few_shot_metrics

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_DRAWS = 5
CHUNK = 1024  # test samples per similarity block: (CHUNK, N) floats at a time


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(M, C) class votes of (M, D) test features from (N, D) training features with (N,) labels;
    all features unit-norm. k above N counts as N."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be ≥ 1 and the temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, len(train_features))
    votes = torch.zeros(len(test_features), num_classes)
    for start in range(0, len(test_features), CHUNK):
        similarity = test_features[start:start + CHUNK] @ train_features.T
        top, at = similarity.topk(k, dim=1)
        votes[start:start + CHUNK].scatter_add_(1, train_labels[at], (top / temperature).exp())
    return votes


def evaluate_knn(
    encoder: Encoder, train_dataset: str, test_dataset: str, *, modality: str = "image", k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE, shots: Sequence[int] = (), draws: int = DEFAULT_DRAWS,
    seed: int = 0, classnames_file: str | Path | None = None, train_split: str = "train", split: str = "test",
    path_col: str | None = None, label_col: str | None = None, batch_size: int = 256, num_workers: int = 0,
    progress: bool = False,
) -> EvalReport:
    """Weighted k-NN of ``test_dataset``'s samples among ``train_dataset``'s (both labelled datasets of
    one class list, read as ``clipkit eval zeroshot`` reads them), with every training label and with
    each ``shots`` count per class (``draws`` draws from ``seed``)."""
    if any(n < 1 for n in shots) or draws < 1:
        raise ValueError(f"--shots takes counts ≥ 1 and --draws ≥ 1, got {list(shots)} and {draws}")
    start = time.perf_counter()
    train, test, train_names = embed_train_and_test(
        encoder, train_dataset, test_dataset, modality=modality, classnames_file=classnames_file,
        train_split=train_split, split=split, path_col=path_col, label_col=label_col, batch_size=batch_size,
        num_workers=num_workers, progress=progress)
    num_classes = len(train_names)
    train_labels, test_labels = train.fields["label"].long(), test.fields["label"].long()

    def accuracies(rows: torch.Tensor) -> dict[str, Any]:
        votes = knn_scores(train.features[rows], train_labels[rows], test.features, num_classes, k, temperature)
        return classification_report(votes, test_labels, train_names)

    metrics: dict[str, Any] = accuracies(torch.arange(len(train_labels)))
    metrics.update(few_shot_metrics(train_labels, shots, num_classes, draws, seed,
                                    lambda rows: accuracies(rows)["acc1"]))
    # A string, so that the table does not print it as a percentage as it does the other floats.
    details = {"classes": num_classes, "train_samples": len(train_labels), "k": k, "temperature": f"{temperature:g}",
               "draws": draws if shots else 0, "chance": 1 / num_classes}
    return EvalReport("knn_classification", encoder.name, test_dataset, modality, metrics, len(test_labels),
                      train.num_skipped + test.num_skipped, time.perf_counter() - start, details)
