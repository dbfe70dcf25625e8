"""Labelled features for the evaluations that learn from labels (k-NN, linear probe): a training and a
test set of one class list, embedded, and draws of a few labelled samples per class."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from clipkit.data.classes import read_classnames
from clipkit.eval.datasets import check_label_range, classification_data
from clipkit.eval.embed import Embedded, embed_batches
from clipkit.eval.encoders import Encoder


def embed_labelled(encoder: Encoder, dataset: str, *, modality: str, classnames: list[str] | None, split: str,
                   batch_size: int, num_workers: int, progress: bool, path_col: str | None,
                   label_col: str | None) -> tuple[Embedded, list[str]]:
    """One labelled dataset (as ``clipkit eval zeroshot`` reads it) embedded, with its "label" field
    checked against its class list → (embedded, class names)."""
    data = classification_data(dataset, encoder.eval_decoder(modality), classnames=classnames,
                               batch_size=batch_size, num_workers=num_workers, split=split, path_col=path_col,
                               label_col=label_col)
    embedded = embed_batches(encoder, modality, data.batches, keep=["label"], progress=progress)
    check_label_range(embedded.fields["label"], len(data.classnames), f"of {dataset}")
    return embedded, data.classnames


def embed_train_and_test(encoder: Encoder, train_dataset: str, test_dataset: str, *, modality: str,
                         classnames_file: str | Path | None, train_split: str, split: str, path_col: str | None,
                         label_col: str | None, batch_size: int, num_workers: int, progress: bool
                         ) -> tuple[Embedded, Embedded, list[str]]:
    """Both datasets embedded → (train, test, class names); they must name the same classes."""
    classnames = read_classnames(Path(classnames_file)) if classnames_file else None
    options = dict(modality=modality, classnames=classnames, batch_size=batch_size, num_workers=num_workers,
                   progress=progress, path_col=path_col, label_col=label_col)
    train, train_names = embed_labelled(encoder, train_dataset, split=train_split, **options)
    test, test_names = embed_labelled(encoder, test_dataset, split=split, **options)
    if train_names != test_names:
        raise ValueError(f"the training and test sets name their classes differently ({len(train_names)} and "
                         f"{len(test_names)} classes): give both one class list with --classnames")
    return train, test, train_names


def sample_shots(labels: torch.Tensor, shots: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Ascending indices of ``shots`` samples of each class, drawn at random without replacement.
    Raises ``ValueError`` naming the classes with fewer samples than that."""
    chosen, short = [], []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if len(members) < shots:
            short.append(f"{cls} ({len(members)})")
            continue
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    if short:
        raise ValueError(f"{shots}-shot draws need {shots} training samples of every class; these classes have "
                         f"fewer: {', '.join(short)}")
    return torch.cat(chosen).sort().values


def _labelled(encoder: Encoder, dataset: str, modality: str, classnames: list[str] | None, split: str,
              batch_size: int, num_workers: int, progress: bool, columns: dict[str, str | None]
              ) -> tuple[Embedded, list[str]]:
    data = classification_data(dataset, encoder.eval_decoder(modality), classnames=classnames,
                               batch_size=batch_size, num_workers=num_workers, split=split, **columns)
    embedded = embed_batches(encoder, modality, data.batches, keep=["label"], progress=progress)
    check_label_range(embedded.fields["label"], len(data.classnames), f"of {dataset}")
    return embedded, data.classnames


def few_shot_metrics(labels: torch.Tensor, shots: Sequence[int], num_classes: int, draws: int, seed: int,
                     accuracy: Callable[[torch.Tensor], float]) -> dict[str, float | list[float]]:
    """For each count n of ``shots``, ``draws`` draws of n training samples per class (from ``seed``),
    each scored by ``accuracy(rows)`` (the top-1 accuracy of a classifier that learns from those rows
    of the training set) → ``{n}_shot_acc1_mean``, ``_std`` (over draws) and ``_draws``."""
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, float | list[float]] = {}
    for n in shots:
        acc1 = torch.tensor([accuracy(sample_shots(labels, n, num_classes, generator)) for _ in range(draws)],
                            dtype=torch.float64)
        metrics[f"{n}_shot_acc1_mean"] = acc1.mean().item()
        metrics[f"{n}_shot_acc1_std"] = acc1.std(unbiased=False).item()
        metrics[f"{n}_shot_acc1_draws"] = acc1.tolist()
    return metrics
