"""``clipkit eval linear-probe``: logistic regression on frozen features, by CLIP_benchmark's protocol
(``clip_benchmark.metrics.linear_probe``), so that its numbers are CLIP_benchmark's on the same features.

A linear layer on the unit-norm features is trained with AdamW (lr 0.1, 10 epochs, batches of 64, a
cosine schedule, seeded) for each weight decay of a sweep: 7 values from 1e-6 to 1e2, then a binary
refinement on a 97-value log grid, each scored by top-1 accuracy on a validation split. The best decay
trains the final probe on training + validation samples (with ``--shots``, on the few-shot samples
alone, as CLIP_benchmark does), which classifies the test set. Without a validation split the decay is
0 and the probe trains on the training set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipkit.eval.benchmark import EvalReport, classification_report
from clipkit.eval.encoders import Encoder, encoder_device
from clipkit.eval.labelled import embed_labelled, embed_train_and_test, few_shot_metrics

LR = 0.1
EPOCHS = 10
BATCH_SIZE = 64
VAL_PROPORTION = 0.2
DEFAULT_DRAWS = 5
# CLIP_benchmark's sweep (after CLIP's paper, A.3): a coarse pass over 7 decays, then binary refinement.
WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
COARSE_WEIGHT_DECAYS = np.logspace(-6, 2, num=7).tolist()
REFINE_SPAN = 8


@dataclass(frozen=True)
class ProbeSettings:
    """How each probe trains: CLIP_benchmark's defaults."""

    lr: float = LR
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    seed: int = 0


def shuffled_batches(count: int, batch_size: int) -> list[torch.Tensor]:
    """One epoch's batches of row indices, in the order ``DataLoader(shuffle=True)`` draws them from
    torch's global generator: its iterator draws a worker base seed, its sampler a seed for the
    permutation. Indexing whole batches is far faster than the DataLoader's per-sample fetch and works
    on any device; the order stays CLIP_benchmark's, which its parity test needs."""
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, unused here
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                settings: ProbeSettings) -> nn.Linear:
    """A (D → num_classes) linear layer trained on features (N, D) with labels (N,), as CLIP_benchmark
    trains it; torch's global generator is seeded inside and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = nn.Linear(features.shape[1], num_classes).to(features.device)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=weight_decay)
        batches_per_epoch = -(-len(features) // settings.batch_size)
        total = settings.epochs * batches_per_epoch
        for epoch in range(settings.epochs):
            for index, rows in enumerate(shuffled_batches(len(features), settings.batch_size)):
                step = index + epoch * batches_per_epoch
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / total)) * settings.lr
                optimizer.zero_grad()
                rows = rows.to(features.device)
                F.cross_entropy(probe(features[rows]), labels[rows]).backward()
                optimizer.step()
    return probe


@torch.no_grad()
def top1(probe: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = probe(features).topk(1, dim=1).indices[:, 0]
    return (predicted == labels).float().sum().item() / len(labels)


def sweep_weight_decay(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                       num_classes: int, settings: ProbeSettings) -> float:
    """CLIP_benchmark's weight-decay search → the decay whose probe is most accurate on ``val``. A
    decay is trained once: training is deterministic, so a repeated one scores the same."""
    scores: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_score = 0, 0.0  # CLIP_benchmark's start: the first decay unless one scores above 0
        for index in candidates:
            if index not in scores:
                scores[index] = top1(train_probe(*train, num_classes, WEIGHT_DECAYS[index], settings), *val)
            if best_score < scores[index]:
                best, best_score = index, scores[index]
        return best

    best = peak([index for index, value in enumerate(WEIGHT_DECAYS) if value in COARSE_WEIGHT_DECAYS])
    span = REFINE_SPAN
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[best]


@dataclass(frozen=True)
class ProbeResult:
    logits: torch.Tensor  # (M, C) of the test set
    weight_decay: float


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
                 test_features: torch.Tensor, num_classes: int, settings: ProbeSettings = ProbeSettings(),
                 *, few_shot: bool = False) -> ProbeResult:
    """The protocol on features (N, D) and labels (N,): sweep on ``val``, train on train + val (on
    train alone when ``few_shot`` or without ``val``), classify the (M, D) test features."""
    if val is None:
        weight_decay, final = 0.0, train
    else:
        weight_decay = sweep_weight_decay(train, val, num_classes, settings)
        final = train if few_shot else (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    probe = train_probe(*final, num_classes, weight_decay, settings)
    with torch.no_grad():
        return ProbeResult(probe(test_features), weight_decay)


def split_validation(count: int, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending (train rows, validation rows) of ``count`` samples, ``proportion`` of them at random
    (from ``seed``) for validation."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = round(count * proportion)
    return order[held:].sort().values, order[:held].sort().values


def evaluate_linear_probe(
    encoder: Encoder, train_dataset: str, test_dataset: str, *, modality: str = "image",
    val_dataset: str | None = None, val_split: str = "val", val_proportion: float = VAL_PROPORTION,
    settings: ProbeSettings = ProbeSettings(), shots: Sequence[int] = (), draws: int = DEFAULT_DRAWS,
    classnames_file: str | Path | None = None, train_split: str = "train", split: str = "test",
    path_col: str | None = None, label_col: str | None = None, batch_size: int = 256, num_workers: int = 0,
    progress: bool = False,
) -> EvalReport:
    """A linear probe of ``encoder``'s frozen features: trained on ``train_dataset`` (its weight decay
    chosen on ``val_dataset``, or on ``val_proportion`` of the training samples held out; 0 for no
    sweep) and tested on ``test_dataset``, with all labels and with each ``shots`` count per class."""
    if any(n < 1 for n in shots) or draws < 1:
        raise ValueError(f"--shots takes counts ≥ 1 and --draws ≥ 1, got {list(shots)} and {draws}")
    if not 0 <= val_proportion < 1:
        raise ValueError(f"--val-proportion must be in [0, 1), got {val_proportion}")
    start = time.perf_counter()
    options = dict(modality=modality, path_col=path_col, label_col=label_col, batch_size=batch_size,
                   num_workers=num_workers, progress=progress)
    train, test, names = embed_train_and_test(encoder, train_dataset, test_dataset, classnames_file=classnames_file,
                                              train_split=train_split, split=split, **options)
    device = encoder_device(encoder)
    features, labels = train.features.to(device), train.fields["label"].long().to(device)
    skipped = train.num_skipped + test.num_skipped
    if val_dataset is not None:
        held, _ = embed_labelled(encoder, val_dataset, classnames=names, split=val_split, **options)
        val = (held.features.to(device), held.fields["label"].long().to(device))
        skipped += held.num_skipped
    elif val_proportion > 0:
        kept, held = (rows.to(device) for rows in split_validation(len(labels), val_proportion, settings.seed))
        val = (features[held], labels[held])
        features, labels = features[kept], labels[kept]
    else:
        val = None
    test_features, test_labels = test.features.to(device), test.fields["label"].long()
    num_classes = len(names)

    result = linear_probe((features, labels), val, test_features, num_classes, settings)
    metrics: dict[str, Any] = classification_report(result.logits.cpu(), test_labels, names)

    def few_shot_accuracy(rows: torch.Tensor) -> float:
        rows = rows.to(device)
        shot = linear_probe((features[rows], labels[rows]), val, test_features, num_classes, settings, few_shot=True)
        return classification_report(shot.logits.cpu(), test_labels, names)["acc1"]

    metrics.update(few_shot_metrics(labels.cpu(), shots, num_classes, draws, settings.seed, few_shot_accuracy))
    # Strings, so that the table does not print them as percentages as it does the other floats.
    details = {"classes": num_classes, "train_samples": len(labels), "val_samples": 0 if val is None else len(val[1]),
               "weight_decay": f"{result.weight_decay:.3g}", "lr": f"{settings.lr:g}", "epochs": settings.epochs,
               "draws": draws if shots else 0, "chance": 1 / num_classes}
    return EvalReport("linear_probe", encoder.name, test_dataset, modality, metrics, len(test_labels), skipped,
                      time.perf_counter() - start, details)
