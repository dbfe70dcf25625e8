"""Evaluation datasets: webdataset shards, a folder of class sub-folders, or a CSV, as batches.

Every kind yields the same batches as the training pipeline: ``{modality: (B, ...) tensor, "label":
(B,) int64 or "captions": list of caption lists, "num_skipped": scalar}``. Undecodable files are
skipped, counted and logged with their path, never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipkit.data.pipeline import CLASS_LABEL_FIELD, ShardStream, build_loader, expand_shards
from clipkit.modalities import FieldDecoder

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
PATH_COLUMNS = ("path", "filepath", "image", "file", "filename")


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file, with an error naming the file and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no {what}")
    return lines


def decode_captions(data: bytes, rng: random.Random) -> list[str]:
    """A ``txt`` member holding one caption, or a JSON list of captions → a non-empty list."""
    text = data.decode("utf-8").strip()
    captions: Any = [text]
    if text.startswith("["):
        try:
            captions = json.loads(text)
        except json.JSONDecodeError:
            pass  # a caption that merely starts with a bracket
    captions = [str(c).strip() for c in captions if str(c).strip()]
    if not captions:
        raise ValueError("no caption")
    return captions


CAPTIONS_FIELD = FieldDecoder("captions", ("txt",), decode_captions)


def dataset_kind(spec: str) -> str:
    """``shards`` (a brace pattern or a folder of .tar files), ``folder`` (class sub-folders) or ``csv``."""
    path = Path(spec)
    if spec.endswith((".csv", ".tsv")):
        return "csv"
    if ".tar" in spec:
        return "shards"
    if path.is_dir():
        return "shards" if any(path.glob("*.tar")) else "folder"
    raise FileNotFoundError(f"evaluation dataset not found: {spec} (a shard pattern, a folder or a .csv)")


def shard_urls(spec: str) -> list[str]:
    path = Path(spec)
    return sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_shards(spec)


def dataset_folder(spec: str) -> Path:
    """Where a dataset's side files (class names, templates) live."""
    if dataset_kind(spec) == "shards":
        return Path(shard_urls(spec)[0]).parent
    path = Path(spec)
    return path if path.is_dir() else path.parent


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


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
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


def _folder_labelled(root: Path, extensions: Sequence[str]) -> tuple[list[FileSample], list[str]]:
    """torchvision ImageFolder's layout: one sub-folder per class, classes in sorted folder order."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class sub-folders")
    samples = [FileSample(file, label) for label, folder in enumerate(folders)
               for file in _matching_files(folder, extensions)]
    if not samples:
        raise ValueError(f"no {'/'.join(extensions)} files under {root}")
    return samples, [folder.name.replace("_", " ") for folder in folders]


def classification_data(
    spec: str, decoder: FieldDecoder, *, classnames: list[str] | None = None, batch_size: int = 256,
    num_workers: int = 0, path_col: str | None = None, label_col: str | None = None,
) -> ClassificationData:
    """Labelled batches of ``decoder``'s modality from shards (``cls`` per sample), a class-folder tree
    or a CSV. Class names: ``classnames`` if given, else ``classnames.txt`` beside shards, folder
    names, or the CSV's label strings (sorted)."""
    kind = dataset_kind(spec)
    if kind == "shards":
        urls = shard_urls(spec)
        names = classnames or read_lines(Path(urls[0]).parent / CLASSNAMES_FILE, "class names")
        return ClassificationData(shard_batches(urls, [decoder, CLASS_LABEL_FIELD], batch_size, num_workers),
                                  names, spec)
    if kind == "folder":
        samples, names = _folder_labelled(Path(spec), decoder.extensions)
        if classnames is not None:
            if len(classnames) != len(names):
                raise ValueError(f"{len(classnames)} class names for {len(names)} class folders in {spec}")
            names = classnames
    else:
        samples, names = _csv_labelled(Path(spec), classnames, path_col, label_col)
    return ClassificationData(file_batches(samples, decoder, batch_size, num_workers), names, spec)


def _csv_captioned(path: Path, path_col: str | None, caption_col: str | None) -> list[FileSample]:
    """CSV rows of (file, caption); a file on several rows, or a JSON list cell, has several captions."""
    rows, columns = _csv_rows(path)
    path_key = _column(columns, path_col, PATH_COLUMNS, path)
    caption_key = _column(columns, caption_col, ("caption", "captions", "text", "txt"), path)
    captions: dict[str, list[str]] = {}
    for row in rows:
        try:
            cell = decode_captions(row[caption_key].encode("utf-8"), random.Random(0))
        except ValueError:
            continue  # an empty caption cell adds nothing to its file
        captions.setdefault(row[path_key], []).extend(cell)
    return [FileSample(path.parent / name, captions=tuple(texts)) for name, texts in captions.items()]


def retrieval_batches(
    spec: str, decoder: FieldDecoder, *, batch_size: int = 256, num_workers: int = 0,
    path_col: str | None = None, caption_col: str | None = None,
) -> Iterable[dict[str, Any]]:
    """Batches of items with their captions (``captions``: a list of lists) from shards or a CSV."""
    kind = dataset_kind(spec)
    if kind == "shards":
        return shard_batches(shard_urls(spec), [decoder, CAPTIONS_FIELD], batch_size, num_workers)
    if kind == "csv":
        samples = _csv_captioned(Path(spec), path_col, caption_col)
        if not samples:
            raise ValueError(f"{spec} has no captioned rows")
        return file_batches(samples, decoder, batch_size, num_workers)
    raise ValueError(f"retrieval datasets are webdataset shards or a CSV of path,caption; got the folder {spec}")

