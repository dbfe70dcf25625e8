"""Raw image–caption data (a folder with sidecar captions, a CSV/TSV or a JSONL file) or labelled
images (a folder of class folders, or a label column) → webdataset shards.

The output is img2dataset's layout, written by :class:`~clipkit.data.writer.ShardWriter`:
``PREFIX-NNNNNN.tar`` holding ``KEY.jpg|png|webp`` (the original image bytes), ``KEY.txt`` (the
captions, one per line: :mod:`clipkit.data.captions`), ``KEY.cls`` (the class index, for labelled
input, as CLIP_benchmark stores it) and ``KEY.json`` (key, caption, source path and any extra
metadata), with ``sizes.json`` (and for labelled input ``classnames.txt``) beside them. KEY is the
sample's index in the sorted input, so a skipped sample leaves a gap.

Input sample ``i`` always goes to chunk ``i // samples_per_shard``, and each chunk becomes one shard
written by one worker process, so the shards are byte-identical whatever the number of workers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import tempfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clipkit.data.captions import clean_captions, join_captions, parse_captions
from clipkit.data.classes import class_folders, read_classnames
from clipkit.data.writer import ShardWriter, shard_name, shard_pattern, update_sizes_index

log = logging.getLogger(__name__)

FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The member extension follows what the bytes are, not the file name, so decoders never guess wrong;
# these are the formats clipkit's image modality reads.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
CLASSNAMES_FILE = "classnames.txt"  # CLIP_benchmark's name, which `clipkit eval zeroshot` reads


class MakeShardsError(Exception):
    """An input that cannot be converted at all: unreadable, of an unknown kind, or a wrong column name."""


class SkipSample(Exception):
    """One sample that cannot be converted; ``reason`` is the category it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceSample:
    """One input pair before it is read: where its image is and where its caption comes from."""

    image: Path | None  # None: the row names no image
    source: str  # the image path as the input gives it, for KEY.json and the logs
    caption: str | list[Any] | None = None  # a CSV/JSONL caption field or JSONL list (None: the row has none)
    caption_file: Path | None = None  # a folder's sidecar x.txt, read instead of ``caption``
    metadata: dict[str, Any] = field(default_factory=dict)  # extra CSV/JSONL columns
    metadata_file: Path | None = None  # a folder's optional sidecar x.json
    label: int | None = None  # the class index of labelled input
    caption_required: bool = True  # labelled samples may have no caption


@dataclass(frozen=True)
class ChunkTask:
    """Input samples ``first_index ...`` that become shard ``shard_index``."""

    out_dir: Path
    prefix: str
    shard_index: int
    first_index: int
    samples: list[SourceSample]


@dataclass(frozen=True)
class ChunkResult:
    """What a worker reports back: its shard's sample count and the samples it skipped."""

    shard_index: int
    num_samples: int
    skipped: list[tuple[str, str, str]]  # (source, reason, detail)


@dataclass(frozen=True)
class InputSamples:
    """The input's samples in order and, for labelled input, its class names in class-index order."""

    samples: list[SourceSample]
    classnames: list[str] | None = None


@dataclass(frozen=True)
class MakeShardsResult:
    """The shards written (in order), how many input samples there were and why some were skipped."""

    out_dir: Path
    prefix: str
    shards: list[Path]
    num_inputs: int
    num_samples: int
    skipped: Counter[str]
    classnames: list[str] | None = None

    def shard_pattern(self) -> str:
        """A brace pattern naming every shard, e.g. ``out/train-{000000..000009}.tar``."""
        return shard_pattern(self.out_dir, self.prefix, len(self.shards))

    def summary(self) -> str:
        """The lines ``clipkit make-shards`` prints when it is done."""
        lines = [f"wrote {self.num_samples} samples in {len(self.shards)} shard(s) to {self.out_dir} "
                 f"(counts in sizes.json)"]
        if self.shards:
            lines.append(f"shards: {self.shard_pattern()}")
        if self.classnames is not None:
            lines.append(f"{len(self.classnames)} classes in {self.out_dir / CLASSNAMES_FILE} (class index "
                         f"per sample in KEY.cls): a zero-shot evaluation set for `clipkit eval zeroshot`")
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        lines.append(f"skipped {sum(self.skipped.values())} of {self.num_inputs} input samples"
                     + (f": {reasons}" if reasons else ""))
        return "\n".join(lines)


def list_samples(
    input_path: Path, image_col: str = "image", caption_col: str | None = None, label_col: str | None = None,
    classnames_file: Path | None = None, class_folders: bool = False,
) -> InputSamples:
    """The input's samples in a fixed order: a folder (sorted, recursive; with ``class_folders`` one
    sub-folder per class), a .csv/.tsv or a .jsonl file (with ``label_col``, labelled by class name
    or class index)."""
    given = read_classnames(classnames_file) if classnames_file is not None else None
    if class_folders:
        if not input_path.is_dir():
            raise MakeShardsError(f"--class-folders needs a folder of class folders; {input_path} is not a folder")
        return _list_class_folders(input_path, given)
    if given is not None and label_col is None:
        raise MakeShardsError("--classnames applies to labelled input: add --label-col or --class-folders")
    if input_path.is_dir():
        if label_col is not None:
            raise MakeShardsError("--label-col applies to CSV/TSV/JSONL input; a folder of class folders takes "
                                  "--class-folders")
        return InputSamples(_list_folder(input_path))
    if not input_path.exists():
        raise MakeShardsError(f"input {input_path} does not exist")
    required = {"--image-col": image_col}
    if label_col is not None:
        required["--label-col"] = label_col
    if caption_col is not None or label_col is None:
        required["--caption-col"] = caption_col or "caption"
    rows = read_rows(input_path, required)
    labels, classnames = _row_labels(input_path, rows, label_col, given) if label_col else ([None] * len(rows), None)
    samples = [_row_sample(row, f"{input_path} row {number}", input_path.parent, image_col,
                           caption_col or "caption", label, label_col)
               for number, (row, label) in enumerate(zip(rows, labels), start=1)]
    return InputSamples(samples, classnames)


def read_rows(path: Path, required: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The rows of a .csv/.tsv or .jsonl file; ``required`` maps the option that names a column to
    the column name that must be there."""
    suffix = path.suffix.lower()
    if suffix in TABLE_DELIMITERS:
        return _read_table(path, TABLE_DELIMITERS[suffix], required or {})
    if suffix == ".jsonl":
        return _read_jsonl(path, required or {})
    raise MakeShardsError(f"input {path} is neither a folder nor a .csv, .tsv or .jsonl file")


def _row_labels(path: Path, rows: list[dict[str, Any]], label_col: str, given: list[str] | dict[str, str] | None
                ) -> tuple[list[int | None], list[str]]:
    """Each row's class index (None: no label) and the class names: a label column of class indices
    needs ``given`` names; class names index into ``given`` or, without it, into their sorted set."""
    if isinstance(given, dict):
        raise MakeShardsError("a folder → class name mapping applies to --class-folders; a label column takes a "
                              "list of class names")
    values = [str(row.get(label_col, "")).strip() for row in rows]
    present = [value for value in values if value]
    if present and all(value.lstrip("-").isdigit() for value in present):
        if given is None:
            raise MakeShardsError(f"the {label_col!r} column of {path} holds class indices: give the class "
                                  "names, one per line in index order, with --classnames")
        bad = sorted({v for v in present if not 0 <= int(v) < len(given)}, key=int)
        if bad:
            raise MakeShardsError(f"class indices {', '.join(bad[:5])} of {path} are outside the "
                                  f"{len(given)} class names of --classnames")
        return [int(v) if v else None for v in values], list(given)
    classnames = list(given) if given is not None else sorted(set(present))
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted(set(present) - index.keys())
    if unknown:
        raise MakeShardsError(f"labels {', '.join(map(repr, unknown[:5]))} of {path} are not among the "
                              f"{len(classnames)} class names of --classnames")
    return [index[v] if v else None for v in values], classnames


def _folder_images(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _folder_sample(image: Path, label: int | None = None) -> SourceSample:
    """An image of a folder with its sidecar caption (x.txt) and metadata (x.json, optional)."""
    metadata_file = image.with_suffix(".json")
    return SourceSample(
        image=image, source=str(image), caption_file=image.with_suffix(".txt"),
        metadata_file=metadata_file if metadata_file.is_file() else None,
        label=label, caption_required=label is None,
    )


def _list_folder(root: Path) -> list[SourceSample]:
    return [_folder_sample(image) for image in _folder_images(root)]


def _list_class_folders(root: Path, given: list[str] | dict[str, str] | None) -> InputSamples:
    """ImageNet's layout, ROOT/CLASS/**/x.jpg: classes are the sub-folders in sorted order, named by
    their folder names (``_`` read as a space) or matched by name to the given class names."""
    try:
        folders, labels, classnames = class_folders(root, given)
    except ValueError as err:
        raise MakeShardsError(str(err)) from err
    samples = [_folder_sample(image, label) for label, folder in zip(labels, folders)
               for image in _folder_images(folder)]
    return InputSamples(samples, classnames)


def _read_table(path: Path, delimiter: str, required: dict[str, str]) -> list[dict[str, Any]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would glue onto the
    # first column's name.
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = list(reader)
            columns = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MakeShardsError(f"cannot read {path}: {err}") from err
    if not columns:
        raise MakeShardsError(f"{path} has no header row")
    _check_columns(path, required, columns)
    return rows


def _read_jsonl(path: Path, required: dict[str, str]) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MakeShardsError(f"cannot read {path}: {err}") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MakeShardsError(f"{path} line {number} is not JSON: {err}") from err
        if not isinstance(row, dict):
            raise MakeShardsError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    # A key missing from some rows skips those samples; missing from every row, it is a wrong name.
    _check_columns(path, required, {key for row in rows for key in row})
    return rows


def _check_columns(path: Path, required: dict[str, str], columns: Collection[str]) -> None:
    """``required`` maps the option that names a column to the name it gave."""
    for option, name in required.items():
        if name not in columns:
            raise MakeShardsError(f"{option} {name!r} is not a column of {path} "
                                  f"(columns: {', '.join(sorted(map(str, columns))) or 'none'})")


def _row_sample(row: dict[str, Any], where: str, base: Path, image_col: str, caption_col: str,
                label: int | None = None, label_col: str | None = None) -> SourceSample:
    """A CSV/JSONL row as a sample; ``where`` names the row in logs when it has no image path."""
    image = row.get(image_col)
    caption = row.get(caption_col)
    metadata = {k: v for k, v in row.items() if k not in (image_col, caption_col, label_col)}
    caption = None if caption is None else caption if isinstance(caption, list) else str(caption)
    labelled = label_col is not None
    if labelled and label is None:
        return SourceSample(None, where, caption, metadata=metadata, caption_required=False)
    if not image:
        return SourceSample(None, where, caption, metadata=metadata, label=label, caption_required=not labelled)
    # Relative paths are relative to the table's folder, not to wherever the command runs.
    return SourceSample(base / str(image), str(image), caption, metadata=metadata, label=label,
                        caption_required=not labelled)


def read_sample(sample: SourceSample) -> tuple[str, bytes, list[str], dict[str, Any]]:
    """(image extension, original image bytes, captions, extra metadata); raises :class:`SkipSample`."""
    if sample.label is None and not sample.caption_required:
        raise SkipSample("missing label")
    captions = _read_captions(sample)  # before the image: it is far cheaper to reject
    extra = {**sample.metadata, **_read_metadata_file(sample)}
    ext, image = _read_image(sample)
    return ext, image, captions, extra


def _read_image(sample: SourceSample) -> tuple[str, bytes]:
    if sample.image is None:
        raise SkipSample("missing image", "no image path in the row")
    try:
        data = sample.image.read_bytes()
    except FileNotFoundError as err:
        raise SkipSample("missing image", f"no {sample.image}") from err
    except OSError as err:
        raise SkipSample("unreadable image", str(err)) from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated files pass open() and verify() alike
            image_format = img.format
    except UnidentifiedImageError as err:  # its message names a BytesIO object, not the file
        raise SkipSample("undecodable image", "not an image format Pillow knows") from err
    except Exception as err:  # Pillow raises many types for bad bytes; any of them means skip
        raise SkipSample("undecodable image", f"{type(err).__name__}: {err}") from err
    if image_format not in FORMAT_EXTENSIONS:
        raise SkipSample("unsupported image format", str(image_format))
    return FORMAT_EXTENSIONS[image_format], data


def _read_captions(sample: SourceSample) -> list[str]:
    """The sample's captions (a field holds one per line, or a JSON list); ``[]`` for a labelled sample
    without any."""
    caption = sample.caption
    if sample.caption_file is not None:
        try:
            caption = sample.caption_file.read_bytes().decode("utf-8")
        except FileNotFoundError as err:
            if not sample.caption_required:
                return []
            raise SkipSample("missing caption", f"no {sample.caption_file}") from err
        except UnicodeDecodeError as err:
            raise SkipSample("caption not UTF-8", f"{sample.caption_file}: {err}") from err
    if caption is None:
        if not sample.caption_required:
            return []
        raise SkipSample("missing caption")
    captions = clean_captions(caption) if isinstance(caption, list) else parse_captions(caption)
    if not captions and sample.caption_required:
        raise SkipSample("empty caption")
    return captions


def _read_metadata_file(sample: SourceSample) -> dict[str, Any]:
    if sample.metadata_file is None:
        return {}
    try:
        metadata = json.loads(sample.metadata_file.read_bytes())
    except (OSError, ValueError) as err:
        raise SkipSample("bad metadata json", f"{sample.metadata_file}: {err}") from err
    if not isinstance(metadata, dict):
        raise SkipSample("bad metadata json", f"{sample.metadata_file}: not a JSON object")
    return metadata


def convert_chunk(task: ChunkTask, report: Callable[[int], None]) -> ChunkResult:
    """Write the readable samples of one chunk as shard ``task.shard_index``; ``report(1)`` per sample."""
    skipped = []
    writer = ShardWriter(task.out_dir, task.prefix, len(task.samples),
                         first_shard=task.shard_index, write_sizes=False)
    with writer:
        for offset, sample in enumerate(task.samples):
            key = f"{task.first_index + offset:09d}"
            try:
                ext, image, captions, extra = read_sample(sample)
            except SkipSample as skip:
                skipped.append((sample.source, skip.reason, skip.detail))
            else:
                writer.write(key, sample_members(key, sample, ext, image, captions, extra))
            report(1)
    return ChunkResult(task.shard_index, writer.num_samples, skipped)


def sample_members(key: str, sample: SourceSample, ext: str, image: bytes, captions: list[str],
                   extra: dict[str, Any]) -> dict[str, bytes]:
    """The tar members of one sample: the image, its captions one per line, its class index, and
    KEY.json with ``caption`` (the first caption; ``captions`` too when there are several)."""
    meta: dict[str, Any] = {"key": key, "source": sample.source}
    members = {ext: image}
    if captions:
        meta["caption"] = captions[0]
        if len(captions) > 1:
            meta["captions"] = captions
        members["txt"] = join_captions(captions).encode()
    if sample.label is not None:
        meta["label"] = sample.label
        members["cls"] = str(sample.label).encode()
    meta.update((k, v) for k, v in extra.items() if k not in meta)
    members["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return members


_progress_queue: multiprocessing.Queue | None = None


def _init_worker(progress_queue: multiprocessing.Queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _convert_in_worker(task: ChunkTask) -> ChunkResult:
    assert _progress_queue is not None
    return convert_chunk(task, _progress_queue.put)


def make_shards(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    prefix: str = "train",
    samples_per_shard: int = 10_000,
    workers: int = 1,
    image_col: str = "image",
    caption_col: str | None = None,
    label_col: str | None = None,
    classnames_file: str | Path | None = None,
    class_folders: bool = False,
    progress: bool = True,
) -> MakeShardsResult:
    """Convert ``input_path`` into shards in ``out_dir``; bad samples are skipped, logged and counted.

    ``caption_col`` defaults to ``caption`` (required, unless the input is labelled); ``label_col``
    (CSV/JSONL) or ``class_folders`` make a labelled set: ``KEY.cls`` per sample and
    ``classnames.txt`` (see :func:`list_samples`). Shards of ``prefix`` left in ``out_dir`` by an
    earlier run are replaced, once the new ones are complete, so the folder holds one consistent set.
    Raises :class:`MakeShardsError` for an input that cannot be read at all, or of which no sample
    converts (the old shards then stay).
    """
    if samples_per_shard < 1 or workers < 1:
        raise MakeShardsError(f"--samples-per-shard and --workers must be at least 1, "
                              f"got {samples_per_shard} and {workers}")
    input_path, out_dir = Path(input_path), Path(out_dir)
    listed = list_samples(input_path, image_col, caption_col, label_col,
                          Path(classnames_file) if classnames_file is not None else None, class_folders)
    samples = listed.samples
    if not samples:
        raise MakeShardsError(f"input {input_path} holds no samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    # New shards are written beside the old ones and replace them only once every chunk is done and
    # some sample was converted: a failed or all-bad re-run leaves the earlier shards as they were.
    staging = Path(tempfile.mkdtemp(prefix=f".make-shards-{prefix}-", dir=out_dir))
    try:
        tasks = [ChunkTask(staging, prefix, i, start, samples[start : start + samples_per_shard])
                 for i, start in enumerate(range(0, len(samples), samples_per_shard))]
        results = _run_chunks(tasks, workers, len(samples), progress)
        skipped = Counter(reason for result in results for _, reason, _ in result.skipped)
        staged, sizes = _number_shards(staging, prefix, results)
        if not staged:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
            raise MakeShardsError(f"none of the {len(samples)} input samples could be converted ({reasons}); "
                                  f"the shards already in {out_dir} are left as they were")
        shards = _replace_shards(staging, out_dir, prefix, staged, sizes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if listed.classnames is not None:
        (out_dir / CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in listed.classnames), encoding="utf-8")
    return MakeShardsResult(out_dir, prefix, shards, len(samples), sum(sizes.values()), skipped, listed.classnames)


def _replace_shards(staging: Path, out_dir: Path, prefix: str, staged: list[Path], sizes: dict[str, int]) -> list[Path]:
    """Move the finished shards from ``staging`` into ``out_dir`` (each by an atomic rename over any
    old shard of its name), then delete the old ``PREFIX-NNNNNN.tar`` shards past them and record
    the counts; returns the shards' final paths."""
    shards = []
    for path in staged:
        os.replace(path, out_dir / path.name)
        shards.append(out_dir / path.name)
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?")
    stale = [p.name for p in sorted(out_dir.iterdir()) if pattern.fullmatch(p.name) and p.name not in sizes]
    for name in stale:
        (out_dir / name).unlink()
    update_sizes_index(out_dir, sizes, remove=stale)
    return shards


def _run_chunks(tasks: list[ChunkTask], workers: int, total: int, progress: bool) -> list[ChunkResult]:
    """Convert every chunk in a pool of ``workers`` processes, logging skipped samples as chunks finish."""
    results = []
    progress_queue: multiprocessing.Queue = multiprocessing.Queue()
    bar = tqdm(total=total, unit="sample", desc="make-shards", disable=not progress)
    with logging_redirect_tqdm(), bar, ProcessPoolExecutor(
        min(workers, len(tasks)), initializer=_init_worker, initargs=(progress_queue,)
    ) as pool:
        pending: set[Future[ChunkResult]] = {pool.submit(_convert_in_worker, task) for task in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                for source, reason, detail in result.skipped:
                    log.warning("skipped %s: %s%s", source, reason, f" ({detail})" if detail else "")
                results.append(result)
            _drain(progress_queue, bar)
        pool.shutdown()  # workers flush their last progress reports as they exit
        _drain(progress_queue, bar)
    return sorted(results, key=lambda r: r.shard_index)


def _drain(progress_queue: multiprocessing.Queue, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _number_shards(out_dir: Path, prefix: str, results: list[ChunkResult]) -> tuple[list[Path], dict[str, int]]:
    """Renumber shards past a chunk whose samples were all skipped, so the names stay contiguous.

    Returns the shard paths in order and their sample counts.
    """
    shards, sizes = [], {}
    for result in (r for r in results if r.num_samples):
        path = out_dir / shard_name(prefix, len(shards))
        if result.shard_index != len(shards):
            os.replace(out_dir / shard_name(prefix, result.shard_index), path)
        shards.append(path)
        sizes[path.name] = result.num_samples
    return shards, sizes
