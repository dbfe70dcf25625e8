"""``clipkit eval zeroshot`` and ``clipkit eval retrieval``: a model and a dataset → a report.

Reports carry CLIP_benchmark's result fields (``dataset``, ``model``, ``task``, ``metrics``) and metric
names, plus the sample count, skipped samples and the time taken; they print as a small table.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clipkit.eval.classifier_cache import ClassifierCache
from clipkit.eval.confusion import confusion_matrix, save_confusion_png
from clipkit.data.classes import read_classnames
from clipkit.eval.datasets import check_label_range, classification_data, retrieval_batches
from clipkit.eval.embed import embed_batches, embed_texts
from clipkit.eval.encoders import Encoder
from clipkit.eval.layout import CLASSNAMES_FILE, TEMPLATES_FILE, resolve_dataset
from clipkit.eval.metrics import classification_metrics, image_text_retrieval
from clipkit.eval.templates import resolve_templates
from clipkit.eval.zeroshot import build_zeroshot_classifier

RETRIEVAL_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalReport:
    """One evaluation's result: what ``--output`` writes as JSON and the CLI prints as a table."""

    task: str
    model: str
    dataset: str
    modality: str
    metrics: dict[str, Any]
    num_samples: int
    num_skipped: int
    seconds: float
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A one-line summary, then the scalar metrics (and chance, for classification) as a table."""
        counts = ", ".join(f"{k} {v}" for k, v in self.details.items() if isinstance(v, int))
        header = (f"{self.task} of {self.num_samples} {self.modality} samples ({counts}; "
                  f"{self.num_skipped} skipped) in {self.seconds:.1f} s")
        values = {**self.metrics, **self.details}
        rows = [f"  {name:<28}{value:>7.1%}" for name, value in values.items() if isinstance(value, float)]
        files = [f"  {name}: {value}" for name, value in self.details.items() if isinstance(value, str)]
        return "\n".join([header, *rows, *files])

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def unique_names(classnames: list[str]) -> list[str]:
    """Class names as report keys: a name that occurs more than once (ImageNet has two "crane"s) gets
    its class index, ``crane [134]``, so that no class's figure is overwritten by another's."""
    counts = Counter(classnames)
    return [f"{name} [{i}]" if counts[name] > 1 else name for i, name in enumerate(classnames)]


def zeroshot_metrics(
    encoder: Encoder, features: torch.Tensor, labels: torch.Tensor, classnames: list[str], templates: list[str],
    batch_size: int = 256, cache: ClassifierCache | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Zero-shot metrics of unit-norm features (N, D) with labels (N,), and the scores (N, C) behind them."""
    classifier = build_zeroshot_classifier(encoder, classnames, templates, batch_size, cache)
    scores = features @ classifier
    return classification_report(scores, labels, classnames), scores


def classification_report(scores: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> dict[str, Any]:
    """acc1, acc5, mean and per-class recall of class scores (N, C) against labels (N,), by CLIP_benchmark's names."""
    result = classification_metrics(scores, labels, ks=(1, 5))
    return {
        "acc1": result.topk[1],
        # CLIP_benchmark reports no top-5 accuracy (NaN) below 5 classes, where every sample would hit.
        "acc5": result.topk[5] if len(classnames) >= 5 else None,
        "mean_per_class_recall": result.mean_per_class_recall,
        "per_class_recall": dict(zip(unique_names(classnames), result.per_class_recall)),
    }


def require_towers(encoder: Encoder, modality: str, task: str) -> None:
    """Zero-shot classification and retrieval compare ``modality`` with texts: a model without either
    tower (an image tower pretrained alone, say) is refused before any data is read."""
    missing = [name for name in (modality, "text") if name not in encoder.modalities]
    if missing:
        raise ValueError(f"{task} needs {modality} and text towers, and {encoder.name} has no {missing[0]} tower "
                         f"(its towers: {', '.join(encoder.modalities)}); judge a tower's features alone with "
                         "`clipkit eval knn` or `clipkit eval linear-probe`")


def retrieval_metrics(encoder: Encoder, features: torch.Tensor, captions: list[list[str]], modality: str,
                      batch_size: int = 256) -> dict[str, float]:
    """Recall@1/5/10 both ways between items (N, D) and their captions (one or more per item)."""
    texts = [text for item in captions for text in item]
    text_to_item = [i for i, item in enumerate(captions) for _ in item]
    text_features = embed_texts(encoder, texts, batch_size)
    metrics = image_text_retrieval(features, text_features, torch.tensor(text_to_item), RETRIEVAL_KS)
    if modality != "image":  # CLIP_benchmark's names say "image"; name the modality evaluated
        metrics = {name.replace("image", modality): value for name, value in metrics.items()}
    return metrics


def evaluate_zeroshot(
    encoder: Encoder,
    dataset: str,
    *,
    modality: str = "image",
    classnames_file: str | Path | None = None,
    templates: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    cache: ClassifierCache | None = None,
    confusion_png: str | Path | None = None,
    path_col: str | None = None,
    label_col: str | None = None,
    split: str = "test",
    progress: bool = False,
) -> EvalReport:
    """Zero-shot classification of every sample of ``dataset`` (shards, class folders or a CSV).

    Class names come from ``classnames_file`` or the dataset (see
    :func:`~clipkit.eval.datasets.classification_data`); templates from ``templates`` (a file or a
    built-in set), else ``zeroshot_classification_templates.txt`` beside the data or one folder up
    (CLIP_benchmark's layout), else the modality's built-in set.
    """
    require_towers(encoder, modality, "zero-shot classification")
    start = time.perf_counter()
    layout = resolve_dataset(dataset, split)
    classnames = read_classnames(Path(classnames_file)) if classnames_file else None
    data = classification_data(dataset, encoder.eval_decoder(modality), classnames=classnames,
                               batch_size=batch_size, num_workers=num_workers, path_col=path_col,
                               label_col=label_col, split=split)
    template_list = resolve_templates(templates, modality, layout.side_file(TEMPLATES_FILE))
    embedded = embed_batches(encoder, modality, data.batches, keep=["label"], progress=progress)
    labels = embedded.fields["label"]
    num_classes = len(data.classnames)
    check_label_range(labels, num_classes, f"from {classnames_file or layout.side_file(CLASSNAMES_FILE)}")
    metrics, scores = zeroshot_metrics(encoder, embedded.features, labels, data.classnames, template_list,
                                       batch_size, cache)
    details: dict[str, Any] = {"classes": num_classes, "templates": len(template_list),
                               "chance": 1 / num_classes}
    if confusion_png:
        matrix = confusion_matrix(scores, labels)
        details["confusion_matrix"] = str(save_confusion_png(
            matrix, data.classnames, confusion_png, title=f"{encoder.name} on {dataset}: top-1 {metrics['acc1']:.1%}"))
    return EvalReport("zeroshot_classification", encoder.name, dataset, modality, metrics, len(labels),
                      embedded.num_skipped, time.perf_counter() - start, details)


def evaluate_retrieval(
    encoder: Encoder,
    dataset: str,
    *,
    modality: str = "image",
    batch_size: int = 256,
    num_workers: int = 0,
    path_col: str | None = None,
    caption_col: str | None = None,
    split: str = "test",
    progress: bool = False,
) -> EvalReport:
    """Item↔text retrieval recall@1/5/10 over items with one or more captions each.

    A text query hits when its own item is in the top k; an item query hits when any of its captions
    is (CLIP_benchmark's counting).
    """
    require_towers(encoder, modality, "retrieval")
    start = time.perf_counter()
    batches = retrieval_batches(dataset, encoder.eval_decoder(modality), batch_size=batch_size,
                                num_workers=num_workers, path_col=path_col, caption_col=caption_col, split=split)
    embedded = embed_batches(encoder, modality, batches, keep=["captions"], progress=progress)
    captions: list[list[str]] = embedded.fields["captions"]
    metrics = retrieval_metrics(encoder, embedded.features, captions, modality, batch_size)
    details = {"texts": sum(map(len, captions))}
    return EvalReport("zeroshot_retrieval", encoder.name, dataset, modality, metrics, len(captions),
                      embedded.num_skipped, time.perf_counter() - start, details)
