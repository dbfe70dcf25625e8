"""A CSV/TSV/JSONL table of image paths and captions named where shards are expected
(``data.train_shards``, ``data.val_shards``) → webdataset shards, converted once by make-shards'
own code and cached beside the table.

The cache is ``.TABLE.shards/`` in the table's folder: shards hold the images' bytes, so they belong
on the same disk as the data, are shared by every run and node that reads the table there, and an
edited table replaces its one cached copy instead of adding another. Image paths are relative to
the table's folder, as for ``clipkit make-shards``.

The cache is keyed by the table's SHA-256, the column settings and the size and modification time
of every image file the table names: an edited table, other columns, or an image replaced, added or
deleted under the same path rebuild it; an unchanged one is reused. One process converts while every other one (each
rank under torchrun) waits on an ``fcntl.flock`` in the cache folder and then reuses the result;
the record that marks the cache complete is written last, so no process reads a half-written cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clipkit.config import ConfigError, DataConfig
from clipkit.data.make_shards import MakeShardsError, make_shards, read_rows
from clipkit.data.shards import is_local
from clipkit.data.writer import shard_name, shard_pattern
from clipkit.errors import DataError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
# The usual column names (open_clip's csv dataset: filepath, title; img2dataset: image, caption).
USUAL_COLUMNS = {
    "image": ("image", "filepath", "path", "file", "filename"),
    "caption": ("caption", "captions", "title", "text"),
}
# Bump when the conversion changes what it writes, so caches made by older code rebuild.
CACHE_LAYOUT = 2
PREFIX = "shard"
RECORD_FILE = "table.json"  # written last: its presence with the current key marks a complete cache
LOCK_FILE = ".lock"
# Enough shards for every rank and data worker of a node to get some (8 GPUs × 8 workers), without
# going past make-shards' default shard size on big tables.
TARGET_SHARDS = 64
MAX_SAMPLES_PER_SHARD = 10_000


@dataclass(frozen=True)
class TableShards:
    """The cached shards of one table and how they came about."""

    table: Path
    cache_dir: Path
    num_rows: int
    num_shards: int
    num_samples: int
    skipped: dict[str, int]  # reason → rows
    converted: bool  # True: this process converted the table; False: it reused a finished conversion

    @property
    def pattern(self) -> str:
        """The brace pattern naming every shard, for ``data.train_shards``."""
        return shard_pattern(self.cache_dir, PREFIX, self.num_shards)

    def describe(self) -> str:
        """One line: what was converted or reused."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        if self.converted:
            return (f"converted {self.num_rows} rows of {self.table} into {self.num_shards} shards in "
                    f"{self.cache_dir} ({skipped} skipped{': ' + reasons if reasons else ''})")
        return (f"reusing shards in {self.cache_dir} ({self.num_samples} samples of {self.table}; "
                f"{skipped} of its {self.num_rows} rows skipped)")


def is_table(spec: str) -> bool:
    """Whether one ``::``-part of a shards setting names a table rather than shards."""
    return spec.lower().endswith(TABLE_SUFFIXES)


def cache_dir(table: Path) -> Path:
    return table.parent / f".{table.name}.shards"


def shards_for_tables(data: DataConfig, *, progress: bool = True) -> tuple[DataConfig, list[TableShards]]:
    """``data`` with each table in ``train_shards`` / ``val_shards`` replaced by its cached shards
    (converted first when there are none for its current content), and those tables' shards."""
    unknown = sorted(set(data.table_columns) - USUAL_COLUMNS.keys())
    if unknown:
        raise ConfigError(f"data.table_columns: unknown role {unknown[0]!r}; it maps "
                          f"{' and '.join(USUAL_COLUMNS)} to column names, e.g. {{image: filepath, caption: title}}")
    tables: list[TableShards] = []
    changes: dict[str, str] = {}
    for key in ("train_shards", "val_shards"):
        parts = []
        for part in getattr(data, key).split("::"):
            if is_table(part):
                if not is_local(part):
                    raise DataError(f"data.{key}: a table must be a local file, got {part}")
                tables.append(table_shards(Path(part), data.table_columns, progress=progress))
                part = tables[-1].pattern
            parts.append(part)
        changes[key] = "::".join(parts)
    return dataclasses.replace(data, **changes), tables


def table_shards(table: Path, columns: Mapping[str, str], *, progress: bool = True) -> TableShards:
    """The shards of ``table`` in its cache folder, converted unless a complete conversion of the same
    content and columns is there; waits while another process converts it."""
    if not table.is_file():
        raise DataError(f"table {table} does not exist")
    cache, key = cache_dir(table), _cache_key(table, columns)
    # Reuse needs no lock (so ranks do not queue, and a finished cache may be read-only): the record is
    # written last, atomically, and a converter removes it before it touches a shard.
    done = _read_record(cache, table, key)
    if done is not None:
        return done
    try:
        cache.mkdir(exist_ok=True)
        (cache / LOCK_FILE).touch()
    except OSError as err:
        raise DataError(f"cannot create the shard cache {cache} beside {table} ({err.strerror}): convert it "
                        f"with `clipkit make-shards --input {table} --out DIR` and train on the shards it "
                        "prints") from None
    with _exclusive(cache / LOCK_FILE, table):
        done = _read_record(cache, table, key)
        if done is not None:
            return done
        # A conversion that dies half-way must not leave a record that matches.
        (cache / RECORD_FILE).unlink(missing_ok=True)
        result = _convert(table, cache, columns, progress)
        _write_record(cache, key, result)
    return result


def _cache_key(table: Path, columns: Mapping[str, str]) -> dict[str, object]:
    digest = hashlib.sha256()
    with table.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"layout": CACHE_LAYOUT, "sha256": digest.hexdigest(), "columns": dict(sorted(columns.items())),
            "images": _image_files_digest(table, columns)}


def _image_files_digest(table: Path, columns: Mapping[str, str]) -> str | None:
    """SHA-256 over (path, size, mtime) of each image file the table names ("missing" for one that is
    not there): the shards hold copies of the images, so a file replaced under the same path must
    rebuild them. None when the table has no rows or no image column (its conversion then fails)."""
    try:
        rows = read_rows(table)
        image_col = _column(table, rows, "image", columns.get("image")) if rows else None
    except (MakeShardsError, DataError):
        return None
    if image_col is None:
        return None
    digest = hashlib.sha256()
    for row in rows:
        if not row.get(image_col):  # a row without an image names no file (not the table's folder)
            digest.update(b"\0none\n")
            continue
        path = table.parent / str(row[image_col])
        try:
            status = path.stat()
            digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


@contextmanager
def _exclusive(lock: Path, table: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (released when the file closes, also if the process dies)."""
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to convert %s", table)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_record(cache: Path, table: Path, key: dict[str, object]) -> TableShards | None:
    """The finished conversion recorded in ``cache`` for ``key``; None if there is none, it is for
    other content, or a shard of it is gone."""
    try:
        record = json.loads((cache / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        if record["key"] != key:
            return None
        shards = TableShards(table, cache, int(record["rows"]), int(record["shards"]), int(record["samples"]),
                             dict(record["skipped"]), converted=False)
    except (KeyError, TypeError, ValueError):  # not a record this code wrote: convert afresh
        return None
    if not all((cache / shard_name(PREFIX, i)).is_file() for i in range(shards.num_shards)):
        return None
    return shards


def _write_record(cache: Path, key: dict[str, object], shards: TableShards) -> None:
    record = {"key": key, "rows": shards.num_rows, "shards": shards.num_shards, "samples": shards.num_samples,
              "skipped": shards.skipped}
    staged = cache / f"{RECORD_FILE}.tmp"
    staged.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(staged, cache / RECORD_FILE)  # atomic: a reader sees no record or a whole one


def _convert(table: Path, cache: Path, columns: Mapping[str, str], progress: bool) -> TableShards:
    try:
        rows = read_rows(table)
        if not rows:
            raise DataError(f"table {table} holds no rows")
        image_col, caption_col = (_column(table, rows, role, columns.get(role)) for role in USUAL_COLUMNS)
        per_shard = min(MAX_SAMPLES_PER_SHARD, math.ceil(len(rows) / TARGET_SHARDS))
        result = make_shards(table, cache, prefix=PREFIX, samples_per_shard=per_shard,
                             workers=os.cpu_count() or 1, image_col=image_col, caption_col=caption_col,
                             progress=progress)
    except MakeShardsError as err:
        raise DataError(f"converting {table}: {err}") from None
    return TableShards(table, cache, result.num_inputs, len(result.shards), result.num_samples,
                       dict(result.skipped), converted=True)


def _column(table: Path, rows: list[dict[str, object]], role: str, given: str | None) -> str:
    """The column holding ``role`` (image or caption): ``given``, else the one usual name present."""
    present = sorted({name for row in rows for name in row if isinstance(name, str)})
    if given is not None:
        if given not in present:
            raise DataError(f"data.table_columns.{role} {given!r} is not a column of {table} "
                            f"(columns: {', '.join(present)})")
        return given
    found = [name for name in USUAL_COLUMNS[role] if name in present]
    if len(found) != 1:
        what = f"several {role} columns ({', '.join(found)})" if found else f"no {role} column"
        raise DataError(f"{table} has {what}: name it with data.table_columns.{role} "
                        f"(columns: {', '.join(present)})")
    return found[0]
