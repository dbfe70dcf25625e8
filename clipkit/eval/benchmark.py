"""``clipkit eval zeroshot``: a checkpoint, labelled webdataset shards → metrics as JSON and a table.

The dataset layout is CLIP_benchmark's webdataset one: each sample has its input (``jpg``, ...) and a
``cls`` class index, with ``classnames.txt`` (one name per line, in class-index order) and
``zeroshot_classification_templates.txt`` (one template with ``{}`` per line) beside the shards.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.data.pipeline import CLASS_LABEL_FIELD, expand_shards
from clipkit.eval.embed import embed_shards
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.zeroshot import build_zeroshot_classifier
from clipkit.modalities import get_modality
from clipkit.train.checkpoint import load_model

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file, with an error naming the file and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no {what}")
    return lines


@dataclass(frozen=True)
class ZeroShotReport:
    """What ``clipkit eval zeroshot`` writes: CLIP_benchmark's result fields and metric names."""

    model: str
    dataset: str
    modality: str
    metrics: dict[str, Any]
    num_samples: int
    num_classes: int
    num_templates: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"task": "zeroshot_classification", **self.__dict__}

    def table(self) -> str:
        """The headline metrics as a small aligned table."""
        rows = [("acc1", self.metrics["acc1"]), ("acc5", self.metrics["acc5"]),
                ("mean_per_class_recall", self.metrics["mean_per_class_recall"]),
                ("chance", 1 / self.num_classes)]
        header = (f"zero-shot classification of {self.num_samples} {self.modality} samples, "
                  f"{self.num_classes} classes x {self.num_templates} templates ({self.seconds:.0f} s)")
        return "\n".join([header, *(f"  {name:<24}{value:>7.1%}" for name, value in rows)])


def evaluate_zeroshot(
    checkpoint: str | Path,
    shards: str,
    *,
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    modality: str = "image",
    batch_size: int = 256,
    num_workers: int = 0,
) -> ZeroShotReport:
    """Zero-shot classification of every sample of ``shards`` with a clipkit checkpoint.

    Class names and templates default to the CLIP_benchmark files beside the first shard.
    """
    start = time.perf_counter()
    urls = expand_shards(shards)
    folder = Path(urls[0]).parent
    classnames = read_lines(Path(classnames_file or folder / CLASSNAMES_FILE), "class names")
    templates = read_lines(Path(templates_file or folder / TEMPLATES_FILE), "prompt templates")
    model, config = load_model(checkpoint)
    features, fields = embed_shards(
        model, get_modality(modality, config.model), urls, batch_size=batch_size,
        extra_fields=[CLASS_LABEL_FIELD], num_workers=num_workers,
    )
    classifier = build_zeroshot_classifier(model, classnames, templates)
    result = classification_metrics(features @ classifier, fields["label"], ks=(1, 5))
    metrics = {
        "acc1": result.topk[1],
        "acc5": result.topk[5],
        "mean_per_class_recall": result.mean_per_class_recall,
        "per_class_recall": dict(zip(classnames, result.per_class_recall)),
    }
    return ZeroShotReport(str(checkpoint), shards, modality, metrics, result.num_samples, len(classnames),
                          len(templates), time.perf_counter() - start)


def write_report(report: ZeroShotReport, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2))
