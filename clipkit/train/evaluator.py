"""Evaluation during training: zero-shot classification on ``data.eval_shards``, retrieval recall and the
contrastive loss on ``data.val_shards``.

The metrics are computed by the same functions as ``clipkit eval zeroshot`` / ``clipkit eval retrieval``
and on the same decoding, so the figures logged at a step equal a later ``clipkit eval`` of that step's
checkpoint. In a torchrun job each rank embeds a contiguous block of the shards and every rank gathers
the blocks in rank order, which is the shards' own order: every rank checks them (so bad data stops all
ranks alike), rank 0 computes the metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed

from clipkit.config import DataConfig, ModelConfig
from clipkit.data.classes import read_lines
from clipkit.data.pipeline import CLASS_LABEL_FIELD
from clipkit.distributed import DistributedContext
from clipkit.errors import DataError
from clipkit.eval.benchmark import retrieval_metrics, zeroshot_metrics
from clipkit.eval.datasets import ADD_CLASS_LABELS, CAPTIONS_FIELD, check_members, shard_batches
from clipkit.eval.embed import Embedded, embed_batches
from clipkit.eval.layout import CLASSNAMES_FILE, TEMPLATES_FILE, DatasetLayout, resolve_dataset
from clipkit.eval.templates import resolve_templates
from clipkit.losses import build_loss
from clipkit.model import ContrastiveModel
from clipkit.modalities import FieldDecoder

# Metrics where lower is better; every other selectable metric is a rate where higher is.
LOWER_IS_BETTER = {"val_loss"}


@dataclass(frozen=True)
class _ZeroShotData:
    layout: DatasetLayout
    classnames: list[str]
    templates: list[str]


def _shards(spec: str, what: str) -> DatasetLayout:
    """The layout of evaluation shards named by config key ``what``; a folder or CSV is not shards."""
    try:
        layout = resolve_dataset(spec)
    except FileNotFoundError as err:
        raise DataError(f"{what}: {err}") from None
    if layout.kind != "shards":
        raise DataError(f"{what} must be webdataset shards (a .tar pattern or a folder of .tar), got {spec}")
    return layout


def _block(items: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s contiguous share of ``items``: the blocks of ranks 0, 1, … in order are ``items``."""
    start, stop = len(items) * rank // world_size, len(items) * (rank + 1) // world_size
    return list(items[start:stop])


class TrainingEvaluator:
    """Evaluates the model being trained on the held-out data the config names (every rank calls
    :meth:`evaluate` together; rank 0 gets the metrics).

    Everything that can be wrong with the data (missing shards, no class names, no labels, no
    captions) is found when the evaluator is built, before the first training step.
    """

    def __init__(self, data: DataConfig, model_config: ModelConfig, modality: str, dist: DistributedContext) -> None:
        self.modality = modality
        self.batch_size = data.batch_size
        self.dist = dist
        self.loss_fn = build_loss(model_config.loss, across_ranks=False)
        self.zeroshot: _ZeroShotData | None = None
        self.val: DatasetLayout | None = None
        if data.eval_shards:
            layout = _shards(data.eval_shards, "data.eval_shards")
            names_file = layout.side_file(CLASSNAMES_FILE)
            if names_file is None:
                raise DataError(f"data.eval_shards: no {CLASSNAMES_FILE} beside {data.eval_shards} or one folder "
                                "up; zero-shot evaluation needs the class names in class-index order")
            check_members(layout, CLASS_LABEL_FIELD, ADD_CLASS_LABELS)
            templates = resolve_templates(None, modality, layout.side_file(TEMPLATES_FILE))
            self.zeroshot = _ZeroShotData(layout, read_lines(names_file, "class names"), templates)
        if data.val_shards:
            self.val = _shards(data.val_shards, "data.val_shards")
            check_members(self.val, CAPTIONS_FIELD, "validation needs the captions of each sample in KEY.txt")

    @property
    def metric_names(self) -> list[str]:
        """What :meth:`evaluate` reports as numbers (the candidates for ``train.select_metric``); no
        acc5 below 5 classes, where it is None."""
        names = []
        if self.zeroshot:
            names = ["acc1", "acc5", "mean_per_class_recall"] if len(self.zeroshot.classnames) >= 5 else \
                ["acc1", "mean_per_class_recall"]
        if self.val:
            names += [f"{way}_retrieval_recall@{k}" for way in (self.modality, "text") for k in (1, 5, 10)]
            names.append("val_loss")
        return names

    def default_metric(self) -> str:
        """acc1 with zero-shot data, else recall@1 of text → item retrieval."""
        return "acc1" if self.zeroshot else f"{self.modality}_retrieval_recall@1"

    @torch.no_grad()
    def evaluate(self, model: ContrastiveModel) -> dict[str, Any] | None:
        """The metrics of ``model`` (in eval mode) now, on rank 0; None on the other ranks.

        Keys: acc1, acc5 (None below 5 classes), mean_per_class_recall, ``{modality}_retrieval_recall@k``
        and ``text_retrieval_recall@k`` for k = 1, 5, 10, val_loss, eval_skipped (undecodable held-out
        samples, summed over both sets) and eval_seconds. Data that cannot be evaluated (no decodable
        sample, a label beyond the class names) raises on every rank alike, so no rank is left waiting.
        """
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        skipped = 0
        decoder = model.eval_decoder(self.modality)
        if self.zeroshot is not None:
            embedded = self._embed(model, decoder, CLASS_LABEL_FIELD, self.zeroshot.layout)
            labels, names = embedded.fields["label"], self.zeroshot.classnames
            if int(labels.min()) < 0 or int(labels.max()) >= len(names):
                raise DataError(f"data.eval_shards: labels run from {int(labels.min())} to {int(labels.max())} "
                                f"but {self.zeroshot.layout.spec} has {len(names)} class names")
            skipped += embedded.num_skipped
            if self.dist.is_main:
                found, _ = zeroshot_metrics(model, embedded.features, labels, names, self.zeroshot.templates,
                                            self.batch_size)
                found.pop("per_class_recall")
                metrics.update(found)
        if self.val is not None:
            embedded = self._embed(model, decoder, CAPTIONS_FIELD, self.val)
            skipped += embedded.num_skipped
            if self.dist.is_main:
                captions = embedded.fields["captions"]
                metrics.update(retrieval_metrics(model, embedded.features, captions, self.modality, self.batch_size))
                metrics["val_loss"] = self._val_loss(model, embedded.features, [c[0] for c in captions])
        if not self.dist.is_main:
            return None
        metrics["eval_skipped"] = skipped
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics

    def _embed(self, model: ContrastiveModel, decoder: FieldDecoder, labels: FieldDecoder,
               layout: DatasetLayout) -> Embedded:
        """Every sample of ``layout``'s shards, embedded (N, D) in shard order, with ``labels``' field:
        each rank embeds its block, and every rank gets all blocks back (so every rank can check them)."""
        share = _block(layout.shards, self.dist.rank, self.dist.world_size)
        batches = shard_batches(share, [decoder, labels], self.batch_size, num_workers=0) if share else []
        parts = [embed_batches(model, self.modality, batches, keep=[labels.name], allow_empty=True)]
        if self.dist.is_distributed:
            mine, parts = parts[0], [None] * self.dist.world_size
            torch.distributed.all_gather_object(parts, mine)
        skipped = sum(part.num_skipped for part in parts)
        found = [part for part in parts if len(part.features)]
        if not found:
            raise DataError(f"no decodable sample in the evaluation shards {layout.spec} ({skipped} skipped; "
                            "the warnings above say why)")
        values = [part.fields[labels.name] for part in found]
        kept = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
        return Embedded(torch.cat([part.features for part in found]), {labels.name: kept}, skipped)

    def _val_loss(self, model: ContrastiveModel, features: torch.Tensor, captions: list[str]) -> float:
        """The training loss over the validation pairs: item features (N, D) against the embeddings of
        their first captions (N strings), in consecutive batches of ``data.batch_size``, weighted by
        batch size."""
        device = model.logit_scale.device
        scale, bias = model.logit_scale.exp(), model.logit_bias
        total = 0.0
        for start in range(0, len(captions), self.batch_size):
            items = features[start:start + self.batch_size].to(device)
            texts = model.encode_text(model.tokenize(captions[start:start + self.batch_size])).float()
            total += float(self.loss_fn(items, texts, scale, bias)) * len(items)
        return total / len(captions)


def build_evaluator(data: DataConfig, model: ModelConfig, dist: DistributedContext) -> TrainingEvaluator | None:
    """The evaluator for the held-out data the config names (None without any): zero-shot and retrieval
    of the trained pair's non-text modality against the model's text tower (the unlocked one when a
    tower is bound to a locked one, ImageBind-style: audio trained against locked images is evaluated
    on audio)."""
    if not data.eval_shards and not data.val_shards:
        return None
    pair = model.modalities[:2]
    if "text" not in model.modalities:
        raise DataError("data.eval_shards / data.val_shards are evaluated against a text tower, and "
                        f"model.modalities ({', '.join(model.modalities)}) has none")
    if data.val_shards and "text" not in pair:
        raise DataError(f"data.val_shards holds item-caption pairs, but training aligns {pair[0]} with {pair[1]}")
    candidates = [name for name in pair if name != "text"]
    unlocked = [name for name in candidates if not getattr(model, name).lock]
    modality = (unlocked or candidates)[0]
    return TrainingEvaluator(data, model, modality, dist)


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (anything beats None)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def describe(record: dict[str, Any], modality: str) -> str:
    """One line of the metrics that are there, e.g. ``top-1 62.3%  top-5 95.1%  image→text R@1 …``."""
    parts = []
    labels = {"acc1": "top-1", "acc5": "top-5"}
    for key, label in labels.items():
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.1%}")
    for way, arrow in ((modality, f"text→{modality}"), ("text", f"{modality}→text")):
        recalls = [record.get(f"{way}_retrieval_recall@{k}") for k in (1, 5, 10)]
        if recalls[0] is not None:
            parts.append(f"{arrow} R@1/5/10 " + "/".join(f"{r:.1%}" for r in recalls))
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.3f}")
    return "  ".join(parts)
