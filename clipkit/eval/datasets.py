"""Evaluation datasets: webdataset shards, a folder of class sub-folders, or a CSV, as batches.

Every kind yields the same batches as the training pipeline: ``{modality: (B, ...) tensor, "label":
(B,) int64 or "captions": list of caption lists, "num_skipped": scalar}``. Undecodable files are
skipped, counted and logged with their path, never fatal. Where the dataset is and which side files
it has is :mod:`clipkit.eval.layout`'s job.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipkit.data.captions import parse_captions
from clipkit.data.classes import class_folders, read_lines
from clipkit.data.pipeline import CLASS_LABEL_FIELD, ShardStream, build_loader, read_shards
from clipkit.errors import DataError
from clipkit.eval.layout import CLASSNAMES_FILE, DatasetLayout, resolve_dataset
from clipkit.modalities import FieldDecoder

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "filepath", "image", "file", "filename")


def decode_captions(data: bytes, rng: random.Random) -> list[str]:
    """A ``txt`` member holding one caption per line, or a JSON list of captions → a non-empty list."""
    captions = parse_captions(data.decode("utf-8"))
    if not captions:
        raise ValueError("no caption")
    return captions


CAPTIONS_FIELD = FieldDecoder("captions", ("txt",), decode_captions)


@dataclass(frozen=True)
class FileSample:
    """One file of a folder or CSV dataset with its label (class index) or its captions."""

    path: Path
    label: int | None = None
    captions: tuple[str, ...] = ()


class FileSamples(Dataset):
    """Files decoded with a :class:`FieldDecoder`; an undecodable file becomes None (skipped)."""

    def __init__(self, samples: Sequence[FileSample], decoder: FieldDecoder) -> None:
        self.samples = samples
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            value = self.decoder.decode(sample.path.read_bytes(), random.Random(index))
        except Exception as err:  # unreadable or corrupt files are counted, not fatal
            log.warning("skipping %s: %s: %s", sample.path, type(err).__name__, err)
            return None
        item: dict[str, Any] = {self.decoder.name: value}
        if sample.label is not None:
            item["label"] = torch.tensor(sample.label)
        if sample.captions:
            item["captions"] = list(sample.captions)
        return item


def collate_files(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"num_skipped": torch.tensor(len(items) - len(kept))}
    if kept:
        for key, first in kept[0].items():
            values = [item[key] for item in kept]
            batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return batch


def file_batches(samples: Sequence[FileSample], decoder: FieldDecoder, batch_size: int,
                 num_workers: int) -> Iterable[dict[str, Any]]:
    return DataLoader(FileSamples(samples, decoder), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_files)


def shard_batches(urls: Sequence[str], fields: Sequence[FieldDecoder], batch_size: int,
                  num_workers: int) -> Iterable[dict[str, Any]]:
    return build_loader(ShardStream(urls, fields, batch_size, train=False), num_workers)


def _matching_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    suffixes = {f".{ext}" for ext in extensions}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


@dataclass(frozen=True)
class ClassificationData:
    """A labelled dataset: its batches (a fresh iterable per pass) and its class names in index order."""

    batches: Iterable[dict[str, Any]]
    classnames: list[str]
    source: str


def check_label_range(labels: torch.Tensor, num_classes: int, names_from: str) -> None:
    """Raise ``ValueError`` when a label (N,) has no class name among ``num_classes`` (``names_from``
    says where the names came from)."""
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels run from {int(labels.min())} to {int(labels.max())} but there are only "
                         f"{num_classes} class names ({names_from})")


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def _column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], path: Path) -> str:
    for name in ([wanted] if wanted else candidates):
        if name in columns:
            return name
    raise ValueError(f"{path} has no {wanted or ' / '.join(candidates)} column; its columns: {', '.join(columns)}")


def _csv_labelled(path: Path, classnames: list[str] | None, path_col: str | None,
                  label_col: str | None) -> tuple[list[FileSample], list[str]]:
    """CSV rows (file path relative to the CSV, label = class index or class name) → samples."""
    rows, columns = _csv_rows(path)
    path_key = _column(columns, path_col, PATH_COLUMNS, path)
    label_key = _column(columns, label_col, ("label", "class", "cls"), path)
    labels = [row[label_key].strip() for row in rows]
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    if classnames is None:
        if numeric:
            raise ValueError(f"{path} labels are class indices: give the class names with --classnames")
        classnames = sorted(set(labels))
    index = {name: i for i, name in enumerate(classnames)}
    samples = []
    for row, label in zip(rows, labels):
        if not numeric and label not in index:
            raise ValueError(f"{path}: label {label!r} is not among the {len(classnames)} class names")
        samples.append(FileSample(path.parent / row[path_key], int(label) if numeric else index[label]))
    return samples, classnames


def _folder_labelled(root: Path, extensions: Sequence[str], classnames: list[str] | dict[str, str] | None
                     ) -> tuple[list[FileSample], list[str]]:
    """torchvision ImageFolder's layout: one sub-folder per class. Without class names the classes are
    the folder names in sorted order; with them, see :func:`match_class_folders`."""
    folders, labels, names = class_folders(root, classnames)
    samples = [FileSample(file, label) for label, folder in zip(labels, folders)
               for file in _matching_files(folder, extensions)]
    if not samples:
        raise ValueError(f"no {'/'.join(extensions)} files under {root}")
    return samples, names


def check_members(layout: DatasetLayout, field: FieldDecoder, how_to_add: str) -> None:
    """Fail at once, with what to do, when the first sample of the shards lacks ``field``'s member
    (rather than skip every sample with a warning each)."""
    first = next(iter(read_shards(layout.shards[:1])), None)
    if first is None:
        raise DataError(f"the first shard of {layout.spec} ({layout.shards[0]}) holds no readable sample")
    if not any(ext in first for ext in field.extensions):
        members = ", ".join(sorted(k for k in first if not k.startswith("__"))) or "none"
        raise DataError(f"the samples of {layout.spec} have no {'/'.join(field.extensions)} member "
                        f"(the first one, {first['__key__']}, has: {members}): {how_to_add}")


ADD_CLASS_LABELS = ("zero-shot classification needs a class index per sample (KEY.cls, as CLIP_benchmark "
                    "writes); make such shards with `clipkit make-shards --label-col COLUMN` from a CSV/JSONL "
                    "or `clipkit make-shards --class-folders` from a folder of class folders")


def classification_data(
    spec: str, decoder: FieldDecoder, *, classnames: list[str] | dict[str, str] | None = None,
    batch_size: int = 256, num_workers: int = 0, path_col: str | None = None, label_col: str | None = None,
    split: str = "test",
) -> ClassificationData:
    """Labelled batches of ``decoder``'s modality from shards (``cls`` per sample), a class-folder tree
    or a CSV. Class names: ``classnames`` if given (class folders are matched to them by name), else
    ``classnames.txt`` beside the shards or one folder up, the folder names, or the CSV's label
    strings (sorted)."""
    layout = resolve_dataset(spec, split)
    if layout.dataset_type in ("retrieval", "multilabel"):
        raise DataError(f"{spec} is a {layout.dataset_type} dataset (its dataset_type.txt says so): "
                        + ("evaluate it with `clipkit eval retrieval`" if layout.dataset_type == "retrieval"
                           else "multi-label classification is not supported"))
    if layout.kind == "shards":
        if isinstance(classnames, dict):
            raise ValueError("a folder → class name mapping applies to class folders; shards need class names "
                             "in class-index order")
        if classnames is None:
            found = layout.side_file(CLASSNAMES_FILE)
            if found is None:
                raise FileNotFoundError(f"no {CLASSNAMES_FILE} beside the shards of {spec} or one folder up: "
                                        "give the class names with --classnames")
            classnames = read_lines(found, "class names")
        check_members(layout, CLASS_LABEL_FIELD, ADD_CLASS_LABELS)
        batches = shard_batches(layout.shards, [decoder, CLASS_LABEL_FIELD], batch_size, num_workers)
        return ClassificationData(batches, classnames, spec)
    if layout.kind == "folder":
        samples, names = _folder_labelled(layout.folder, decoder.extensions, classnames)
    else:
        if isinstance(classnames, dict):
            raise ValueError("a folder → class name mapping applies to class folders, not to a CSV")
        samples, names = _csv_labelled(Path(spec), classnames, path_col, label_col)
    return ClassificationData(file_batches(samples, decoder, batch_size, num_workers), names, spec)


def _csv_captioned(path: Path, path_col: str | None, caption_col: str | None) -> list[FileSample]:
    """CSV rows of (file, captions); a file on several rows has the captions of all of them, and a
    cell may hold several (one per line, or a JSON list)."""
    rows, columns = _csv_rows(path)
    path_key = _column(columns, path_col, PATH_COLUMNS, path)
    caption_key = _column(columns, caption_col, ("caption", "captions", "text", "txt"), path)
    captions: dict[str, list[str]] = {}
    for row in rows:
        # An empty caption cell adds nothing to its file.
        captions.setdefault(row[path_key], []).extend(parse_captions(row[caption_key] or ""))
    return [FileSample(path.parent / name, captions=tuple(texts)) for name, texts in captions.items() if texts]


def retrieval_batches(
    spec: str, decoder: FieldDecoder, *, batch_size: int = 256, num_workers: int = 0,
    path_col: str | None = None, caption_col: str | None = None, split: str = "test",
) -> Iterable[dict[str, Any]]:
    """Batches of items with their captions (``captions``: a list of lists) from shards or a CSV."""
    layout = resolve_dataset(spec, split)
    if layout.kind == "shards":
        check_members(layout, CAPTIONS_FIELD, "retrieval needs the captions of each sample in KEY.txt "
                                               "(one per line, or a JSON list)")
        return shard_batches(layout.shards, [decoder, CAPTIONS_FIELD], batch_size, num_workers)
    if layout.kind == "csv":
        samples = _csv_captioned(Path(spec), path_col, caption_col)
        if not samples:
            raise ValueError(f"{spec} has no captioned rows")
        return file_batches(samples, decoder, batch_size, num_workers)
    raise ValueError(f"retrieval datasets are webdataset shards or a CSV of path,caption; got the folder {spec}")
